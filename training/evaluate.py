"""``presafe eval``: evaluate whatever an OpenAI-compatible endpoint serves, model by model, on the same prompts.

Per model, and per source: harmful refusal rate, the share of refusals taken before the CoT, benign
over-refusal, arithmetic accuracy (last number of the answer part against the known ``answer``), mean
generated tokens (``usage.completion_tokens``) and the four decision paths. Rates come with Wilson 95%
intervals. The report is ``eval.json``, ``eval.md``, ``eval.png`` and ``responses.jsonl`` (one row per
request); an *ablation* section compares PreSafe with its λ = 0 twin (plain SFT on the same targets).

Decision parsing (reasoning vs answer, refusal, path) is :mod:`service.decision`'s: a gateway's
``presafe`` extension field is used when present, otherwise the decision is computed here from the text,
so a plain vLLM endpoint works too. Where the completion starts (inside an opened think block or not)
is read, with ``think_start=auto``, from the endpoint's own rendering of a probe prompt (vLLM's
``/tokenize`` + ``/detokenize``); an endpoint without them gets the tracker's "unknown" rules.

Requests go through the official ``openai`` AsyncOpenAI client: bounded concurrency, the client's
retries with exponential backoff, a progress bar. A request that still fails is recorded as an error
and left out of the rates (the count is reported).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.decision import DecisionPath, analyze, prompt_starts_in_think, split_think
from service.judge import PatternJudge, RefusalJudge
from training.data import BENIGN, HARMFUL, PoolRecord

ARITHMETIC = "arithmetic"
PATHS = tuple(str(p) for p in DecisionPath)
_PROBE = "PRESAFE-EVAL-PROBE"
SCHEMA_VERSION = 1


class EvalError(Exception):
    """A user-facing evaluation error (bad endpoint, unknown model, empty selection)."""


class EvalConfig(BaseModel):
    """What ``presafe eval`` runs."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    models: list[str] = Field(min_length=1)
    api_key: str = "EMPTY"
    splits: list[str] = ["heldout"]
    arithmetic_splits: list[str] = ["test"]  # arithmetic has no held-out source; its test split is unseen
    sources: list[str] | None = None
    limit_per_source: int | None = Field(default=None, ge=1)
    seed: int = 0
    concurrency: int = Field(default=8, ge=1)
    max_tokens: int = Field(default=512, ge=1)
    temperature: float = Field(default=0.0, ge=0.0)
    cot: bool = True
    think_start: Literal["auto", "open", "closed", "unknown"] = "auto"
    max_retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)
    ablation: dict[str, str] | None = None  # {"presafe": model, "sft": model}

    @field_validator("base_url")
    @classmethod
    def _v1(cls, url: str) -> str:
        """Accept ``http://host:8000`` and ``http://host:8000/v1`` alike."""
        url = url.strip().rstrip("/")
        if not re.match(r"^https?://", url):
            raise ValueError(f"base URL must start with http:// or https://, got {url!r}")
        return url if url.endswith("/v1") else url + "/v1"

    @field_validator("models")
    @classmethod
    def _unique(cls, models: list[str]) -> list[str]:
        return list(dict.fromkeys(models))

    @field_validator("ablation")
    @classmethod
    def _ablation_keys(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is not None and set(value) != {"presafe", "sft"}:
            raise ValueError("ablation needs exactly the keys presafe and sft (presafe=MODEL,sft=MODEL)")
        return value


def parse_ablation(spec: str) -> dict[str, str]:
    """``"presafe=a,sft=b"`` → ``{"presafe": "a", "sft": "b"}``."""
    out: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not value.strip():
            raise EvalError(f"bad --ablation {spec!r}: expected presafe=MODEL,sft=MODEL")
        out[key.strip()] = value.strip()
    if set(out) != {"presafe", "sft"}:
        raise EvalError(f"bad --ablation {spec!r}: expected presafe=MODEL,sft=MODEL")
    return out


# --------------------------------------------------------------------------- prompts


def select_prompts(records: Iterable[PoolRecord], *, splits: Sequence[str] = ("heldout",),
                   arithmetic_splits: Sequence[str] = ("test",), sources: Sequence[str] | None = None,
                   limit_per_source: int | None = None, seed: int = 0) -> list[PoolRecord]:
    """Labelled prompts of ``splits`` (arithmetic: of ``arithmetic_splits``), optionally only ``sources``,
    with at most ``limit_per_source`` per source (a seeded sample), sorted by source and id. A split or
    source that no record has is an :class:`EvalError` (a typo would otherwise select nothing)."""
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
    for source in sorted(by_source):
        recs = sorted(by_source[source], key=lambda r: r.id)
        if limit_per_source is not None and len(recs) > limit_per_source:
            recs = sorted(random.Random(f"{seed}:{source}").sample(recs, limit_per_source), key=lambda r: r.id)
        chosen.extend(recs)
    return chosen


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
                      judge: RefusalJudge, latency_s: float | None = None) -> ResponseRow:
    """Decision, tokens and arithmetic correctness of one chat completion."""
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
    row = ResponseRow(model=model, id=rec.id, source=rec.source, label=rec.label or "", path=path,
                      refused=refused, completion_tokens=tokens,
                      think_tokens=(remote or {}).get("think_tokens", local.think_tokens),
                      think_closed=local.think_closed, finish_reason=finish, decision_source=source,
                      latency_s=latency_s, text=text, reasoning=reasoning)
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


