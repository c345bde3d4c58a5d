"""Stage 1, teacher: for every prompt of the query pool, the teacher's answer and refuse/comply decision.

Teachers (``kind`` of the config's ``teacher`` section, :class:`service.core.config.TeacherConfig`, the
teacher's option set; :class:`TeacherRun` holds the rest: the base model, what to cover, how to connect):

- ``cot-off``: the base reasoning model with its chain of thought switched off (assistant turn
  pre-filled with an empty think block); its answer, judged by the refusal judge, is the decision.
- ``endpoint``: any OpenAI-compatible chat endpoint (URL + model name), judged the same way.
- ``labels``: the pool's own labels (``harmful`` → refuse), for base models whose CoT-OFF mode is
  not itself safe (the CPU default, SmolLM2-135M).

For the same prompts the base model's CoT-ON answers (and, unless switched off, its CoT-OFF answers)
are recorded too: stage 2 self-distils benign answers from them, and ``presafe train report``
compares the two modes. The base model runs batched in vLLM, either a server this process starts (its log goes to a
file beside the output, ``<out>-vllm.log``; the console keeps the progress) or
behind a served OpenAI-compatible endpoint (``base_url``, raw ``/v1/completions`` of the rendered
prompt, so both paths see the same text).

Output: JSONL, one :class:`TeacherRecord` per prompt, each generation with its provenance (model,
template mode, sampling parameters, judge) and its decision analysis (:mod:`service.core.decision`). The
file is appended batch by batch (flushed and fsynced): a rerun skips prompts that already have every
part it asks for, and an interrupted run loses at most the batch in flight. A rerun that asks for
more parts (say CoT-ON answers for the train split, after a labels-only pass over the whole pool)
generates only the missing parts and appends the merged record; readers keep the last record of an
id. An endpoint that fails or times out is retried with exponential backoff; then the run stops
with :class:`TeacherError`, keeping what is done.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.core.assets import AssetError, resolve_model
from service.core.config import TeacherConfig
from service.core.judge import RefusalJudge, get_judge
from service.core.labels import COMPLY, REFUSE
from service.core.settings import get_settings
from training.data import PoolRecord, seeded_sample

Mode = Literal["cot-on", "cot-off", "chat"]


class TeacherError(RuntimeError):
    """The teacher run cannot go on (endpoint down after retries, inconsistent output file, …)."""


# --------------------------------------------------------------------------- configuration


class Sampling(BaseModel):
    """Sampling parameters of one generation mode (greedy by default, so reruns agree)."""

    model_config = ConfigDict(extra="forbid")

    max_tokens: int = Field(gt=0)
    temperature: float = Field(default=0.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int = 0


class TeacherRun(BaseModel):
    """What one teacher run covers and how it connects: the values beyond the config's ``teacher`` section
    (:class:`service.core.config.TeacherConfig`, which is the teacher's option set)."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(default_factory=lambda: get_settings().base_model,
                       description="Base reasoning model: known name, local dir or HF id (its tokenizer renders prompts).")
    seed: int = Field(default=0, description="Seed of the sample (``limit``) and of every generation.")
    cot_on: bool = Field(default=True, description="Record the base model's CoT-ON answers.")
    cot_off: bool = Field(default=True, description="Record the base model's CoT-OFF answers (always for kind=cot-off).")
    splits: list[str] | None = None
    sources: list[str] | None = None
    limit: int | None = Field(default=None, gt=0, description="Seeded sample of this many prompts.")
    batch_size: int = Field(default=64, gt=0)
    served_model: str | None = Field(default=None, description="Model name at the section's base_url (default: its first model).")
    api_key: str = "EMPTY"
    judge_options: dict[str, Any] = Field(default_factory=dict,
                                          description="Keyword arguments of the judge (endpoint: url, model, api_key).")
    endpoint_max_tokens: int | None = Field(default=None, gt=0, description="Tokens per endpoint-teacher answer when "
                                            "not the section's max_tokens (the CoT-OFF limit).")
    timeout_s: float = Field(default=300.0, gt=0)
    retries: int = Field(default=3, ge=0)
    backoff_s: float = Field(default=2.0, ge=0)
    max_model_len: int = 2048


