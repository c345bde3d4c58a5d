"""Admin end to end: a real gateway process (uvicorn) in front of the real vLLM test server.

Retraining runs the fixture trainer (tests/fixtures/tiny_trainer.py: a real PEFT LoRA for the tiny
Llama) through the local runner; the adapter is published, loaded into vLLM at runtime and
promoted. Covers: retrain over HTTP → the new adapter answers under the alias; 409 while a job
runs; the trainer killed mid-run → job failed, old adapter still served; the eval gate; hot swaps
under load with zero failed requests; kill -9 of the gateway mid-job → restart recovers.
Figures (retrain → answering time, requests during swaps) are printed (run with ``-s``).
"""

from __future__ import annotations

import json
import os
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

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

TOKEN = "e2e-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TRAINER = Path(__file__).parent / "fixtures" / "tiny_trainer.py"
LAUNCH = ("import sys, uvicorn; from service.app import create_app; "
          "uvicorn.run(create_app(), host='127.0.0.1', port=int(sys.argv[1]), log_level='warning', "
          "timeout_graceful_shutdown=5)")
MESSAGES = [{"role": "user", "content": "Say hello."}]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    def __init__(self, vllm, home: Path, prefix: str, gateway: GatewayProcess, base: Path):
        self.vllm, self.home, self.prefix, self.gateway, self.base = vllm, home, prefix, gateway, base

    @property
    def url(self) -> str:
        return self.gateway.url

    def admin(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.url}/admin{path}", headers=AUTH, timeout=120, **kwargs)

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


@pytest.fixture(scope="module")
def e2e(vllm_server, tiny_llm_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("admin-e2e")
    prefix = f"e2e{uuid.uuid4().hex[:6]}"  # vLLM is shared with other tests: unique adapter names
    config = home / "retrain.yaml"
    config.write_text(f"models:\n  base: {tiny_llm_dir}\nalign:\n  max_steps: 3\npublish:\n  name: {prefix}\n")
    env = {**os.environ, "PRESAFE_HOME": str(home / "home"), "PRESAFE_VLLM_URL": vllm_server.url,
           "PRESAFE_ADMIN_TOKEN": TOKEN, "PRESAFE_TRAIN_COMMAND": f"{sys.executable} {TRAINER}",
           "PRESAFE_TRAIN_CONFIG": str(config), "PRESAFE_BASE_MODEL": str(tiny_llm_dir),
           "PRESAFE_MODELS_TTL_S": "1", "TINY_TRAINER_STEP_S": "0.05", "PRESAFE_CANCEL_GRACE_S": "5",
           "PRESAFE_WATCH_S": "1"}
    gateway = GatewayProcess(env, home / "gateway.log").start()
    state = E2E(vllm_server, home / "home", prefix, gateway, tiny_llm_dir)
    try:
        yield state
    finally:
        state.gateway.stop()
        models = httpx.get(f"{vllm_server.url}/v1/models").json()["data"]
        for card in models:
            if card["id"].startswith(prefix):
                httpx.post(f"{vllm_server.url}/v1/unload_lora_adapter", json={"lora_name": card["id"]})


def test_retrain_over_http_then_the_new_adapter_answers(e2e):
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
    name = f"{e2e.prefix}-v1"
    assert (job["adapter"], job["promoted"], job["progress"], job["gate"]["passed"]) == (name, True, 1.0, True)
    assert job["metrics"]["loss"] > 0 and job["stage"] == "publish"
    assert job["metrics"]["harmful"]["refusal_rate"] == 0.9  # the manifest's eval figures, merged on publish
    assert any(line.startswith("tiny trainer: base=") for line in job["log_tail"])
    while True:  # the alias answers with the new adapter (the gateway re-reads the registry)
        answer = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4)
        if answer.model == name:
            break
        assert time.monotonic() - t0 < t_job + 30
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
    name = f"{e2e.prefix}-v1"
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
    resp = e2e.admin("POST", "/retrain", json={"gate": {"min": {"harmful.refusal_rate": 0.95}}})
    job = e2e.wait_job(resp.json()["id"])
    assert job["state"] == "succeeded" and job["adapter"] == f"{e2e.prefix}-v2" and job["promoted"] is False
    assert job["gate"]["passed"] is False
    assert job["gate"]["reasons"] == ["harmful.refusal_rate=0.9 is below the minimum 0.95"]
    listing = e2e.admin("GET", "/adapters").json()
    assert listing["promoted"] == f"{e2e.prefix}-v1"
    assert [(a["name"], a["promoted"]) for a in listing["data"]] == [(f"{e2e.prefix}-v1", True),
                                                                     (f"{e2e.prefix}-v2", False)]


