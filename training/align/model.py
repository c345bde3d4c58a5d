"""Stage 2 model: the frozen decision classifier, the trainable decision head (projector), the
:class:`PreSafeModel` that computes both losses, and the head's files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from service.core.assets import resolve_model
from service.core.config import ConfigError, ModelsConfig
from service.core.cot import (
    NoChatTemplateError,
    get_chat_template,
    template_text,
)
from service.core.labels import refuse_class
from training.align.data import AlignError

HEAD_WEIGHTS = "decision_head.safetensors"
HEAD_CONFIG = "decision_head.json"


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


def pre_cot_vector(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """One layer's pre-CoT states, B×P×d → B×d: normalised without parameters (residual streams have a few
    huge dimensions), then averaged over the positions ``mask`` (B×P) marks. The decision head and the
    probes (:mod:`training.evaluate.probe`) read the states this way."""
    normed = nn.functional.layer_norm(states.float(), states.shape[-1:])
    weights = mask.unsqueeze(-1).float()
    return (normed * weights).sum(1) / weights.sum(1).clamp(min=1)


class LinearDecisionHead(nn.Module):
    """The default decision head: one linear logit on the pre-CoT residual streams (each chosen layer's state
    normalised without parameters, averaged over layers and positions). It has no capacity of its own to
    absorb the decision loss: to fit the classifier's decisions the LoRA weights must move the states."""

    def __init__(self, llm_hidden: int):
        super().__init__()
        self.settings = {"kind": "linear_probe", "llm_hidden": llm_hidden}
        self.proj = nn.Linear(llm_hidden, 1)

    def forward(self, layer_states: Sequence[torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        """``layer_states``: one B×P×d tensor per layer, ``mask`` B×P → the refuse logit, B."""
        pooled = torch.stack([pre_cot_vector(s, mask) for s in layer_states]).mean(0)
        return self.proj(pooled).squeeze(-1)


class DecisionHead(nn.Module):
    """The classifier-projector variant: pooled LLM hidden states → pseudo-token embeddings of the frozen
    classifier, which returns the refuse logit."""

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


def sft_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, per: str = "token") -> torch.Tensor:
    """Next-token cross-entropy on the target tokens (``labels`` != -100), averaged over every target
    token of the batch (``token``, the causal-LM default) or per example first (``example``).

    ``hidden`` is the final (normed) hidden state, B×T×d: the vocabulary logits are computed only where a
    target token is predicted, so prompts, padding and decision-only rows cost no ``lm_head`` at all."""
    targets = nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]  # position t predicts token t + 1
    mask = targets != -100
    if not mask.any():
        return hidden.sum() * 0.0  # zero, still attached to the graph
    losses = nn.functional.cross_entropy(lm_head(hidden[mask]).float(), targets[mask], reduction="none")
    if per == "token":
        return losses.mean()
    counts = mask.sum(1)
    sums = losses.new_zeros(labels.shape[0]).index_add(0, mask.nonzero()[:, 0], losses)
    has_target = counts > 0
    return (sums[has_target] / counts[has_target]).mean()


