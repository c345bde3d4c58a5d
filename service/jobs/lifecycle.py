"""The retrain job lifecycle and the adapter swaps behind the admin API, without HTTP.

A retrain (:meth:`Lifecycle.retrain`) validates its overrides against the pipeline config
(``service.core.config.PipelineConfig``: unknown keys and out-of-range values are 422 naming the key),
records a job (one at a time: a second request is 409 naming the active job, never queued),
writes ``$PRESAFE_HOME/jobs/<id>/config.yaml`` and starts the trainer through the runner
(:mod:`service.jobs.runners`); its progress lines (:mod:`service.jobs.store`) update the job row, its output
goes to ``jobs/<id>/train.log``. When it succeeds, its adapter is published to the store and gated
(:mod:`service.adapters.release`: the same steps as the pipeline's publish), and a passing adapter is
loaded into vLLM under its own name and then promoted: the registry switch is what moves the alias, so
requests never see an adapter that is not loaded.

Start-up: leftover temp dirs go, the registry is pointed at intact adapters, jobs a previous
process left active become ``interrupted`` (their trainers are stopped), and the promoted adapter
is loaded into vLLM again (retrying until vLLM answers).

What it needs of the gateway is :class:`service.core.serving.ServingGateway`. Failures are
:class:`service.core.errors.APIError` with the status the admin API answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import shutil
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.adapters.release import may_promote, promotion_record, store_once
from service.adapters.store import (
    AdapterError,
    AdapterInfo,
    AdapterInvalid,
    AdapterLoadError,
    AdapterNotFound,
    AdapterStore,
    NothingToRollBack,
    Registry,
    ReplicaAdapters,
    check_adapter,
)
from service.core.config import ConfigError, PipelineConfig, deep_merge, load_config_mapping, nest_dotted
from service.core.errors import APIError, validation_error
from service.core.gate import GateConfig, GateResult
from service.core.progress import parse_progress_line
from service.core.serving import MergedServing, ServingGateway
from service.core.settings import Settings
from service.jobs.rollout import DeploymentRollout
from service.jobs.runners import RunHandle, Runner, RunSpec, make_runner
from service.jobs.sandbox import PATH_KEYS, URL_KEYS, Sandbox, SandboxError
from service.jobs.store import (
    FINAL_STATES,
    Job,
    JobConflict,
    JobNotFound,
    JobState,
    JobStore,
    tail_lines,
)

log = logging.getLogger("presafe.admin")

CHECKOUT_CONFIGS = Path(__file__).resolve().parents[2] / "configs"
DEFAULT_CONFIG = CHECKOUT_CONFIGS / "cpu-smollm2.yaml"


class AdminSettings(BaseSettings):
    """Admin options (``PRESAFE_*`` env); the token itself is :attr:`Settings.admin_token`."""

    model_config = SettingsConfigDict(env_prefix="PRESAFE_", extra="ignore")

    runner: Literal["local", "kubernetes"] = Field("local", description="Where retrains run.")
    train_config: Path | None = Field(None, description="Base pipeline config of a retrain "
                                      "(default: the checkout's configs/cpu-smollm2.yaml, else the defaults).")
    promote_gate: GateConfig = Field(default_factory=GateConfig, description="Eval gate (JSON) for promotion.")
    admin_max_body_bytes: int = Field(64 * 1024, ge=1, description="Largest admin request body (413 above).")
    cancel_grace_s: float = Field(10.0, ge=0, description="SIGTERM → SIGKILL delay when cancelling a run.")
    keep_loaded: int = Field(3, ge=1, description="Adapters kept loaded in vLLM: the promoted one and the "
                             "ones promoted before it (rollback targets).")
    watch_s: float = Field(15.0, gt=0, description="How often the admin checks that vLLM holds the promoted "
                           "adapter (and loads it again if not).")
    keep_work_dirs: int = Field(3, ge=0, description="Finished jobs whose work dirs (jobs/<id>/run, output) are "
                                "kept; older ones are freed (config and log stay).")
    bootstrap_train: bool = Field(False, description="On start, with no promoted adapter and no active job, "
                                  "retrain with the base config (docker compose / Kubernetes first start).")
    admin_allowed_roots: list[Path] = Field(default_factory=list, description="Directories a retrain's paths may "
                                            "also point into (JSON list), beyond their $PRESAFE_HOME directories.")
    admin_allowed_urls: list[str] = Field(default_factory=list, description="URL prefixes a retrain's teacher "
                                          "URLs may use (JSON list; none by default).")
    admin_allowed_models: list[str] = Field(default_factory=list, description="Model ids (e.g. Hugging Face) a "
                                            "retrain may name besides the known models and local directories.")


def _note(log_path: Path, line: str) -> None:
    """Append one line of our own to a job's log (best effort)."""
    with contextlib.suppress(OSError), open(log_path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")


def _disk_full(exc: BaseException) -> bool:
    """An ENOSPC/EDQUOT, or SQLite's "database or disk is full"."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(exc, sqlite3.OperationalError) and "disk is full" in str(exc)


class DataRefs(BaseModel):
    """Data the retrain uses instead of the config's."""

    model_config = ConfigDict(extra="forbid")

    pool: str | None = Field(None, description="Query pool JSONL, relative to $PRESAFE_HOME/data (or an "
                             "absolute path inside it).")


class RetrainRequest(BaseModel):
    """``POST /admin/retrain``. Every field is optional: ``{}`` retrains with the base config."""

    model_config = ConfigDict(extra="forbid")

    config: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
                               description="Named base config: <name>[.yaml] in $PRESAFE_HOME/configs or the "
                               "checkout's configs/ (default: PRESAFE_TRAIN_CONFIG).")
    overrides: dict[str, Any] = Field(default_factory=dict, description="Config overrides, as dotted keys "
                                      "({\"align.lora_r\": 8}) or nested sections ({\"align\": {\"lora_r\": 8}}).")
    data: DataRefs | None = None
    promote: bool = Field(True, description="Promote the new adapter when it passes the gate (false: store only).")
    gate: GateConfig | None = Field(None, description="Stricter gate for this job: tightens PRESAFE_PROMOTE_GATE "
                                    "(bounds added, margins only lowered), never loosens it.")
    force: bool = Field(False, strict=True, description="Promote even if the gate fails (recorded in the promotion "
                        "history); only a JSON true.")


