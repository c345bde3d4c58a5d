"""The promoted adapter served from merged weights (``service.engines``), end to end with real vLLM servers.

The gateway fronts the shared LoRA test server (tiny Llama) with ``PRESAFE_SERVE_MERGED=true``: it merges the
promoted adapter, starts a vLLM of its own on the merged weights (no LoRA) and routes the alias there; a promote
under load starts the next one beside it (blue/green), moves the alias, drains and stops the old one. When memory
is short for a second engine the alias stays on runtime LoRA and ``/admin/adapters`` says so.
"""

from __future__ import annotations

import threading
import time

import httpx
import psutil
import pytest
from test_admin_e2e import E2E, MESSAGES, wait_until

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPTS = ["Say hello.", "How do I bake bread?", "Name three colours.", "What is 2 + 3?"]


@pytest.fixture
def e2e(vllm_server, tiny_llm_dir, tiny_adapter_dir, tmp_path):
    state = E2E(vllm_server, tmp_path, tiny_llm_dir, tiny_adapter_dir)
    state.gateway.env.update({"PRESAFE_SERVE_MERGED": "true", "VLLM_CPU_KVCACHE_SPACE": "1",
                              "PRESAFE_VLLM_MAX_MODEL_LEN": "1024"})
    try:
        yield state
    finally:
        state.close()


def serving(e2e: E2E) -> dict:
    return e2e.admin("GET", "/adapters", timeout=600).json()["serving"]  # 2 cores shared by 3 engines: be patient


def greedy(url: str, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0}
    out = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600).json()["choices"][0]["message"]
    return (out.get("reasoning") or "") + "|" + (out.get("content") or "")


def served_requests(url: str) -> float:
    """vLLM's own count of finished requests (``vllm:request_success_total``, all reasons)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=600).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "vllm:request_success_total")


@pytest.mark.timeout(1800)  # three engine starts (merges included), the last one under load: ~10 min on 2 cores
def test_promoted_adapter_served_merged_then_swapped_blue_green_under_load(e2e):
    e2e.start(stored=2)  # v1 promoted: the alias answers through LoRA at once, merged once its engine is up
    v1, v2 = e2e.name(1), e2e.name(2)
    wait_until(lambda: serving(e2e)["mode"] == "merged", timeout=900, what="v1 served merged")
    first = serving(e2e)
    assert first["adapter"] == v1 and first["engine"]["adapter"] == v1 and first["reason"] is None
    blue = first["engine"]
    assert blue["url"] != e2e.vllm.url and psutil.pid_exists(blue["pid"])

    # the merged engine and the LoRA adapter answer alike (greedy), and the alias goes to the merged engine
    assert [greedy(blue["url"], v1, p) for p in PROMPTS] == [greedy(e2e.vllm.url, v1, p) for p in PROMPTS]
    before_merged, before_lora = served_requests(blue["url"]), served_requests(e2e.vllm.url)
    for prompt in PROMPTS:
        out = e2e.client().chat.completions.create(model="presafe", max_tokens=4,
                                                   messages=[{"role": "user", "content": prompt}])
        assert out.model == v1 and out.model_extra["presafe"]["path"]
    assert served_requests(blue["url"]) - before_merged == len(PROMPTS)
    assert served_requests(e2e.vllm.url) == before_lora

    # promote v2 while clients keep sending (streamed, not, and streams left after one chunk): none fails
    stop, lock = threading.Event(), threading.Lock()
    results: list[tuple[str, str]] = []

    def worker(i: int) -> None:
        client = e2e.client()
        while not stop.is_set():
            try:
                if i == 4:  # leaves early: its request must not keep the old engine from draining
                    stream = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=64,
                                                            stream=True)
                    model = next(iter(stream)).model
                    stream.close()
                elif i % 2:
                    chunks = list(client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=8,
                                                                 stream=True))
                    assert len({c.model for c in chunks}) == 1
                    model = chunks[0].model
                else:
                    model = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=8).model
                outcome = "ok"
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                outcome, model = f"error: {type(exc).__name__}: {exc}", ""
            with lock:
                results.append((outcome, model))
            time.sleep(1.0)  # steady traffic (~5 req/s) that leaves the green engine's start CPU on 2 slow cores

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: len(results) >= 5, what="the load running")
        t0 = time.monotonic()
        resp = e2e.admin("POST", f"/adapters/{v2}/promote", timeout=1200)
        swap_s = time.monotonic() - t0
        assert resp.status_code == 200, resp.text
        now = serving(e2e)
        assert now["mode"] == "merged" and now["engine"]["adapter"] == v2, now  # ready before the alias moved
        green = now["engine"]
        assert green["url"] not in (blue["url"], e2e.vllm.url)
        assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=2).model == v2
        # the old engine drains and stops; its memory goes with its process. The swap record is complete once the
        # gateway has finished retiring it (a moment after the process is gone: RSS is measured then)
        wait_until(lambda: "retired" in serving(e2e)["last_swap"], timeout=120, what="the old engine retired")
        assert not psutil.pid_exists(blue["pid"]) or psutil.Process(blue["pid"]).status() == "zombie"
        swap = serving(e2e)["last_swap"]
        assert swap["to"] == v2 and swap["from"] == [v1] and swap["retired"] == [v1] and swap["stopped"] is True
        assert swap["peak_rss_bytes"] > swap["rss_after_bytes"] > 0  # two engines at the peak, one after
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{blue['url']}/health", timeout=3)
        n = len(results)
        wait_until(lambda: len(results) >= n + 4, what="requests after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    errors = [r for r in results if r[0] != "ok"]
    print(f"\nmerged blue/green: promote answered in {swap_s:.1f}s (green ready in {swap['ready_s']}s), "
          f"{len(results)} requests, {len(errors)} errors, peak RSS {swap['peak_rss_bytes'] / 2**20:.0f} MiB "
          f"(after {swap['rss_after_bytes'] / 2**20:.0f} MiB), {swap['drained_requests']} drained")
    assert errors == []
    assert {v1, v2} <= {model for _, model in results}
    assert served_requests(green["url"]) > 0


def test_short_memory_falls_back_to_runtime_lora_and_says_so(e2e):
    e2e.gateway.env["PRESAFE_MERGED_MEMORY_RESERVE_GIB"] = "100000"
    e2e.start(stored=1)
    v1 = e2e.name(1)
    wait_until(lambda: serving(e2e)["reason"] != "the merged engine is starting", timeout=300,
               what="the merged engine given up")
    now = serving(e2e)
    assert now["mode"] == "lora" and now["adapter"] == v1 and now["engines"] == []
    assert "memory is short for a second engine" in now["reason"] and "runtime LoRA" in now["reason"]
    before = served_requests(e2e.vllm.url)
    assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=2).model == v1
    assert served_requests(e2e.vllm.url) == before + 1  # through the LoRA engine
    # a promote tries again at once, and still says why it stays on LoRA
    resp = e2e.admin("POST", f"/adapters/{v1}/promote", timeout=600)
    assert resp.status_code == 200, resp.text
    assert serving(e2e)["mode"] == "lora"
