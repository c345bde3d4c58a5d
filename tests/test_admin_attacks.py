"""The admin's inputs tried as an attacker would (issue 13): paths and URLs of a retrain, the trainer's
environment, publish, the gate; and its fault paths: vLLM refusing a load, an invalid adapter from the
trainer, cancel while publishing, old adapters unloaded. In process, with a fake vLLM (the admin e2e with a
real vLLM is test_admin_e2e.py)."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_admin import AUTH, assert_error, make_client, setup_home

from service.jobs.sandbox import PATH_KEYS, URL_KEYS


@pytest.fixture
def home(tmp_path, monkeypatch, tiny_llm_dir) -> Path:
    return setup_home(tmp_path, monkeypatch, tiny_llm_dir)


def _no_job_started(client) -> None:
    assert client.get("/admin/jobs", headers=AUTH).json()["data"] == []


@pytest.mark.parametrize("body, key", [
    ({"overrides": {"data.pool": "/proc/self/environ"}}, "data.pool"),
    ({"overrides": {"data": {"pool": "/etc/passwd"}}}, "data.pool"),
    ({"overrides": {"data.pool": "../../../etc/passwd"}}, "data.pool"),
    ({"data": {"pool": "../../etc/passwd"}}, "data.pool"),
    ({"overrides": {"models.chat_template": "/etc/shadow"}}, "models.chat_template"),
    ({"overrides": {"models.base": "/etc"}}, "models.base"),
    ({"overrides": {"models.base": "someone/evil-model"}}, "models.base"),
    ({"overrides": {"models.classifier_backbone": "/root"}}, "models.classifier_backbone"),
    ({"overrides": {"run_dir": "/tmp/anywhere"}}, "run_dir"),
    ({"overrides": {"run_dir": "../adapters"}}, "run_dir"),
    ({"overrides": {"publish.adapters_dir": "/tmp/store"}}, "publish.adapters_dir"),
    ({"overrides": {"publish": {"adapters_dir": "/tmp/store"}}}, "publish.adapters_dir"),
    ({"overrides": {"teacher.endpoint_url": "http://169.254.169.254/latest", "teacher.kind": "endpoint"}},
     "teacher.endpoint_url"),
    ({"overrides": {"teacher": {"base_url": "http://presafe-admin:8080/v1"}}}, "teacher.base_url"),
])
def test_retrain_paths_and_urls_outside_the_sandbox_are_400(home, body, key):
    with make_client(home) as client:
        err = assert_error(client.post("/admin/retrain", json=body, headers=AUTH), 400)
        assert err["param"] == key and err["message"].startswith(f"{key}: ")
        assert err["code"] in ("path_not_allowed", "url_not_allowed")
        _no_job_started(client)


def test_a_symlink_out_of_the_data_dir_is_refused(home):
    data = home / "data"
    data.mkdir(parents=True)
    (data / "pool.jsonl").symlink_to("/proc/self/environ")
    with make_client(home) as client:
        for body in ({"data": {"pool": "pool.jsonl"}}, {"overrides": {"data.pool": str(data / "pool.jsonl")}}):
            err = assert_error(client.post("/admin/retrain", json=body, headers=AUTH), 400)
            assert err["param"] == "data.pool"
        _no_job_started(client)


def test_paths_inside_the_sandbox_and_allowed_urls_are_accepted(home, monkeypatch, tmp_path):
    extra = tmp_path / "operator-data"
    extra.mkdir()
    (extra / "pool.jsonl").write_text("{}\n")
    monkeypatch.setenv("PRESAFE_ADMIN_ALLOWED_ROOTS", f'["{extra}"]')
    monkeypatch.setenv("PRESAFE_ADMIN_ALLOWED_URLS", '["http://teacher.internal:8000/v1"]')
    (home / "data").mkdir(parents=True)
    (home / "data" / "mine.jsonl").write_text("{}\n")
    with make_client(home) as client:
        body = {"overrides": {"data.pool": str(extra / "pool.jsonl"), "run_dir": "exp1",
                              "teacher.base_url": "http://teacher.internal:8000/v1",
                              "models.chat_template": "{% for m in messages %}{{ m.content }}{% endfor %}"}}
        job = client.post("/admin/retrain", json=body, headers=AUTH)
        assert job.status_code == 202, job.text
        import yaml

        config = yaml.safe_load((home / "jobs" / job.json()["id"] / "config.yaml").read_text())
        assert config["run_dir"] == str((home / "runs" / "exp1").resolve())
        assert config["data"]["pool"] == str((extra / "pool.jsonl").resolve())
        client.post(f"/admin/jobs/{job.json()['id']}/cancel", headers=AUTH)
        # a lookalike host, user info or a sibling path prefix do not pass
        for url in ("http://teacher.internal.evil:8000/v1", "http://x@teacher.internal:8000/v1",
                    "http://teacher.internal:8000/v10", "https://teacher.internal:8000/v1"):
            err = assert_error(client.post("/admin/retrain", json={"overrides": {"teacher.base_url": url}},
                                           headers=AUTH), 400)
            assert err["param"] == "teacher.base_url"


def test_every_path_and_url_key_of_the_config_is_sandboxed():
    """A new Path/URL/model key in service.core.config must be added to service.jobs.sandbox (or this fails)."""
    from pydantic import BaseModel

    from service.core.config import PipelineConfig

    def keys(model: type[BaseModel], prefix: str = "") -> dict[str, object]:
        out = {}
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                out.update(keys(ann, f"{prefix}{name}."))
            else:
                out[prefix + name] = ann
        return out

    risky = {k for k, ann in keys(PipelineConfig).items()
             if "Path" in str(ann) or k.endswith(("_url", "_dir", "template", ".base", "backbone", ".pool"))}
    assert risky <= set(PATH_KEYS) | set(URL_KEYS), risky - set(PATH_KEYS) - set(URL_KEYS)


ENV_DUMPER = """
import json, os, sys
out = sys.argv[sys.argv.index("--output") + 1]
with open(os.path.join(os.path.dirname(out), "trainer-env.json"), "w") as fh:
    json.dump(dict(os.environ), fh)
