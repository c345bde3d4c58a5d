"""The promoted adapter served from merged weights on a vLLM of its own (no ``--enable-lora``), swapped blue/green.

LoRA in vLLM's CPU backend costs the alias 0.3-0.6x of the base model's throughput (docs/benchmarks.md); the
adapter folded into the base weights (:mod:`service.adapters.merge`) serves at the base's speed. The LoRA engine
stays (the base, candidates, rollback targets, many adapters at once, and the fallback); the gateway routes the
requests for the promoted adapter's name to its merged engine while one runs and is ready:

- :meth:`MergedEngines.serving` (the admin's promote and rollback): merge the adapter (cached under
  ``$PRESAFE_HOME/merged/<name>``, checked against the adapter's weights), start a vLLM on it beside the running
  ones, wait until it is ready and route the name to it; the caller moves the alias inside the block. Where
  memory is short for one more engine, or the merge or the start fails, the adapter stays on LoRA and
  :meth:`MergedEngines.status` says why.
- :meth:`MergedEngines.follow` (the gateway's own loop, admin or not): serve whatever the registry promotes
  merged; stop routing to every other merged engine, wait for its requests in flight, stop it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.adapters.merge import merged_is_current
from service.adapters.store import AdapterStore
from service.core.settings import Settings
from service.vllm_server import (
    EmbeddedPlan,
    VLLMSupervisor,
    base_chat_template,
    free_port,
    render_template_plan,
    vllm_dtype,
)

log = logging.getLogger("presafe.engines")

GIB = 1 << 30


class EngineUnavailable(RuntimeError):
    """The promoted adapter cannot be served merged now (the message says why); it stays on LoRA."""


def available_memory() -> int | None:
    """``MemAvailable`` of this host in bytes (None where /proc/meminfo is unreadable)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def engine_memory_need(merged_dir: Path, reserve_gib: float) -> int:
    """Bytes one more CPU engine on ``merged_dir`` takes: its weights, its KV cache (``VLLM_CPU_KVCACHE_SPACE``
    GiB, 1 as PreSafe starts vLLM) and ``reserve_gib`` for the process itself."""
    weights = sum(p.stat().st_size for p in merged_dir.glob("*.safetensors"))
    try:
        kv_gib = float(os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1") or 1)
    except ValueError:
        kv_gib = 1.0
    return int(weights + (kv_gib + reserve_gib) * GIB)


def tree_rss(pids: list[int]) -> int:
    """Resident memory of the processes ``pids`` and all their children, in bytes."""
    import psutil

    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
    return total


def cpus_beside(pids: Iterable[int | None]) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for an engine started beside the running ones (``pids``): the CPUs their pinned
    processes leave free (``nobind`` when none is free), or None (no pinned engine: vLLM's own binding).

    vLLM's CPU backend pins every engine to the same cores, so a green engine started beside a busy blue one got
    67 ms of CPU in 7 minutes here (2 cores); an unpinned one served 0.74-0.90x of a pinned base, so the green
    engine is pinned to the other cores instead (on 2 cores: the one vLLM leaves to its API servers)."""
    import psutil

    every = set(os.sched_getaffinity(0))
    used: set[int] = set()
    for pid in pids:
        if pid is None:
            continue
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    cpus = set(proc.cpu_affinity())
                    if cpus and cpus < every:
                        used |= cpus
    if not used:
        return None
    free = sorted(every - used)
    return ",".join(map(str, free)) if free else "nobind"


@dataclass(eq=False)
class Engine:
    """A vLLM serving one adapter's merged weights under the adapter's name."""

    adapter: str
    merged_dir: Path
    supervisor: VLLMSupervisor
    started_at: float = field(default_factory=time.time)
    in_flight: int = 0  # gateway requests sent to it and not finished

    @property
    def url(self) -> str:
        return self.supervisor.plan.url

    @property
    def running(self) -> bool:
        return self.supervisor.running

    @property
    def pid(self) -> int | None:
        return self.supervisor.proc.pid if self.supervisor.proc is not None else None

    def as_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "url": self.url, "pid": self.pid, "merged_dir": str(self.merged_dir),
                "started_at": self.started_at, "in_flight": self.in_flight, "running": self.running}


def merge_command(settings: Settings, adapter_dir: Path, out: Path) -> list[str]:
    """The command that folds ``adapter_dir`` into its base and writes the model to ``out``
    (:mod:`service.adapters.merge`, run in a process of its own: the gateway never imports torch)."""
    cmd = [sys.executable, "-m", "service.adapters.merge", str(adapter_dir), str(out)]
    return cmd + ["--dtype", settings.vllm_dtype] if settings.vllm_dtype else cmd


def merged_plan(settings: Settings, adapter: str, merged: Path, adapter_dir: Path, *, port: int,
                work: Path) -> EmbeddedPlan:
    """The vLLM that serves ``adapter`` from its merged weights ``merged``: under the adapter's name, without
    LoRA, with the CoT serving template (:class:`EngineUnavailable` without one: the alias never goes without)."""
    template, _ = render_template_plan(str(merged), work, base_chat_template(settings, adapter_dir),
                                       settings.vllm_startup_timeout_s)
    if template is None:
        raise EngineUnavailable("no CoT serving template for the merged model")
    return EmbeddedPlan(
        model=str(merged), served_name=adapter, port=port, chat_template=template, lora=False,
        max_model_len=settings.vllm_max_model_len, extra_args=shlex.split(settings.vllm_args),
        dtype=vllm_dtype(settings),
        api_key=settings.vllm_api_key.get_secret_value() if settings.vllm_api_key else None)


class MergedEngines:
    """The merged engines of one gateway: which adapter each serves, the swaps, and where they stand."""

    def __init__(self, settings: Settings, *, other_pids: Callable[[], list[int]] = list):
        self.settings = settings
        self.store = AdapterStore(settings.adapters_dir)
        self.root = settings.root / "merged"
        self.other_pids = other_pids  # e.g. the embedded LoRA engine: counted in a swap's peak memory
        self.engines: dict[str, Engine] = {}
        self.failed: dict[str, tuple[float, str]] = {}  # adapter -> (when, why) it could not be served merged
        self.last_swap: dict[str, Any] | None = None
        self._lock = asyncio.Lock()
        self._peak: list[int] = [0]
        self._sampler: asyncio.Task | None = None
        self._follow: asyncio.Task | None = None

    # ------------------------------------------------------------ the gateway's side
    def acquire(self, model: str) -> Engine | None:
        """The running merged engine serving ``model`` (counted in flight until :meth:`release`), else None."""
        engine = self.engines.get(model)
        if engine is None or not engine.running:
            return None
        engine.in_flight += 1
        return engine

    def serves(self, model: str) -> bool:
        """Whether a running merged engine serves ``model``."""
        engine = self.engines.get(model)
        return engine is not None and engine.running

    def urls(self) -> list[str]:
        """The running merged engines' URLs."""
        return [e.url for e in self.engines.values() if e.running]

    @staticmethod
    def release(engine: Engine) -> None:
        engine.in_flight -= 1

    def start(self, promoted: Callable[[], str | None]) -> None:
        self._follow = asyncio.create_task(self.follow(promoted))

    async def follow(self, promoted: Callable[[], str | None], interval: float = 1.0) -> None:
        """Serve what the registry promotes merged (retrying a failure after ``merged_retry_s``); retire the rest."""
        while True:
            stale: list[Engine] = []
            try:
                async with self._lock:
                    target = promoted()  # read under the lock: a promote holding it moves the registry first
                    if target is not None and self._wants(target):
                        await self._ensure(target)
                    stale = [e for name, e in self.engines.items() if name != target or not e.running]
                    for engine in stale:
                        del self.engines[engine.adapter]
                if stale:
                    await self._retire(stale)
            except Exception:
                log.exception("merged serving: follow step failed")
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._follow is not None:
            self._follow.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follow
        self._stop_sampler()
        engines, self.engines = list(self.engines.values()), {}
        await asyncio.gather(*(asyncio.to_thread(e.supervisor.stop, 10.0) for e in engines))

    # ------------------------------------------------------------ the admin's side
    @contextlib.asynccontextmanager
    async def serving(self, adapter: str) -> AsyncIterator[bool]:
        """Start ``adapter``'s merged engine (if it is not running) and route its name there; yields whether it
        is served merged (False: LoRA, :meth:`status` says why). The caller moves the alias inside the block;
        the follow loop then retires the other engines."""
        async with self._lock:
            self.failed.pop(adapter, None)  # an explicit promote tries again at once
            yield await self._ensure(adapter)

    def status(self, promoted: str | None) -> dict[str, Any]:
        """How the alias is served now: ``merged`` (its engine), ``lora`` (and why), or ``none``."""
        engine = self.engines.get(promoted or "")
        if promoted is None:
            mode, reason = "none", "no adapter is promoted"
        elif engine is not None and engine.running:
            mode, reason = "merged", None
        else:
            mode = "lora"
            failed = self.failed.get(promoted)
            reason = failed[1] if failed else "the merged engine is starting"
        return {"mode": mode, "adapter": promoted, "reason": reason,
                "engine": engine.as_dict() if engine is not None else None,
                "engines": [e.as_dict() for e in self.engines.values()], "last_swap": self.last_swap}

    # ------------------------------------------------------------ internals (under the lock)
    def _wants(self, adapter: str) -> bool:
        engine = self.engines.get(adapter)
        if engine is not None and engine.running:
            return False
        failed = self.failed.get(adapter)
        return failed is None or time.time() - failed[0] >= self.settings.merged_retry_s

    async def _ensure(self, adapter: str) -> bool:
        engine = self.engines.get(adapter)
        if engine is not None and engine.running:
            return True
        if engine is not None:  # it died: its replacement starts below
            del self.engines[adapter]
            await self._retire([engine])
        t0 = time.monotonic()
        self._start_sampler()
        try:
            engine = await self._start(adapter)
        except EngineUnavailable as exc:
            self._stop_sampler()
            self.failed[adapter] = (time.time(), str(exc))
            log.warning("the promoted adapter stays on LoRA", extra={"adapter": adapter, "reason": str(exc)})
            return False
        self.failed.pop(adapter, None)
        self.engines[adapter] = engine
        self.last_swap = {"to": adapter, "from": [n for n in self.engines if n != adapter],
                          "ready_s": round(time.monotonic() - t0, 1), "peak_rss_bytes": self._peak[0]}
        if not self.last_swap["from"]:
            self._stop_sampler()
        log.info("merged engine ready", extra={"adapter": adapter, "url": engine.url,
                                               "ready_s": self.last_swap["ready_s"]})
        return True

    async def _merged_dir(self, adapter: str, adapter_dir: Path) -> Path:
        """The adapter's merged weights: reused when intact and made from this adapter, else merged now (in a
        process of its own: the gateway never imports torch)."""
        out = self.root / adapter
        if await asyncio.to_thread(merged_is_current, out, adapter_dir):
            return out
        cmd = merge_command(self.settings, adapter_dir, out)
        log.info("merging the adapter for serving", extra={"adapter": adapter, "out": str(out)})
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = await proc.communicate()
        if proc.returncode != 0:
            raise EngineUnavailable(f"merging {adapter} failed: {err.decode(errors='replace').strip()[-500:]}")
        return out

    async def _start(self, adapter: str) -> Engine:
        if not self.store.exists(adapter):
            raise EngineUnavailable(f"adapter {adapter!r} is not in the store")
        adapter_dir = self.store.path(adapter)
        merged = await self._merged_dir(adapter, adapter_dir)
        need, free = engine_memory_need(merged, self.settings.merged_memory_reserve_gib), available_memory()
        if free is not None and need > free:
            raise EngineUnavailable(f"memory is short for a second engine: it needs {need / GIB:.1f} GiB, "
                                    f"{free / GIB:.1f} GiB are available; serving through runtime LoRA")
        work = self.root / ".serve" / adapter
        settings = self.settings
        plan = await asyncio.to_thread(merged_plan, settings, adapter, merged, adapter_dir,  # slow on busy cores
                                       port=free_port(), work=work)
        bind = cpus_beside(e.pid for e in self.engines.values())
        if bind and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:  # the operator's binding wins
            plan.env["VLLM_CPU_OMP_THREADS_BIND"] = bind
        supervisor = VLLMSupervisor(plan, settings, work / "vllm.log", max_restarts=0)
        supervisor.start()
        try:
            await supervisor.wait_ready(settings.vllm_startup_timeout_s)
        except RuntimeError as exc:
            await asyncio.to_thread(supervisor.stop, 10.0)
            raise EngineUnavailable(f"vLLM on the merged weights did not start: {str(exc)[-600:]}") from None
        except asyncio.CancelledError:
            await asyncio.to_thread(supervisor.stop, 10.0)
            raise
        return Engine(adapter=adapter, merged_dir=merged, supervisor=supervisor)

    async def _retire(self, engines: list[Engine]) -> None:
        """Wait for each engine's requests in flight (up to ``drain_timeout_s``), then stop it."""
        deadline = time.monotonic() + self.settings.drain_timeout_s
        drained = sum(e.in_flight for e in engines)
        while any(e.in_flight > 0 and e.running for e in engines) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.gather(*(asyncio.to_thread(e.supervisor.stop, 30.0) for e in engines))
        log.info("merged engines stopped", extra={"adapters": [e.adapter for e in engines],
                                                  "drained_requests": drained})
        if self.last_swap is not None and self._sampler is not None:
            pids = [p for p in (*self.other_pids(), *(e.pid for e in self.engines.values())) if p]
            self.last_swap.update(retired=[e.adapter for e in engines], drained_requests=drained,
                                  peak_rss_bytes=self._peak[0], rss_after_bytes=tree_rss(pids),
                                  stopped=all(not e.running for e in engines))
            self._stop_sampler()

    def _start_sampler(self) -> None:
        self._stop_sampler()
        self._peak = peak = [0]

        async def sample() -> None:
            while True:
                pids = [p for p in (*self.other_pids(), *(e.pid for e in self.engines.values())) if p]
                pids += [p for p in self._starting_pids() if p not in pids]
                peak[0] = max(peak[0], await asyncio.to_thread(tree_rss, pids))
                await asyncio.sleep(0.5)

        self._sampler = asyncio.create_task(sample())

    def _starting_pids(self) -> list[int]:
        """Engines whose vLLM is running but not routed yet (the green one while it starts)."""
        import psutil

        found = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process().children():
                with contextlib.suppress(psutil.Error):
                    if "vllm.entrypoints.openai.api_server" in " ".join(child.cmdline()):
                        found.append(child.pid)
        return found

    def _stop_sampler(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
