"""Several vLLM replicas behind one gateway (issue #18): every replica serves every adapter, routing per request
to the least busy replica, ejection and readmission, retries of requests that had not started.

The end-to-end test runs two real vLLM servers (the tiny model); the pool's choice rules are unit-tested too.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

import httpx
import openai
import pytest
from conftest import VLLMServer, write_serving_template
from gateway_support import ServerThread
from test_admin_e2e import E2E, MESSAGES, wait_until

from service.engines import cpus_beside
from service.gateway.metrics import Metrics
from service.gateway.replicas import ReplicaPool, resolve_all, split_urls

# --------------------------------------------------------------------------- the pool's rules


def pool(*urls: str) -> ReplicaPool:
    return ReplicaPool(list(urls), Metrics())


def test_split_urls_takes_a_comma_list():
    assert split_urls("http://a:8000/, http://b:8000,,http://a:8000") == ["http://a:8000", "http://b:8000"]


def test_pick_prefers_the_least_busy_replica_that_holds_the_model():
    p = pool("http://a", "http://b", "http://c")
    a, b, c = p.replicas
    a.models = b.models = frozenset({"base", "v2"})
    c.models = frozenset({"base"})
    a.outstanding, b.outstanding, c.outstanding = 3, 1, 0
    assert p.pick("v2") is b  # c is idle but lacks v2
    assert p.pick("base") is c
    assert p.pick("unknown") is c  # nobody holds it: the least busy of all
    b.outstanding = 3
    a.routed, b.routed = 10, 9
    assert p.pick("v2") is b  # a tie on outstanding goes to the one that got fewer
    assert p.pick("v2", exclude=[b]) is a


def test_ejected_replicas_are_skipped_until_none_is_left():
    p = pool("http://a", "http://b")
    a, b = p.replicas
    p.eject(a, "test")
    assert [p.pick() for _ in range(3)] == [b, b, b]
    assert p.pick(exclude=[b]) is a  # every other one tried: the ejected one is still worth a try
    p.eject(b, "test")
    assert p.pick() in (a, b)  # all ejected: try them anyway (a single upstream is never skipped)
    assert p.pick(exclude=[a, b]) is None


def test_merged_pool_picks_only_an_admitted_replica_serving_the_name():
    """The merged replicas (PRESAFE_MERGED_URL): a pod on another adapter, or an ejected one, never gets the
    request (the caller falls back to the LoRA replicas), unlike the LoRA pool's try-anyway rule."""
    p = ReplicaPool(["http://old", "http://new", "http://new2"], Metrics(), fallback=False)
    old, new, new2 = p.replicas
    old.models, new.models, new2.models = frozenset({"v1"}), frozenset({"v2"}), frozenset({"v2"})
    assert p.pick("v1") is old
    assert p.pick("v3") is None and p.pick() is None
    new.outstanding = 2
    assert p.pick("v2") is new2
    p.eject(new2, "test")
    assert p.pick("v2") is new
    assert p.pick("v2", exclude=[new]) is None  # the ejected one is not worth a try here
    p.eject(new, "test")
    assert p.pick("v2") is None


def test_balances_routed_requests_when_idle():
    p = pool("http://a", "http://b")
    for _ in range(10):
        p.begin(p.pick())
        for r in p.replicas:
            r.outstanding = 0
    assert [r.routed for r in p.replicas] == [5, 5]