sys.exit(5)
"""


def test_the_trainer_gets_no_secrets_from_the_gateway_environment(home, monkeypatch, tmp_path):
    """The local runner scrubs the environment: no admin token, no vLLM key, no *_API_KEY / *TOKEN*."""
    script = tmp_path / "dump_env.py"
    script.write_text(ENV_DUMPER)
    monkeypatch.setenv("PRESAFE_TRAIN_COMMAND", f"{sys.executable} {script}")
    secrets = {"PRESAFE_ADMIN_TOKEN": "s3cret-token", "PRESAFE_VLLM_API_KEY": "vllm-key", "OPENAI_API_KEY": "sk-1",
               "HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "aws", "DB_PASSWORD": "pw"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("PRESAFE_SOMETHING_HARMLESS", "kept")
    with make_client(home) as client:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        from test_admin import wait_state

        assert wait_state(client, job["id"], {"failed"})["exit_code"] == 5
    env = json.loads((home / "jobs" / job["id"] / "trainer-env.json").read_text())
    assert not set(secrets) & set(env), set(secrets) & set(env)
    assert not any(v in env.values() for v in secrets.values())
    assert env["PRESAFE_SOMETHING_HARMLESS"] == "kept" and env["PRESAFE_JOB_ID"] == job["id"]
    assert env["PATH"] == os.environ["PATH"]


LINK_PLANTER = """
import os, sys
out = sys.argv[sys.argv.index("--output") + 1]
os.makedirs(out)
os.symlink("/etc/passwd", os.path.join(out, "adapter_model.safetensors"))
"""


def test_a_trainer_output_with_a_symlink_is_not_published(home, monkeypatch, tmp_path):
    script = tmp_path / "planter.py"
    script.write_text(LINK_PLANTER)
    monkeypatch.setenv("PRESAFE_TRAIN_COMMAND", f"{sys.executable} {script}")
    from test_admin import wait_state

    with make_client(home) as client:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        done = wait_state(client, job["id"], {"failed", "succeeded"})
        assert done["state"] == "failed" and "symbolic link" in done["error"], done["error"]
        assert client.get("/admin/adapters", headers=AUTH).json()["data"] == []


@pytest.mark.parametrize("name", ["x" * 49, "x" * 5000, "presafe-v2", "a/b"])
def test_an_unaddressable_publish_name_is_refused(home, name):
    with make_client(home) as client:
        err = assert_error(client.post("/admin/retrain", json={"overrides": {"publish.name": name}}, headers=AUTH),
                           422)
        assert err["param"] == "publish.name"
        _no_job_started(client)


# --------------------------------------------------------------------------- the gate fails closed


class FakeVLLM:
    """vLLM's runtime LoRA routes for the in-process admin (the real ones are in test_admin_e2e.py).

    Fault paths: ``refuse`` answers every load with vLLM's error; a load of a name in ``hold`` waits
    (its name noted in ``loading``) until ``release`` is set."""

    def __init__(self):
        import threading

        self.loaded: dict[str, str] = {}
        self.unloaded: list[str] = []
        self.refuse = False
        self.hold: set[str] = set()
        self.loading: list[str] = []
        self.release = threading.Event()

    async def handler(self, request):
        import asyncio

        import httpx

        if request.url.path == "/v1/models":
            cards = [{"id": n, "root": p, "parent": "base"} for n, p in self.loaded.items()]
            return httpx.Response(200, json={"data": cards})
        body = json.loads(request.content)
        if request.url.path == "/v1/load_lora_adapter":
            self.loading.append(body["lora_name"])
            if self.refuse:
                return httpx.Response(400, json={"error": {"message": "Loading lora failed: no space for it",
                                                           "type": "BadRequestError", "code": 400}})
            while body["lora_name"] in self.hold and not self.release.is_set():
                await asyncio.sleep(0.01)
            self.loaded[body["lora_name"]] = body["lora_path"]
        elif request.url.path == "/v1/unload_lora_adapter":
            self.unloaded.append(body["lora_name"])
            self.loaded.pop(body["lora_name"], None)
        return httpx.Response(200, text="ok")


COPIER = """
import os, shutil, sys
out = sys.argv[sys.argv.index("--output") + 1]
shutil.copytree(os.environ["COPIER_ADAPTER"], out)
if os.environ.get("COPIER_DAMAGE") == "truncate":
    weights = os.path.join(out, "adapter_model.safetensors")
    data = open(weights, "rb").read()
    open(weights, "wb").write(data[:-100])