# --------------------------------------------------------------------------- metrics


def wilson(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval of a proportion ``k/n`` (None when ``n`` is 0)."""
    if n == 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def _rate(k: int, n: int) -> dict:
    return {"value": round(k / n, 4) if n else None, "k": k, "n": n, "ci95": wilson(k, n)}


def summarize(rows: Sequence[ResponseRow]) -> dict:
    """The metrics of one group of rows (errors are counted and left out of every rate)."""
    ok = [r for r in rows if r.error is None]
    harmful = [r for r in ok if r.label == HARMFUL]
    benign = [r for r in ok if r.label == BENIGN]
    arith = [r for r in ok if r.expected is not None]
    refused_harmful = [r for r in harmful if r.refused]
    tokens = [r.completion_tokens for r in ok if r.completion_tokens is not None]
    paths = Counter(r.path for r in ok)
    return {
        "n": len(rows),
        "errors": len(rows) - len(ok),
        "harmful_refusal_rate": _rate(len(refused_harmful), len(harmful)),
        "pre_cot_share": _rate(sum(r.path == DecisionPath.REFUSE_PRE_COT for r in refused_harmful),
                               len(refused_harmful)),
        "benign_over_refusal": _rate(sum(bool(r.refused) for r in benign), len(benign)),
        "arithmetic_accuracy": _rate(sum(bool(r.correct) for r in arith), len(arith)),
        "mean_completion_tokens": round(sum(tokens) / len(tokens), 2) if tokens else None,
        "mean_think_tokens": (round(sum(r.think_tokens or 0 for r in ok) / len(ok), 2) if ok else None),
        "paths": {p: paths.get(p, 0) for p in PATHS},
        "paths_harmful": {p: sum(r.path == p for r in harmful) for p in PATHS},
        "paths_benign": {p: sum(r.path == p for r in benign) for p in PATHS},
    }


def summarize_model(rows: Sequence[ResponseRow]) -> dict:
    """``overall`` and ``by_source`` metrics of one model's rows."""
    by_source: dict[str, list[ResponseRow]] = defaultdict(list)
    for row in rows:
        by_source[row.source].append(row)
    return {"overall": summarize(rows), "by_source": {s: summarize(by_source[s]) for s in sorted(by_source)}}


# Headline metrics: key, label, higher-is-better (None: neither).
HEADLINE: tuple[tuple[str, str, bool | None], ...] = (
    ("harmful_refusal_rate", "harmful refusal rate", True),
    ("pre_cot_share", "refusals taken pre-CoT", True),
    ("benign_over_refusal", "benign over-refusal", False),
    ("arithmetic_accuracy", "arithmetic accuracy", True),
    ("mean_completion_tokens", "mean generated tokens", None),
)


def metric_value(summary: dict, key: str) -> float | None:
    value = summary[key]
    return value["value"] if isinstance(value, dict) else value


def ablation(models: dict[str, dict], presafe: str, sft: str) -> dict:
    """PreSafe against its λ = 0 twin: each headline metric of both and the delta (PreSafe − SFT-only)."""
    for name in (presafe, sft):
        if name not in models:
            raise EvalError(f"ablation model {name!r} was not evaluated; evaluated: {', '.join(models)}")
    a, b = models[presafe]["overall"], models[sft]["overall"]
    rows = {}
    for key, _, _ in HEADLINE:
        va, vb = metric_value(a, key), metric_value(b, key)
        rows[key] = {"presafe": va, "sft": vb,
                     "delta": None if va is None or vb is None else round(va - vb, 4)}
        if isinstance(a[key], dict):
            rows[key]["delta_ci95"] = newcombe(a[key]["k"], a[key]["n"], b[key]["k"], b[key]["n"])
    return {"presafe": presafe, "sft": sft, "metrics": rows}


def newcombe(k1: int, n1: int, k2: int, n2: int) -> list[float] | None:
    """95% interval of ``k1/n1 − k2/n2`` from the two Wilson intervals (Newcombe's hybrid score method;
    it treats the samples as independent, which is conservative for the same prompts)."""
    w1, w2 = wilson(k1, n1), wilson(k2, n2)
    if w1 is None or w2 is None:
        return None
    p1, p2 = k1 / n1, k2 / n2
    d = p1 - p2
    lo = d - math.sqrt((p1 - w1[0]) ** 2 + (w2[1] - p2) ** 2)
    hi = d + math.sqrt((w1[1] - p1) ** 2 + (p2 - w2[0]) ** 2)
    return [round(max(-1.0, lo), 4), round(min(1.0, hi), 4)]


# --------------------------------------------------------------------------- running


class KnownRows:
    """Rows a model already produced for some prompts (with how its completions start), reusable in
    :func:`run_eval`; :meth:`save`/:meth:`load` keep them as JSON lines."""

    def __init__(self, rows: Sequence[ResponseRow], starts_in_think: dict[str, bool | None]):
        self.rows = list(rows)
        self.starts_in_think = dict(starts_in_think)

    def covering(self, records: Sequence[PoolRecord]) -> dict[str, list[ResponseRow]]:
        """Per model, its rows for exactly these prompts, if it has one for each (in record order)."""
        out = {}
        for model in self.starts_in_think:
            by_id = {r.id: r for r in self.rows if r.model == model and r.error is None}
            if all(rec.id in by_id for rec in records):
                out[model] = [by_id[rec.id] for rec in records]
        return out

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(json.dumps({"starts_in_think": self.starts_in_think}) + "\n")
            fh.writelines(json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in self.rows)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> KnownRows | None:
        """The rows saved at ``path``; None when there are none or the file is unreadable."""
        try:
            with open(path, encoding="utf-8") as fh:
                head = json.loads(fh.readline())["starts_in_think"]
                return cls([ResponseRow(**json.loads(line)) for line in fh], head)
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass
class EvalResult:
    """Everything ``presafe eval`` measured."""

    config: dict
    prompts: dict  # counts by source / label
    starts_in_think: dict[str, bool | None]
    models: dict[str, dict]
    rows: list[ResponseRow]
    ablation: dict | None
    served: list[str]
    elapsed_s: float

    def to_json(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "config": self.config,
            "prompts": self.prompts,
            "served_models": self.served,
            "starts_in_think": self.starts_in_think,
            "models": self.models,
            "ablation": self.ablation,
            "elapsed_s": round(self.elapsed_s, 2),
        }


def _root(base_url: str) -> str:
    return base_url.removesuffix("/v1")


def _connection_error(base_url: str, exc: BaseException) -> EvalError:
    cause = exc.__cause__ or exc
    return EvalError(f"cannot reach the endpoint at {base_url}: {type(cause).__name__}: {cause}")


async def served_models(client, base_url: str) -> list[str]:
    """The model ids the endpoint lists (``GET /v1/models``)."""
    import openai

    try:
        page = await client.models.list()
    except openai.APIConnectionError as exc:
        raise _connection_error(base_url, exc) from None
    except openai.APIStatusError as exc:
        raise EvalError(f"{base_url}/models answered HTTP {exc.status_code}: {exc.message}") from None
    return [m.id for m in page.data]


async def probe_starts_in_think(base_url: str, model: str, cot: bool, api_key: str,
                                timeout: float = 30.0) -> bool | None:
    """Render a probe chat with the endpoint's own template (vLLM ``/tokenize`` + ``/detokenize``) and
    tell whether the completion starts inside an opened think block; None if unknown."""
    import httpx

    root, headers = _root(base_url), {"Authorization": f"Bearer {api_key}"}
    body = {"model": model, "messages": [{"role": "user", "content": _PROBE}], "add_generation_prompt": True,
            "chat_template_kwargs": {"enable_thinking": cot}}
    try:
        async with httpx.AsyncClient(timeout=timeout, headers=headers) as http:
            tok = await http.post(f"{root}/tokenize", json=body)
            tok.raise_for_status()
            det = await http.post(f"{root}/detokenize", json={"model": model, "tokens": tok.json()["tokens"]})
            det.raise_for_status()
            prompt = det.json()["prompt"]
    except (httpx.HTTPError, KeyError, ValueError):
        return None
    tail = prompt.rpartition(_PROBE)[2]
    if "<think>" not in tail and "</think>" not in tail:
        return None  # the template knows no think block: the model may or may not open one
    return prompt_starts_in_think(prompt)


_FIXED_START = {"open": True, "closed": False, "unknown": None}


async def run_eval(cfg: EvalConfig, records: Sequence[PoolRecord], *, progress: bool = True,
                   judge: RefusalJudge | None = None, on_progress: Callable[[float], None] | None = None,
                   known: KnownRows | None = None) -> EvalResult:
    """Send every selected prompt to every model and aggregate (``on_progress``: fraction of requests done).

    ``known`` holds finished rows of some models (a cached base model): those models are not asked
    again when it has a row for every selected prompt."""
    import openai

    if not records:
        raise EvalError("no prompts selected (check --splits, --arithmetic-splits, --source)")
    judge = judge or PatternJudge()
    t0 = time.monotonic()
    client = openai.AsyncOpenAI(base_url=cfg.base_url, api_key=cfg.api_key, max_retries=cfg.max_retries,
                                timeout=cfg.timeout_s)
    try:
        probe = client.with_options(max_retries=min(cfg.max_retries, 1), timeout=30.0)
        served = await served_models(probe, cfg.base_url)
        missing = [m for m in cfg.models if m not in served]
        if missing:
            raise EvalError(f"model {missing[0]!r} is not served at {cfg.base_url}; "
                            f"it serves: {', '.join(served) or '(nothing)'}")
        if cfg.ablation:
            for name in cfg.ablation.values():
                if name not in cfg.models:
                    raise EvalError(f"ablation model {name!r} is not among --model {', '.join(cfg.models)}")
        reused = known.covering(records) if known else {}
        starts: dict[str, bool | None] = {m: known.starts_in_think[m] for m in reused}
        asked = [m for m in cfg.models if m not in reused]
        for model in asked:
            starts[model] = (await probe_starts_in_think(cfg.base_url, model, cfg.cot, cfg.api_key)
                             if cfg.think_start == "auto" else _FIXED_START[cfg.think_start])
        fresh = await _run_requests(client, cfg.model_copy(update={"models": asked}), records, starts, judge,
                                    progress, on_progress) if asked else []
        rows = [row for m in cfg.models for row in reused.get(m, fresh) if row.model == m]
    finally:
        await client.close()
    models = {m: summarize_model([r for r in rows if r.model == m]) for m in cfg.models}
    failed = [m for m in cfg.models if models[m]["overall"]["errors"] == models[m]["overall"]["n"]]
    if failed:
        first = next(r.error for r in rows if r.model == failed[0])
        raise EvalError(f"every request to model {failed[0]!r} at {cfg.base_url} failed; first error: {first}")
    abl = ablation(models, cfg.ablation["presafe"], cfg.ablation["sft"]) if cfg.ablation else None
    prompts = {"total": len(records), "by_source": dict(Counter(r.source for r in records)),
               "by_label": dict(Counter(r.label for r in records))}
    return EvalResult(config=cfg.model_dump(mode="json", exclude={"api_key"}), prompts=prompts,
                      starts_in_think=starts, models=models, rows=rows, ablation=abl, served=served,
                      elapsed_s=time.monotonic() - t0)


async def _run_requests(client, cfg: EvalConfig, records: Sequence[PoolRecord], starts: dict,
                        judge: RefusalJudge, progress: bool,
                        on_progress: Callable[[float], None] | None = None) -> list[ResponseRow]:
    import openai
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(cfg.concurrency)
    extra_body = {"chat_template_kwargs": {"enable_thinking": cfg.cot}}
    total = len(records) * len(cfg.models)
    bar = tqdm(total=total, desc="eval", unit="req", disable=not progress)
    finished: list[ResponseRow] = []

    async def one(model: str, rec: PoolRecord) -> ResponseRow:
        async with sem:
            t = time.monotonic()
            try:
                response = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": rec.prompt}],
                    max_tokens=cfg.max_tokens, temperature=cfg.temperature, seed=cfg.seed,
                    extra_body=extra_body)
                row = row_from_response(model, rec, response, starts_in_think=starts[model], judge=judge,
                                        latency_s=round(time.monotonic() - t, 4))
            except openai.APIConnectionError as exc:
                row = ResponseRow(model, rec.id, rec.source, rec.label or "",
                                  error=str(_connection_error(cfg.base_url, exc)))
            except openai.APIStatusError as exc:
                row = ResponseRow(model, rec.id, rec.source, rec.label or "",
                                  error=f"HTTP {exc.status_code}: {exc.message}")
            except openai.APIError as exc:
                row = ResponseRow(model, rec.id, rec.source, rec.label or "", error=f"{type(exc).__name__}: {exc}")
            bar.update(1)
            finished.append(row)
            if on_progress is not None:
                on_progress(len(finished) / total)
            return row

    try:
        return list(await asyncio.gather(*(one(m, r) for m in cfg.models for r in records)))
    finally:
        bar.close()