def teacher_sampling(cfg: TeacherConfig, seed: int = 0, endpoint_max_tokens: int | None = None) -> dict[str, Sampling]:
    """The sampling of each generation kind (``cot_on``, ``cot_off``, ``endpoint``) of a ``teacher`` section."""
    common = {"temperature": cfg.temperature, "seed": seed}
    return {"cot_on": Sampling(max_tokens=cfg.cot_on_max_tokens, **common),
            "cot_off": Sampling(max_tokens=cfg.max_tokens, **common),
            "endpoint": Sampling(max_tokens=endpoint_max_tokens or cfg.max_tokens, **common)}


def default_output() -> Path:
    return get_settings().root / "teacher" / "teacher.jsonl"


# --------------------------------------------------------------------------- records


class Provenance(BaseModel):
    model: str
    backend: str  # "vllm" (a server started here) or the endpoint URL
    template_mode: Mode
    sampling: Sampling
    judge: str


class Generation(BaseModel):
    """One answer of a model: the raw text, its reasoning and answer parts, and the judge's verdict."""

    text: str
    reasoning: str | None = None
    answer: str
    think_closed: bool  # False: cut by the length limit inside an unfinished think block (no decision yet)
    path: str  # service.core.decision.DecisionPath: refuse_pre_cot, refuse_after_cot, answer_with_cot, answer_without_cot
    finish_reason: str | None = None
    refusal: bool
    provenance: Provenance


# Pool fields a teacher record carries; a done record whose copy differs from the pool is rewritten
# (its generations kept), so a rebuilt pool's metadata reaches the classifier without new generation.
POOL_FIELDS = ("source", "label", "split", "category", "form", "pair_id", "template", "base_id")


class TeacherRecord(BaseModel):
    """The teacher's output for one pool prompt."""

    model_config = ConfigDict(extra="allow")

    id: str
    prompt: str
    source: str
    label: str | None = None
    split: str
    decision: Literal["refuse", "comply"]
    teacher: dict  # Teacher.signature() of the run that wrote it
    # carried from the pool record (training.data.PoolRecord): the classifier's per-form and pair checks
    category: str | None = None
    form: str | None = None
    pair_id: str | None = None
    template: str | None = None
    base_id: str | None = None
    endpoint: Generation | None = None
    cot_on: Generation | None = None
    cot_off: Generation | None = None


def _read_records(path: Path, error: type[Exception]) -> dict[str, TeacherRecord]:
    """Records of ``path`` by id (the last record of an id wins), in first-appearance order."""
    records: dict[str, TeacherRecord] = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                rec = TeacherRecord.model_validate_json(line)
            except ValidationError as exc:
                raise error(f"{path}:{lineno}: malformed teacher record ({str(exc).splitlines()[0]})") from None
            records[rec.id] = rec
    return records


def read_done(path: Path) -> dict[str, TeacherRecord]:
    """Records already in ``path`` by id; a torn last line (a run killed mid-write) is cut off, any
    other bad line is an error naming the file and line."""
    if not path.is_file():
        return {}
    size = path.stat().st_size
    if size:
        with open(path, "rb") as fh:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                fh.seek(0)
                data = fh.read()
                cut = data.rfind(b"\n") + 1
                with open(path, "r+b") as wh:
                    wh.truncate(cut)
    return _read_records(path, TeacherError)