class PreSafeModel(nn.Module):
    """LoRA-wrapped LLM + decision head + frozen classifier; ``forward`` returns both losses."""

    def __init__(self, llm: nn.Module, layers: list[int], lambda_decision: float,
                 head: DecisionHead | LinearDecisionHead | None = None, classifier: FrozenClassifier | None = None,
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
        """The head's refuse logit on the pre-CoT states (through the frozen classifier for that variant)."""
        rows = torch.arange(positions.shape[0], device=positions.device).unsqueeze(1)
        if isinstance(self.head, LinearDecisionHead):
            return self.head([hidden_states[i][rows, positions] for i in self.layers], position_mask)
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
                decision_target=None, decision_label=None, freeze_llm: bool = False) -> dict[str, torch.Tensor]:
        use_head = self.head is not None and decision_positions is not None
        use_sft = labels is not None and not freeze_llm
        has_target = (labels != -100).any(1) if use_sft else None
        lengths = attention_mask.sum(1)
        # The rows run as several forwards, each cut to its own longest row (right padding): the rows with an SFT
        # target, then the decision-only rows in groups of similar length (:func:`length_groups`), so a short
        # prompt never pays for a long answer's or a long jailbreak's padding. The chat template's opening that
        # every row shares runs once (:meth:`_shared_prefix`). The losses are those of one forward of the batch.
        if use_sft and use_head:
            targeted, rest = torch.nonzero(has_target).flatten(), torch.nonzero(~has_target).flatten()
            groups = [targeted] if len(targeted) else []
            groups += [rest[g] for g in length_groups(lengths[rest].tolist())] if len(rest) else []
        else:
            rows = torch.arange(input_ids.shape[0], device=input_ids.device)
            groups = [rows[g] for g in length_groups(lengths.tolist())] if use_head else [rows]
        result: dict[str, torch.Tensor] = {}
        sft: torch.Tensor | None = None
        logits = []
        llm_grad = torch.no_grad if freeze_llm else nullcontext  # the warm-up trains the head alone
        with llm_grad():
            prefix = self._shared_prefix(input_ids, lengths)
        for group in groups:
            with llm_grad():
                hidden = self._hidden_states(input_ids[group], attention_mask[group], int(lengths[group].max()), prefix)
            if use_sft and sft is None:  # the first group: the one with the targets
                sft = sft_loss(hidden[-1], self.llm.get_output_embeddings(), labels[group, :hidden[-1].shape[1]],
                               self.sft_loss_per)
            if use_head:
                logits.append(self.decision_logit(hidden, decision_positions[group], decision_mask[group]))
        losses = []
        if use_sft:
            result["sft_loss"] = sft
            losses.append(result["sft_loss"])
        if use_head:
            order = torch.cat(groups).argsort()
            logit = torch.cat(logits)[order]  # back to the batch's row order
            target = decision_target.float()
            if isinstance(self.head, LinearDecisionHead):
                target = decision_label.float()  # the classifier's decision, not its probability
            decision_loss = nn.functional.binary_cross_entropy_with_logits(logit, target)
            result["decision_loss"] = decision_loss
            result["decision_prob"] = torch.sigmoid(logit.detach())
            result["decision_target"] = target  # what the head was trained against this step
            losses.append(decision_loss if freeze_llm else self.lambda_decision * decision_loss)
        if not losses:
            raise AlignError("nothing to train on: no labels and no decision head")
        result["loss"] = sum(losses)
        return result

    def _shared_prefix(self, input_ids: torch.Tensor, lengths: torch.Tensor):
        """The forward of the tokens every row starts with (the chat template's system turn), run once for the
        batch: ``(length, key/value cache, hidden states)``, or None when the rows share fewer than
        :data:`MIN_SHARED_PREFIX` tokens or gradient checkpointing (which drops the cache) is on."""
        if input_ids.shape[0] < 2 or getattr(self.llm, "is_gradient_checkpointing", False):
            return None
        differs = (input_ids != input_ids[:1]).any(0).nonzero()
        shared = int(differs[0]) if len(differs) else input_ids.shape[1]
        shared = min(shared, int(lengths.min()) - 1)  # every row keeps at least one token of its own
        if shared < MIN_SHARED_PREFIX:
            return None
        out = self.llm(input_ids=input_ids[:1, :shared], use_cache=True, output_hidden_states=True, logits_to_keep=1)
        return shared, [(layer.keys, layer.values) for layer in out.past_key_values.layers], out.hidden_states

    def _hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, length: int,
                       prefix) -> tuple[torch.Tensor, ...]:
        """Every layer's hidden states (B×length×d) of these rows, continuing from the shared prefix's cache."""
        if prefix is None:
            return self.llm(input_ids=input_ids[:, :length], attention_mask=attention_mask[:, :length],
                            output_hidden_states=True, logits_to_keep=1).hidden_states
        from transformers import DynamicCache

        shared, layers, prefix_states = prefix
        rows = input_ids.shape[0]
        cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                             for k, v in layers], config=self.llm.config)
        out = self.llm(input_ids=input_ids[:, shared:length], attention_mask=attention_mask[:, :length],
                       past_key_values=cache, use_cache=True, output_hidden_states=True, logits_to_keep=1)
        return tuple(torch.cat([p.expand(rows, -1, -1), h], dim=1)
                     for p, h in zip(prefix_states, out.hidden_states, strict=True))


# Fewer shared opening tokens than this run with their rows (a second forward would cost more than it saves).
MIN_SHARED_PREFIX = 8
# What one more forward costs, in tokens of compute: a forward + backward of SmolLM2-135M with LoRA on 2 cores
# takes ~0.35 s plus ~6.3 ms per token (ops dispatched per layer, whatever the length).
FORWARD_COST_TOKENS = 55


def length_groups(lengths: Sequence[int], forward_cost: int | None = None) -> list[list[int]]:
    """Rows (indices into ``lengths``) split into groups of similar length, each padded to its own longest row:
    the split of the rows sorted by length that minimises padded tokens plus ``forward_cost`` per group
    (default :data:`FORWARD_COST_TOKENS`)."""
    forward_cost = FORWARD_COST_TOKENS if forward_cost is None else forward_cost
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    best = [0] + [float("inf")] * len(sizes)
    cut = [0] * (len(sizes) + 1)
    for end in range(1, len(sizes) + 1):
        for start in range(end):
            cost = best[start] + (end - start) * sizes[end - 1] + forward_cost
            if cost < best[end]:
                best[end], cut[end] = cost, start
    groups, end = [], len(sizes)
    while end:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def save_decision_head(head: DecisionHead | LinearDecisionHead, directory: Path, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, directory / HEAD_WEIGHTS)
    (directory / HEAD_CONFIG).write_text(json.dumps({**head.settings, **(extra or {})}, indent=2))


def load_decision_head(directory: Path) -> DecisionHead | LinearDecisionHead:
    """A decision head saved by :func:`save_decision_head` (for analysis or further training)."""
    from safetensors.torch import load_file

    settings = json.loads((directory / HEAD_CONFIG).read_text())
    if settings.get("kind") == "linear_probe":
        head = LinearDecisionHead(settings["llm_hidden"])
        head.load_state_dict(load_file(directory / HEAD_WEIGHTS))
        return head
    keys = ("llm_hidden", "classifier_hidden", "pooling", "pseudo_tokens", "kind", "hidden")
    head = DecisionHead(**{k: settings[k] for k in keys})
    head.load_state_dict(load_file(directory / HEAD_WEIGHTS))
    return head