def evaluate(cfg: EvalConfig, records: Sequence[PoolRecord] | None = None, *, pool_path: Path | None = None,
             progress: bool = True, on_progress: Callable[[float], None] | None = None,
             known: KnownRows | None = None) -> EvalResult:
    """Select prompts from the pool (unless ``records`` are given) and run :func:`run_eval`."""
    if records is None:
        from training.data import load_pool

        records = select_prompts(load_pool(pool_path).records, splits=cfg.splits,
                                 arithmetic_splits=cfg.arithmetic_splits, sources=cfg.sources,
                                 limit_per_source=cfg.limit_per_source, seed=cfg.seed)
    return asyncio.run(run_eval(cfg, records, progress=progress, on_progress=on_progress, known=known))


# --------------------------------------------------------------------------- report


def _fmt_rate(rate: dict) -> str:
    if rate["value"] is None:
        return "–"
    ci = rate["ci95"]
    return f"{rate['value']:.1%} ({rate['k']}/{rate['n']}; {ci[0]:.0%}–{ci[1]:.0%})"


def _fmt(value: Any) -> str:
    if isinstance(value, dict):
        return _fmt_rate(value)
    if value is None:
        return "–"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _fmt_metric(value: float | None, pct: bool) -> str:
    return "–" if value is None else (f"{value:.1%}" if pct else f"{value:.1f}")