def iter_teacher(path: Path) -> Iterator[TeacherRecord]:
    """Teacher records of ``path``, one per id (its last); a bad line is an error naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise AssetError(f"no teacher output at {path}; make it with: presafe train teacher")
    yield from _read_records(path, AssetError).values()


# --------------------------------------------------------------------------- retries


def _retryable(exc: Exception) -> bool:
    import openai

    if isinstance(exc, (openai.APIConnectionError, openai.APITimeoutError, openai.RateLimitError)):
        return True
    return isinstance(exc, openai.APIStatusError) and exc.status_code >= 500


def with_retries(call: Callable[[], object], what: str, retries: int, backoff_s: float,
                 log: Callable[[str], None] = lambda msg: None):
    """Run ``call``; retry transient endpoint failures with exponential backoff, then raise TeacherError."""
    for attempt in range(retries + 1):
        try:
            return call()
        except Exception as exc:
            if not _retryable(exc):
                raise TeacherError(f"{what} failed: {exc}") from exc
            if attempt == retries:
                raise TeacherError(f"{what} failed after {retries + 1} attempts: {exc}") from exc
            delay = backoff_s * 2**attempt
            log(f"{what}: {type(exc).__name__}; retry {attempt + 1}/{retries} in {delay:.1f}s")
            time.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- generators


@dataclass
class Completion:
    text: str
    finish_reason: str | None = None
    reasoning: str | None = None


class Generator(Protocol):
    backend: str

    def complete(self, prompts: Sequence[str], sampling: Sequence[Sampling]) -> list[Completion]: ...


class ServedVLLM:
    """The base model behind a vLLM server subprocess of its own: vLLM's log goes to ``log_path`` (the
    console keeps the stages), completions go through :class:`CompletionsEndpoint`."""

    backend = "vllm"

    def __init__(self, run: TeacherRun, model_path: str, log_path: Path, log: Callable[[str], None]):
        import asyncio

        from service.vllm_server import EmbeddedPlan, VLLMSupervisor, free_port

        settings = get_settings()
        plan = EmbeddedPlan(model=model_path, served_name="teacher-base", port=free_port(), lora=False,
                            max_model_len=run.max_model_len, extra_args=["--seed", str(run.seed)])
        self.supervisor = VLLMSupervisor(plan, settings, log_path, max_restarts=0)
        log(f"starting vLLM with {model_path} (its log: {log_path})")
        self.supervisor.start()
        try:
            asyncio.run(self.supervisor.wait_ready(settings.vllm_startup_timeout_s))
            # our own server works through one batch at a time: a slow machine must not time it out
            self.endpoint = CompletionsEndpoint(plan.url, run.model_copy(update={
                "served_model": plan.served_name, "timeout_s": max(run.timeout_s, 3600.0)}), log)
        except BaseException:
            self.supervisor.stop()
            raise

    def complete(self, prompts: Sequence[str], sampling: Sequence[Sampling]) -> list[Completion]:
        return self.endpoint.complete(prompts, sampling)

    def close(self) -> None:
        """Stop the server now (it would otherwise hold its memory until the process exits)."""
        self.supervisor.stop()


def _client(url: str, api_key: str, timeout_s: float):
    import openai

    base = url.rstrip("/")
    return openai.OpenAI(base_url=base if base.endswith("/v1") else f"{base}/v1", api_key=api_key,
                         timeout=timeout_s, max_retries=0)


class CompletionsEndpoint:
    """A served base model: one batched ``/v1/completions`` request per sampling setting."""

    def __init__(self, base_url: str, run: TeacherRun, log: Callable[[str], None]):
        self.backend = base_url
        self.run, self.log = run, log
        self.client = _client(base_url, run.api_key, run.timeout_s)
        self.model = run.served_model or with_retries(
            lambda: self.client.models.list().data[0].id, f"{base_url} /v1/models", run.retries,
            run.backoff_s, log)

    def complete(self, prompts: Sequence[str], sampling: Sequence[Sampling]) -> list[Completion]:
        out: list[Completion | None] = [None] * len(prompts)
        groups: dict[str, list[int]] = {}
        for i, s in enumerate(sampling):
            groups.setdefault(s.model_dump_json(), []).append(i)
        for key, idx in groups.items():
            s = Sampling.model_validate_json(key)
            request = {"model": self.model, "prompt": [prompts[i] for i in idx], "max_tokens": s.max_tokens,
                       "temperature": s.temperature, "top_p": s.top_p, "seed": s.seed}
            resp = with_retries(lambda request=request: self.client.completions.create(**request),
                                f"{self.backend} /v1/completions", self.run.retries, self.run.backoff_s, self.log)
            for choice in resp.choices:
                out[idx[choice.index]] = Completion(choice.text, choice.finish_reason)
        missing = [i for i, c in enumerate(out) if c is None]
        if missing:
            raise TeacherError(f"{self.backend} returned {len(prompts) - len(missing)} of {len(prompts)} completions")
        return out  # type: ignore[return-value]


class ChatEndpoint:
    """The ``endpoint`` teacher: any OpenAI-compatible chat model, one request per prompt, several in flight."""

    def __init__(self, cfg: TeacherConfig, run: TeacherRun, sampling: Sampling, log: Callable[[str], None]):
        if not cfg.endpoint_url or not cfg.endpoint_model:
            raise TeacherError("the endpoint teacher needs --endpoint-url and --endpoint-model")
        self.backend = cfg.endpoint_url
        self.cfg, self.run, self.sampling, self.log = cfg, run, sampling, log
        self.client = _client(cfg.endpoint_url, run.api_key, run.timeout_s)

    def _one(self, prompt: str) -> Completion:
        s = self.sampling
        resp = with_retries(
            lambda: self.client.chat.completions.create(
                model=self.cfg.endpoint_model, messages=[{"role": "user", "content": prompt}],
                max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p, seed=s.seed),
            f"{self.backend} /v1/chat/completions", self.run.retries, self.run.backoff_s, self.log)
        choice = resp.choices[0]
        msg = choice.message
        reasoning = getattr(msg, "reasoning", None) or getattr(msg, "reasoning_content", None)
        return Completion(msg.content or "", choice.finish_reason, reasoning)

    def chat(self, prompts: Sequence[str]) -> list[Completion]:
        failed = threading.Event()  # a failure stops the batch: requests not yet started are dropped

        def one(prompt: str) -> Completion | None:
            if failed.is_set():
                return None
            try:
                return self._one(prompt)
            except Exception:
                failed.set()
                raise

        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(one, prompts))  # type: ignore[arg-type]


# --------------------------------------------------------------------------- the run


def select(records: list[PoolRecord], run: TeacherRun) -> list[PoolRecord]:
    """Filter by split/source; ``limit`` takes a seeded (order-stable) sample."""
    chosen = [r for r in records
              if (run.splits is None or r.split in run.splits) and (run.sources is None or r.source in run.sources)]
    return seeded_sample(chosen, run.limit, run.seed)


@dataclass
class TeacherResult:
    path: Path
    total: int
    skipped: int
    written: int
    seconds: float


class Teacher:
    """Runs a ``teacher`` section (:class:`service.core.config.TeacherConfig`) and a :class:`TeacherRun` over
    pool records, appending to a JSONL file."""

    def __init__(self, cfg: TeacherConfig, run: TeacherRun, log: Callable[[str], None] = lambda msg: None,
                 generator: Generator | None = None):
        self.cfg, self.run_options, self.log = cfg, run, log
        self.sampling = teacher_sampling(cfg, run.seed, run.endpoint_max_tokens)
        try:
            self.judge: RefusalJudge = get_judge(cfg.judge, **run.judge_options)
        except TypeError as exc:
            raise TeacherError(f"refusal judge {cfg.judge!r}: {exc} (the endpoint judge needs --judge-url and "
                               f"--judge-model)") from None
        self._generator = generator
        self.vllm_log: Path | None = None  # where a vLLM server started here logs (set by run: beside its output)
        self._endpoint: ChatEndpoint | None = None
        self._tokenizer = None
        self.model_path = resolve_model(run.model)

    # lazily started: a rerun with nothing left to do starts no model
    @property
    def generator(self) -> Generator:
        if self._generator is None:
            if self.cfg.base_url:
                self._generator = CompletionsEndpoint(self.cfg.base_url, self.run_options, self.log)
            else:
                log_path = self.vllm_log or default_output().with_name("vllm.log")
                self._generator = ServedVLLM(self.run_options, self.model_path, log_path, self.log)
        return self._generator

    def close(self) -> None:
        """Release the generator (a vLLM server started here) once the run is over."""
        close = getattr(self._generator, "close", None)
        if close is not None:
            close()
        self._generator = None

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def render(self, prompt: str, cot: bool) -> str:
        from service.core.cot import render_prompt

        return render_prompt(self.tokenizer, [{"role": "user", "content": prompt}], cot=cot)

    def _generation(self, c: Completion, mode: Mode, sampling: Sampling, model: str, backend: str) -> Generation:
        """Split and judge a completion with the gateway's decision analysis (service.core.decision)."""
        from service.core.decision import DecisionTracker

        # CoT-ON completions start inside the think block, CoT-OFF ones after it; chat answers carry
        # reasoning in their own field or before a </think>.
        starts = {"cot-on": True, "cot-off": False, "chat": None}[mode]
        tracker = DecisionTracker(self.judge, starts_in_think=starts, streaming=False,
                                  head_chars=len(c.text) + len(c.reasoning or "") + 1)
        tracker.feed(c.text, c.reasoning)
        decision = tracker.finish(c.finish_reason)
        prov = Provenance(model=model, backend=backend, template_mode=mode, sampling=sampling, judge=self.judge.name)
        return Generation(text=c.text, reasoning=tracker.reasoning_text or None, answer=tracker.answer_head,
                          think_closed=decision.think_closed, path=str(decision.path),
                          finish_reason=c.finish_reason, refusal=decision.refused, provenance=prov)

    def parts(self) -> tuple[str, ...]:
        """The record parts this run fills in: ``endpoint``, ``cot_on``, ``cot_off``."""
        run = self.run_options
        return tuple(p for p, want in (("endpoint", self.cfg.kind == "endpoint"), ("cot_on", run.cot_on),
                                       ("cot_off", run.cot_off or self.cfg.kind == "cot-off")) if want)

    def signature(self) -> dict:
        """Who decides; a rerun may only add to a file written with the same signature."""
        cfg = self.cfg
        return {"kind": cfg.kind, "judge": cfg.judge,
                "model": cfg.endpoint_model if cfg.kind == "endpoint" else self.run_options.model
                if cfg.kind == "cot-off" else None}

    def missing(self, rec: TeacherRecord | None) -> tuple[str, ...]:
        """What this run still has to do for a prompt (``record``: nothing is on file yet)."""
        if rec is None:
            return ("record", *self.parts())
        return tuple(p for p in self.parts() if getattr(rec, p) is None)

    def process(self, batch: list[PoolRecord], done: dict[str, TeacherRecord]) -> list[TeacherRecord]:
        """Fill in the missing parts of each prompt's record; return the complete records."""
        cfg, model, sampling = self.cfg, self.run_options.model, self.sampling
        parts: dict[str, dict[str, Generation | None]] = {
            r.id: {p: getattr(done[r.id], p) if r.id in done else None for p in ("endpoint", "cot_on", "cot_off")}
            for r in batch}
        todo = {r.id: self.missing(done.get(r.id)) for r in batch}
        chat = [r for r in batch if "endpoint" in todo[r.id]]
        if chat:
            if self._endpoint is None:
                self._endpoint = ChatEndpoint(cfg, self.run_options, sampling["endpoint"], self.log)
            for r, c in zip(chat, self._endpoint.chat([r.prompt for r in chat]), strict=True):
                parts[r.id]["endpoint"] = self._generation(c, "chat", sampling["endpoint"], cfg.endpoint_model,
                                                           cfg.endpoint_url)
        jobs: list[tuple[str, str, str, Sampling]] = []
        for r in batch:
            if "cot_on" in todo[r.id]:
                jobs.append(("cot_on", r.id, self.render(r.prompt, cot=True), sampling["cot_on"]))
            if "cot_off" in todo[r.id]:
                jobs.append(("cot_off", r.id, self.render(r.prompt, cot=False), sampling["cot_off"]))
        if jobs:
            gen = self.generator
            completions = gen.complete([j[2] for j in jobs], [j[3] for j in jobs])
            for (key, rid, _, job_sampling), c in zip(jobs, completions, strict=True):
                mode: Mode = "cot-on" if key == "cot_on" else "cot-off"
                parts[rid][key] = self._generation(c, mode, job_sampling, model, gen.backend)
        out = []
        for r in batch:
            got = parts[r.id]
            if cfg.kind == "labels":
                if r.label not in ("harmful", "benign"):
                    raise TeacherError(f"prompt {r.id} has no harmful/benign label; the labels teacher needs one")
                decision = REFUSE if r.label == "harmful" else COMPLY
            else:
                decision = REFUSE if got["endpoint" if cfg.kind == "endpoint" else "cot_off"].refusal else COMPLY
            out.append(TeacherRecord(id=r.id, prompt=r.prompt, decision=decision, teacher=self.signature(),
                                     **{f: getattr(r, f) for f in POOL_FIELDS}, **got))
        return out

    def check_compatible(self, out: Path, done: dict[str, TeacherRecord]) -> None:
        mine = self.signature()
        for rec in done.values():
            if rec.teacher != mine:
                raise TeacherError(
                    f"{out} was written by another teacher ({json.dumps(rec.teacher, sort_keys=True)}, this run: "
                    f"{json.dumps(mine, sort_keys=True)}); pass --overwrite or another --out")
            for part in ("cot_on", "cot_off"):
                gen = getattr(rec, part)
                if gen is not None and part in self.parts() and gen.provenance.model != self.run_options.model:
                    raise TeacherError(f"{out} holds {part} answers of {gen.provenance.model!r}, this run uses "
                                       f"{self.run_options.model!r}; pass --overwrite or another --out")
            return  # one record is enough: a file has one writer signature

    def run(self, records: list[PoolRecord], out: Path, overwrite: bool = False,
            progress: bool = True, on_progress: Callable[[float], None] | None = None) -> TeacherResult:
        """Process every selected prompt that lacks a part this run asks for; append batch by batch
        (``on_progress`` gets the fraction done after each batch)."""
        from tqdm import tqdm

        start = time.monotonic()
        out.parent.mkdir(parents=True, exist_ok=True)
        if overwrite and out.exists():
            out.unlink()
        self.vllm_log = self.vllm_log or out.with_name(f"{out.stem}-vllm.log")
        done = read_done(out)
        self.check_compatible(out, done)
        chosen = select(records, self.run_options)
        pending = [r for r in chosen if self.missing(done.get(r.id)) or _stale(r, done[r.id])]
        self.log(f"{len(chosen)} prompts selected, {len(chosen) - len(pending)} already done, {len(pending)} to go")
        written = 0
        with open(out, "a", encoding="utf-8") as fh, \
                tqdm(total=len(pending), desc=f"teacher ({self.cfg.kind})", unit="prompt", disable=not progress) as bar:
            for b in range(0, len(pending), self.run_options.batch_size):
                rows = self.process(pending[b: b + self.run_options.batch_size], done)
                fh.write("".join(r.model_dump_json(exclude_none=True) + "\n" for r in rows))
                fh.flush()
                os.fsync(fh.fileno())
                written += len(rows)
                bar.update(len(rows))
                if on_progress is not None:
                    on_progress(written / len(pending))
        return TeacherResult(out, len(chosen), len(chosen) - len(pending), written, time.monotonic() - start)


def _stale(pool: PoolRecord, rec: TeacherRecord) -> bool:
    """Whether a done record's copy of the pool fields differs from the pool record now."""
    return any(getattr(pool, f) != getattr(rec, f) for f in POOL_FIELDS)


def run_teacher(cfg: TeacherConfig, run: TeacherRun, pool_path: Path | None = None, out: Path | None = None,
                overwrite: bool = False, log: Callable[[str], None] = lambda msg: None,
                progress: bool = True) -> TeacherResult:
    """Load the pool (``$PRESAFE_HOME/data/default/pool.jsonl`` by default) and run the teacher over it."""
    from training.data import load_pool

    records = load_pool(pool_path).records
    if not records:
        raise AssetError(f"the query pool {pool_path} is empty")
    return Teacher(cfg, run, log).run(records, out or default_output(), overwrite=overwrite, progress=progress)