"""


def _gated_client(home, base_model, fake):
    import httpx
    from fastapi.testclient import TestClient
    from test_admin import TOKEN

    from service.adapters.store import VLLMAdapters
    from service.app import create_app
    from service.core.settings import Settings

    settings = Settings(home=home, admin_token=TOKEN, base_model=str(base_model))
    client = TestClient(create_app(settings, upstream_url="http://127.0.0.1:9"))
    client.__enter__()
    client.app.state.admin.vllm = VLLMAdapters("http://vllm", transport=httpx.MockTransport(fake.handler))
    client.fake = fake
    return client


@pytest.fixture
def gated(home, tiny_llm_dir, tiny_adapter_dir):
    """A client whose store holds v1 (promoted, refusal 0.95) and v2 (refusal 0.5), and a fake vLLM
    (``client.fake``)."""
    import shutil

    from service.adapters.store import AdapterStore

    store = AdapterStore(home / "adapters")
    names = []
    for refusal in (0.95, 0.5):
        src = Path(shutil.copytree(tiny_adapter_dir, home.parent / f"src-{refusal}"))
        manifest = json.loads((src / "presafe-manifest.json").read_text())
        manifest["metrics"]["harmful"]["refusal_rate"] = refusal
        (src / "presafe-manifest.json").write_text(json.dumps(manifest))
        names.append(store.publish(src).name)
    store.promote(names[0])
    fake = FakeVLLM()
    client = _gated_client(home, tiny_llm_dir, fake)
    try:
        yield client, store, names
    finally:
        fake.release.set()
        client.__exit__(None, None, None)


def test_promote_checks_the_gate_and_force_is_recorded(gated):
    client, store, (v1, v2) = gated
    for body in (None, {}, {"force": False}):
        err = assert_error(client.post(f"/admin/adapters/{v2}/promote", json=body, headers=AUTH), 409,
                           code="gate_failed")
        assert f"harmful.refusal_rate=0.5 is more than 0.05 below the promoted adapter {v1}'s 0.95" in err["message"]
    assert store.promoted() == v1
    assert_error(client.post(f"/admin/adapters/{v2}/promote", json={"force": "yes"}, headers=AUTH), 422)
    assert_error(client.post(f"/admin/adapters/{v2}/promote", json={"gate": {}}, headers=AUTH), 422)
    forced = client.post(f"/admin/adapters/{v2}/promote", json={"force": True}, headers=AUTH)
    assert forced.status_code == 200, forced.text
    assert forced.json()["promoted"] == v2 and forced.json()["gate"]["forced"] is True
    listing = client.get("/admin/adapters", headers=AUTH).json()
    assert listing["promoted"] == v2
    last = listing["promotions"][-1]
    assert (last["adapter"], last["forced"], last["gate_passed"], last["previous"]) == (v2, True, False, v1)
    # a rollback is no promotion past the gate: allowed, and logged
    assert client.post("/admin/adapters/rollback", headers=AUTH).json()["promoted"] == v1
    assert client.get("/admin/adapters", headers=AUTH).json()["promotions"][-1]["action"] == "rollback"


def test_a_passing_adapter_promotes_without_force(gated):
    client, store, (v1, _) = gated
    resp = client.post(f"/admin/adapters/{v1}/promote", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["gate"]["passed"] is True
    assert store.read_registry().promotions[-1]["forced"] is False


def test_a_retrain_cannot_switch_the_gate_off(gated, monkeypatch):
    """``"gate": {}`` is the default gate, a looser job gate is ignored, only ``force`` passes (recorded)."""
    from test_admin import wait_state

    client, store, (v1, _) = gated
    trainer = Path(__file__).parent / "fixtures" / "tiny_trainer.py"
    monkeypatch.setenv("PRESAFE_TRAIN_COMMAND", f"{sys.executable} {trainer}")
    monkeypatch.setenv("TINY_TRAINER_REFUSAL", "0.5")
    for body in ({"gate": {}}, {"gate": {"refusal_margin": 1.0, "min": {}, "max": {}}}):
        job = client.post("/admin/retrain", json=body, headers=AUTH).json()
        done = wait_state(client, job["id"], {"succeeded", "failed"}, timeout=120)
        assert done["state"] == "succeeded" and done["promoted"] is False, done
        assert done["gate"]["passed"] is False and done["gate"]["margins"]["harmful.refusal_rate"] == 0.05
        assert done["gate"]["reasons"] == [(f"harmful.refusal_rate=0.5 is more than 0.05 below the promoted "
                                           f"adapter {v1}'s 0.95")]
        assert store.promoted() == v1
    job = client.post("/admin/retrain", json={"force": True}, headers=AUTH).json()
    done = wait_state(client, job["id"], {"succeeded", "failed"}, timeout=120)
    assert done["state"] == "succeeded" and done["promoted"] is True and done["gate"]["forced"] is True
    assert store.promoted() == done["adapter"]
    last = store.read_registry().promotions[-1]
    assert (last["adapter"], last["forced"], last["job_id"]) == (done["adapter"], True, job["id"])


# --------------------------------------------------------------------------- promotion order, vLLM faults


def _copier(monkeypatch, tmp_path, adapter, damage=None) -> None:
    """The trainer copies ``adapter`` as its output (``damage``: ``truncate`` cuts its weights)."""
    script = tmp_path / "copier.py"
    script.write_text(COPIER)
    monkeypatch.setenv("PRESAFE_TRAIN_COMMAND", f"{sys.executable} {script}")
    monkeypatch.setenv("COPIER_ADAPTER", str(adapter))
    if damage:
        monkeypatch.setenv("COPIER_DAMAGE", damage)


def test_vllm_refusing_the_load_is_502_and_the_registry_is_unchanged(gated, monkeypatch, tmp_path,
                                                                    tiny_adapter_dir):
    """Load first, then move the alias: a load vLLM refuses leaves registry.json exactly as it was."""
    from test_admin import wait_state

    client, store, (v1, v2) = gated
    registry = store.root / "registry.json"
    before = registry.read_bytes()
    client.fake.refuse = True
    err = assert_error(client.post(f"/admin/adapters/{v2}/promote", json={"force": True}, headers=AUTH), 502,
                       code="adapter_load_failed")
    assert "no space for it" in err["message"] and client.fake.loading[-1] == v2
    assert registry.read_bytes() == before and store.promoted() == v1
    client.fake.refuse = False  # v2 served; then a rollback whose load of v1 vLLM refuses
    assert client.post(f"/admin/adapters/{v2}/promote", json={"force": True}, headers=AUTH).status_code == 200
    before = registry.read_bytes()
    client.fake.refuse = True
    assert_error(client.post("/admin/adapters/rollback", headers=AUTH), 502, code="adapter_load_failed")
    assert registry.read_bytes() == before and store.promoted() == v2
    # a retrain's publish: the adapter is stored, not served, and the job says so
    _copier(monkeypatch, tmp_path, tiny_adapter_dir)
    job = client.post("/admin/retrain", json={"force": True}, headers=AUTH).json()
    done = wait_state(client, job["id"], {"succeeded", "failed"})
    assert done["state"] == "failed" and done["promoted"] is False
    assert done["error"].startswith(f"stored as {done['adapter']} but not served: vLLM refused adapter")
    assert registry.read_bytes() == before and store.promoted() == v2


@pytest.mark.parametrize("damage, reason", [("truncate", "not readable safetensors"),
                                            ("other-base", "does not match the served base model")])
def test_an_invalid_adapter_from_the_trainer_fails_the_job_and_stores_nothing(
        gated, monkeypatch, tmp_path, tiny_adapter_dir, damage, reason):
    from test_admin import wait_state

    client, store, (v1, v2) = gated
    if damage == "other-base":  # a real adapter, trained on another model than the one served
        other = tmp_path / "other-model"
        other.mkdir()
        client.__exit__(None, None, None)
        client = _gated_client(store.root.parent, other, client.fake)
    _copier(monkeypatch, tmp_path, tiny_adapter_dir, damage if damage == "truncate" else None)
    registry = (store.root / "registry.json").read_bytes()
    try:
        job = client.post("/admin/retrain", json={"force": True}, headers=AUTH).json()
        done = wait_state(client, job["id"], {"succeeded", "failed"})
        assert done["state"] == "failed" and done["adapter"] is None and done["promoted"] is False
        assert done["error"].startswith("the trained adapter failed its check:") and reason in done["error"]
        assert [a.name for a in store.list()] == [v1, v2]
        assert (store.root / "registry.json").read_bytes() == registry
        assert not [p.name for p in store.root.iterdir() if ".tmp-" in p.name]
        assert "presafe-v3" not in client.fake.loading  # nothing new was offered to vLLM
    finally:
        if damage == "other-base":
            client.__exit__(None, None, None)


def test_cancel_while_publishing_is_409_and_the_publish_completes(gated, monkeypatch, tmp_path, tiny_adapter_dir):
    from test_admin import wait_state

    client, store, _ = gated
    _copier(monkeypatch, tmp_path, tiny_adapter_dir)
    client.fake.hold.add("presafe-v3")
    job = client.post("/admin/retrain", json={"force": True}, headers=AUTH).json()
    deadline = time.monotonic() + 60
    while "presafe-v3" not in client.fake.loading:  # stored, gated, and now being loaded into vLLM
        assert time.monotonic() < deadline, client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()
        time.sleep(0.01)
    assert client.get(f"/admin/jobs/{job['id']}", headers=AUTH).json()["state"] == "publishing"
    err = assert_error(client.post(f"/admin/jobs/{job['id']}/cancel", headers=AUTH), 409, code="job_publishing")
    assert "can no longer be cancelled" in err["message"]
    client.fake.release.set()
    done = wait_state(client, job["id"], {"succeeded", "failed", "cancelled"})
    assert (done["state"], done["adapter"], done["promoted"]) == ("succeeded", "presafe-v3", True)
    assert store.promoted() == "presafe-v3"


def test_promotions_unload_adapters_beyond_the_kept_ones(gated, tiny_adapter_dir):
    """After each promotion vLLM keeps the last ``keep_loaded`` (3) promoted adapters; adapters that are not
    the store's (loaded by someone else) are left alone."""
    client, store, (v1, v2) = gated
    fake = client.fake
    fake.loaded.update({v1: str(store.path(v1)), "someone-else": "/elsewhere"})
    newer = [store.publish(tiny_adapter_dir).name for _ in range(3)]
    for name in (v2, *newer):
        assert client.post(f"/admin/adapters/{name}/promote", json={"force": True}, headers=AUTH).status_code == 200
    assert fake.unloaded == [v1, v2]  # v1 once v4 was promoted, v2 once v5 was
    assert set(fake.loaded) == {*newer, "someone-else"}
    assert client.get("/admin/adapters", headers=AUTH).json()["history"][-3:] == newer