def test_hot_swaps_under_load_drop_no_request(e2e):
    v1, v2 = f"{e2e.prefix}-v1", f"{e2e.prefix}-v2"
    stop = threading.Event()
    results: list[tuple[str, str]] = []  # (outcome, model)
    lock = threading.Lock()

    def worker(i: int) -> None:
        client = e2e.client()
        while not stop.is_set():
            try:
                if i % 2:
                    stream = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=8,
                                                            stream=True)
                    chunks = list(stream)
                    model = chunks[0].model
                    assert any(c.choices and c.choices[0].finish_reason for c in chunks)
                else:
                    model = client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=8).model
                outcome = "ok"
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                outcome, model = f"error: {type(exc).__name__}: {exc}", ""
            with lock:
                results.append((outcome, model))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    swaps = []
    try:
        time.sleep(1.5)
        for _ in range(4):
            for path in (f"/adapters/{v2}/promote", "/adapters/rollback"):
                t0 = time.monotonic()
                resp = e2e.admin("POST", path)
                assert resp.status_code == 200, resp.text
                swaps.append(time.monotonic() - t0)
                time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    errors = [r for r in results if r[0] != "ok"]
    seen = {model for _, model in results}
    print(f"\nhot swap: {len(swaps)} swaps (mean {sum(swaps) / len(swaps):.2f}s), {len(results)} requests, "
          f"{len(errors)} errors, models seen {sorted(seen)}")
    assert errors == []
    assert {v1, v2} <= seen and len(results) > 40
    assert e2e.admin("GET", "/adapters").json()["promoted"] == v1


def test_kill_9_of_the_gateway_mid_job_then_restart_recovers(e2e):
    v1 = f"{e2e.prefix}-v1"
    resp = e2e.admin("POST", "/retrain", json={"overrides": {"align.max_steps": 4000}})
    job_id = resp.json()["id"]
    job = e2e.wait_job(job_id, lambda j: j["stage"] == "align")
    trainer = int(job["runner_ref"])
    e2e.gateway.kill9()
    # what a crash can leave behind: a half-written publish; vLLM restarted without the adapter
    leftover = e2e.home / "adapters" / f".{e2e.prefix}-v3.tmp-crash"
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
    deadline = time.monotonic() + 60
    while v1 not in {m["id"] for m in httpx.get(f"{e2e.vllm.url}/v1/models").json()["data"]}:
        assert time.monotonic() < deadline, "the promoted adapter was not loaded again"
        time.sleep(0.5)
    assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4).model == v1
    metrics = e2e.metrics()
    assert metrics[("presafe_jobs", (("state", "interrupted"),))] == 1
    assert metrics[("presafe_served_adapter_info", (("adapter", v1), ("alias", "presafe"), ("version", "1")))] == 1
    # and the next retrain works
    resp = e2e.admin("POST", "/retrain", json={})
    assert resp.status_code == 202
    job = e2e.wait_job(resp.json()["id"])
    assert job["state"] == "succeeded" and job["adapter"] == f"{e2e.prefix}-v3", json.dumps(job)


def test_vllm_losing_the_promoted_adapter_gets_it_back(e2e):
    """As after a vLLM restart: the admin's watch loads the promoted adapter again within seconds."""
    promoted = e2e.admin("GET", "/adapters").json()["promoted"]
    assert httpx.post(f"{e2e.vllm.url}/v1/unload_lora_adapter", json={"lora_name": promoted}).status_code == 200
    t0 = time.monotonic()
    while promoted not in {m["id"] for m in httpx.get(f"{e2e.vllm.url}/v1/models").json()["data"]}:
        assert time.monotonic() - t0 < 30, "the promoted adapter was not loaded again"
        time.sleep(0.2)
    assert e2e.client().chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4).model == promoted
