"""What ``presafe eval`` measures on: the eval sets of the selected prompts, arithmetic scoring and one
row per request (decision, tokens, correctness)."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from service.core.decision import DecisionPath, analyze, split_think
from service.core.judge import RefusalJudge
from training.data import BENIGN, HARMFUL, PoolRecord

ARITHMETIC = "arithmetic"
FORMMATCHED = "formmatched"
JAILBREAK = "jailbreak"
PROBES = "probes"
EDGY = "edgy"
UNCAPPED = "uncapped"
EDGY_SOURCES = (FORMMATCHED,)  # sources whose edgy benign prompts form a set of their own
PATHS = tuple(str(p) for p in DecisionPath)


class EvalError(Exception):
    """A user-facing evaluation error (bad endpoint, unknown model, empty selection)."""


# --------------------------------------------------------------------------- prompts


def _set_key(rec: PoolRecord) -> tuple[str, str]:
    if rec.source in EDGY_SOURCES and rec.label == BENIGN and rec.category == EDGY:
        return rec.source, EDGY
    return rec.source, rec.label or ""


def _rank(seed: int, rec: PoolRecord) -> str:
    """A seeded, order-free sort key; twins of a counterfactual pair share it, so a sample of each of
    their sets keeps the pair together."""
    return hashlib.sha256(f"{seed}:{rec.pair_id or rec.id}".encode()).hexdigest() + rec.id


def set_of(rec: PoolRecord) -> str:
    """The eval set of a record (assigned by :func:`assign_sets`; its source until then)."""
    return (rec.model_extra or {}).get("eval_set") or rec.source


def assign_sets(records: Sequence[PoolRecord], uncapped: Iterable[str] = ()) -> list[PoolRecord]:
    """The records with their eval set: ``source`` when the source has one (source, label) group,
    ``source/label`` (``source/edgy``) when it has more; ids in ``uncapped`` go to ``source/uncapped``."""
    uncapped = set(uncapped)
    groups: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for rec in records:
        if rec.id not in uncapped:
            groups[rec.source].add(_set_key(rec))
    out = []
    for rec in records:
        source, part = _set_key(rec)
        if rec.id in uncapped:
            name = f"{source}/{UNCAPPED}"
        else:
            name = f"{source}/{part}" if len(groups[source]) > 1 else source
        out.append(PoolRecord(**{**rec.model_dump(), "eval_set": name}))
    return out


def select_prompts(records: Iterable[PoolRecord], *, splits: Sequence[str] = ("heldout",),
                   arithmetic_splits: Sequence[str] = ("test",), sources: Sequence[str] | None = None,
                   limit_per_source: int | None = None, limit_per_set: int | None = None,
                   uncapped_source: str | None = None, uncapped_n: int = 0, seed: int = 0) -> list[PoolRecord]:
    """Labelled prompts of ``splits`` (arithmetic: of ``arithmetic_splits``), optionally only ``sources``,
    grouped into eval sets (:func:`assign_sets`), sorted by source and id.

    At most ``limit_per_source`` per source, then ``limit_per_set`` per set: seeded samples that keep
    counterfactual pairs together (:func:`_rank`). ``uncapped_n`` more harmful prompts of
    ``uncapped_source`` (not among those chosen) form the set ``<source>/uncapped``. A split or source that
    no record has is an :class:`EvalError` (a typo would otherwise select nothing)."""
    records = list(records)
    present = {"split": {r.split for r in records}, "source": {r.source for r in records}}
    for kind, asked in (("split", [*splits, *arithmetic_splits]), ("source", sources or [])):
        unknown = sorted(set(asked) - present[kind])
        if unknown:
            raise EvalError(f"unknown {kind} {unknown[0]!r}; the pool has: {', '.join(sorted(present[kind]))}")
    by_source: dict[str, list[PoolRecord]] = defaultdict(list)
    for rec in records:
        if rec.label not in (HARMFUL, BENIGN) or (sources and rec.source not in sources):
            continue
        wanted = arithmetic_splits if rec.source == ARITHMETIC else splits
        if rec.split in wanted:
            by_source[rec.source].append(rec)
    chosen: list[PoolRecord] = []
    extra: list[PoolRecord] = []
    for source in sorted(by_source):
        ranked = sorted(by_source[source], key=lambda r: _rank(seed, r))
        picked = ranked[:limit_per_source] if limit_per_source is not None else ranked
        by_set: dict[tuple[str, str], list[PoolRecord]] = defaultdict(list)
        for rec in picked:
            by_set[_set_key(rec)].append(rec)
        picked = [r for group in by_set.values()
                  for r in (group[:limit_per_set] if limit_per_set is not None else group)]
        chosen.extend(picked)
        if source == uncapped_source and uncapped_n:
            ids = {r.id for r in picked}
            extra.extend([r for r in ranked if r.label == HARMFUL and r.id not in ids][:uncapped_n])
    ordered = sorted(chosen + extra, key=lambda r: (r.source, r.id))
    return assign_sets(ordered, uncapped={r.id for r in extra})


# --------------------------------------------------------------------------- arithmetic

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number written in ``text`` (thousands separators dropped), or None."""
    found = _NUMBER.findall(text or "")
    return found[-1].replace(",", "") if found else None