# --------------------------------------------------------------------------- work dirs, full disk


def test_only_the_last_work_dirs_are_kept(home, monkeypatch):
    from test_admin import wait_state

    from service.jobs.store import JobState, JobStore

    monkeypatch.setenv("PRESAFE_KEEP_WORK_DIRS", "2")
    monkeypatch.setenv("SLEEPER_MODE", "fail")
    jobs = JobStore(home / "jobs" / "jobs.sqlite")
    old = []
    for _ in range(4):
        job = jobs.create(request={}, runner="local", work_root=home / "jobs")
        (Path(job.work_dir) / "run" / "align").mkdir(parents=True)
        (Path(job.work_dir) / "train.log").write_text("log\n")
        jobs.update(job.id, state=JobState.failed, finished_at=time.time())
        old.append(job.id)
        time.sleep(0.01)
    with make_client(home) as client:
        new = client.post("/admin/retrain", json={}, headers=AUTH).json()
        (home / "jobs" / new["id"] / "run").mkdir(parents=True)
        wait_state(client, new["id"], {"failed"})
    kept = {p.parent.name for p in (home / "jobs").glob("*/run")}
    assert kept == {new["id"], old[-1]}
    assert all((home / "jobs" / j / "train.log").is_file() for j in old)  # history stays


def test_a_full_disk_fails_the_job_with_the_reason(home, monkeypatch):
    import errno
    import sqlite3

    from test_admin import wait_state

    from service.jobs.lifecycle import Lifecycle
    from service.jobs.store import JobStore

    def no_space(logfile, line):  # the job has written work files by the time the disk fills
        (Path(logfile.name).parent / "run").mkdir(parents=True, exist_ok=True)
        raise OSError(errno.ENOSPC, "No space left on device", str(logfile.name))

    update = JobStore.update
    failures = []

    def full_once(self, job_id, **fields):  # SQLite too finds the disk full, once, at the final write
        if fields.get("finished_at") and not failures:
            failures.append(fields)
            raise sqlite3.OperationalError("database or disk is full")
        return update(self, job_id, **fields)

    monkeypatch.setattr(Lifecycle, "_append_log", staticmethod(no_space))
    monkeypatch.setattr(JobStore, "update", full_once)
    with make_client(home) as client:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        done = wait_state(client, job["id"], {"failed", "succeeded", "interrupted"}, timeout=30)
        assert done["state"] == "failed" and done["error"].startswith("disk full: ") and "No space" in done["error"]
        assert failures and not (home / "jobs" / job["id"] / "run").exists()  # its work freed to make room
        assert client.post("/admin/retrain", json={}, headers=AUTH).status_code == 202  # the slot is free


