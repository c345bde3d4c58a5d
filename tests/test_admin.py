"""Admin API in process (no vLLM): auth on every route, bad input, job lifecycle, restart, metrics, OpenAPI.

The end-to-end tests with a real vLLM and a real gateway process are in test_admin_e2e.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.core.settings import Settings
from service.jobs.store import JobState, JobStore

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

ROUTES = [
    ("POST", "/admin/retrain", {}),
    ("GET", "/admin/jobs", None),
    ("GET", "/admin/jobs/job-123", None),
    ("POST", "/admin/jobs/job-123/cancel", None),
    ("GET", "/admin/adapters", None),
    ("POST", "/admin/adapters/presafe-v1/promote", None),
    ("POST", "/admin/adapters/rollback", None),
]

SLEEPER = textwrap.dedent("""
    import json, os, sys, time
    print(json.dumps({"stage": "align", "progress": 0.1}), flush=True)
    if os.environ.get("SLEEPER_MODE") == "fail":
        print("boom: out of memory", flush=True)
        sys.exit(3)
    if os.environ.get("SLEEPER_MODE") == "no-output":
        sys.exit(0)
    time.sleep(300)
""")


def assert_error(resp, status: int, *, code=None, contains: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if code is not None:
        assert body["error"]["code"] == code
    if contains is not None:
        assert contains in body["error"]["message"]
    return body["error"]


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_llm_dir) -> Path:
    return setup_home(tmp_path, monkeypatch, tiny_llm_dir)


def setup_home(tmp_path: Path, monkeypatch, tiny_llm_dir: Path) -> Path:
    """A sleeper trainer, a base config on the tiny model, and the $PRESAFE_HOME to use."""
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    config = tmp_path / "base.yaml"
    config.write_text(f"models:\n  base: {tiny_llm_dir}\nalign:\n  max_steps: 2\n")
    monkeypatch.setenv("PRESAFE_TRAIN_COMMAND", f"{sys.executable} {script}")
    monkeypatch.setenv("PRESAFE_TRAIN_CONFIG", str(config))
    monkeypatch.setenv("PRESAFE_CANCEL_GRACE_S", "3")
    monkeypatch.delenv("SLEEPER_MODE", raising=False)
    return tmp_path / "home"


def make_client(home: Path, token: str | None = TOKEN) -> TestClient:
    settings = Settings(home=home, admin_token=token, base_model="unused")
    # nothing listens on port 9: the admin paths tested here never need vLLM
    return TestClient(create_app(settings, upstream_url="http://127.0.0.1:9"))


def wait_state(client: TestClient, job_id: str, states: set[str], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/admin/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in states:
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} still {job['state']}")


@pytest.mark.parametrize("method, path, body", ROUTES)
def test_every_admin_route_rejects_missing_and_wrong_tokens(home, method, path, body):
    with make_client(home) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}, {"Authorization": f"Bearer {TOKEN}x"}):
            resp = client.request(method, path, json=body, headers=headers)
            assert_error(resp, 401, code="invalid_admin_token")
            assert resp.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method, path, body", ROUTES)
def test_every_admin_route_is_403_without_a_configured_token(home, method, path, body):
    with make_client(home, token=None) as client:
        for headers in ({}, AUTH, {"Authorization": "Bearer "}):
            err = assert_error(client.request(method, path, json=body, headers=headers), 403, code="admin_disabled")
            assert "admin disabled" in err["message"]
    with make_client(home, token="") as client:
        assert_error(client.request(method, path, json=body, headers={"Authorization": "Bearer "}), 403)


def test_auth_comes_before_the_size_limit(home):
    with make_client(home) as client:
        assert_error(client.post("/admin/retrain", content=b"x" * 200_000), 401)
        assert_error(client.post("/admin/retrain", content=b"x" * 200_000, headers=AUTH), 413,
                     code="request_too_large")


@pytest.mark.parametrize("body, status, param, contains", [
    ({"overrides": {"align.lora_rnk": 8}}, 422, "align.lora_rnk", "align.lora_rnk: unknown key"),
    ({"overrides": {"align": {"lora_r": 0}}}, 422, "align.lora_r", "greater than or equal to 1"),
    ({"overrides": {"align.lora_r": 0, "teacher.kind": "oracle", "nope": 1}}, 422, None, "nope: unknown key"),
    ({"overrides": {"align..lora_r": 4}}, 422, "overrides.align..lora_r", "invalid key"),
    ({"overrides": {"align.lora_dropout": 1.5}}, 422, "align.lora_dropout", "less than 1"),
    ({"overides": {}}, 422, "overides", "overides: unknown key"),
    ({"promote": "sometimes"}, 422, "promote", "valid boolean"),
    ({"gate": {"min": {"x": "high"}}}, 422, "gate.min.x", "valid number"),
    ({"config": "no-such-config"}, 422, "config", "unknown config 'no-such-config'"),
    ({"config": "../etc/passwd"}, 422, "config", "should match pattern"),
    ({"data": {"pool": "../../etc/passwd"}}, 400, "data.pool", "outside the allowed directories"),
    ({"data": {"pool": "missing.jsonl"}}, 422, "data.pool", "no such file"),
])
def test_retrain_rejects_bad_input_naming_it(home, body, status, param, contains):
    with make_client(home) as client:
        err = assert_error(client.post("/admin/retrain", json=body, headers=AUTH), status, contains=contains)
        if param is not None:
            assert err["param"] == param
        assert client.get("/admin/jobs", headers=AUTH).json()["data"] == []  # nothing was started


def test_bad_json_and_bad_query_parameters(home):
    with make_client(home) as client:
        assert_error(client.post("/admin/retrain", content=b"{nope", headers={**AUTH, "content-type":
                                                                             "application/json"}), 400,
                     code="invalid_json")
        assert_error(client.get("/admin/jobs?limit=0", headers=AUTH), 422, contains="limit")
        assert_error(client.get("/admin/jobs?state=sleeping", headers=AUTH), 422, contains="state")
        assert_error(client.get("/admin/jobs/x?log_lines=5000", headers=AUTH), 422, contains="log_lines")


def test_unknown_job_and_adapter_are_404(home):
    with make_client(home) as client:
        assert_error(client.get("/admin/jobs/job-nope", headers=AUTH), 404, code="job_not_found")
        assert_error(client.post("/admin/jobs/job-nope/cancel", headers=AUTH), 404, code="job_not_found")
        assert_error(client.post("/admin/adapters/presafe-v7/promote", headers=AUTH), 404, code="adapter_not_found")
        assert_error(client.post("/admin/adapters/..%2F..%2Fetc/promote", headers=AUTH), 404)
        assert_error(client.post("/admin/adapters/rollback", headers=AUTH), 409, code="nothing_to_roll_back")
        listing = client.get("/admin/adapters", headers=AUTH).json()
        serving = listing.pop("serving")  # nothing saved was touched, nothing is served
        replicas = listing.pop("replicas")
        assert listing == {"object": "list", "alias": "presafe", "promoted": None, "history": [], "promotions": [],
                           "data": []}
        assert serving["mode"] == "none" and serving["adapter"] is None and serving["engines"] == []
        # the one vLLM (nothing listens there) is checked when listed: ejected, and why
        assert replicas == [{"url": "http://127.0.0.1:9", "admitted": False, "error": "health check: ConnectError",
                             "adapters": [], "holds_promoted": None}]


def test_one_job_at_a_time_cancel_and_conflicts(home):
    with make_client(home) as client:
        resp = client.post("/admin/retrain", json={"overrides": {"align.lora_r": 4}}, headers=AUTH)
        assert resp.status_code == 202, resp.text
        job = resp.json()
        assert job["state"] in ("queued", "running") and job["request"]["overrides"] == {"align.lora_r": 4}
        running = wait_state(client, job["id"], {"running"})
        assert running["runner"] == "local" and running["runner_ref"].isdigit()
        deadline = time.monotonic() + 30
        while client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()["stage"] != "align":
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # the config file the trainer got: base + overrides
        config = (home / "jobs" / job["id"] / "config.yaml").read_text()
        assert "lora_r: 4" in config and "max_steps: 2" in config

        err = assert_error(client.post("/admin/retrain", json={}, headers=AUTH), 409, code="job_active")
        assert job["id"] in err["message"]

        cancelled = client.post(f"/admin/jobs/{job['id']}/cancel", headers=AUTH)
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["state"] == "cancelled" and cancelled.json()["error"] == "cancelled by request"
        pid = int(running["runner_ref"])
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        assert_error(client.post(f"/admin/jobs/{job['id']}/cancel", headers=AUTH), 409, code="job_finished")
        # the slot is free again
        second = client.post("/admin/retrain", json={}, headers=AUTH)
        assert second.status_code == 202
        client.post(f"/admin/jobs/{second.json()['id']}/cancel", headers=AUTH)
        jobs = client.get("/admin/jobs", headers=AUTH).json()["data"]
        assert [j["id"] for j in jobs] == [second.json()["id"], job["id"]]
        assert [j["id"] for j in client.get("/admin/jobs?state=cancelled&limit=1", headers=AUTH).json()["data"]] \
            == [second.json()["id"]]


@pytest.mark.parametrize("mode, expected", [
    ("fail", "trainer exited with code 3; last output: boom: out of memory"),
    ("no-output", "the trainer finished without writing"),
])
def test_failed_trainer_fails_the_job_with_its_reason(home, monkeypatch, mode, expected):
    monkeypatch.setenv("SLEEPER_MODE", mode)
    with make_client(home) as client:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        done = wait_state(client, job["id"], {"failed", "succeeded"})
        assert done["state"] == "failed" and expected in done["error"]
        assert done["progress"] == 0.1 and done["stage"] in ("align", "publish")
        if mode == "fail":
            assert done["exit_code"] == 3
            assert done["log_tail"][-1] == "boom: out of memory"
            assert client.get(f"/admin/jobs/{job['id']}?log_lines=1", headers=AUTH).json()["log_tail"] == \
                ["boom: out of memory"]


def test_a_trainer_that_cannot_start_fails_the_job(home, monkeypatch):
    monkeypatch.setenv("PRESAFE_TRAIN_COMMAND", str(home.parent / "no-such-trainer"))
    with make_client(home) as client:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        done = wait_state(client, job["id"], {"failed"})
        assert done["error"].startswith("could not start the trainer: FileNotFoundError")
        assert client.post("/admin/retrain", json={}, headers=AUTH).status_code == 202  # slot freed


def test_without_a_token_the_admin_touches_no_state(home):
    """The public gateway (no token, read-only volumes) must not open the job database or the store."""
    with make_client(home, token=None) as client:
        assert client.get("/health").status_code == 200
        assert_error(client.get("/admin/jobs", headers=AUTH), 403)
    assert not (home / "jobs").exists() and not (home / "adapters").exists()


def test_an_admin_that_cannot_start_is_503_and_the_gateway_stays_up(home):
    home.mkdir(parents=True)
    (home / "jobs").write_text("not a directory")
    with make_client(home) as client:
        assert client.get("/health").status_code == 200
        assert_error(client.get("/admin/jobs"), 401)
        err = assert_error(client.get("/admin/jobs", headers=AUTH), 503, code="admin_unavailable")
        assert "FileExistsError" in err["message"] or "NotADirectoryError" in err["message"]


def test_restart_marks_running_jobs_interrupted_and_stops_their_trainer(home):
    """A job a dead gateway left running becomes interrupted on start; its orphaned trainer is killed."""
    jobs = JobStore(home / "jobs" / "jobs.sqlite")
    job = jobs.create(request={}, runner="local", work_root=home / "jobs")
    orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", "--output",
                               f"{job.work_dir}/output"], start_new_session=True)
    try:
        time.sleep(0.3)
        jobs.update(job.id, state=JobState.running, runner_ref=str(orphan.pid), started_at=time.time())
        with make_client(home) as client:
            got = client.get(f"/admin/jobs/{job.id}", headers=AUTH).json()
            assert got["state"] == "interrupted" and "running" in got["error"]
            assert orphan.wait(10) == -signal.SIGKILL
            metrics = {(s.name, s.labels.get("state")): s.value
                       for fam in text_string_to_metric_families(client.get("/metrics").text)
                       for s in fam.samples}
            assert metrics[("presafe_jobs", "interrupted")] == 1
            assert metrics[("presafe_jobs", "running")] == 0
            # the slot is free for a new job
            assert client.post("/admin/retrain", json={}, headers=AUTH).status_code == 202
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_shutdown_interrupts_the_running_job(home):
    with make_client(home) as client:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        running = wait_state(client, job["id"], {"running"})
    after = JobStore(home / "jobs" / "jobs.sqlite").get(job["id"])
    assert after.state is JobState.interrupted and "shut down" in after.error
    with pytest.raises(ProcessLookupError):
        os.kill(int(running["runner_ref"]), 0)


def test_openapi_documents_the_admin_api(home):
    with make_client(home) as client:
        spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["AdminBearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "PRESAFE_ADMIN_TOKEN. Without a configured token every admin route is 403."}
    expected = {("post", "/admin/retrain"): "JobOut", ("get", "/admin/jobs"): "JobList",
                ("get", "/admin/jobs/{job_id}"): "JobOut", ("post", "/admin/jobs/{job_id}/cancel"): "JobOut",
                ("get", "/admin/adapters"): "AdapterList", ("post", "/admin/adapters/{name}/promote"): "SwapResult",
                ("post", "/admin/adapters/rollback"): "SwapResult"}
    for (method, path), model in expected.items():
        op = spec["paths"][path][method]
        assert op["security"] == [{"AdminBearer": []}]
        ok = op["responses"]["202" if path == "/admin/retrain" else "200"]
        assert ok["content"]["application/json"]["schema"]["$ref"] == f"#/components/schemas/{model}"
        for status in ("401", "403", "422"):
            assert op["responses"][status]["content"]["application/json"]["schema"]["$ref"] == \
                "#/components/schemas/ErrorResponse"
    assert "overrides" in spec["components"]["schemas"]["RetrainRequest"]["properties"]
    assert json.dumps(spec)  # serialisable


def test_admin_import_does_not_pull_torch():
    code = "import sys, service.admin.routes; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_served_adapter_watcher_retries_and_warns_once_per_error(home, monkeypatch, tiny_adapter_dir, caplog):
    """vLLM down (or refusing for good, e.g. without --enable-lora): the watcher keeps retrying the promoted
    adapter's load, but warns once per distinct error; its repeats go to debug, not every watch_s to the log."""
    from service.adapters.store import AdapterStore

    store = AdapterStore(Settings(home=home).adapters_dir)
    store.promote(store.publish(tiny_adapter_dir).name)
    monkeypatch.setenv("PRESAFE_WATCH_S", "0.05")
    caplog.set_level("DEBUG", logger="presafe.admin")
    with make_client(home):
        deadline = time.monotonic() + 30
        while sum("could not load the served adapter" in r.getMessage() for r in caplog.records) < 6:
            assert time.monotonic() < deadline, caplog.text[-2000:]
            time.sleep(0.05)
    tries = [r for r in caplog.records if "could not load the served adapter" in r.getMessage()]
    assert [r.levelname for r in tries[:6]] == ["WARNING"] + ["DEBUG"] * 5
    assert "127.0.0.1:9" in tries[0].error and all(r.repeat for r in tries[1:6])
