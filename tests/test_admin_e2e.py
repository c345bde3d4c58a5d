"""Admin end to end: a real gateway process (uvicorn) in front of the real vLLM test server.

Retraining runs the fixture trainer (tests/fixtures/tiny_trainer.py: a real PEFT LoRA for the tiny
Llama) through the local runner; the adapter is published, loaded into vLLM at runtime and
promoted. Covers: retrain over HTTP → the new adapter answers under the alias; 409 while a job
runs; the trainer killed mid-run → job failed, old adapter still served; the eval gate; hot swaps
under load with zero failed requests (and a long stream that spans them on the adapter it started
on); kill -9 of the gateway mid-job → restart recovers.

Each test is independent (any order): its own $PRESAFE_HOME, adapter name prefix and gateway process,
its store set up directly (real PEFT adapters published and promoted); only the vLLM server is shared.
Figures (retrain → answering time, requests during swaps) are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.adapters.store import AdapterStore, check_adapter
from service.vllm_server import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKEN = "e2e-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TRAINER = Path(__file__).parent / "fixtures" / "tiny_trainer.py"
LAUNCH = ("import sys, uvicorn; from service.app import create_app; from service.gateway.logs import setup_logging; "
          "setup_logging('warning'); "
          "uvicorn.run(create_app(), host='127.0.0.1', port=int(sys.argv[1]), log_level='warning', "
          "timeout_graceful_shutdown=5)")
MESSAGES = [{"role": "user", "content": "Say hello."}]
REFUSAL = 0.8  # the eval figure of every adapter here: the setup's (written in its manifest) and the trainer's


class GatewayProcess:
    """``create_app()`` under uvicorn in its own process, configured by environment only."""

    def __init__(self, env: dict[str, str], log_path: Path):
        self.env, self.log_path = env, log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> GatewayProcess:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(port)], env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited:\n{self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("gateway did not start")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class E2E:
    """One test's world: a home, an adapter name prefix, a gateway process, the shared vLLM."""

    def __init__(self, vllm, root: Path, base: Path, adapter_src: Path):
        self.vllm, self.base, self.adapter_src = vllm, base, adapter_src
        self.home = root / "home"
        self.prefix = f"e2e{uuid.uuid4().hex[:6]}"  # vLLM is shared with other tests: unique adapter names
        config = root / "retrain.yaml"
        config.write_text(f"models:\n  base: {base}\nalign:\n  max_steps: 3\npublish:\n  name: {self.prefix}\n")
        env = {**os.environ, "PRESAFE_HOME": str(self.home), "PRESAFE_VLLM_URL": vllm.url,
               "PRESAFE_ADMIN_TOKEN": TOKEN, "PRESAFE_TRAIN_COMMAND": f"{sys.executable} {TRAINER}",
               "PRESAFE_TRAIN_CONFIG": str(config), "PRESAFE_BASE_MODEL": str(base),
               "PRESAFE_MODELS_TTL_S": "1", "TINY_TRAINER_STEP_S": "0.05", "TINY_TRAINER_REFUSAL": str(REFUSAL),
               "PRESAFE_CANCEL_GRACE_S": "5", "PRESAFE_WATCH_S": "1"}
        self.gateway = GatewayProcess(env, root / "gateway.log")

    def name(self, version: int) -> str:
        return f"{self.prefix}-v{version}"

    def start(self, stored: int = 0) -> E2E:
        """Publish ``stored`` real adapters (v1 promoted) into the store, start the gateway and, with a
        promoted adapter, wait until the alias answers with it (the admin loads it into vLLM at start)."""
        if stored:
            store = AdapterStore(self.home / "adapters")
            src = self.home.parent / "adapter-src"
            shutil.copytree(self.adapter_src, src)
            manifest = json.loads((src / "presafe-manifest.json").read_text())
            manifest["metrics"]["harmful"]["refusal_rate"] = REFUSAL
            (src / "presafe-manifest.json").write_text(json.dumps(manifest))
            for _ in range(stored):
                store.publish(src, prefix=self.prefix, expected_base=str(self.base))
            store.promote(self.name(1))
        self.gateway.start()
        if stored:
            self.wait_alias(self.name(1))
        return self

    def wait_alias(self, name: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                model = self.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=2).model
            except openai.APIStatusError:
                model = None
            if model == name:
                return
            assert time.monotonic() < deadline, f"the alias does not answer with {name} (got {model})"
            time.sleep(0.2)

    @property
    def url(self) -> str:
        return self.gateway.url

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.url}/admin{path}", headers=AUTH, **{"timeout": 120, **kwargs})

    def client(self, *, admin: bool = False) -> openai.OpenAI:
        """A public client (only the alias), or one holding the admin token (every served model)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=TOKEN if admin else "unused", max_retries=0,
                             timeout=120)

    def wait_job(self, job_id: str, done=lambda job: job["state"] in ("succeeded", "failed", "cancelled"),
                 timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.admin("GET", f"/jobs/{job_id}").json()
            if done(job):
                return job
            time.sleep(0.1)
        raise AssertionError(f"job {job_id}: {job}")

    def metrics(self) -> dict[tuple, float]:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(text) for s in fam.samples}

    def close(self) -> None:
        self.gateway.stop()
        for card in httpx.get(f"{self.vllm.url}/v1/models").json()["data"]:
            if card["id"].startswith(self.prefix):
                httpx.post(f"{self.vllm.url}/v1/unload_lora_adapter", json={"lora_name": card["id"]})


@pytest.fixture
def e2e(vllm_server, tiny_llm_dir, tiny_adapter_dir, tmp_path):
    """A fresh world for one test (not started: the test calls ``start`` with the store it needs)."""
    state = E2E(vllm_server, tmp_path, tiny_llm_dir, tiny_adapter_dir)
    try:
        yield state
    finally:
        state.close()


def wait_until(condition, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not reached within {timeout} s"
        time.sleep(0.05)


def test_retrain_over_http_then_the_new_adapter_answers(e2e):
    e2e.start()
    client = e2e.client()
    with pytest.raises(openai.APIStatusError) as info:  # nothing promoted yet: fail safe, never the base model
        client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4)
    assert info.value.status_code == 503

    t0 = time.monotonic()
    resp = e2e.admin("POST", "/retrain", json={"overrides": {"align.lora_r": 8}})
    assert resp.status_code == 202, resp.text
    marks: dict[str, float] = {}

    def note(job: dict) -> bool:
        marks.setdefault(job["state"], time.monotonic() - t0)
        return job["state"] in ("succeeded", "failed", "cancelled")

    job = e2e.wait_job(resp.json()["id"], note)
    t_job = time.monotonic() - t0
    assert job["state"] == "succeeded", job
    name = e2e.name(1)
    assert (job["adapter"], job["promoted"], job["progress"], job["gate"]["passed"]) == (name, True, 1.0, True)
    assert job["metrics"]["loss"] > 0 and job["stage"] == "publish"
    assert job["metrics"]["harmful"]["refusal_rate"] == REFUSAL  # the manifest's eval figures, merged on publish
    assert any(line.startswith("tiny trainer: base=") for line in job["log_tail"])
    # the admin promotes after vLLM loaded the adapter, in this process: the alias answers with it at once
    answer = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4)
    assert answer.model == name
    t_answer = time.monotonic() - t0
    print(f"\nretrain → job succeeded {t_job:.1f}s, → alias answers with {name} {t_answer:.1f}s "
          f"(state first seen at: {', '.join(f'{k} {v:.1f}s' for k, v in marks.items())})")

    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"presafe"} and models["presafe"].root == name  # the public sees the alias only
    admin = e2e.client(admin=True)
    assert name in {m.id for m in admin.models.list().data}
    assert admin.chat.completions.create(model=name, messages=MESSAGES, max_tokens=4).model == name
    stored = Path(e2e.home / "adapters" / name)
    check_adapter(stored, expected_base=str(e2e.base))
    listing = e2e.admin("GET", "/adapters").json()
    assert listing["promoted"] == name and listing["data"][0]["loaded"] is True
    metrics = e2e.metrics()
    assert metrics[("presafe_served_adapter_info", (("adapter", name), ("alias", "presafe"), ("version", "1")))] == 1
    assert metrics[("presafe_jobs", (("state", "succeeded"),))] == 1
    assert metrics[("presafe_last_successful_retrain_timestamp_seconds", ())] >= time.time() - t_answer - 5


def test_busy_409_then_killed_trainer_fails_and_the_old_adapter_stays(e2e):
    e2e.start(stored=1)
    name = e2e.name(1)
    resp = e2e.admin("POST", "/retrain", json={"overrides": {"align.max_steps": 4000}})
    assert resp.status_code == 202
    job_id = resp.json()["id"]
    job = e2e.wait_job(job_id, lambda j: j["stage"] == "align" and j["progress"] > 0.1)
    busy = e2e.admin("POST", "/retrain", json={})
    assert busy.status_code == 409 and job_id in busy.json()["error"]["message"]

    os.kill(int(job["runner_ref"]), signal.SIGKILL)
    job = e2e.wait_job(job_id)
    assert job["state"] == "failed" and "SIGKILL" in job["error"] and job["adapter"] is None
    assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4).model == name
    assert [a["name"] for a in e2e.admin("GET", "/adapters").json()["data"]] == [name]
    assert e2e.metrics()[("presafe_jobs", (("state", "failed"),))] == 1


def test_gate_stores_without_promoting(e2e):
    e2e.start(stored=1)
    resp = e2e.admin("POST", "/retrain", json={"gate": {"min": {"harmful.refusal_rate": 0.95}}})
    job = e2e.wait_job(resp.json()["id"])
    assert job["state"] == "succeeded" and job["adapter"] == e2e.name(2) and job["promoted"] is False
    assert job["gate"]["passed"] is False
    assert job["gate"]["reasons"] == [f"harmful.refusal_rate={REFUSAL} is below the minimum 0.95"]
    listing = e2e.admin("GET", "/adapters").json()
    assert listing["promoted"] == e2e.name(1)
    assert [(a["name"], a["promoted"]) for a in listing["data"]] == [(e2e.name(1), True), (e2e.name(2), False)]
    assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4).model == e2e.name(1)


SLOW_TOKENS = 900  # a stream far longer than a swap (prompt + this stays under --max-model-len 1024)


def test_hot_swaps_under_load_drop_no_request(e2e):
    """Alias swaps while six clients send requests: none fails, a stream never changes adapter midway, a
    request sent after a swap answered gets the new adapter, and long streams running back to back (at
    least one of them still running when a swap answered) finish, chunk by chunk, on the adapter they
    started on."""
    e2e.start(stored=2)
    v1, v2 = e2e.name(1), e2e.name(2)
    stop = threading.Event()
    results: list[tuple[str, str]] = []  # (outcome, model)
    lock = threading.Lock()

    def worker(i: int) -> None:
        client = e2e.client()
        while not stop.is_set():
            try:
                if i % 2:
                    chunks = list(client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=8,
                                                                 stream=True))
                    models = {c.model for c in chunks}
                    assert len(models) == 1, models  # one adapter from the first chunk to the last
                    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
                    model = chunks[0].model
                else:
                    model = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=8).model
                outcome = "ok"
            except Exception as exc:  # noqa: BLE001 - every failure is counted, with the transport error under it
                cause = exc.__cause__ or exc.__context__
                outcome = f"error: {type(exc).__name__}: {exc}" + (f" ({type(cause).__name__}: {cause})" if cause else "")
                model = ""
            with lock:
                results.append((outcome, model))

    long_streams: list[list] = []  # each long stream's chunks, as they arrive; they run back to back

    def long_streams_back_to_back() -> None:
        while not stop.is_set():
            chunks: list = []
            long_streams.append(chunks)
            for chunk in e2e.client().chat.completions.create(
                    model="presafe", messages=MESSAGES, max_tokens=SLOW_TOKENS, temperature=0, stream=True,
                    stream_options={"include_usage": True}):
                chunks.append(chunk)  # noqa: PERF402 - appended as they arrive: the test watches the list grow

    def done() -> int:
        with lock:
            return len(results)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    swaps: list[float] = []
    spans: list[tuple[int, int]] = []  # (long stream, its chunks when the swap answered) for a stream live at t0
    long_thread = threading.Thread(target=long_streams_back_to_back)
    try:
        wait_until(lambda: done() >= 6, what="the load running")
        long_thread.start()
        wait_until(lambda: long_streams and len(long_streams[0]) > 0, what="the long stream's first chunk")
        for _ in range(4):
            for path, serving in ((f"/adapters/{v2}/promote", v2), ("/adapters/rollback", v1)):
                live = len(long_streams) - 1  # routed already when it has a chunk
                started = len(long_streams[live]) > 0
                t0 = time.monotonic()
                resp = e2e.admin("POST", path)
                assert resp.status_code == 200, resp.text
                swaps.append(time.monotonic() - t0)
                if started:
                    spans.append((live, len(long_streams[live])))
                after = client_model(e2e)
                assert after == serving  # a request sent after the swap answered gets the new adapter
                n = done()
                wait_until(lambda n=n: done() >= n + 3, what="requests completing after the swap")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        long_thread.join(120)
    errors = [r for r in results if r[0] != "ok"]
    seen = {model for _, model in results}
    spanned = [(i, k) for i, k in spans if len(long_streams[i]) > k]  # still streaming when the swap answered
    print(f"\nhot swap: {len(swaps)} swaps (mean {sum(swaps) / len(swaps):.2f}s), {len(results)} requests, "
          f"{len(errors)} errors, models seen {sorted(seen)}; {len(long_streams)} long streams of "
          f"{[len(c) for c in long_streams]} chunks, {len(spanned)} swaps answered mid-stream")
    assert errors == [], f"{errors}\ngateway log (tail):\n{e2e.gateway.log_path.read_text()[-4000:]}"
    assert {v1, v2} <= seen
    # a long stream: every chunk from the adapter it started on, to its natural end, past the swaps
    assert spanned, "no swap answered while a long stream was running"
    assert {c.model for c in long_streams[0]} == {v1}
    for chunks in long_streams:
        assert len({c.model for c in chunks}) == 1
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
        usage = next(c.usage for c in chunks if c.usage)
        assert usage.completion_tokens == SLOW_TOKENS
        assert chunks[-1].choices == []
    assert long_streams[0][-1].model_extra["presafe"]["path"] == "answer_with_cot"  # cut mid-think
    assert e2e.admin("GET", "/adapters").json()["promoted"] == v1


def client_model(e2e: E2E) -> str:
    return e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=2).model


def test_kill_9_of_the_gateway_mid_job_then_restart_recovers(e2e):
    e2e.start(stored=1)
    v1 = e2e.name(1)
    resp = e2e.admin("POST", "/retrain", json={"overrides": {"align.max_steps": 4000}})
    job_id = resp.json()["id"]
    job = e2e.wait_job(job_id, lambda j: j["stage"] == "align")
    trainer = int(job["runner_ref"])
    e2e.gateway.kill9()
    # what a crash can leave behind: a half-written publish; vLLM restarted without the adapter
    leftover = e2e.home / "adapters" / f".{e2e.name(2)}.tmp-crash"
    leftover.mkdir()
    (leftover / "adapter_config.json").write_text("{")
    assert httpx.post(f"{e2e.vllm.url}/v1/unload_lora_adapter", json={"lora_name": v1}).status_code == 200

    e2e.gateway.start()
    job = e2e.admin("GET", f"/jobs/{job_id}").json()
    assert job["state"] == "interrupted" and "running" in job["error"]
    deadline = time.monotonic() + 10
    while Path(f"/proc/{trainer}").exists() and Path(f"/proc/{trainer}/stat").read_text().split()[2] != "Z":
        assert time.monotonic() < deadline, "the orphaned trainer is still running"
        time.sleep(0.1)
    assert not leftover.exists()
    store = AdapterStore(e2e.home / "adapters")
    assert store.promoted() == v1 and store.recover().registry_rewritten is False
    wait_until(lambda: v1 in {m["id"] for m in httpx.get(f"{e2e.vllm.url}/v1/models").json()["data"]},
               what="the promoted adapter loaded again")
    assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4).model == v1
    metrics = e2e.metrics()
    assert metrics[("presafe_jobs", (("state", "interrupted"),))] == 1
    assert metrics[("presafe_served_adapter_info", (("adapter", v1), ("alias", "presafe"), ("version", "1")))] == 1
    # and the next retrain works
    resp = e2e.admin("POST", "/retrain", json={})
    assert resp.status_code == 202
    job = e2e.wait_job(resp.json()["id"])
    assert job["state"] == "succeeded" and job["adapter"] == e2e.name(2), json.dumps(job)


def test_vllm_losing_the_promoted_adapter_gets_it_back(e2e):
    """As after a vLLM restart: the admin's watch loads the promoted adapter again within seconds."""
    e2e.start(stored=1)
    promoted = e2e.admin("GET", "/adapters").json()["promoted"]
    assert promoted == e2e.name(1)
    assert httpx.post(f"{e2e.vllm.url}/v1/unload_lora_adapter", json={"lora_name": promoted}).status_code == 200
    wait_until(lambda: promoted in {m["id"] for m in httpx.get(f"{e2e.vllm.url}/v1/models").json()["data"]},
               timeout=30, what="the promoted adapter loaded again")
    assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4).model == promoted