# --------------------------------------------------------------------------- the Kubernetes runner never hangs


def _k8s_client(home, api, start_timeout_s):
    from service.jobs.runners import PACKAGED_JOB_TEMPLATE, KubernetesRunner

    client = make_client(home)
    client.__enter__()
    client.app.state.admin._runner = KubernetesRunner(namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=api,
                                                      core_api=api, poll_s=0.02, start_timeout_s=start_timeout_s)
    return client


def test_a_trainer_image_that_never_pulls_fails_the_job(home):
    from test_admin import wait_state
    from test_jobs import PodFaultK8s, _waiting

    api = PodFaultK8s(_waiting("ImagePullBackOff", 'Back-off pulling image "presafe-vllm:nope"'))
    client = _k8s_client(home, api, 3600)
    try:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        done = wait_state(client, job["id"], {"failed", "succeeded", "cancelled"}, timeout=20)
        assert done["state"] == "failed" and done["runner"] == "kubernetes"
        assert "the trainer never started: container trainer: ImagePullBackOff" in done["error"]
        assert client.post("/admin/retrain", json={}, headers=AUTH).status_code == 202  # no 409 left behind
    finally:
        client.__exit__(None, None, None)


def test_cancel_works_before_the_trainer_pod_starts(home):
    from test_jobs import PodFaultK8s, _unschedulable

    api = PodFaultK8s(_unschedulable())
    client = _k8s_client(home, api, 3600)
    try:
        job = client.post("/admin/retrain", json={}, headers=AUTH).json()
        resp = client.post(f"/admin/jobs/{job['id']}/cancel", headers=AUTH)
        assert resp.status_code == 200 and resp.json()["state"] == "cancelled", resp.text
        assert api.deleted and api.deleted[0] == f"presafe-train-{job['id']}"
    finally:
        client.__exit__(None, None, None)


