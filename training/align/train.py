"""Stage 2 training: the ``Trainer`` subclass, building the LoRA model, running a stage and where it writes."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

from service.core.assets import AssetError, atomic_dir, resolve_model
from service.core.config import AlignConfig, ConfigError, PipelineConfig
from service.core.formats import ADAPTER_CHAT_TEMPLATE, ADAPTER_WEIGHTS
from service.core.hardware import autocast_bf16
from training.align.data import (
    AlignCollator,
    AlignError,
    AlignExample,
    ListDataset,
    Log,
    build_decision_only,
    build_examples,
    load_training_records,
    transfer_split,
)
from training.align.model import (
    HEAD_WEIGHTS,
    DecisionHead,
    FrozenClassifier,
    LinearDecisionHead,
    PreSafeModel,
    classifier_probabilities,
    load_base_tokenizer,
    load_classifier,
    resolve_layers,
    save_decision_head,
    torch_dtype,
)

# --------------------------------------------------------------------------- trainer


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denominator = a.norm() * b.norm()
    return float((a @ b) / denominator) if denominator > 0 else 0.0


class AlignTrainer(Trainer):
    """``Trainer`` for :class:`PreSafeModel`: both losses, projector warm-up, adapter-only checkpoints."""

    def __init__(self, *args, projector_warmup_steps: int = 0, projector_lr: float = 1e-3, grad_probe_steps: int = 0,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.projector_warmup_steps = projector_warmup_steps
        self.projector_lr = projector_lr
        self.grad_probe_steps = grad_probe_steps
        self._probed_step = -1
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
                self._add("decision_mae", (outputs["decision_prob"] - outputs["decision_target"]).abs().mean().item())
            if not freeze and self._probe_due():
                for key, value in self.gradient_probe(outputs).items():
                    self._add(key, value)
            self.tokens_seen += int(inputs["attention_mask"].sum())
        return (outputs["loss"], outputs) if return_outputs else outputs["loss"]

    def _add(self, key: str, value: float) -> None:
        self._sums[key] = self._sums.get(key, 0.0) + value
        self._counts[key] = self._counts.get(key, 0) + 1

    def _probe_due(self) -> bool:
        step = self.state.global_step
        if not self.grad_probe_steps or step % self.grad_probe_steps or step == self._probed_step:
            return False
        self._probed_step = step  # once per optimizer step, on its first micro-batch
        return True

    def gradient_probe(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        """Norms of the gradients that L_sft and λ·L_decision send into the LoRA weights, and their cosine."""
        m = self.presafe_model()
        params = [p for p in m.llm.parameters() if p.requires_grad]
        grads = {}
        for key, scale in (("sft_loss", 1.0), ("decision_loss", m.lambda_decision)):
            if key not in outputs or not outputs[key].requires_grad:
                continue
            parts = torch.autograd.grad(outputs[key] * scale, params, retain_graph=True, allow_unused=True)
            grads[key] = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten().float()
                                    for g, p in zip(parts, params, strict=True)])
        out = {f"grad_norm_{k.removesuffix('_loss')}": g.norm().item() for k, g in grads.items()}
        if len(grads) == 2:
            out["grad_cosine"] = _cosine(grads["sft_loss"], grads["decision_loss"])
        return out

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
    if lam > 0 and a.decision_head == "linear":
        head = LinearDecisionHead(llm.config.hidden_size)
    elif lam > 0:
        if classifier is None:
            raise AlignError("the classifier decision head (λ > 0) needs the classifier")
        head = DecisionHead(llm.config.hidden_size, classifier.hidden_size, a.decision_pooling, a.pseudo_tokens,
                            a.projector, a.projector_hidden)
    frozen = classifier if isinstance(head, DecisionHead) else None
    return PreSafeModel(llm, layers, lam, head, frozen, a.sft_loss_per)


def per_process_batch(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """(examples per forward pass, accumulation steps) on each of ``processes`` processes, so that one
    optimizer step still takes ``batch_size × grad_accum`` examples: the largest forward batch ≤ ``batch_size``
    that divides each process's share."""
    step = batch_size * grad_accum
    if step % processes:
        raise AlignError(f"align: {processes} processes cannot share an optimizer step of batch_size × grad_accum "
                         f"= {step} examples; make it a multiple of {processes}")
    share = step // processes
    micro = max(d for d in range(1, min(batch_size, share) + 1) if share % d == 0)
    return micro, share // micro