def test_equal_replicas_share_concurrent_load_within_20_percent(tmp_path):
    """Two equally fast replicas (fake upstreams: real vLLM servers on 2 shared cores are not equally fast, see the
    end-to-end test) under 8 concurrent clients: each gets its share within +-20% of the other's."""
    from gateway_support import FakeUpstream, fake_settings, sample, scrape
    from test_gateway_faults import USER

    from service.gateway.app import create_gateway_app

    replicas = [FakeUpstream(), FakeUpstream()]
    with ServerThread(replicas[0].app) as a, ServerThread(replicas[1].app) as b, \
            ServerThread(create_gateway_app(fake_settings(tmp_path), upstream_url=f"{a.url},{b.url}",
                                            think_open=False)) as gw:
        def client_loop(i: int) -> None:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
            for _ in range(15):  # each request takes ~50 ms upstream, so several are outstanding at once
                extra = {"fake_sleep": 0.05}
                if i % 2:
                    list(client.chat.completions.create(model="slow", messages=USER, stream=True, extra_body=extra))
                else:
                    client.chat.completions.create(model="slow", messages=USER, extra_body=extra)

        threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        metrics = scrape(gw.url)
        counts = {url: sample(metrics, "presafe_upstream_requests_total", replica=url) for url in (a.url, b.url)}
    assert sum(counts.values()) == 120, counts
    assert abs(counts[a.url] - counts[b.url]) <= 0.2 * max(counts.values()), counts


async def test_health_checks_eject_and_readmit(vllm_server):
    dead = f"http://127.0.0.1:{_closed_port()}"
    metrics = Metrics()
    p = ReplicaPool([vllm_server.url, dead], metrics, interval=1.0)
    try:
        await p.check_all()
        live, gone = p.replicas
        assert live.healthy and "tiny" in live.models
        assert not gone.healthy and "ConnectError" in gone.error
        assert metrics.replica_healthy.labels(gone.url)._value.get() == 0
        gone.url = vllm_server.url  # the replica answers again
        await p.check(gone)
        assert gone.healthy and gone.error is None
        assert metrics.replica_healthy.labels(dead)._value.get() == 0  # its own series kept its last state
    finally:
        await p.stop()


async def test_dns_discovery_lists_every_address():
    assert await resolve_all(["http://localhost:8000/"]) in (["http://127.0.0.1:8000"],
                                                              ["http://127.0.0.1:8000", "http://[::1]:8000"])
    assert await resolve_all(["http://no-such-host.invalid:1"]) == []


def _closed_port() -> int:
    from service.vllm_server import free_port

    return free_port()


class DroppingReplica:
    """A replica that passes health checks (``/v1/models`` lists the fake's models) but drops every generation
    request's connection before replying, like a vLLM killed mid-request; with ``after_headers``, a stream's
    connection only after its 200 event-stream headers, like a vLLM killed between those and the first token.
    A thread with its own event loop."""

    def __init__(self, models: bytes, after_headers: bool = False):
        self.models, self.after_headers, self.dropped = models, after_headers, 0
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self.handle, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            headers = (await reader.readuntil(b"\r\n\r\n")).lower()
            if line.startswith(b"GET /v1/models"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(self.models)).encode() + b"\r\n\r\n" + self.models)
                await writer.drain()
                continue
            length = int(headers.split(b"content-length:")[1].split(b"\r\n")[0]) if b"content-length:" in headers else 0
            body = await reader.readexactly(length)
            if self.after_headers and json.loads(body).get("stream"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
                await writer.drain()
            self.dropped += 1
            break
        writer.close()

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)


@pytest.mark.parametrize("after_headers", [False, True], ids=["before-headers", "stream-before-first-chunk"])
def test_a_request_whose_replica_drops_it_goes_to_the_other(fake, tmp_path, after_headers):
    from gateway_support import fake_settings, sample, scrape
    from test_gateway_faults import USER

    from service.gateway.app import create_gateway_app

    dropper = DroppingReplica(httpx.get(f"{fake.url}/v1/models").content, after_headers)
    try:
        settings = fake_settings(tmp_path, replica_health_s=0.2)
        with ServerThread(create_gateway_app(settings, upstream_url=f"{dropper.url},{fake.url}",
                                             think_open=False)) as gw:
            client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
            for i in range(12):
                if i % 2:
                    chunks = list(client.chat.completions.create(model="crafted", messages=USER, stream=True))
                    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there."
                else:
                    assert client.chat.completions.create(model="crafted", messages=USER).choices[0].message.content \
                        == "Hello there."
                time.sleep(0.25)  # the dropper passes its next health check and is readmitted
            metrics = scrape(gw.url)
            retried = sample(metrics, "presafe_upstream_errors_total", kind="replica_retry")
            assert retried >= 2  # it was tried, ejected, readmitted and tried again
            assert dropper.dropped >= retried  # (a dropped reused connection is first retried once on it)
            assert sample(metrics, "presafe_requests_total", route="/v1/chat/completions", model="crafted",
                          status="200") == 12
    finally:
        dropper.close()