# --------------------------------------------------------------------------- a restart loses no work


@pytest.fixture
def restart(home, tiny_llm_dir, tiny_adapter_dir, monkeypatch):
    """A job row as a killed admin left it (state, work dir with config and trainer output), and a client
    factory for the next admin process (fake vLLM routes, base = the tiny model)."""
    import shutil

    import httpx
    import yaml
    from fastapi.testclient import TestClient
    from test_admin import TOKEN

    import service.adapters.store as store_module
    from service.app import create_app
    from service.core.settings import Settings
    from service.jobs.store import JobStore

    fake = FakeVLLM()
    real = store_module.VLLMAdapters
    monkeypatch.setattr(store_module, "VLLMAdapters", lambda url, api_key=None, timeout=120.0: real(
        "http://vllm", api_key=api_key, transport=httpx.MockTransport(fake.handler)))
    jobs = JobStore(home / "jobs" / "jobs.sqlite")

    def left_behind(state, runner="local", ref=None):
        job = jobs.create(request={}, runner=runner, work_root=home / "jobs")
        job.config_path.parent.mkdir(parents=True, exist_ok=True)
        job.config_path.write_text(yaml.safe_dump({"models": {"base": str(tiny_llm_dir)}}))
        shutil.copytree(tiny_adapter_dir, job.output_dir)
        jobs.update(job.id, state=state, runner_ref=ref, exit_code=0 if state == "publishing" else None)
        return job

    def client():
        settings = Settings(home=home, admin_token=TOKEN, base_model=str(tiny_llm_dir))
        return TestClient(create_app(settings, upstream_url="http://127.0.0.1:9"))

    return SimpleNamespace(jobs=jobs, left_behind=left_behind, client=client, fake=fake)