def world_size() -> int:
    """Processes of this training run (torchrun / accelerate set ``WORLD_SIZE``)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def training_arguments(a: AlignConfig, output_dir: Path, max_steps: int | None = None, progress: bool = True,
                       save: bool = True, bf16: bool = False):
    """The Trainer's arguments for ``a``; ``bf16``: the base model's weights are bfloat16 (autocast on a GPU)."""
    from transformers import TrainingArguments

    cuda = torch.cuda.is_available()
    micro, accum = per_process_batch(a.batch_size, a.grad_accum, world_size())
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum, learning_rate=a.learning_rate, weight_decay=a.weight_decay,
        lr_scheduler_type=a.lr_scheduler, warmup_steps=a.warmup_ratio, num_train_epochs=a.epochs,
        max_steps=a.max_steps if max_steps is None else max_steps, logging_steps=a.logging_steps,
        save_strategy="steps" if save else "no", save_steps=a.save_steps, save_total_limit=a.save_total_limit,
        seed=a.seed, data_seed=a.seed, report_to="none", remove_unused_columns=False,
        dataloader_num_workers=0, disable_tqdm=not progress, bf16=autocast_bf16(a.mixed_precision) or (cuda and bf16),
        train_sampling_strategy="group_by_length" if a.group_by_length else "random",
        use_cpu=not cuda, label_names=["labels"], prediction_loss_only=True,
        ddp_find_unused_parameters=True,  # LoRA gets no gradient during the projector warm-up
    )


def build_trainer(cfg: PipelineConfig, model: PreSafeModel, examples: Sequence[AlignExample], tokenizer,
                  output_dir: Path, max_steps: int | None = None, progress: bool = True, save: bool = True,
                  callbacks: Sequence[TrainerCallback] = ()) -> AlignTrainer:
    """The :class:`AlignTrainer` of stage 2 for ``model`` on ``examples`` (train_align and the recipe sweep)."""
    a = cfg.align
    return AlignTrainer(
        model=model, args=training_arguments(a, output_dir, max_steps, progress, save,
                                             bf16=cfg.models.dtype == "bfloat16"),
        train_dataset=ListDataset([e.features() for e in examples]),
        data_collator=AlignCollator(tokenizer.pad_token_id), callbacks=list(callbacks),
        projector_warmup_steps=a.projector_warmup_steps, projector_lr=a.projector_lr,
        grad_probe_steps=a.grad_probe_steps if model.head is not None else 0)


class StepFraction(TrainerCallback):
    """Calls ``report(global_step / max_steps)`` after each optimizer step, on the first process only."""

    def __init__(self, report: Callable[[float], None]):
        self.report = report

    def on_step_end(self, args, state, control, **kwargs):
        if state.max_steps and state.is_world_process_zero:
            self.report(state.global_step / state.max_steps)


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
    records, extra, decision_only = load_training_records(
        teacher_path, cfg.data.train_split, cfg.data.max_train_prompts, cfg.data.seed, a.extra_refuse_prompts,
        a.decision_only_prompts if a.lambda_decision > 0 else 0, cfg.data.sft_sources)
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
    examples = transfer_split(examples, a.sft_refuse_fraction, cfg.data.seed)
    if decision_only:
        log(f"scoring {len(decision_only)} decision-only prompts with the classifier")
        only_probs = classifier_probabilities(classifier, [r.prompt for r in decision_only], cfg.classifier.max_length)
        examples += build_decision_only(decision_only, only_probs, classifier.threshold, tokenizer, a)
    if a.lambda_decision == 0:
        examples = [e for e in examples if not e.decision_only]  # nothing would train on them
    stats.decision_only = sum(e.decision_only for e in examples)
    stats.decision_only_refuse = sum(e.decision_only and e.decision_label == 1.0 for e in examples)
    if not examples:
        raise AlignError(f"no training examples left for split {cfg.data.train_split!r} "
                         f"({stats.prompts} prompts, {stats.skipped_no_answer} without a CoT-ON answer)")
    log(f"{len(examples)} examples: {stats.refuse} refuse (Path A), {stats.comply} comply (Path B), "
        f"{stats.target_tokens} target tokens, {stats.decision_only} decision-only "
        f"({stats.decision_only_refuse} refuse)")
    model = build_model(cfg, classifier)
    checkpoints = checkpoints or checkpoints_dir(output)
    timer = StepTimer()
    trainer = build_trainer(cfg, model, examples, tokenizer, checkpoints, max_steps, progress,
                            callbacks=[timer, *callbacks])
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


def check_lora_only(adapter_dir: Path) -> None:
    """The adapter dir is a plain PEFT LoRA adapter (no decision-head weights inside)."""
    from safetensors import safe_open

    if not (adapter_dir / "adapter_config.json").is_file() or not (adapter_dir / ADAPTER_WEIGHTS).is_file():
        raise AssetError(f"{adapter_dir} is not a PEFT adapter")
    with safe_open(adapter_dir / ADAPTER_WEIGHTS, "pt") as fh:
        bad = [k for k in fh.keys() if "lora_" not in k]  # noqa: SIM118 - safe_open is no dict
    if bad:
        raise AssetError(f"{adapter_dir} holds non-LoRA weights: {bad[:3]}")
