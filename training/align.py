"""Stage 2: PreSafe alignment — LoRA on the reasoning model with SFT plus a pre-CoT decision loss.

Training data, per teacher record of the training split:

- the frozen decision classifier scores the prompt text (refuse probability ``p``);
- ``p >= threshold`` (the classifier's ``metrics.json``): **Path A**, the target is an immediate
  refusal — empty think block, then one of a few fixed refusal sentences;
- otherwise **Path B**, the target is the base model's own CoT-ON answer from the teacher file
  (self-distillation, so reasoning is kept).

Loss ``L = L_sft + λ·L_decision``. ``L_sft`` is the causal-LM loss on the target tokens only.
``L_decision``: the hidden states at the pre-CoT positions (assistant header through the opening
``<think>``, from :func:`service.core.cot.encode_example`) of the chosen deeper layers are averaged over
layers (and over positions for ``mean`` pooling), a trainable projector maps them to ``k``
pseudo-token embeddings of the frozen classifier, which reads ``[CLS] pseudo… [SEP]`` as
``inputs_embeds`` and returns a refuse logit; BCE against ``p``. Gradients pass through the frozen
classifier and the projector into the LoRA weights. The first ``projector_warmup_steps`` optimizer
steps run the LLM without gradients and train only the projector.

:class:`AlignTrainer` is a ``transformers.Trainer`` subclass (``compute_loss``), so ``accelerate
launch`` / ``torchrun`` work unchanged: the trained modules (LoRA, projector) and the frozen
classifier live in one :class:`PreSafeModel`, so DDP syncs the projector too. Checkpoints hold the
PEFT adapter and ``decision_head.safetensors``; ``resume_from_checkpoint`` restores both.

Output directory (written beside the target, then renamed into place):
``adapter/`` (a plain PEFT LoRA adapter that vLLM loads), ``decision_head/`` (projector weights and
config, kept out of the adapter), ``metrics.json``, ``log_history.jsonl``, ``config.json``.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from service.core.assets import AssetError, atomic_dir, resolve_model
from service.core.config import AlignConfig, ConfigError, ModelsConfig, PipelineConfig
from service.core.cot import (
    COT_ON_PREFILL,
    NoChatTemplateError,
    encode_example,
    get_chat_template,
    pre_cot_positions,
    render_prompt,
    template_text,
)
from service.core.formats import ADAPTER_CHAT_TEMPLATE, ADAPTER_WEIGHTS
from service.core.labels import COMPLY, REFUSE, refuse_class
from training.data import seeded_sample

HEAD_WEIGHTS = "decision_head.safetensors"
HEAD_CONFIG = "decision_head.json"
Log = Callable[[str], None]


class AlignError(RuntimeError):
    """Stage 2 cannot run with these inputs (no data, no template, missing classifier, …)."""


# --------------------------------------------------------------------------- models


def resolve_layers(spec: str | list[int], num_layers: int) -> list[int]:
    """Transformer blocks (1-based, as indices into ``hidden_states``) named by ``decision_layers``."""
    if spec == "all":
        return list(range(1, num_layers + 1))
    if spec in ("last_third", "last_half"):
        count = max(1, num_layers // (3 if spec == "last_third" else 2))
        return list(range(num_layers - count + 1, num_layers + 1))
    layers = []
    for layer in spec:
        resolved = layer if layer > 0 else num_layers + 1 + layer
        if not 1 <= resolved <= num_layers:
            raise ConfigError(f"align.decision_layers: layer {layer} is outside 1..{num_layers} "
                              f"(the base model has {num_layers} layers)")
        layers.append(resolved)
    return sorted(set(layers))


def torch_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_base_tokenizer(models: ModelsConfig):
    """The base model's tokenizer, with ``models.chat_template`` applied; an error if it has no template."""
    from transformers import AutoTokenizer

    path = resolve_model(models.base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    try:
        if models.chat_template:
            tokenizer.chat_template = template_text(models.chat_template)
        get_chat_template(tokenizer)
    except NoChatTemplateError as exc:
        given = f"models.chat_template: {exc}" if models.chat_template else (
            f"base model {models.base!r} has no chat template; set models.chat_template "
            f"(a .jinja file or the template text) in the config")
        raise AlignError(given) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class FrozenClassifier:
    """The stage 1 decision classifier, frozen: model, tokenizer and refuse threshold."""

    model: nn.Module
    tokenizer: Any
    threshold: float
    path: Path

    @property
    def hidden_size(self) -> int:
        return self.model.get_input_embeddings().embedding_dim


def refuse_index(config) -> int | None:
    """Which logit means *refuse*: ``None`` for a single-logit (sigmoid) head."""
    return None if config.num_labels == 1 else refuse_class(config.id2label)


def refuse_logit(logits: torch.Tensor, index: int | None) -> torch.Tensor:
    """log p(refuse) - log p(not refuse), from a sigmoid or softmax head."""
    if index is None:
        return logits[:, 0]
    others = torch.cat([logits[:, :index], logits[:, index + 1:]], dim=1)
    return logits[:, index] - torch.logsumexp(others, dim=1)


def load_classifier(path: Path | str, threshold: float | None = None) -> FrozenClassifier:
    """The stage 1 classifier dir (:func:`training.classifier.load_classifier`), frozen; ``threshold``
    overrides its ``metrics.json`` one."""
    from training.classifier import load_classifier as load_saved

    path = Path(path)
    tokenizer, model, saved_threshold = load_saved(path)
    model.float().requires_grad_(False)
    return FrozenClassifier(model, tokenizer, float(saved_threshold if threshold is None else threshold), path)


@torch.no_grad()
def classifier_probabilities(clf: FrozenClassifier, texts: Sequence[str], max_length: int = 128,
                             batch_size: int = 32) -> list[float]:
    """The frozen classifier's refuse probability for each prompt text."""
    device = next(clf.model.parameters()).device
    index = refuse_index(clf.model.config)
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        enc = clf.tokenizer(list(texts[start:start + batch_size]), truncation=True, max_length=max_length,
                            padding=True, return_tensors="pt").to(device)
        out.extend(torch.sigmoid(refuse_logit(clf.model(**enc).logits.float(), index)).tolist())
    return out


class DecisionHead(nn.Module):
    """Trainable projector: pooled LLM hidden states → pseudo-token embeddings of the classifier."""

    def __init__(self, llm_hidden: int, classifier_hidden: int, pooling: str = "mean", pseudo_tokens: int = 4,
                 kind: str = "mlp", hidden: int = 512):
        super().__init__()
        self.settings = {"llm_hidden": llm_hidden, "classifier_hidden": classifier_hidden, "pooling": pooling,
                         "pseudo_tokens": pseudo_tokens, "kind": kind, "hidden": hidden}
        self.pooling, self.k, self.out_dim = pooling, pseudo_tokens, classifier_hidden
        width = classifier_hidden * (pseudo_tokens if pooling == "mean" else 1)
        self.norm = nn.LayerNorm(llm_hidden)  # LLM residual streams have a few huge dimensions
        if kind == "linear":
            self.proj = nn.Linear(llm_hidden, width)
        else:
            self.proj = nn.Sequential(nn.Linear(llm_hidden, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``states`` B×P×d (layer-averaged), ``mask`` B×P → (embeddings B×K×e, attention mask B×K)."""
        states = self.norm(states.float())
        if self.pooling == "mean":
            weights = mask.unsqueeze(-1).float()
            pooled = (states * weights).sum(1) / weights.sum(1).clamp(min=1)
            embeds = self.proj(pooled).view(states.shape[0], self.k, self.out_dim)
            return embeds, torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.proj(states), mask.long()


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, per: str = "token") -> torch.Tensor:
    """Next-token cross-entropy on the target tokens (``labels`` != -100), averaged over every target
    token of the batch (``token``, the causal-LM default) or per example first (``example``)."""
    targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # shift the labels, not the (large) logits
    losses = nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(),
                                         ignore_index=-100, reduction="none").view_as(targets)
    mask = targets != -100
    if per == "token":
        return losses.sum() / mask.sum().clamp(min=1)
    counts = mask.sum(1)
    if not counts.any():
        return losses.sum()  # zero, still attached to the graph
    has_target = counts > 0
    return (losses.sum(1)[has_target] / counts[has_target]).mean()


class PreSafeModel(nn.Module):
    """LoRA-wrapped LLM + decision head + frozen classifier; ``forward`` returns both losses."""

    def __init__(self, llm: nn.Module, layers: list[int], lambda_decision: float,
                 head: DecisionHead | None = None, classifier: FrozenClassifier | None = None,
                 sft_loss_per: str = "token"):
        super().__init__()
        self.llm = llm
        self.layers = layers
        self.lambda_decision = lambda_decision
        self.sft_loss_per = sft_loss_per
        self.head = head
        self.classifier = classifier.model if classifier is not None else None
        self._refuse_index = refuse_index(self.classifier.config) if self.classifier is not None else None
        if classifier is not None:
            ids = classifier.tokenizer("", add_special_tokens=True)["input_ids"]  # [CLS] [SEP] for BERT
            self.register_buffer("frame_ids", torch.tensor(ids, dtype=torch.long), persistent=False)
        self.accepts_loss_kwargs = False  # per-batch mean losses: Trainer scales for grad accumulation

    def train(self, mode: bool = True):
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()  # frozen: no dropout, ever
        return self

    def decision_logit(self, hidden_states: Sequence[torch.Tensor], positions: torch.Tensor,
                       position_mask: torch.Tensor) -> torch.Tensor:
        """The frozen classifier's refuse logit on the projected pre-CoT states."""
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
        picked = torch.stack([hidden_states[i][rows, positions] for i in self.layers]).mean(0)  # B×P×d
        embeds, mask = self.head(picked, position_mask)
        frame = self.classifier.get_input_embeddings()(self.frame_ids).to(embeds.dtype)
        batch = embeds.shape[0]
        inputs = torch.cat([frame[:1].expand(batch, 1, -1), embeds, frame[1:].expand(batch, -1, -1)], dim=1)
        ones = mask.new_ones(batch, 1)
        attention = torch.cat([ones, mask, ones.expand(batch, frame.shape[0] - 1)], dim=1)
        logits = self.classifier(inputs_embeds=inputs, attention_mask=attention).logits.float()
        return refuse_logit(logits, self._refuse_index)

    def forward(self, input_ids, attention_mask, labels=None, decision_positions=None, decision_mask=None,
                decision_target=None, freeze_llm: bool = False) -> dict[str, torch.Tensor]:
        use_head = self.head is not None and decision_positions is not None
        with torch.no_grad() if freeze_llm else nullcontext():
            out = self.llm(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=use_head,
                           **({"logits_to_keep": 1} if freeze_llm else {}))
        result: dict[str, torch.Tensor] = {}
        losses = []
        if labels is not None and not freeze_llm:
            result["sft_loss"] = sft_loss(out.logits, labels, self.sft_loss_per)
            losses.append(result["sft_loss"])
        if use_head:
            logit = self.decision_logit(out.hidden_states, decision_positions, decision_mask)
            decision_loss = nn.functional.binary_cross_entropy_with_logits(logit, decision_target.float())
            result["decision_loss"] = decision_loss
            result["decision_prob"] = torch.sigmoid(logit.detach())
            losses.append(decision_loss if freeze_llm else self.lambda_decision * decision_loss)
        if not losses:
            raise AlignError("nothing to train on: no labels and no decision head")
        result["loss"] = sum(losses)
        return result


# --------------------------------------------------------------------------- data


@dataclass
class AlignExample:
    """One tokenized training example."""

    id: str
    path: str  # "refuse" (Path A) or "comply" (Path B)
    input_ids: list[int]
    labels: list[int]
    decision_positions: list[int]
    decision_target: float

    def features(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "labels": self.labels,
                "decision_positions": self.decision_positions, "decision_target": self.decision_target}


@dataclass
class DataStats:
    prompts: int = 0
    refuse: int = 0
    comply: int = 0
    skipped_no_answer: int = 0
    truncated_prompts: int = 0
    truncated_targets: int = 0
    tokens: int = 0
    target_tokens: int = 0
    teacher_agreement: float | None = None
    extra_refuse: int = 0  # align.extra_refuse_prompts kept (the classifier marks them refuse too)


class AlignCollator:
    """Right-pads ``input_ids``/``labels``; carries the pre-CoT positions (padded, with a mask) and
    the classifier's target probability."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        npos = max(len(f["decision_positions"]) for f in features)
        batch = {"input_ids": [], "attention_mask": [], "labels": [], "decision_positions": [], "decision_mask": []}
        for f in features:
            pad = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * pad)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
            batch["labels"].append(list(f["labels"]) + [-100] * pad)
            ppad = npos - len(f["decision_positions"])
            batch["decision_positions"].append(list(f["decision_positions"]) + [0] * ppad)
            batch["decision_mask"].append([1] * len(f["decision_positions"]) + [0] * ppad)
        out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
        out["decision_target"] = torch.tensor([float(f["decision_target"]) for f in features], dtype=torch.float32)
        return out


def refusal_for(prompt_id: str, templates: Sequence[str]) -> str:
    """A refusal sentence chosen by a stable hash of the prompt id (reruns give the same targets)."""
    return templates[int(hashlib.sha256(prompt_id.encode()).hexdigest()[:8], 16) % len(templates)]


def _messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


_CUT = " … "  # marks where a long user text lost its middle


def _fit_prompt(tokenizer, prompt: str, max_length: int) -> tuple[str, bool]:
    """Shorten the user text until the rendered CoT-ON prompt fits ``max_length`` tokens, cutting its
    *middle*: the opening (who is asking, a role-play set-up) and the end (where a wrapped request
    usually sits) both survive."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    cut = tokenizer(_CUT, add_special_tokens=False)["input_ids"]
    for attempt in range(4):
        rendered = render_prompt(tokenizer, _messages(prompt), cot=True)
        overflow = len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) - max_length
        if overflow <= 0:
            return prompt, attempt > 0
        keep = len(ids) - overflow - len(cut) - 1
        if keep < 2:
            raise AlignError(f"align.max_prompt_length={max_length} is too short for the chat template")
        head = keep // 3
        ids = ids[:head] + cut + ids[len(ids) - (keep - head):]
        prompt = tokenizer.decode(ids)
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return prompt, True


def encode_align_example(tokenizer, prompt: str, target_path: str, cot_on=None, *, refusal: str,
                         max_prompt_length: int, max_target_length: int) -> tuple[list[int], int, list[int], bool, bool]:
    """(input_ids, prompt_length, pre-CoT positions, prompt truncated, target truncated) of one example.

    Both paths share the CoT-ON prompt (it ends with the opening ``<think>``). Path A: an empty think
    block and ``refusal`` (:func:`service.core.cot.encode_example`). Path B: the base model's own CoT-ON
    generation verbatim — reasoning, ``</think>`` and answer as it wrote them, or its answer inside an
    unclosed block — plus end-of-sequence when it stopped by itself: self-distillation of exactly what
    it does now.
    """
    prompt, prompt_cut = _fit_prompt(tokenizer, prompt, max_prompt_length)
    messages = _messages(prompt)
    if target_path == REFUSE:
        enc = encode_example(tokenizer, messages, refusal, cot=True, reasoning="")
        ids, plen, positions = enc.input_ids, enc.prompt_length, enc.pre_cot_positions
    else:
        prompt_ids = tokenizer(render_prompt(tokenizer, messages, cot=True), add_special_tokens=False)["input_ids"]
        target = tokenizer(cot_on.text.removeprefix(COT_ON_PREFILL), add_special_tokens=False)["input_ids"]
        if cot_on.finish_reason == "stop" and tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        ids, plen = list(prompt_ids) + target, len(prompt_ids)
        positions = pre_cot_positions(tokenizer, messages, cot=True)
    target_cut = len(ids) - plen > max_target_length
    return ids[: plen + max_target_length], plen, positions, prompt_cut, target_cut


def build_examples(records: Sequence, probabilities: Sequence[float], threshold: float, tokenizer,
                   cfg: AlignConfig, log: Log = lambda msg: None) -> tuple[list[AlignExample], DataStats]:
    """Teacher records + classifier probabilities → tokenized Path A / Path B examples."""
    stats = DataStats(prompts=len(records))
    examples: list[AlignExample] = []
    agree = 0
    for rec, prob in zip(records, probabilities, strict=True):
        path = REFUSE if prob >= threshold else COMPLY
        agree += path == rec.decision
        cot_on = getattr(rec, "cot_on", None)
        if path == COMPLY and cot_on is None:
            if cfg.missing_answer == "error":
                raise AlignError(f"prompt {rec.id} is marked comply but the teacher file has no CoT-ON answer "
                                 f"for it (rerun the teacher with CoT-ON answers, or set align.missing_answer: skip)")
            stats.skipped_no_answer += 1
            continue
        ids, plen, positions, prompt_cut, target_cut = encode_align_example(
            tokenizer, rec.prompt, path, cot_on, refusal=refusal_for(rec.id, cfg.refusal_templates),
            max_prompt_length=cfg.max_prompt_length, max_target_length=cfg.max_target_length)
        if len(ids) <= plen:
            stats.skipped_no_answer += 1  # an empty generation teaches nothing
            continue
        stats.truncated_prompts += prompt_cut
        stats.truncated_targets += target_cut
        stats.tokens += len(ids)
        stats.target_tokens += len(ids) - plen
        setattr(stats, path, getattr(stats, path) + 1)
        examples.append(AlignExample(rec.id, path, ids, [-100] * plen + ids[plen:], positions, float(prob)))
    stats.teacher_agreement = agree / len(records) if records else None
    if stats.skipped_no_answer:
        log(f"skipped {stats.skipped_no_answer} comply prompts without a usable CoT-ON answer")
    return examples, stats


def load_training_records(teacher_path: Path, split: str, max_prompts: int | None = None, seed: int = 0,
                          extra_refuse: int = 0) -> tuple[list, list]:
    """Teacher records of one split: the seeded sample of ``max_prompts``, and up to ``extra_refuse``
    more (seeded) that the teacher refuses; an error if the split has none."""
    from training.teacher import iter_teacher

    records = list(iter_teacher(Path(teacher_path)))
    chosen = [r for r in records if r.split == split]
    if not chosen:
        present = sorted({r.split for r in records})
        raise AlignError(f"no training data for split {split!r} in {teacher_path} "
                         f"({len(records)} records; splits present: {', '.join(present) or 'none'})")
    sample = seeded_sample(chosen, max_prompts, seed)
    taken = {r.id for r in sample}
    rest = [r for r in chosen if r.id not in taken and r.decision == REFUSE]
    return sample, seeded_sample(rest, extra_refuse, seed) if extra_refuse else []


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]


# --------------------------------------------------------------------------- trainer


def save_decision_head(head: DecisionHead, directory: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, directory / HEAD_WEIGHTS)
    (directory / HEAD_CONFIG).write_text(json.dumps({**head.settings, **(extra or {})}, indent=2))


def load_decision_head(directory: Path) -> DecisionHead:
    """A decision head saved by :func:`save_decision_head` (for analysis or further training)."""
    from safetensors.torch import load_file

    settings = json.loads((directory / HEAD_CONFIG).read_text())
    keys = ("llm_hidden", "classifier_hidden", "pooling", "pseudo_tokens", "kind", "hidden")
    head = DecisionHead(**{k: settings[k] for k in keys})
    head.load_state_dict(load_file(directory / HEAD_WEIGHTS))
    return head


class AlignTrainer(Trainer):
    """``Trainer`` for :class:`PreSafeModel`: both losses, projector warm-up, adapter-only checkpoints."""

    def __init__(self, *args, projector_warmup_steps: int = 0, projector_lr: float = 1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_warmup_steps = projector_warmup_steps
        self.projector_lr = projector_lr
        self.model_accepts_loss_kwargs = False
        self._sums: dict[str, float] = {}
        self._counts: dict[str, int] = {}
        self.tokens_seen = 0
        self._warmup_step = False

    def presafe_model(self) -> PreSafeModel:
        return self.accelerator.unwrap_model(self.model)

    def in_warmup(self) -> bool:
        head = self.presafe_model().head
        return head is not None and self.state.global_step < self.projector_warmup_steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        freeze = model.training and self.in_warmup()
        outputs = model(**inputs, freeze_llm=freeze)
        if model.training:
            self._warmup_step = freeze
            for key in ("sft_loss", "decision_loss"):
                if key in outputs:
                    self._sums[key] = self._sums.get(key, 0.0) + outputs[key].detach().float().item()
                    self._counts[key] = self._counts.get(key, 0) + 1
            if "decision_prob" in outputs:
                err = (outputs["decision_prob"] - inputs["decision_target"]).abs().mean().item()
                self._sums["decision_mae"] = self._sums.get("decision_mae", 0.0) + err
                self._counts["decision_mae"] = self._counts.get("decision_mae", 0) + 1
            self.tokens_seen += int(inputs["attention_mask"].sum())
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._counts:  # a training log: add the separate losses since the last one
            for key, total in self._sums.items():
                value = torch.tensor(total / self._counts[key], device=self.args.device)
                logs[key] = round(self.accelerator.reduce(value, reduction="mean").item(), 6)
            logs["projector_warmup"] = int(self._warmup_step)
            self._sums, self._counts = {}, {}
        super().log(logs, start_time)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            m = self.presafe_model()
            groups = [{"params": [p for p in m.llm.parameters() if p.requires_grad],
                       "lr": self.args.learning_rate, "weight_decay": self.args.weight_decay}]
            if m.head is not None:
                groups.append({"params": list(m.head.parameters()), "lr": self.projector_lr, "weight_decay": 0.0})
            optimizer_cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, m)
            self.optimizer = optimizer_cls(groups, **kwargs)
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Checkpoint = the PEFT adapter + the decision head (never the frozen base or classifier)."""
        output_dir = Path(output_dir or self.args.output_dir)
        m = self.presafe_model()
        m.llm.save_pretrained(output_dir)
        if m.head is not None:
            save_decision_head(m.head, output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        ckpt = Path(resume_from_checkpoint)
        m = self.presafe_model()
        if not (ckpt / ADAPTER_WEIGHTS).is_file():
            raise AlignError(f"{ckpt} is not an align checkpoint (no {ADAPTER_WEIGHTS})")
        result = set_peft_model_state_dict(m.llm, load_file(ckpt / ADAPTER_WEIGHTS))
        if result.unexpected_keys:
            raise AlignError(f"{ckpt}: adapter weights do not fit this model ({result.unexpected_keys[:3]})")
        if m.head is not None:
            if not (ckpt / HEAD_WEIGHTS).is_file():
                raise AlignError(f"{ckpt} has no {HEAD_WEIGHTS}; it was not written with the decision loss on")
            m.head.load_state_dict(load_file(ckpt / HEAD_WEIGHTS))


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (for the overhead benchmark and tokens/s)."""

    def __init__(self):
        self.times: list[float] = []
        self._t0 = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t0)