@pytest.mark.parametrize("stored_before_the_kill", [False, True])
def test_a_job_killed_while_publishing_is_published_after_a_restart(restart, home, stored_before_the_kill):
    from test_admin import wait_state

    from service.adapters.store import AdapterStore

    job = restart.left_behind("publishing")
    store = AdapterStore(home / "adapters")
    if stored_before_the_kill:  # killed after the store had it, before the job row said so
        store.publish(job.output_dir, job_id=job.id)
    with restart.client() as client:
        done = wait_state(client, job.id, {"succeeded", "failed", "interrupted"})
        assert done["state"] == "succeeded" and done["promoted"] is True, done
    assert [a.name for a in store.list()] == ["presafe-v1"] and store.find_job(job.id).name == "presafe-v1"
    assert store.promoted() == "presafe-v1" and "presafe-v1" in restart.fake.loaded


def test_a_restart_reattaches_to_a_kubernetes_job_still_running(restart, home, monkeypatch):
    from test_admin import wait_state
    from test_jobs import FakeK8s

    import service.jobs.lifecycle as admin_module
    from service.jobs.runners import PACKAGED_JOB_TEMPLATE, KubernetesRunner

    monkeypatch.setenv("PRESAFE_RUNNER", "kubernetes")
    api = FakeK8s(b'{"stage": "align", "progress": 0.7}\nstill training\n', ticks=5)
    monkeypatch.setattr(admin_module, "make_runner", lambda kind: KubernetesRunner(
        namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=api, core_api=api, poll_s=0.02))
    job = restart.left_behind("running", runner="kubernetes", ref="presafe-train-x")
    job = restart.jobs.get(job.id)
    with restart.client() as client:
        done = wait_state(client, job.id, {"succeeded", "failed", "interrupted"})
        assert done["state"] == "succeeded" and done["promoted"] is True, done
        assert api.deleted == []  # the Job was followed, not deleted
        log = client.get(f"/admin/jobs/{job.id}?log_lines=5", headers=AUTH).json()["log_tail"]
        assert "[presafe] the admin restarted and re-attached to this run" in log and "still training" in log


