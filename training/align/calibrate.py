"""The adapter's operating point: a LoRA scale picked on the val split, the way the classifier's threshold is.

The LoRA update ``ΔW`` is scaled by ``s`` (``lora_alpha`` × s in ``adapter_config.json``: the adapter stays plain
PEFT and vLLM, the merge and the gateway serve it as it is). ``s`` = 1 is the adapter as trained; ``s`` = 0 is the
base model, which refuses nothing. Measured on the CPU default (docs/training.md): the benign prompts an adapter
refuses are nearly nested across runs, and scaling removes the weakest of them first while the harmful ones hold.

The rule: the smallest scale of ``grid`` whose greedy decisions on the val split's style-matched prompts still
refuse at least ``min_harmful_refusal`` of the harmful ones; the largest when none does. Scales are measured from
the smallest up and the first that keeps the floor ends the search (refusal grows with the scale: measured so on
the CPU default), so a well-placed grid costs two or three passes over the prompts. A decision is what greedy
generation does, judged by the gateway's decision parser on its first ``max_new_tokens`` tokens: the teacher-forced
score (:mod:`training.evaluate.decision_score`) reads only the trained opening (``\n</think>``) and misses the
refusals the adapters also write inside the think block.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from service.core.decision import DecisionPath, analyze
from service.core.labels import REFUSE

REFUSALS = (DecisionPath.REFUSE_PRE_COT, DecisionPath.REFUSE_AFTER_COT)


@dataclass(frozen=True)
class ScalePoint:
    """Greedy refusal rates of one LoRA scale on the calibration prompts."""

    scale: float
    harmful_refusal: float
    benign_refusal: float
    groups: dict[str, list[int]]  # group (source/decision/form) → [refused, n]


@dataclass
class Calibration:
    """The chosen scale and every scale measured on the way (``presafe`` metrics: ``calibration``)."""

    scale: float
    min_harmful_refusal: float
    n_harmful: int
    n_benign: int
    points: list[ScalePoint] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def greedy_refusals(model, tokenizer, prompts: Sequence[str], *, max_new_tokens: int = 12, batch_size: int = 32,
                    max_prompt_length: int = 512) -> list[bool]:
    """Whether greedy generation refuses each prompt before any reasoning (CoT-ON prompt; the gateway's decision
    parser on the first ``max_new_tokens`` tokens, read as if generation had stopped there: a refusal written
    inside the think block counts, a reasoning cut short does not). Prompts are batched by length (left
    padding), so a batch pads little."""
    from training.align.data import encode_decision_prompt

    encoded = [encode_decision_prompt(tokenizer, p, max_prompt_length)[0] for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    refused = [False] * len(prompts)
    for start in range(0, len(order), batch_size):
        batch = order[start:start + batch_size]
        length = max(len(encoded[i]) for i in batch)
        ids = torch.full((len(batch), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, length - len(encoded[i]):] = torch.tensor(encoded[i])
            mask[row, length - len(encoded[i]):] = 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad)
        for row, i in enumerate(batch):
            new = out[row, length:].tolist()
            if tokenizer.eos_token_id in new:
                new = new[:new.index(tokenizer.eos_token_id)]
            text = tokenizer.decode(new, skip_special_tokens=False)
            decision = analyze(text, starts_in_think=True, finish_reason="stop")
            refused[i] = decision.path in REFUSALS
    return refused


def set_lora_scale(model, scale: float) -> None:
    """Scale every LoRA layer's update of ``model`` (a PEFT model) by ``scale`` against its trained scaling."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            trained = module.__dict__.setdefault("_presafe_trained_scaling", dict(module.scaling))
            for name, value in trained.items():
                module.scaling[name] = value * scale


def pick_scale(points: Sequence[ScalePoint], min_harmful_refusal: float) -> float:
    """The smallest measured scale that refuses at least ``min_harmful_refusal`` of the harmful prompts; the
    largest measured scale when none does."""
    passing = [p.scale for p in points if p.harmful_refusal >= min_harmful_refusal]
    return min(passing) if passing else max(p.scale for p in points)


def calibrate_scale(model, tokenizer, records: Sequence, *, grid: Sequence[float], min_harmful_refusal: float,
                    max_new_tokens: int = 12, log: Callable[[str], None] = lambda m: None) -> Calibration:
    """Measure ``grid`` from the smallest scale up on ``records`` (teacher records: ``prompt``, ``decision``,
    ``source``, ``form``) until one keeps the floor, and pick the scale (:func:`pick_scale`). Leaves ``model``
    unmerged at s = 1."""
    started = time.monotonic()
    harmful = [r.decision == REFUSE for r in records]
    if not any(harmful) or all(harmful):
        raise ValueError("calibration needs prompts of both decisions")
    points: list[ScalePoint] = []
    scales = sorted(set(grid))
    for scale in scales:
        set_lora_scale(model, scale)
        model.merge_adapter()  # generation at the base model's speed (unmerged LoRA layers cost ~2x per step)
        try:
            refused = greedy_refusals(model, tokenizer, [r.prompt for r in records], max_new_tokens=max_new_tokens)
        finally:
            model.unmerge_adapter()  # with the same scaling it was merged with
        groups: dict[str, list[int]] = {}
        for rec, ref in zip(records, refused, strict=True):
            key = f"{rec.source}/{rec.decision}" + (f"/{rec.form}" if rec.decision != REFUSE and rec.form else "")
            counts = groups.setdefault(key, [0, 0])
            counts[0] += ref
            counts[1] += 1
        point = ScalePoint(scale, _share(refused, harmful, True), _share(refused, harmful, False), groups)
        points.append(point)
        log(f"LoRA scale {scale:g}: val harmful refused {point.harmful_refusal:.1%}, "
            f"benign refused {point.benign_refusal:.1%}")
        if point.harmful_refusal >= min_harmful_refusal:
            break  # larger scales refuse more still: this is the smallest that keeps the floor
    set_lora_scale(model, 1.0)
    return Calibration(pick_scale(points, min_harmful_refusal), min_harmful_refusal, sum(harmful),
                       len(harmful) - sum(harmful), points, round(time.monotonic() - started, 1))


def _share(refused: Sequence[bool], harmful: Sequence[bool], which: bool) -> float:
    chosen = [r for r, h in zip(refused, harmful, strict=True) if h == which]
    return sum(chosen) / len(chosen)


def write_scale(adapter_dir: Path, trained_alpha: float, scale: float) -> dict:
    """Set the adapter's update to ``scale`` × the trained one in its ``adapter_config.json``: ``lora_alpha`` =
    ``trained_alpha`` × ``scale`` (absolute, so writing twice scales once). Returns the new config; the weights are
    untouched."""
    path = Path(adapter_dir) / "adapter_config.json"
    config = json.loads(path.read_text())
    if config.get("alpha_pattern"):
        raise ValueError(f"{path}: an adapter with a per-module alpha_pattern cannot be rescaled")
    config["lora_alpha"] = trained_alpha * scale
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(config, indent=2))
    tmp.replace(path)
    return config
