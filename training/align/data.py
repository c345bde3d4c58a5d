"""Stage 2 data: teacher records and classifier probabilities → tokenized Path A (refusal) and Path B
(self-distilled CoT-ON answer) examples, batched with their pre-CoT positions."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from service.core.config import AlignConfig
from service.core.cot import (
    COT_ON_PREFILL,
    THINK_CLOSE,
    encode_example,
    pre_cot_positions,
    render_prompt,
    split_reasoning,
)
from service.core.labels import COMPLY, REFUSE
from training.data import seeded_sample

Log = Callable[[str], None]


class AlignError(RuntimeError):
    """Stage 2 cannot run with these inputs (no data, no template, missing classifier, …)."""


# --------------------------------------------------------------------------- data


@dataclass
class AlignExample:
    """One tokenized training example."""

    id: str
    path: str  # "refuse" (Path A) or "comply" (Path B)
    input_ids: list[int]
    labels: list[int]
    decision_positions: list[int]
    decision_target: float  # the classifier's refuse probability
    decision_label: float = 0.0  # its decision: 1.0 refuse, 0.0 comply

    @property
    def decision_only(self) -> bool:
        """No SFT target: trained by the decision loss alone."""
        return all(label == -100 for label in self.labels)

    def features(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "labels": self.labels,
                "decision_positions": self.decision_positions, "decision_target": self.decision_target,
                "decision_label": self.decision_label}


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
    cut_answers: int = 0  # comply prompts whose CoT-ON answer was cut at the limit, kept as decision-only
    extra_refuse: int = 0  # align.extra_refuse_prompts kept (the classifier marks them refuse too)
    decision_only: int = 0  # examples with no SFT target (decision loss only)
    decision_only_refuse: int = 0


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
        for key in ("decision_target", "decision_label"):
            out[key] = torch.tensor([float(f.get(key, 0.0)) for f in features], dtype=torch.float32)
        return out


def refusal_for(prompt_id: str, templates: Sequence[str]) -> str:
    """A refusal sentence (or answer note) chosen by a stable hash of the prompt id (reruns give the same
    targets)."""
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
                         max_prompt_length: int, max_target_length: int, answer_note: str | None = None,
                         answer_target: str = "verbatim") -> tuple[list[int], int, list[int], bool, bool]:
    """(input_ids, prompt_length, pre-CoT positions, prompt truncated, target truncated) of one example.

    Both paths share the CoT-ON prompt (it ends with the opening ``<think>``). Path A: an empty think
    block and ``refusal`` (:func:`service.core.cot.encode_example`). Path B: the base model's own CoT-ON
    generation verbatim — reasoning, ``</think>`` and answer as it wrote them, or its answer inside an
    unclosed block — plus end-of-sequence when it stopped by itself: self-distillation of exactly what
    it does now. With ``answer_note`` (``align.answer_target: brief_think``) the think block holds that note
    alone and closes, and the answer follows it: the one after the base's ``</think>``, else all it wrote.
    With ``answer_target="closed"`` an answer the base wrote inside a think block it never closed gets Path A's
    layout (:func:`_ending_answer`); one after a CoT it closed itself stays verbatim.
    """
    prompt, prompt_cut = _fit_prompt(tokenizer, prompt, max_prompt_length)
    messages = _messages(prompt)
    text = cot_on.text.removeprefix(COT_ON_PREFILL) if target_path != REFUSE else ""
    if target_path != REFUSE and answer_target == "closed" and split_reasoning(text)[0] is None:
        enc, trimmed = _ending_answer(tokenizer, messages, text.strip(), max_target_length)
        return (enc.input_ids, enc.prompt_length, with_decision_position(enc.pre_cot_positions, enc.prompt_length),
                prompt_cut, trimmed)
    if target_path == REFUSE:
        enc = encode_example(tokenizer, messages, refusal, cot=True, reasoning="")
        ids, plen, positions = enc.input_ids, enc.prompt_length, enc.pre_cot_positions
    else:
        prompt_ids = tokenizer(render_prompt(tokenizer, messages, cot=True), add_special_tokens=False)["input_ids"]
        if answer_note is not None:
            reasoning, answer = split_reasoning(text)
            text = f"{answer_note}\n{THINK_CLOSE}\n\n{answer if reasoning is not None else text.lstrip()}"
        target = tokenizer(text, add_special_tokens=False)["input_ids"]
        if cot_on.finish_reason == "stop" and tokenizer.eos_token_id is not None:
            target = target + [tokenizer.eos_token_id]
        ids, plen = list(prompt_ids) + target, len(prompt_ids)
        positions = pre_cot_positions(tokenizer, messages, cot=True)
    target_cut = len(ids) - plen > max_target_length
    return ids[: plen + max_target_length], plen, with_decision_position(positions, plen), prompt_cut, target_cut


def _shorter(answer: str) -> str:
    """``answer`` without its last line, else its last sentence, else its last word."""
    body = answer.rstrip()
    for sep in ("\n", ". ", "! ", "? ", " "):
        head, found, _ = body.rpartition(sep)
        if found and head.strip():
            return head + (sep.strip() if sep != "\n" else "")
    return ""


def _ending_answer(tokenizer, messages, answer: str, max_target_length: int):
    """(the example, whether the answer was cut back) for ``answer`` in Path A's layout: an empty think block,
    the answer, end of turn. An answer too long for ``max_target_length`` (the base's run into the teacher's
    limit) loses whole lines (else sentences, else words) until it fits: every such target ends, as the base's
    own answers end, instead of teaching the model to run on."""
    enc = encode_example(tokenizer, messages, answer, cot=True, reasoning="")
    trimmed = False
    while len(enc.input_ids) - enc.prompt_length > max_target_length and answer:
        answer, trimmed = _shorter(answer), True
        enc = encode_example(tokenizer, messages, answer, cot=True, reasoning="")
    return enc, trimmed


def with_decision_position(positions: Sequence[int], prompt_length: int) -> list[int]:
    """The pre-CoT span plus the prompt's last token: the position whose next token starts the refusal or the
    CoT."""
    return sorted({*positions, prompt_length - 1})


def encode_decision_prompt(tokenizer, prompt: str, max_prompt_length: int) -> tuple[list[int], list[int], bool]:
    """(prompt ids, pre-CoT positions with the decision position, truncated) of a decision-only example."""
    prompt, cut = _fit_prompt(tokenizer, prompt, max_prompt_length)
    messages = _messages(prompt)
    ids = tokenizer(render_prompt(tokenizer, messages, cot=True), add_special_tokens=False)["input_ids"]
    return ids, with_decision_position(pre_cot_positions(tokenizer, messages, cot=True), len(ids)), cut


def decision_only_example(rec, prob: float, threshold: float, tokenizer, cfg: AlignConfig) -> tuple[AlignExample, bool]:
    """(a prompt with no SFT target, labelled by the classifier's decision ``p >= threshold``; prompt truncated)."""
    ids, positions, cut = encode_decision_prompt(tokenizer, rec.prompt, cfg.max_prompt_length)
    return AlignExample(rec.id, REFUSE if prob >= threshold else COMPLY, ids, [-100] * len(ids), positions,
                        float(prob), float(prob >= threshold)), cut


def build_decision_only(records: Sequence, probabilities: Sequence[float], threshold: float, tokenizer,
                        cfg: AlignConfig) -> list[AlignExample]:
    """Prompts with no SFT target, labelled by the classifier's decision (``p >= threshold``)."""
    return [decision_only_example(rec, prob, threshold, tokenizer, cfg)[0]
            for rec, prob in zip(records, probabilities, strict=True)]


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
        if path == COMPLY and cot_on.finish_reason == "length" and cfg.cut_answers == "decision_only":
            example, prompt_cut = decision_only_example(rec, prob, threshold, tokenizer, cfg)
            stats.cut_answers += 1
            stats.truncated_prompts += prompt_cut
            stats.tokens += len(example.input_ids)
            examples.append(example)
            continue
        ids, plen, positions, prompt_cut, target_cut = encode_align_example(
            tokenizer, rec.prompt, path, cot_on, refusal=refusal_for(rec.id, cfg.refusal_templates),
            max_prompt_length=cfg.max_prompt_length, max_target_length=cfg.max_target_length,
            answer_note=refusal_for(rec.id, cfg.answer_notes) if cfg.answer_target == "brief_think" else None,
            answer_target=cfg.answer_target)
        if len(ids) <= plen:
            stats.skipped_no_answer += 1  # an empty generation teaches nothing
            continue
        stats.truncated_prompts += prompt_cut
        stats.truncated_targets += target_cut
        stats.tokens += len(ids)
        stats.target_tokens += len(ids) - plen
        setattr(stats, path, getattr(stats, path) + 1)
        examples.append(AlignExample(rec.id, path, ids, [-100] * plen + ids[plen:], positions, float(prob),
                                     float(path == REFUSE)))
    stats.teacher_agreement = agree / len(records) if records else None
    if stats.skipped_no_answer:
        log(f"skipped {stats.skipped_no_answer} comply prompts without a usable CoT-ON answer")
    if stats.cut_answers:
        log(f"{stats.cut_answers} comply prompts whose CoT-ON answer hit the teacher's token limit: decision loss "
            "only (align.cut_answers)")
    return examples, stats


def transfer_split(examples: list[AlignExample], fraction: float, seed: int = 0) -> list[AlignExample]:
    """The transfer arm: only a seeded ``fraction`` of the Path A examples keep their SFT target; the others
    become decision-only (prompt alone, decision label kept). ``fraction`` 1 changes nothing."""
    if fraction >= 1:
        return examples
    refuse = [e for e in examples if e.path == REFUSE]
    keep = {e.id for e in seeded_sample(refuse, round(len(refuse) * fraction), seed + 2)}
    out = []
    for e in examples:
        if e.path == REFUSE and e.id not in keep:
            plen = next(i for i, label in enumerate(e.labels) if label != -100)
            e = AlignExample(e.id, e.path, e.input_ids[:plen], [-100] * plen, e.decision_positions,
                             e.decision_target, e.decision_label)
        out.append(e)
    return out


def load_training_records(teacher_path: Path, split: str, max_prompts: int | None = None, seed: int = 0,
                          extra_refuse: int = 0, decision_only: int = 0,
                          sources: Sequence[str] | None = None) -> tuple[list, list, list]:
    """Teacher records of one split: the SFT sample of ``max_prompts`` and up to ``extra_refuse`` more
    (seeded) that the teacher refuses, both from ``sources`` (all when None), and up to ``decision_only`` of
    the rest of every source (seeded, for the decision loss alone); an error if the split has none."""
    from training.data import sft_sample
    from training.teacher import iter_teacher

    records = list(iter_teacher(Path(teacher_path)))
    chosen = [r for r in records if r.split == split]
    if not chosen:
        present = sorted({r.split for r in records})
        raise AlignError(f"no training data for split {split!r} in {teacher_path} "
                         f"({len(records)} records; splits present: {', '.join(present) or 'none'})")
    sft_pool = [r for r in chosen if sources is None or r.source in sources]
    if not sft_pool:
        present = sorted({r.source for r in chosen})
        raise AlignError(f"no {split!r} prompt of the SFT sources {', '.join(sources or ())} in {teacher_path} "
                         f"(sources present: {', '.join(present)})")
    sample = sft_sample(sft_pool, max_prompts, seed)
    taken = {r.id for r in sample}
    rest = [r for r in sft_pool if r.id not in taken and r.decision == REFUSE]
    extra = seeded_sample(rest, extra_refuse, seed) if extra_refuse else []
    taken |= {r.id for r in extra}
    unused = [r for r in chosen if r.id not in taken]
    return sample, extra, seeded_sample(unused, decision_only, seed + 1) if decision_only else []


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, items: list[dict[str, Any]]):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.items[i]