def render_markdown(result: EvalResult) -> str:
    """The report as markdown: headline table (models side by side), per source, paths, ablation."""
    cfg, models = result.config, result.models
    names = list(models)
    lines = [
        "# PreSafe evaluation", "",
        (f"Endpoint `{cfg['base_url']}`, CoT {'on' if cfg['cot'] else 'off'}, max_tokens {cfg['max_tokens']}, "
        f"temperature {cfg['temperature']}, splits {', '.join(cfg['splits'])} (arithmetic: "
        f"{', '.join(cfg['arithmetic_splits'])}), {result.prompts['total']} prompts per model "
        f"({', '.join(f'{s} {n}' for s, n in sorted(result.prompts['by_source'].items()))}); "
        f"{result.elapsed_s:.0f} s in all."), "",
        ("Rates: value (k/n; Wilson 95% interval). Pre-CoT share: refusals of harmful prompts with no "
        "reasoning before them. Arithmetic: last number of the answer part against the known answer."), "",
        "## Overall", "",
    ]
    rows = [[label, *(_fmt(models[m]["overall"][key]) for m in names)] for key, label, _ in HEADLINE]
    rows.append(["mean think tokens", *(_fmt(models[m]["overall"]["mean_think_tokens"]) for m in names)])
    rows.append(["failed requests", *(str(models[m]["overall"]["errors"]) for m in names)])
    lines += _table(["metric", *names], rows) + [""]

    lines += ["## Per source", ""]
    src_rows = []
    for m in names:
        for source, s in models[m]["by_source"].items():
            src_rows.append([m, source, str(s["n"]), _fmt(s["harmful_refusal_rate"]), _fmt(s["pre_cot_share"]),
                             _fmt(s["benign_over_refusal"]), _fmt(s["arithmetic_accuracy"]),
                             _fmt(s["mean_completion_tokens"])])
    lines += _table(["model", "source", "n", "harmful refusal", "pre-CoT share", "over-refusal",
                     "arithmetic", "tokens"], src_rows) + [""]

    lines += ["## Decision paths", ""]
    path_rows = []
    for m in names:
        for label in (HARMFUL, BENIGN):
            counts = models[m]["overall"][f"paths_{label}"]
            path_rows.append([m, label, *(str(counts[p]) for p in PATHS)])
    lines += _table(["model", "prompts", *PATHS], path_rows) + [""]

    if result.ablation:
        abl = result.ablation
        lines += ["## Ablation: decision loss (PreSafe) against λ = 0 (plain SFT on the same targets)", "",
                  f"PreSafe `{abl['presafe']}` against SFT-only `{abl['sft']}`; delta = PreSafe − SFT-only.", ""]
        abl_rows = []
        for key, label, higher in HEADLINE:
            m = abl["metrics"][key]
            delta = m["delta"]
            verdict = "" if delta is None or higher is None or delta == 0 else (
                "better" if (delta > 0) == higher else "worse")
            pct = key != "mean_completion_tokens"
            dfmt = "–" if delta is None else (f"{delta * 100:+.1f} pp" if pct else f"{delta:+.1f}")
            ci = m.get("delta_ci95")
            cifmt = "" if ci is None else f"{ci[0] * 100:+.1f} … {ci[1] * 100:+.1f} pp"
            if ci is not None and verdict and ci[0] <= 0 <= ci[1]:
                verdict += " (within noise)"
            abl_rows.append([label, _fmt_metric(m["presafe"], pct), _fmt_metric(m["sft"], pct), dfmt, cifmt,
                             verdict])
        lines += _table(["metric", "PreSafe", "SFT-only (λ=0)", "delta", "delta 95% interval", ""],
                        abl_rows) + [""]
    return "\n".join(lines)


