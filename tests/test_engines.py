"""Merged serving's bookkeeping (``service.engines``) without vLLM: routing only to a running engine, draining
before a stop, the memory estimate, and where it is on by default. The engines themselves: test_merged_serving.py."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from service.core.settings import Settings
from service.engines import GIB, Engine, MergedEngines, engine_memory_need


class FakeSupervisor:
    def __init__(self):
        self.plan = SimpleNamespace(url="http://127.0.0.1:1")
        self.proc = None
        self.stopped = False

    @property
    def running(self) -> bool:
        return not self.stopped

    def stop(self, grace: float = 30.0) -> None:
        self.stopped = True


def test_requests_route_to_a_running_engine_and_a_retired_one_drains_first(tmp_path):
    async def scenario() -> None:
        engines = MergedEngines(Settings(home=tmp_path))
        supervisor = FakeSupervisor()
        engine = Engine("p-v1", tmp_path, supervisor)
        engines.engines["p-v1"] = engine
        assert engines.acquire("p-v2") is None
        held = engines.acquire("p-v1")
        assert held is engine and engine.in_flight == 1 and engines.serves("p-v1")
        del engines.engines["p-v1"]  # what the follow loop does before it retires an engine
        retire = asyncio.create_task(engines._retire([engine]))
        await asyncio.sleep(0.3)
        assert not supervisor.stopped  # a request is still in flight on it
        engines.release(held)
        await asyncio.wait_for(retire, 5)
        assert supervisor.stopped and engine.in_flight == 0
        engines.engines["p-v1"] = engine  # a dead engine gets no request
        assert engines.acquire("p-v1") is None and not engines.serves("p-v1")

    asyncio.run(scenario())


def test_status_says_how_the_alias_is_served(tmp_path):
    engines = MergedEngines(Settings(home=tmp_path))
    assert engines.status(None)["mode"] == "none"
    assert engines.status("p-v1") | {"engines": []} == {
        "mode": "lora", "adapter": "p-v1", "reason": "the merged engine is starting", "engine": None, "engines": [],
        "last_swap": None}
    engines.failed["p-v1"] = (0.0, "memory is short")
    assert engines.status("p-v1")["reason"] == "memory is short"
    engines.engines["p-v1"] = Engine("p-v1", tmp_path, FakeSupervisor())
    status = engines.status("p-v1")
    assert status["mode"] == "merged" and status["reason"] is None and status["engine"]["adapter"] == "p-v1"


def test_memory_need_counts_weights_kv_cache_and_reserve(tmp_path, monkeypatch):
    (tmp_path / "model.safetensors").write_bytes(bytes(1000))
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    assert engine_memory_need(tmp_path, 0.5) == 1000 + int(2.5 * GIB)


def test_merged_serving_is_on_where_the_gateway_starts_vllm(tmp_path):
    from service.gateway.app import Gateway

    async def engines(settings: Settings, supervisor) -> MergedEngines | None:
        gateway = Gateway(settings, "http://127.0.0.1:1", supervisor=supervisor)
        try:
            return gateway.engines
        finally:
            await gateway.aclose()

    settings = Settings(home=tmp_path)
    assert asyncio.run(engines(settings, FakeSupervisor())) is not None  # embedded: on
    assert asyncio.run(engines(settings, None)) is None  # in front of an external vLLM: off
    on = settings.model_copy(update={"serve_merged": True})
    assert asyncio.run(engines(on, None)) is not None
    off = settings.model_copy(update={"serve_merged": False})
    assert asyncio.run(engines(off, FakeSupervisor())) is None


def test_a_promote_keeps_its_green_engine_and_the_follow_loop_retires_the_blue_one(tmp_path, monkeypatch):
    """The follow loop reads the registry under the swap lock: a promote that holds it (green ready, then the
    registry moves) must not see its new engine retired by a loop that read the old registry."""

    async def scenario() -> None:
        engines = MergedEngines(Settings(home=tmp_path))
        started: list[str] = []

        async def start(adapter: str) -> Engine:
            started.append(adapter)
            return Engine(adapter, tmp_path, FakeSupervisor())

        monkeypatch.setattr(engines, "_start", start)
        registry = {"promoted": "p-v1"}
        follow = asyncio.create_task(engines.follow(lambda: registry["promoted"], interval=0.01))
        try:
            for _ in range(100):
                if engines.serves("p-v1"):
                    break
                await asyncio.sleep(0.01)
            blue = engines.engines["p-v1"]
            async with engines.serving("p-v2") as merged:
                assert merged and engines.serves("p-v1") and engines.serves("p-v2")
                await asyncio.sleep(0.05)  # the loop waits on the lock meanwhile
                registry["promoted"] = "p-v2"
            for _ in range(100):
                if not blue.running:
                    break
                await asyncio.sleep(0.01)
            assert not blue.running and engines.serves("p-v2") and list(engines.engines) == ["p-v2"]
            assert started == ["p-v1", "p-v2"]
            assert engines.status("p-v2")["mode"] == "merged"
        finally:
            follow.cancel()

    asyncio.run(scenario())


def test_a_green_engine_is_pinned_beside_the_running_ones():
    """vLLM pins every CPU engine to the same cores; a green engine gets the CPUs the running ones leave free."""
    import os
    import subprocess
    import sys

    from service.engines import cpus_beside

    every = sorted(os.sched_getaffinity(0))
    assert cpus_beside([]) is None and cpus_beside([None]) is None
    # a stand-in engine: a parent whose child (the worker) is pinned to the first CPU
    script = "import os, sys, time; os.sched_setaffinity(0, {int(sys.argv[1])}); time.sleep(60)"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; subprocess.run(sys.argv[1:])",
                               sys.executable, "-c", script, str(every[0])])
    try:
        import time

        import psutil

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            children = psutil.Process(parent.pid).children(recursive=True)
            if any(c.cpu_affinity() == [every[0]] for c in children if c.pid != parent.pid):
                break
            time.sleep(0.1)
        expected = ",".join(map(str, every[1:])) if len(every) > 1 else "nobind"
        assert cpus_beside([parent.pid]) == expected
    finally:
        for child in psutil.Process(parent.pid).children(recursive=True):
            child.kill()
        parent.kill()
        parent.wait()


def test_an_engine_process_starts_on_every_cpu_even_from_a_pinned_thread():
    """vLLM pins its own workers; the engine PreSafe starts must not inherit the forking thread's pinning."""
    import os
    import subprocess
    import sys
    import threading

    from service.vllm_server import _die_with_parent

    every = os.sched_getaffinity(0)
    seen: list[str] = []

    def start_pinned() -> None:
        os.sched_setaffinity(0, {min(every)})  # this thread only
        out = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                             capture_output=True, text=True, check=True, preexec_fn=_die_with_parent)
        seen.append(out.stdout.strip())

    thread = threading.Thread(target=start_pinned)
    thread.start()
    thread.join(60)
    assert seen == [str(sorted(range(os.cpu_count())))]