# --------------------------------------------------------------------------- two real vLLM replicas


@pytest.fixture
def e2e(vllm_server, tiny_llm_dir, tiny_adapter_dir, tmp_path):
    state = E2E(vllm_server, tmp_path, tiny_llm_dir, tiny_adapter_dir)
    try:
        yield state
    finally:
        state.close()


def replica_counts(e2e) -> dict[str, float]:
    return {dict(labels)["replica"]: value for (name, labels), value in e2e.metrics().items()
            if name == "presafe_upstream_requests_total"}


def healthy(e2e, url: str) -> float:
    return e2e.metrics()[("presafe_upstream_replica_healthy", (("replica", url),))]


def served(url: str) -> set[str]:
    return {card["id"] for card in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]}


def answer(url: str, model: str) -> str:
    resp = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                      json={"model": model, "messages": MESSAGES, "max_tokens": 2})
    assert resp.status_code == 200, resp.text
    return resp.json()["model"]


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.timeout(1500)  # two replica starts (one a restart) beside the shared vLLM: ~6 min on 2 cores
def test_two_replicas_promote_route_eject_and_readmit(e2e, tiny_llm_dir, tmp_path):
    template = write_serving_template(tiny_llm_dir, tmp_path / "chat_template.jinja")
    args = ["--chat-template", str(template)]
    # vLLM binds each CPU engine's worker to the same core: on 2 cores a second one restarted beside the busy
    # first one got 0.6% of its core (machines of their own in production); this one takes the other core.
    env = {"VLLM_CPU_OMP_THREADS_BIND": cpus_beside([e2e.vllm.proc.pid]) or "auto"}
    second = VLLMServer(tiny_llm_dir, "tiny", tmp_path / "vllm-b.log", extra_args=args, env=env)
    try:
        second.wait_ready()
        a, b = e2e.vllm.url, second.url
        e2e.gateway.env.update(PRESAFE_VLLM_URL=f"{a},{b}", PRESAFE_REPLICA_HEALTH_S="0.5")
        e2e.start(stored=2)  # v1 promoted: the admin loads it into every replica
        v1, v2 = e2e.name(1), e2e.name(2)
        wait_until(lambda: v1 in served(a) and v1 in served(b), what="v1 on both replicas")

        # a promotion is done when every replica answers with the new version
        resp = e2e.admin("POST", f"/adapters/{v2}/promote", timeout=300)
        assert resp.status_code == 200, resp.text
        assert answer(a, v2) == v2 and answer(b, v2) == v2
        e2e.wait_alias(v2, timeout=10)
        # and the admin shows it replica by replica
        view = {r["url"]: r for r in e2e.admin("GET", "/adapters", timeout=120).json()["replicas"]}
        assert set(view) == {a, b}
        for r in view.values():
            assert r["admitted"] and r["error"] is None and r["holds_promoted"] is True and {v1, v2} <= set(r["adapters"])

        # per request, not per connection: one client's requests spread over both replicas
        before = replica_counts(e2e)
        client = e2e.client()
        for _ in range(20):
            assert client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=2).model == v2
        after = replica_counts(e2e)
        assert min(after[a] - before.get(a, 0), after[b] - before.get(b, 0)) >= 5
        assert abs(after[a] - after[b]) <= 1  # one at a time, none outstanding: the one routed fewer gets it

        # under load, one replica dies and comes back
        stop, lock = threading.Event(), threading.Lock()
        results: list[tuple[str, bool]] = []  # (outcome, whether the stream had started)

        def worker(i: int) -> None:
            client = e2e.client()
            while not stop.is_set():
                started = False
                try:
                    if i % 3 == 1:
                        for _chunk in client.chat.completions.create(model="presafe", messages=MESSAGES,
                                                                     max_tokens=16, stream=True):
                            started = True
                    elif i % 3 == 2:  # leaves after the first chunk
                        stream = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=16,
                                                                stream=True)
                        next(iter(stream))
                        started = True
                        stream.close()
                    else:
                        client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=16)
                    outcome = "ok"
                except openai.APIStatusError as exc:
                    outcome = f"status {exc.status_code}: {exc.message}"
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    outcome = f"error: {type(exc).__name__}: {exc}"
                with lock:
                    results.append((outcome, started))
                time.sleep(0.25)  # steady traffic that leaves a restarting vLLM some CPU on 2 cores

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]  # 2 of each kind
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(results) >= 150, timeout=300, what="the load running")
            loaded = replica_counts(e2e)
            n_before = len(results)
            spread = {u: loaded[u] - after[u] for u in (a, b)}
            os.killpg(second.proc.pid, 9)
            second.proc.wait(30)
            second.stop()
            wait_until(lambda: healthy(e2e, b) == 0, timeout=30, what="the dead replica ejected")
            view = {r["url"]: r for r in e2e.admin("GET", "/adapters", timeout=120).json()["replicas"]}
            assert not view[b]["admitted"] and view[b]["error"] and view[b]["adapters"] == []
            assert view[a]["admitted"] and view[a]["holds_promoted"] is True
            wait_until(lambda: len(results) >= n_before + 30, timeout=120, what="requests without the replica")
            while_dead = replica_counts(e2e)

            second = VLLMServer(tiny_llm_dir, "tiny", tmp_path / "vllm-b.log", extra_args=args, port=second.port,
                                env=env)
            second.wait_ready(900)
            wait_until(lambda: healthy(e2e, b) == 1, timeout=60, what="the replica readmitted")
            wait_until(lambda: v2 in served(b), timeout=60, what="the promoted adapter loaded into it again")
            view = {r["url"]: r for r in e2e.admin("GET", "/adapters", timeout=120).json()["replicas"]}
            assert view[b]["admitted"] and view[b]["holds_promoted"] is True
            wait_until(lambda: replica_counts(e2e)[b] > while_dead[b] + 10, timeout=120,
                       what="requests on the readmitted replica")
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        failed = [r for r in results if r[0] != "ok" and not r[1]]
        cut = [r for r in results if r[0] != "ok" and r[1]]
        print(f"\nreplicas: {len(results)} requests, {len(failed)} failed before streaming, {len(cut)} streams cut "
              f"by the kill; routed before the kill {spread}; retried on the other replica "
              f"{e2e.metrics().get(('presafe_upstream_errors_total', (('kind', 'replica_retry'),)), 0):.0f}")
        assert failed == []
        assert len(cut) <= len(threads)  # only streams running on the killed replica, at most one per client
        # Under load the less busy replica gets more: on 2 shared cores the two are not equally fast (80/76 in one
        # run here, 89/64 in another), so this asks for a fair share each, not the +-20% of equal replicas.
        assert min(spread.values()) >= 0.3 * sum(spread.values())
        assert while_dead[a] > loaded[a]
    finally:
        second.stop()


def test_a_background_step_that_fails_is_retried_not_dropped():
    """The health checks and queue polls run as :class:`~service.core.periodic.Periodic` steps: one that raises is
    logged and the loop goes on; stop() ends it."""
    from service.core.periodic import Periodic

    calls: list[int] = []

    async def step() -> None:
        calls.append(len(calls))
        if len(calls) == 1:
            raise RuntimeError("one bad poll")

    async def run() -> bool:
        loop = Periodic(step, 0.01, name="test step")
        loop.start()
        loop.start()  # a second start does not run a second loop
        await asyncio.sleep(0.2)
        running = loop.running
        await loop.stop()
        stopped_at = len(calls)
        await asyncio.sleep(0.05)
        assert len(calls) == stopped_at and not loop.running
        return running

    assert asyncio.run(run()) and len(calls) >= 3