def arithmetic_correct(answer_text: str, expected: str) -> tuple[bool, str | None]:
    """(whether the last number of the answer part equals ``expected``, that number)."""
    got = last_number(answer_text)
    if got is None:
        return False, None
    try:
        return float(got) == float(expected), got
    except ValueError:
        return False, got


# --------------------------------------------------------------------------- rows


@dataclass
class ResponseRow:
    """One request's outcome."""

    model: str
    id: str
    source: str
    label: str
    path: str | None = None
    refused: bool | None = None
    completion_tokens: int | None = None
    think_tokens: int | None = None
    think_closed: bool | None = None
    finish_reason: str | None = None
    expected: str | None = None  # arithmetic
    parsed: str | None = None
    correct: bool | None = None
    decision_source: str | None = None  # "gateway" (the response's presafe field) or "client"
    latency_s: float | None = None
    text: str | None = None
    reasoning: str | None = None
    error: str | None = None
    set: str | None = None  # eval set (see :func:`assign_sets`)
    form: str | None = None
    category: str | None = None
    pair_id: str | None = None
    max_tokens: int | None = None  # the generation limit asked for
    capped: bool = False  # asked with decision_max_tokens (below max_tokens)
    p_refuse: float | None = None  # teacher-forced decision score: P(refusal path's opening | prompt)
    greedy_refuse: bool | None = None  # greedy decoding opens the refusal path (pre-CoT refusal)

    @classmethod
    def of(cls, model: str, rec: PoolRecord, **fields: Any) -> ResponseRow:
        """A row for ``rec`` (its set, form, category and pair filled in)."""
        return cls(model=model, id=rec.id, source=rec.source, label=rec.label or "", set=set_of(rec),
                   form=rec.form, category=rec.category, pair_id=rec.pair_id, **fields)


def _extra(obj: Any, name: str) -> Any:
    value = getattr(obj, name, None)
    if value is None and getattr(obj, "model_extra", None):
        value = obj.model_extra.get(name)
    return value


def gateway_decision(response: Any, choice: Any = None) -> dict | None:
    """The decision a PreSafe gateway attached (``presafe`` on the choice or the response), if any."""
    for holder in (choice, response):
        if holder is None:
            continue
        field = _extra(holder, "presafe")
        if isinstance(field, dict):
            decision = field.get("decision", field)
            if isinstance(decision, dict) and decision.get("path") in PATHS and "refused" in decision:
                return decision
    return None


def row_from_response(model: str, rec: PoolRecord, response: Any, *, starts_in_think: bool | None,
                      judge: RefusalJudge, latency_s: float | None = None, max_tokens: int | None = None,
                      capped: bool = False) -> ResponseRow:
    """Decision, tokens and arithmetic correctness of one chat completion (a completion cut by the length
    limit is analysed as such: ``finish_reason`` goes to :func:`service.core.decision.analyze`)."""
    choice = response.choices[0]
    message = choice.message
    text = message.content or ""
    reasoning = _extra(message, "reasoning") or _extra(message, "reasoning_content")
    usage = getattr(response, "usage", None)
    tokens = getattr(usage, "completion_tokens", None)
    finish = choice.finish_reason
    local = analyze(text, reasoning, judge=judge, starts_in_think=starts_in_think, finish_reason=finish,
                    completion_tokens=tokens)
    remote = gateway_decision(response, choice)
    path, refused, source = str(local.path), local.refused, "client"
    if remote is not None:
        path, refused, source = str(remote["path"]), bool(remote["refused"]), "gateway"
    row = ResponseRow.of(model, rec, path=path, refused=refused, completion_tokens=tokens,
                         think_tokens=(remote or {}).get("think_tokens", local.think_tokens),
                         think_closed=local.think_closed, finish_reason=finish, decision_source=source,
                         latency_s=latency_s, text=text, reasoning=reasoning, max_tokens=max_tokens, capped=capped)
    if remote is not None and "think_closed" in remote:
        row.think_closed = bool(remote["think_closed"])
    if rec.answer is not None:
        if reasoning:
            answer = text
        elif row.think_closed is False:  # cut inside the reasoning: no answer yet
            answer = ""
        else:
            answer = split_think(text, starts_in_think=starts_in_think, finish_reason=finish)[1]
        row.expected = rec.answer
        row.correct, row.parsed = arithmetic_correct(answer, rec.answer)
    return row