def gate_record(result: GateResult, gate: GateConfig, forced: bool = False) -> dict[str, Any]:
    """A gate verdict as the job row and the admin API show it (the fields of the API's ``GateOut``)."""
    return {"passed": result.passed, "reasons": result.reasons, "values": result.values,
            "reference": result.reference, "reference_from": result.reference_from,
            "margins": {k: m for k, m, _ in gate.relative_rules()}, "min": gate.min, "max": gate.max,
            "forced": forced}


@dataclass
class Swap:
    """The alias after a promote or rollback (``gate``: the promotion's :func:`gate_record`)."""

    alias: str
    promoted: str
    previous: str | None
    gate: dict[str, Any] | None = None


# --------------------------------------------------------------------------- config handling


def nest_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """A retrain request's ``overrides`` as nested sections (:func:`service.core.config.nest_dotted`); a bad
    key is a 422 naming ``overrides.<key>``."""
    try:
        return nest_dotted(overrides)
    except ConfigError as exc:
        raise APIError(422, f"overrides: {exc}", param=f"overrides.{exc.key}", code="invalid_request") from None


# --------------------------------------------------------------------------- the lifecycle


class Lifecycle:
    """Jobs, runner, adapter store and vLLM for one gateway (the admin API's ``app.state.admin``)."""

    def __init__(self, gateway: ServingGateway, options: AdminSettings | None = None, runner: Runner | None = None):
        self.gw = gateway
        self.settings: Settings = gateway.settings
        self.options = options or AdminSettings()
        self.store = AdapterStore(self.settings.adapters_dir)
        self.work_root = self.settings.root / "jobs"
        self.jobs = JobStore(self.work_root / "jobs.sqlite")
        key = self.settings.vllm_api_key.get_secret_value() if self.settings.vllm_api_key else None
        self.vllm = ReplicaAdapters(gateway.replica_urls, api_key=key)  # every replica holds what is served
        self._runner = runner
        self._tasks: dict[str, asyncio.Task] = {}
        self._handles: dict[str, RunHandle] = {}
        self._cancelled: set[str] = set()
        self._swap = asyncio.Lock()
        self._background: asyncio.Task | None = None
        # In Kubernetes: the Deployment serving the promoted adapter merged, rolled on promote (service.jobs.rollout)
        self.rollout = DeploymentRollout(self.settings.merged_deployment, replicas=gateway.merged_replica_view,
                                         interval=self.options.watch_s) if self.settings.merged_deployment else None

    @property
    def alias(self) -> str:
        return self.settings.model_alias

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            try:
                self._runner = make_runner(self.options.runner)
            except Exception as exc:  # noqa: BLE001 - e.g. no cluster credentials
                raise APIError(503, f"the {self.options.runner} runner is unavailable: {exc}",
                               code="runner_unavailable") from None
        return self._runner

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        report = await asyncio.to_thread(self.store.recover)
        if report.removed_temp or report.dropped:
            log.warning("adapter store recovered", extra={"removed_temp": report.removed_temp,
                                                          "dropped": report.dropped, "promoted": report.promoted})
        for job in self.jobs.active_jobs():
            await self._recover_job(job)
        self.update_metrics()
        if self.options.bootstrap_train:
            await self.bootstrap()
        self._background = asyncio.create_task(self._watch_served())
        if self.rollout is not None:
            self.rollout.start(self.store.promoted)

    async def bootstrap(self) -> Job | None:
        """First start: no promoted adapter and no active job → train the default adapter (the alias is
        not served until one passes the gate). Returns the job started, if any."""
        if self.store.promoted() or self.jobs.active() is not None:
            return None
        try:
            job = await self.retrain(RetrainRequest())
        except APIError as exc:
            log.error("could not start training the default adapter", extra={"error": exc.message})
            return None
        log.warning("no promoted adapter: training the default one", extra={"job_id": job.id})
        return job

    async def _recover_job(self, job: Job) -> None:
        """A job a previous process left active: resume its publish, re-attach to its run (Kubernetes),
        else mark it ``interrupted`` and stop what is left of its trainer."""
        if job.state is JobState.publishing:  # the trainer had succeeded: publish (idempotent) again
            log.warning("resuming the publish of a job after a restart", extra={"job_id": job.id})
            self._tasks[job.id] = asyncio.create_task(self._resume_publish(job), name=f"publish-{job.id}")
            return
        runner = None
        if job.runner_ref and job.runner == self.options.runner:
            with contextlib.suppress(APIError):
                runner = self.runner
        if runner is not None and job.state is JobState.running:
            try:
                handle = await runner.attach(job.runner_ref, job.id)
            except Exception as exc:  # noqa: BLE001 - e.g. the API is down: the job cannot be followed
                log.warning("could not re-attach to a job", extra={"job_id": job.id, "error": str(exc)})
                handle = None
            if handle is not None:
                log.warning("re-attached to a running job after a restart", extra={"job_id": job.id})
                _note(job.log_path, "[presafe] the admin restarted and re-attached to this run")
                self._tasks[job.id] = asyncio.create_task(self._follow(job, handle), name=f"retrain-{job.id}")
                return
        self.jobs.interrupt(job)
        log.warning("job interrupted by a restart", extra={"job_id": job.id, "state": job.state.value})
        if runner is not None:
            with contextlib.suppress(Exception):
                await runner.reap(job.runner_ref, job.id)

    async def _resume_publish(self, job: Job) -> None:
        try:
            await self._publish(job)
        except asyncio.CancelledError:
            self._finish(job.id, JobState.interrupted, error="the gateway shut down during the job")
            raise
        except Exception as exc:  # a job never takes the gateway down
            log.exception("resumed publish failed", extra={"job_id": job.id})
            self._finish(job.id, JobState.failed, error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._tasks.pop(job.id, None)

    async def stop(self) -> None:
        if self._background is not None:
            self._background.cancel()
        if self.rollout is not None:
            await self.rollout.close()
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch_served(self) -> None:
        """Keep the promoted adapter (and its rollback target) loaded in vLLM: at start-up and then
        every ``watch_s`` seconds, so a vLLM restart does not leave the alias pointing at nothing. A failure
        is logged as a warning once (again when its error changes), its retries at debug level: a vLLM that
        refuses for good (e.g. started without ``--enable-lora``) does not flood the log."""
        delay, reported = 1.0, None
        while True:
            registry = self.store.read_registry()
            names = [n for n in reversed(registry.history[-2:]) if self.store.exists(n)]
            if registry.promoted and registry.promoted not in names and self.store.exists(registry.promoted):
                names.insert(0, registry.promoted)
            try:
                missing = [n for n in names if n not in await self.vllm.loaded()] if names else []
                async with self._swap:
                    for name in missing:
                        await self.vllm.load(name, self.store.path(name))
                if missing:
                    with contextlib.suppress(APIError):
                        await self.gw.served_models(fresh=True)
                    log.info("served adapters (re)loaded into vLLM", extra={"adapters": missing})
                reported, delay = None, self.options.watch_s
            except AdapterLoadError as exc:
                repeat = str(exc) == reported
                log.log(logging.DEBUG if repeat else logging.WARNING, "could not load the served adapter into "
                        "vLLM (retried every watch_s)", extra={"error": str(exc), "repeat": repeat})
                reported, delay = str(exc), min(delay * 2, self.options.watch_s)
            await asyncio.sleep(delay)

    def update_metrics(self) -> None:
        self.gw.record_jobs(self.jobs.counts(), self.jobs.last_success_time())
        self.gw.record_served(self.store.promoted())

    # ------------------------------------------------------------ retrain
    def _base_config(self, name: str | None) -> dict[str, Any]:
        if name is None:
            path = self.options.train_config or (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
            if path is None:
                return {}
        else:
            dirs = [self.settings.root / "configs", CHECKOUT_CONFIGS]
            found = [d / f for d in dirs for f in (name, f"{name}.yaml") if (d / f).is_file()]
            if not found:
                known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.yaml")})
                raise APIError(422, f"unknown config {name!r}; known: {', '.join(known) or 'none'}",
                               param="config", code="unknown_config")
            path = found[0]
        try:
            return load_config_mapping(path)
        except (OSError, ConfigError) as exc:
            raise APIError(503, f"the base config {path} is unreadable: {exc}", code="config_unreadable") from None

    @property
    def sandbox(self) -> Sandbox:
        o = self.options
        return Sandbox.from_settings(self.settings, o.admin_allowed_roots, o.admin_allowed_urls,
                                     o.admin_allowed_models)

    def _data_pool(self, ref: str) -> Path:
        path = Path(self._sandboxed(lambda: self.sandbox.path("data.pool", ref, PATH_KEYS["data.pool"][1])))
        if not path.is_file():
            raise APIError(422, f"data.pool {ref!r}: no such file in {self.settings.data_dir}", param="data.pool",
                           code="invalid_data_ref")
        return path

    @staticmethod
    def _sandboxed(check: Callable[[], Any]) -> Any:
        try:
            return check()
        except SandboxError as exc:
            code = "url_not_allowed" if exc.key in URL_KEYS else "path_not_allowed"
            raise APIError(400, str(exc), param=exc.key, code=code) from None

    def build_config(self, req: RetrainRequest) -> dict[str, Any]:
        """Base config + overrides + data references, sandboxed (:mod:`service.jobs.sandbox`), then validated
        by the pipeline's config model."""
        base = self._base_config(req.config)
        merged = deep_merge(base, nest_overrides(req.overrides))
        if req.data and req.data.pool:
            merged = deep_merge(merged, {"data": {"pool": str(self._data_pool(req.data.pool))}})
        merged = self._sandboxed(lambda: self.sandbox.check(merged, trusted=base))
        try:
            cfg = PipelineConfig.model_validate(merged)
        except ValidationError as exc:
            raise validation_error(exc, status=422, limit=10, unknown_key=True) from None
        if getattr(cfg.publish, "load_into_vllm", False):  # the admin publishes and loads, not the trainer
            merged = deep_merge(merged, {"publish": {"load_into_vllm": False}})
        return merged

    async def retrain(self, req: RetrainRequest) -> Job:
        config = self.build_config(req)
        runner = self.runner
        try:
            job = self.jobs.create(request=req.model_dump(mode="json"), runner=runner.kind, work_root=self.work_root)
        except JobConflict as exc:
            raise APIError(409, f"job {exc.active_id} is already active; one training job runs at a time "
                           "(wait for it or cancel it)", code="job_active") from None
        try:
            work = Path(job.work_dir)
            work.mkdir(parents=True, exist_ok=True)
            job.config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        except OSError as exc:
            self._finish(job.id, JobState.failed, error=f"could not write the job directory: {exc}")
            raise APIError(503, f"could not write the job directory: {exc}", code="job_dir_error") from None
        self._tasks[job.id] = asyncio.create_task(self._run(job, runner), name=f"retrain-{job.id}")
        self.update_metrics()
        return self.jobs.get(job.id)

    def _finish(self, job_id: str, state: JobState, **fields: Any) -> None:
        """Record a final state; on a full disk, free the job's own work files first and try again."""
        try:
            self.jobs.update(job_id, state=state, finished_at=time.time(), **fields)
        except (OSError, sqlite3.OperationalError) as exc:
            if not _disk_full(exc):
                raise
            self._free_work(job_id)
            self.jobs.update(job_id, state=state, finished_at=time.time(), **fields)
        self.update_metrics()
        if state in FINAL_STATES:
            with contextlib.suppress(OSError, sqlite3.Error):
                self.prune_work_dirs()

    def _free_work(self, job_id: str) -> None:
        """Remove a job's bulky outputs (``run/``, ``output/``); its config and log stay."""
        for sub in ("run", "output"):
            shutil.rmtree(self.work_root / job_id / sub, ignore_errors=True)

    def prune_work_dirs(self) -> list[str]:
        """Keep the work dirs (``run/``, ``output/``) of the last ``keep_work_dirs`` finished jobs; free the rest."""
        finished = [j for j in self.jobs.list(limit=100_000) if j.state in FINAL_STATES]
        freed = []
        for job in finished[self.options.keep_work_dirs:]:
            if any((Path(job.work_dir) / sub).exists() for sub in ("run", "output")):
                self._free_work(job.id)
                freed.append(job.id)
        return freed

    @staticmethod
    def _append_log(logfile: Any, line: str) -> None:
        logfile.write(line + "\n")
        logfile.flush()

    async def _run(self, job: Job, runner: Runner) -> None:
        try:
            handle = await runner.start(RunSpec(job.id, job.config_path, job.output_dir))
        except Exception as exc:  # noqa: BLE001 - e.g. no such command, the Kubernetes API said no
            log.warning("could not start the trainer", extra={"job_id": job.id, "error": str(exc)})
            self._finish(job.id, JobState.failed, error=f"could not start the trainer: {type(exc).__name__}: {exc}")
            self._tasks.pop(job.id, None)
            return
        except asyncio.CancelledError:
            self._finish(job.id, JobState.interrupted, error="the gateway shut down during the job")
            raise
        started = self.jobs.update(job.id, only_if=(JobState.queued,), state=JobState.running,
                                   started_at=time.time(), runner_ref=handle.ref)
        self.update_metrics()
        await self._follow(job, handle, cancel_first=not started)

    async def _follow(self, job: Job, handle: RunHandle, cancel_first: bool = False) -> None:
        """Stream a started (or re-attached) run into the job's log and row, then publish its adapter."""
        self._handles[job.id] = handle
        try:
            if cancel_first or job.id in self._cancelled:
                await handle.cancel(self.options.cancel_grace_s)
            with open(job.log_path, "a", encoding="utf-8") as logfile:  # noqa: ASYNC230 - local append
                async for line in handle.lines():
                    self._append_log(logfile, line)
                    event = parse_progress_line(line)
                    if event is not None:
                        self.jobs.record_progress(job.id, event)
            outcome = await handle.wait()
            self._handles.pop(job.id, None)
            if job.id in self._cancelled:
                self._finish(job.id, JobState.cancelled, exit_code=outcome.exit_code, error="cancelled by request")
            elif not outcome.ok:
                last = tail_lines(job.log_path, 1)
                detail = f"{outcome.detail}" + (f"; last output: {last[0][:300]}" if last else "")
                self._finish(job.id, JobState.failed, exit_code=outcome.exit_code, error=detail)
            else:
                self.jobs.update(job.id, exit_code=0)
                await self._publish(self.jobs.get(job.id))
        except asyncio.CancelledError:  # the gateway is shutting down
            with contextlib.suppress(Exception):
                await asyncio.shield(handle.cancel(min(self.options.cancel_grace_s, 5.0)))
            self._finish(job.id, JobState.interrupted, error="the gateway shut down during the job")
            raise
        except Exception as exc:  # a job never takes the gateway down
            with contextlib.suppress(Exception):
                await handle.cancel(0)
            if _disk_full(exc):
                log.warning("retrain job failed: disk full", extra={"job_id": job.id, "error": str(exc)})
                self._free_work(job.id)
                self._finish(job.id, JobState.failed, error=f"disk full: {exc}")
            else:
                log.exception("retrain job failed", extra={"job_id": job.id})
                self._finish(job.id, JobState.failed, error=f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._handles.pop(job.id, None)
            self._tasks.pop(job.id, None)
            self._cancelled.discard(job.id)

    async def _publish(self, job: Job) -> None:
        """Store, gate and promote the trainer's adapter. Idempotent: a publish resumed after a restart
        finds the adapter the job already stored (by its job id) instead of storing it twice."""
        self.jobs.update(job.id, only_if=(JobState.running,), state=JobState.publishing, stage="publish")
        self.update_metrics()
        config = load_config_mapping(job.config_path)
        prefix = (config.get("publish") or {}).get("name") or "presafe"
        if not job.output_dir.is_dir() and await asyncio.to_thread(self.store.find_job, job.id) is None:
            self._finish(job.id, JobState.failed, error=f"the trainer finished without writing {job.output_dir}")
            return
        expected = await self.expected_base()
        try:
            info = await asyncio.to_thread(store_once, self.store, job.output_dir, prefix=prefix,
                                           expected_base=expected, job_id=job.id)
        except AdapterInvalid as exc:
            self._finish(job.id, JobState.failed, error=f"the trained adapter failed its check: {exc}")
            return
        except AdapterError as exc:
            self._finish(job.id, JobState.failed, error=f"the trained adapter could not be stored: {exc}")
            return
        # PRESAFE_PROMOTE_GATE, tightened by the request's gate and the pipeline config's publish.gate
        gate_cfg = self.job_gate(job.request, config)
        force = bool(job.request.get("force"))
        result = await asyncio.to_thread(self.store.gate, info.name, gate_cfg)
        # the job shows the adapter's eval figures (the manifest's headline metrics) beside the trainer's
        self.jobs.update(job.id, adapter=info.name, gate=gate_record(result, gate_cfg),
                         metrics={**job.metrics, **info.metrics})
        with contextlib.suppress(OSError):
            shutil.rmtree(job.output_dir)  # the store holds the adapter now
        if self.store.promoted() == info.name:  # a resumed publish that had promoted already
            self.jobs.update(job.id, promoted=True)
        elif may_promote(result, promote=job.request.get("promote", True), force=force):
            try:
                swap = await self.promote(info.name, force=force, gate=gate_cfg, job_id=job.id)
            except (AdapterError, APIError) as exc:
                message = exc.message if isinstance(exc, APIError) else str(exc)
                self._finish(job.id, JobState.failed, error=f"stored as {info.name} but not served: {message}")
                return
            self.jobs.update(job.id, promoted=True, gate=swap.gate)
        self._finish(job.id, JobState.succeeded, progress=1.0)

    def job_gate(self, request: dict[str, Any], config: dict[str, Any]) -> GateConfig:
        """The operator's gate, tightened by the job's own (request ``gate``, config ``publish.gate``)."""
        gate = self.options.promote_gate
        for source in (request.get("gate"), (config.get("publish") or {}).get("gate")):
            if source:
                gate = gate.tightened(GateConfig.model_validate(source))
        return gate

    async def expected_base(self) -> str | None:
        """The base model vLLM serves (its path, from ``/v1/models``), else the configured base."""
        with contextlib.suppress(Exception):
            models = await self.gw.served_models()
            base = next((m for m in models if not m.get("parent")), None)
            if base is not None:
                return base.get("root") or base["id"]
        return self.settings.base_model

    async def cancel(self, job_id: str) -> Job:
        job = self._job(job_id)
        if job.state in FINAL_STATES:
            raise APIError(409, f"job {job_id} is already {job.state.value}", code="job_finished")
        if job.state is JobState.publishing:
            raise APIError(409, f"job {job_id} is publishing its adapter and can no longer be cancelled",
                           code="job_publishing")
        self._cancelled.add(job_id)
        handle, task = self._handles.get(job_id), self._tasks.get(job_id)
        if handle is not None:
            await handle.cancel(self.options.cancel_grace_s)
        if task is not None:
            await asyncio.wait({task}, timeout=self.options.cancel_grace_s + 5)
        if task is None and self._job(job_id).state not in FINAL_STATES:  # not run by this process
            self._finish(job_id, JobState.cancelled, error="cancelled by request")
        return self._job(job_id)

    def _job(self, job_id: str) -> Job:
        try:
            return self.jobs.get(job_id)
        except JobNotFound:
            raise APIError(404, f"job {job_id!r} not found", param="job_id", code="job_not_found") from None

    # ------------------------------------------------------------ adapters
    def _adapter_path(self, name: str) -> Path:
        if not self.store.exists(name):
            raise APIError(404, f"adapter {name!r} not found", param="name", code="adapter_not_found")
        return self.store.path(name)

    @property
    def merged(self) -> MergedServing | None:
        """What serves the promoted adapter merged: the gateway's own engines, else the rolled Deployment."""
        return self.gw.engines if self.gw.engines is not None else self.rollout

    def _merged(self, name: str) -> contextlib.AbstractAsyncContextManager:
        """Serve ``name`` from its merged weights where the gateway does (else nothing to do)."""
        return self.merged.serving(name) if self.merged is not None else contextlib.nullcontext()

    def serving_status(self) -> dict[str, Any]:
        """How the alias is served now (:meth:`service.core.serving.MergedServing.status`)."""
        promoted = self.store.promoted()
        if self.merged is not None:
            return self.merged.status(promoted)
        return {"mode": "lora" if promoted else "none", "adapter": promoted,
                "reason": "merged serving is off (PRESAFE_SERVE_MERGED, PRESAFE_MERGED_URL)" if promoted
                else "no adapter is promoted", "engine": None, "engines": [], "last_swap": None}

    async def _serve(self, name: str) -> None:
        """Load ``name`` into vLLM and refresh the gateway's model list (before the alias moves)."""
        try:
            await self.vllm.load(name, self.store.path(name))
        except AdapterLoadError as exc:
            raise APIError(502, str(exc), code="adapter_load_failed") from None
        with contextlib.suppress(APIError):
            await self.gw.served_models(fresh=True)

    async def promote(self, name: str, *, force: bool = False, gate: GateConfig | None = None,
                      job_id: str | None = None) -> Swap:
        """Check, gate (409 ``gate_failed`` unless ``force``), load into vLLM, then move the alias."""
        async with self._swap:
            path = self._adapter_path(name)
            expected = await self.expected_base()
            try:
                await asyncio.to_thread(check_adapter, path, expected)
            except AdapterInvalid as exc:
                raise APIError(409, f"adapter {name!r} fails its check: {exc}", code="adapter_invalid") from None
            gate = gate or self.options.promote_gate
            result = await asyncio.to_thread(self.store.gate, name, gate)
            if not result.passed and not force:
                raise APIError(409, f"adapter {name!r} fails the promotion gate: {'; '.join(result.reasons)} "
                               "(promote with {\"force\": true} to override)", code="gate_failed")
            previous = self.store.promoted()
            await self._serve(name)
            record = promotion_record(result, forced=force, previous=previous, job_id=job_id)
            async with self._merged(name):  # blue/green: its merged engine is ready before the alias moves
                try:
                    await asyncio.to_thread(self.store.promote, name, record=record)
                except AdapterNotFound:
                    raise APIError(404, f"adapter {name!r} not found", param="name",
                                   code="adapter_not_found") from None
            self.update_metrics()
            await self._trim_loaded()
            log.info("adapter promoted", extra={"adapter": name, "previous": previous, "forced": force,
                                                "gate": result.reasons})
            out = gate_record(result, gate, forced=force and not result.passed)
            return Swap(alias=self.alias, promoted=name, previous=previous, gate=out)

    async def rollback(self) -> Swap:
        async with self._swap:
            try:
                current, previous = self.store.rollback_target()
            except NothingToRollBack as exc:
                raise APIError(409, str(exc), code="nothing_to_roll_back") from None
            await self._serve(previous)
            async with self._merged(previous):
                try:
                    await asyncio.to_thread(self.store.rollback, current)
                except NothingToRollBack as exc:
                    raise APIError(409, str(exc), code="nothing_to_roll_back") from None
            self.update_metrics()
            log.info("adapter rolled back", extra={"adapter": previous, "previous": current})
            return Swap(alias=self.alias, promoted=previous, previous=current)

    async def _trim_loaded(self) -> None:
        """Unload store adapters vLLM holds beyond the promoted one and its recent predecessors."""
        registry = self.store.read_registry()
        keep = set(registry.history[-self.options.keep_loaded:]) | {registry.promoted}
        try:
            loaded = await self.vllm.loaded()
            for name in sorted(loaded - keep):
                if self.store.exists(name):
                    await self.vllm.unload(name)
        except AdapterLoadError as exc:
            log.warning("could not unload old adapters", extra={"error": str(exc)})

    async def replicas(self, stored: list[str]) -> list[dict[str, Any]]:
        """Each vLLM replica: admitted or why not, which of the ``stored`` adapters it holds, and whether it
        holds the promoted one (None: none is promoted). A promotion is complete when every admitted one does."""
        promoted = self.store.promoted()
        out = []
        for replica in await self.gw.replica_status():
            held = set(replica["models"])
            out.append({"url": replica["url"], "admitted": replica["admitted"], "error": replica["error"],
                        "adapters": [name for name in stored if name in held],
                        "holds_promoted": None if promoted is None else promoted in held})
        return out

    async def adapters(self) -> tuple[Registry, list[AdapterInfo], set[str] | None]:
        """The registry, the stored adapters (oldest first) and the names vLLM has loaded (None: no answer)."""
        registry = self.store.read_registry()
        try:
            loaded: set[str] | None = await self.vllm.loaded()
        except AdapterLoadError:
            loaded = None
        return registry, await asyncio.to_thread(self.store.list), loaded