# --------------------------------------------------------------------------- building and running


def build_model(cfg: PipelineConfig, classifier: FrozenClassifier | None, device: str | None = None,
                lambda_decision: float | None = None) -> PreSafeModel:
    """Base LLM (frozen) + LoRA + (when λ > 0) projector and frozen classifier, seeded."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, set_seed

    a = cfg.align
    lam = a.lambda_decision if lambda_decision is None else lambda_decision
    set_seed(a.seed)
    llm = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.models.base), dtype=torch_dtype(cfg.models.dtype))
    if a.gradient_checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    llm.config.use_cache = False
    num_layers = llm.config.num_hidden_layers
    layers = resolve_layers(a.decision_layers, num_layers)
    present = {name.rsplit(".", 1)[-1] for name, _ in llm.named_modules()}
    missing = [t for t in a.target_modules if t not in present]
    if missing:
        raise ConfigError(f"align.target_modules: {missing} not found in the base model")
    lora = LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                      target_modules=list(a.target_modules), task_type="CAUSAL_LM", bias="none")
    llm = get_peft_model(llm, lora)
    head = None
    if lam > 0:
        if classifier is None:
            raise AlignError("the decision loss (λ > 0) needs the classifier")
        head = DecisionHead(llm.config.hidden_size, classifier.hidden_size, a.decision_pooling, a.pseudo_tokens,
                            a.projector, a.projector_hidden)
    return PreSafeModel(llm, layers, lam, head, classifier if head is not None else None, a.sft_loss_per)


def training_arguments(a: AlignConfig, output_dir: Path, max_steps: int | None = None, progress: bool = True,
                       save: bool = True, bf16: bool = False):
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum, learning_rate=a.learning_rate, weight_decay=a.weight_decay,
        lr_scheduler_type=a.lr_scheduler, warmup_steps=a.warmup_ratio, num_train_epochs=a.epochs,
        max_steps=a.max_steps if max_steps is None else max_steps, logging_steps=a.logging_steps,
        save_strategy="steps" if save else "no", save_steps=a.save_steps, save_total_limit=a.save_total_limit,
        seed=a.seed, data_seed=a.seed, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=not progress, bf16=cuda and bf16,
        train_sampling_strategy="group_by_length" if a.group_by_length else "random",
        use_cpu=not cuda, label_names=["labels"], prediction_loss_only=True,
        ddp_find_unused_parameters=True,  # LoRA gets no gradient during the projector warm-up
    )


def checkpoints_dir(output: Path) -> Path:
    """Where an align run writing ``output`` keeps its checkpoints by default: ``<output>.checkpoints``."""
    return output.with_name(f"{output.name}.checkpoints")


@dataclass
class AlignPaths:
    """Where stage 2 reads and writes (``run_dir`` of the config, else each stage's own default)."""

    teacher: Path
    classifier: Path
    output: Path
    checkpoints: Path

    @classmethod
    def default(cls, cfg: PipelineConfig, teacher: Path | None = None, classifier: Path | None = None,
                output: Path | None = None, checkpoints: Path | None = None) -> AlignPaths:
        from service.core.settings import get_settings
        from training import classifier as classifier_stage
        from training import teacher as teacher_stage

        run = cfg.run_dir.expanduser() if cfg.run_dir else None
        teacher = teacher or (run / "teacher.jsonl" if run else teacher_stage.default_output())
        classifier = classifier or (run / "classifier" if run else classifier_stage.default_output())
        output = output or (run / "align" if run else get_settings().root / "align")
        return cls(Path(teacher), Path(classifier), Path(output),
                   Path(checkpoints or checkpoints_dir(output)))


@dataclass
class AlignResult:
    output: Path
    adapter: Path
    metrics: dict = field(default_factory=dict)


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(type(obj).__name__)


def train_align(cfg: PipelineConfig, teacher_path: Path, classifier_dir: Path | None, output: Path,
                checkpoints: Path | None = None, resume: str | bool | None = None, max_steps: int | None = None,
                log: Log = lambda msg: None, progress: bool = True, callbacks: Sequence[TrainerCallback] = ()
                ) -> AlignResult:
    """Run stage 2 and write ``output`` (adapter/, decision_head/, metrics.json, …) atomically."""
    a = cfg.align
    started = time.monotonic()
    tokenizer = load_base_tokenizer(cfg.models)
    records, extra = load_training_records(teacher_path, cfg.data.train_split, cfg.data.max_train_prompts,
                                           cfg.data.seed, a.extra_refuse_prompts)
    if classifier_dir is None:
        raise AlignError("stage 2 needs the stage 1 classifier (classifier dir)")
    classifier = load_classifier(classifier_dir, a.threshold)
    from accelerate import PartialState

    classifier.model.to(PartialState().device)  # score on this process's GPU when there is one
    log(f"scoring {len(records) + len(extra)} prompts with the classifier (threshold {classifier.threshold:.3f})")
    probs = classifier_probabilities(classifier, [r.prompt for r in records + extra], cfg.classifier.max_length)
    # the extra prompts are Path A examples only: the ones the classifier would let through are dropped
    kept = [(r, p) for r, p in zip(extra, probs[len(records):], strict=True) if p >= classifier.threshold]
    records, probs = records + [r for r, _ in kept], probs[:len(records)] + [p for _, p in kept]
    if extra:
        log(f"+{len(kept)} extra refuse prompts (of {len(extra)}; the classifier lets the rest through)")
    examples, stats = build_examples(records, probs, classifier.threshold, tokenizer, a, log)
    stats.extra_refuse = len(kept)
    if not examples:
        raise AlignError(f"no training examples left for split {cfg.data.train_split!r} "
                         f"({stats.prompts} prompts, {stats.skipped_no_answer} without a CoT-ON answer)")
    log(f"{len(examples)} examples: {stats.refuse} refuse (Path A), {stats.comply} comply (Path B), "
        f"{stats.target_tokens} target tokens")
    model = build_model(cfg, classifier)
    checkpoints = checkpoints or checkpoints_dir(output)
    timer = StepTimer()
    trainer = AlignTrainer(
        model=model, args=training_arguments(a, checkpoints, max_steps, progress, bf16=cfg.models.dtype == "bfloat16"),
        train_dataset=ListDataset([e.features() for e in examples]),
        data_collator=AlignCollator(tokenizer.pad_token_id), callbacks=[timer, *callbacks],
        projector_warmup_steps=a.projector_warmup_steps, projector_lr=a.projector_lr)
    if resume is True:
        from transformers.trainer_utils import get_last_checkpoint

        resume = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
        log(f"resuming from {resume}" if resume else f"no checkpoint in {checkpoints}; starting from scratch")
    train_out = trainer.train(resume_from_checkpoint=resume or None)
    history = trainer.state.log_history
    last = {k: next((h[k] for h in reversed(history) if k in h), None) for k in ("sft_loss", "decision_loss")}
    runtime = train_out.metrics.get("train_runtime") or 0.0
    metrics = {
        "base_model": cfg.models.base, "classifier": str(classifier.path), "threshold": classifier.threshold,
        "teacher": str(teacher_path), "data": asdict(stats), "examples": len(examples),
        "steps": trainer.state.global_step, "train_runtime_s": runtime,
        "train_tokens_per_s": trainer.tokens_seen / runtime if runtime else None,
        "step_s_median": statistics.median(timer.times[a.projector_warmup_steps:] or timer.times or [0.0]),
        "final_sft_loss": last["sft_loss"], "final_decision_loss": last["decision_loss"],
        "layers": model.layers, "lambda_decision": a.lambda_decision, "wall_s": time.monotonic() - started,
        "resumed_from": str(resume) if resume else None,
    }
    output = Path(output)
    if not trainer.is_world_process_zero():  # one writer under torchrun / accelerate launch
        trainer.accelerator.wait_for_everyone()
        return AlignResult(output, output / "adapter", metrics)
    with atomic_dir(output) as tmp:
        model.llm.save_pretrained(tmp / "adapter")
        if cfg.models.chat_template:  # the gateway serves the base with the template the adapter learnt
            (tmp / "adapter" / ADAPTER_CHAT_TEMPLATE).write_text(tokenizer.chat_template, encoding="utf-8")
        if model.head is not None:
            save_decision_head(model.head, tmp / "decision_head",
                               {"layers": model.layers, "classifier": str(classifier.path)})
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=_json_default))
        (tmp / "config.json").write_text(cfg.model_dump_json(indent=2))
        with open(tmp / "log_history.jsonl", "w") as fh:
            fh.writelines(json.dumps(h) + "\n" for h in history)
    trainer.accelerator.wait_for_everyone()
    log(f"adapter → {output / 'adapter'}")
    return AlignResult(output, output / "adapter", metrics)


def check_adapter(adapter_dir: Path) -> None:
    """The adapter dir is a plain PEFT LoRA adapter (no decision-head weights inside)."""
    from safetensors import safe_open

    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise AssetError(f"{adapter_dir} is not a PEFT adapter")
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, "pt") as fh:
        bad = [k for k in fh.keys() if "lora_" not in k]  # noqa: SIM118 - safe_open is no dict
    if bad:
        raise AssetError(f"{adapter_dir} holds non-LoRA weights: {bad[:3]}")


__all__ = ["AlignCollator", "AlignError", "AlignTrainer", "DecisionHead", "PreSafeModel", "build_examples",
           "build_model", "classifier_probabilities", "load_classifier", "load_decision_head", "train_align"]