def test_a_restart_interrupts_a_kubernetes_job_that_is_gone(restart, home, monkeypatch):
    from test_jobs import FakeK8s

    import service.jobs.lifecycle as admin_module
    from service.jobs.runners import PACKAGED_JOB_TEMPLATE, KubernetesRunner

    monkeypatch.setenv("PRESAFE_RUNNER", "kubernetes")
    api = FakeK8s(b"")
    api.deleted.append("presafe-train-gone")
    monkeypatch.setattr(admin_module, "make_runner", lambda kind: KubernetesRunner(
        namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=api, core_api=api, poll_s=0.02))
    job = restart.left_behind("running", runner="kubernetes", ref="presafe-train-gone")
    with restart.client() as client:
        got = client.get(f"/admin/jobs/{job.id}", headers=AUTH).json()
        assert got["state"] == "interrupted" and "running" in got["error"]


# --------------------------------------------------------------------------- first start trains the default adapter


def test_first_start_trains_the_default_adapter_even_without_a_token(home, monkeypatch, tiny_adapter_dir):
    """docker compose up on an empty store: the admin starts a retrain at once (its routes stay 403 without a
    token); with an adapter promoted, nothing is started."""
    import shutil

    from service.adapters.store import AdapterStore
    from service.jobs.store import JobStore

    monkeypatch.setenv("PRESAFE_BOOTSTRAP_TRAIN", "true")
    with make_client(home, token=None) as client:
        assert_error(client.get("/admin/jobs", headers=AUTH), 403, code="admin_disabled")
        active = JobStore(home / "jobs" / "jobs.sqlite").active()
        assert active is not None and active.request["promote"] is True
        assert client.get("/health").status_code == 200
    store = AdapterStore(home / "adapters")
    store.promote(store.publish(Path(shutil.copytree(tiny_adapter_dir, home.parent / "a"))).name)
    with make_client(home, token=None):
        assert JobStore(home / "jobs" / "jobs.sqlite").active() is None  # the first one was interrupted, none new