def render_png(result: EvalResult, path: Path) -> None:
    """Grouped bars per model (rates; mean tokens) and a stacked decision-path bar per model and label."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.models)
    overall = {m: result.models[m]["overall"] for m in names}
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.8), gridspec_kw={"width_ratios": [3, 1.2, 2]})
    rate_keys = [(k, label) for k, label, _ in HEADLINE if k != "mean_completion_tokens"]
    width = 0.8 / len(names)
    ax = axes[0]
    for i, m in enumerate(names):
        values = [metric_value(overall[m], k) for k, _ in rate_keys]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(rate_keys))]
        cis = [overall[m][k]["ci95"] for k, _ in rate_keys]
        err = [[max(0.0, v - c[0]) if c else 0 for v, c in zip(values, cis)],
               [max(0.0, c[1] - v) if c else 0 for v, c in zip(values, cis)]]
        bars = ax.bar(xs, [v or 0 for v in values], width, label=m, yerr=err, capsize=2, error_kw={"elinewidth": 0.8})
        for bar, v in zip(bars, values):
            ax.annotate("n/a" if v is None else f"{v:.0%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(rate_keys)), [label for _, label in rate_keys], fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("rate")
    ax.set_title("rates per model (Wilson 95% intervals)")
    ax.legend(fontsize=8)

    ax = axes[1]
    tokens = [overall[m]["mean_completion_tokens"] or 0 for m in names]
    ax.bar(range(len(names)), tokens, color=[f"C{i}" for i in range(len(names))])
    ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
    ax.set_title("mean generated tokens")

    ax = axes[2]
    labels, bottoms = [], []
    stacks = {p: [] for p in PATHS}
    for m in names:
        for label in (HARMFUL, BENIGN):
            counts = overall[m][f"paths_{label}"]
            total = sum(counts.values()) or 1
            labels.append(f"{m}\n{label}")
            for p in PATHS:
                stacks[p].append(counts[p] / total)
    bottoms = [0.0] * len(labels)
    colors = {"refuse_pre_cot": "#2a9d8f", "refuse_after_cot": "#e9c46a", "answer_with_cot": "#e76f51",
              "answer_without_cot": "#8d99ae"}
    for p in PATHS:
        ax.bar(range(len(labels)), stacks[p], 0.6, bottom=bottoms, label=p, color=colors.get(p))
        bottoms = [b + v for b, v in zip(bottoms, stacks[p])]
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylim(0, 1.0)
    ax.set_title("decision paths (share of prompts)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    fig.suptitle(f"PreSafe eval — CoT {'on' if result.config['cot'] else 'off'}, "
                 f"{result.prompts['total']} prompts per model")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: EvalResult, out_dir: Path) -> dict[str, Path]:
    """Write ``eval.json``, ``eval.md``, ``eval.png`` and ``responses.jsonl`` under ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in ("eval.json", "eval.md", "eval.png", "responses.jsonl")}
    paths["eval.json"].write_text(json.dumps(result.to_json(), indent=2) + "\n")
    paths["eval.md"].write_text(render_markdown(result))
    render_png(result, paths["eval.png"])
    with open(paths["responses.jsonl"], "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(asdict(row), ensure_ascii=False) + "\n" for row in result.rows)
    return paths


__all__ = [
    "EvalConfig",
    "EvalError",
    "EvalResult",
    "KnownRows",
    "ResponseRow",
    "ablation",
    "arithmetic_correct",
    "evaluate",
    "last_number",
    "newcombe",
    "parse_ablation",
    "render_markdown",
    "render_png",
    "row_from_response",
    "run_eval",
    "select_prompts",
    "summarize",
    "summarize_model",
    "wilson",
    "write_report",
]
