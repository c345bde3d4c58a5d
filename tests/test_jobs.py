"""Job store (SQLite WAL, one active job), progress protocol, and the local / Kubernetes runners."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from service.core.progress import ProgressEvent, emit_progress, parse_progress_line
from service.jobs.runners import (
    PACKAGED_JOB_TEMPLATE,
    KubernetesRunner,
    LocalRunner,
    RunSpec,
    build_job_manifest,
    find_job_spec,
    load_job_spec,
    make_runner,
)
from service.jobs.store import (
    JobConflict,
    JobNotFound,
    JobState,
    JobStore,
    tail_lines,
)


@pytest.fixture
def jobs(tmp_path) -> JobStore:
    return JobStore(tmp_path / "jobs.sqlite")


def test_store_uses_wal_and_round_trips(jobs, tmp_path):
    assert jobs.journal_mode == "wal"
    job = jobs.create(request={"overrides": {"align.lora_r": 4}}, runner="local", work_root=tmp_path / "work")
    assert job.state is JobState.queued and job.request == {"overrides": {"align.lora_r": 4}}
    assert job.work_dir == str(tmp_path / "work" / job.id)
    assert jobs.update(job.id, state=JobState.running, started_at=1.0, runner_ref="123")
    jobs.record_progress(job.id, ProgressEvent(stage="align", progress=0.5, metrics={"loss": 1.0}))
    jobs.record_progress(job.id, ProgressEvent(metrics={"step": 3}))
    job = jobs.get(job.id)
    assert (job.state, job.stage, job.progress, job.metrics) == (JobState.running, "align", 0.5,
                                                                 {"loss": 1.0, "step": 3})
    with pytest.raises(JobNotFound):
        jobs.get("job-nope")
    with pytest.raises(ValueError, match="unknown job columns"):
        jobs.update(job.id, bogus=1)


def test_one_active_job_at_a_time(jobs, tmp_path):
    first = jobs.create(request={}, runner="local", work_root=tmp_path)
    with pytest.raises(JobConflict) as info:
        jobs.create(request={}, runner="local", work_root=tmp_path)
    assert info.value.active_id == first.id
    jobs.update(first.id, state=JobState.running)
    with pytest.raises(JobConflict):
        jobs.create(request={}, runner="local", work_root=tmp_path)
    jobs.update(first.id, state=JobState.succeeded, finished_at=time.time())
    second = jobs.create(request={}, runner="local", work_root=tmp_path)
    assert [j.id for j in jobs.list()] == [second.id, first.id]
    assert [j.id for j in jobs.list(state=JobState.succeeded)] == [first.id]


def test_concurrent_creates_admit_exactly_one(jobs, tmp_path):
    """Threads and a second process racing to create: the unique index lets one through."""
    results: list[str] = []
    barrier = threading.Barrier(8)

    def attempt():
        barrier.wait()
        try:
            results.append(jobs.create(request={}, runner="local", work_root=tmp_path).id)
        except JobConflict as exc:
            results.append("conflict:" + exc.active_id)

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if not r.startswith("conflict:")]
    assert len(winners) == 1
    assert all(r == "conflict:" + winners[0] for r in results if r.startswith("conflict:"))
    code = ("import sys; from pathlib import Path; from service.jobs.store import JobStore, JobConflict\n"
            "try:\n    JobStore(Path(sys.argv[1])).create(request={}, runner='local', work_root=Path('.'))\n"
            "except JobConflict as e:\n    print(e.active_id)")
    out = subprocess.run([sys.executable, "-c", code, str(jobs.path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == winners[0]


def test_update_only_if_guards_state_transitions(jobs, tmp_path):
    job = jobs.create(request={}, runner="local", work_root=tmp_path)
    jobs.update(job.id, state=JobState.cancelled)
    assert not jobs.update(job.id, only_if=(JobState.running,), state=JobState.succeeded)
    assert jobs.get(job.id).state is JobState.cancelled
    jobs.record_progress(job.id, ProgressEvent(stage="late", progress=0.9))  # ignored once final
    assert jobs.get(job.id).stage is None


def test_interrupt_active_counts_and_last_success(jobs, tmp_path):
    assert jobs.last_success_time() is None
    done = jobs.create(request={}, runner="local", work_root=tmp_path)
    jobs.update(done.id, state=JobState.succeeded, finished_at=1234.5)
    running = jobs.create(request={}, runner="local", work_root=tmp_path)
    jobs.update(running.id, state=JobState.running)
    reopened = JobStore(jobs.path)  # a new process would open the same file
    assert [j.id for j in reopened.interrupt_active()] == [running.id]
    job = reopened.get(running.id)
    assert job.state is JobState.interrupted and "running" in job.error and job.finished_at
    counts = reopened.counts()
    assert counts["succeeded"] == 1 and counts["interrupted"] == 1 and counts["running"] == 0
    assert set(counts) == {s.value for s in JobState}
    assert reopened.last_success_time() == 1234.5


@pytest.mark.parametrize("line, expected", [
    ('{"stage": "align", "progress": 0.42, "metrics": {"loss": 0.7}}', ProgressEvent("align", 0.42, {"loss": 0.7})),
    ('  {"progress": 1.5}  ', ProgressEvent(None, 1.0, {})),
    ('{"stage": "eval"}', ProgressEvent("eval", None, {})),
    ('{"loss": 0.3}', None),
    ('{"stage": 3}', None),
    ('{"progress": "half"}', None),
    ('{"progress": true}', None),
    ('{"stage": "x", "metrics": [1]}', None),
    ("{broken", None),
    ("Epoch 1: loss 0.3", None),
    ("", None),
    # a progress bar leaves its line open: the object lands after it (stderr and stdout are one stream)
    ('align:  40%|████      | 2/5 [00:10<00:15, 5.27s/it]{"stage": "align", "progress": 0.7412}',
     ProgressEvent("align", 0.7412, {})),
    ('{"stage": "eval", "progress": 0.9} eval: 3/5 [00:01<00:00]', ProgressEvent("eval", 0.9, {})),
    ("{'loss': 0.3, 'grad_norm': 1.1}{\"progress\": 0.5}", ProgressEvent(None, 0.5, {})),  # HF's log dict first
    ('bar {desc}| {"stage": "a", "progress": 0.1}{"progress": 0.2, "metrics": {"x": 1}}',
     ProgressEvent("a", 0.2, {"x": 1})),  # two on one line merge, the later wins
    ('{"metrics": {"progress": 0.5}}', None),  # an object inside another is not an event
    ('50%|█████     | {"stage": 3}', None),
])
def test_parse_progress_line(line, expected):
    assert parse_progress_line(line) == expected


def test_emit_progress_round_trips():
    buf = io.StringIO()
    emit_progress("align", 0.25, {"loss": 2.0}, stream=buf)
    assert parse_progress_line(buf.getvalue()) == ProgressEvent("align", 0.25, {"loss": 2.0})


def test_tail_lines(tmp_path):
    log = tmp_path / "log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert tail_lines(log, 3) == ["line 997", "line 998", "line 999"]
    assert tail_lines(log, 5, max_bytes=30)[-1] == "line 999"
    assert all(line.startswith("line ") for line in tail_lines(log, 50, max_bytes=30))
    assert tail_lines(tmp_path / "missing") == []


# --------------------------------------------------------------------------- local runner

SCRIPT = textwrap.dedent("""
    import json, os, subprocess, sys, time
    args = sys.argv[1:]
    out = args[args.index("--output") + 1]
    mode = os.environ.get("MODE", "ok")
    print("starting", flush=True)
    print(json.dumps({"stage": "align", "progress": 0.5, "metrics": {"loss": 1}}), flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    if mode == "ok":
        sys.stdout.write("no newline at end")
        sys.exit(0)
    if mode == "fail":
        sys.exit(4)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    open(out + ".child", "w").write(str(child.pid))
    print("sleeping", flush=True)
    time.sleep(120)
""")


def _spec(tmp_path, job_id="job-abc123") -> RunSpec:
    return RunSpec(job_id=job_id, config_path=tmp_path / "config.yaml", output_dir=tmp_path / f"{job_id}-out")


async def _collect(handle):
    return [line async for line in handle.lines()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text().split()
    return stat[2] != "Z"


async def test_local_runner_streams_lines_and_exit_codes(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT)
    handle = await LocalRunner([sys.executable, str(script)]).start(_spec(tmp_path))
    lines = await _collect(handle)
    outcome = await handle.wait()
    assert outcome.ok and outcome.exit_code == 0
    assert lines[0] == "starting" and parse_progress_line(lines[1]).progress == 0.5
    assert "to stderr" in lines and lines[-1] == "no newline at end"

    failing = await LocalRunner([sys.executable, str(script)], env={"MODE": "fail"}).start(_spec(tmp_path))
    await _collect(failing)
    outcome = await failing.wait()
    assert (outcome.ok, outcome.exit_code, outcome.detail) == (False, 4, "trainer exited with code 4")


BAR_TRAINER = textwrap.dedent("""
    import sys, time
    from tqdm import tqdm
    from training.pipeline import Progress
    mode = sys.argv[1]
    progress = Progress(stages=("align",), json_lines=True)  # what `presafe train run` prints
    progress.begin("align")
    report = progress.within("align")
    steps = 5
    if mode == "raw":  # a bar drawn without any carriage return, still no newline before the JSON
        for step in range(1, steps + 1):
            sys.stderr.write(f"align {step}/{steps} [00:0{step}<00:10, 5.27s/it]")
            sys.stderr.flush()
            report(step / steps)
    else:  # tqdm as the trainer shows it: '\\r' + bar, the line left open
        bar = tqdm(total=steps, desc="align", mininterval=0, miniters=1,
                   file=sys.stderr if mode == "stderr" else sys.stdout)
        for step in range(1, steps + 1):
            time.sleep(0.01)
            bar.update(1)
            report(step / steps)
        bar.close()
    progress.end("align")
""")


@pytest.mark.parametrize("mode", ["stderr", "stdout", "raw"])
async def test_progress_survives_a_progress_bar_on_the_same_line(tmp_path, mode):
    """A retrain as a user runs it: the bar on (tqdm, on stderr merged into stdout, or on stdout itself);
    every progress line the pipeline prints reaches the job, though it shares a line with the bar."""
    script = tmp_path / "trainer.py"
    script.write_text(BAR_TRAINER)
    root = str(Path(__file__).resolve().parents[1])
    handle = await LocalRunner([sys.executable, str(script), mode], env={"PYTHONPATH": root}).start(_spec(tmp_path))
    lines = await _collect(handle)
    assert (await handle.wait()).ok, lines
    events = [(line, e) for line in lines if (e := parse_progress_line(line)) is not None]
    assert [e.progress for _, e in events] == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.0]  # begin, 5 steps, end
    assert {e.stage for _, e in events} == {"align"}
    bar = "/5 [" if mode == "raw" else "|"
    shared = [line for line, _ in events if bar in line.partition("{")[0]]
    assert len(shared) >= 4, lines  # the case under test did happen: bar and JSON on one line


async def test_local_runner_cancel_stops_the_whole_process_group(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT)
    spec = _spec(tmp_path)
    handle = await LocalRunner([sys.executable, str(script)], env={"MODE": "hang"}).start(spec)
    lines = []
    async for line in handle.lines():
        lines.append(line)
        if line == "sleeping":
            break
    child = int(Path(str(spec.output_dir) + ".child").read_text())
    assert _alive(child)
    await handle.cancel(grace_s=5)
    outcome = await handle.wait()
    assert outcome.exit_code == -signal.SIGTERM and "SIGTERM" in outcome.detail
    for _ in range(50):
        if not _alive(child):
            break
        await asyncio.sleep(0.1)
    assert not _alive(child)


def test_local_runner_reap_kills_only_the_jobs_own_leftover(tmp_path):
    script = tmp_path / "trainer.py"
    script.write_text(SCRIPT)
    spec = _spec(tmp_path, job_id="job-orphan1")
    proc = subprocess.Popen([sys.executable, str(script), "--config", "c", "--output", str(spec.output_dir)],
                            env={**os.environ, "MODE": "hang"}, start_new_session=True, stdout=subprocess.DEVNULL)
    unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        runner = LocalRunner()
        time.sleep(0.5)  # let the child exec python
        assert asyncio.run(runner.reap(str(unrelated.pid), "job-orphan1")) is False
        assert asyncio.run(runner.reap("not-a-pid", "job-orphan1")) is False
        assert unrelated.poll() is None
        assert asyncio.run(runner.reap(str(proc.pid), "job-orphan1")) is True
        assert proc.wait(10) == -signal.SIGKILL
    finally:
        for p in (proc, unrelated):
            if p.poll() is None:
                p.kill()
                p.wait()


def test_default_command_and_runner_choice(monkeypatch):
    monkeypatch.delenv("PRESAFE_TRAIN_COMMAND", raising=False)
    assert LocalRunner().command == [sys.executable, "-m", "training.cli", "train", "run"]
    monkeypatch.setenv("PRESAFE_TRAIN_COMMAND", "python 'my trainer.py' train run")
    assert LocalRunner().command == ["python", "my trainer.py", "train", "run"]
    assert make_runner("local").kind == "local"
    with pytest.raises(ValueError, match="unknown runner"):
        make_runner("slurm")


# --------------------------------------------------------------------------- Kubernetes runner


def test_job_manifest_from_the_packaged_template(tmp_path):
    spec = _spec(tmp_path)
    manifest = build_job_manifest(load_job_spec(PACKAGED_JOB_TEMPLATE), spec)
    assert manifest["metadata"]["name"] == "presafe-train-job-abc123"
    assert manifest["metadata"]["labels"]["presafe.dev/job-id"] == "job-abc123"
    pod = manifest["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and manifest["spec"]["backoffLimit"] == 0
    container = pod["containers"][0]
    assert container["args"] == ["--config", str(spec.config_path), "--output", str(spec.output_dir)]
    assert {"name": "PRESAFE_JOB_ID", "value": "job-abc123"} in container["env"]
    # the kubernetes client accepts it as a V1Job
    from kubernetes.client import ApiClient, V1Job

    job = ApiClient()._ApiClient__deserialize(manifest, V1Job)
    assert job.spec.template.spec.containers[0].args[1] == str(spec.config_path)


def test_job_manifest_without_placeholders_appends_arguments(tmp_path):
    spec_file = tmp_path / "training-job.yaml"
    spec_file.write_text(textwrap.dedent("""
        apiVersion: v1
        kind: ConfigMap
        metadata: {name: unrelated}
        ---
        apiVersion: batch/v1
        kind: Job
        metadata: {generateName: train-}
        spec:
          backoffLimit: 2
          template:
            spec:
              containers:
                - name: sidecar
                  image: busybox
                - name: trainer
                  image: presafe:gpu
                  command: [presafe, train, run]
                  env: [{name: PRESAFE_JOB_ID, value: stale}]
    """))
    spec = _spec(tmp_path)
    manifest = build_job_manifest(load_job_spec(spec_file), spec)
    assert "generateName" not in manifest["metadata"] and manifest["spec"]["backoffLimit"] == 2
    trainer = manifest["spec"]["template"]["spec"]["containers"][1]
    assert trainer["command"] == ["presafe", "train", "run"]
    assert trainer["args"] == ["--config", str(spec.config_path), "--output", str(spec.output_dir)]
    assert trainer["env"] == [{"name": "PRESAFE_JOB_ID", "value": "job-abc123"}]
    assert "args" not in manifest["spec"]["template"]["spec"]["containers"][0]


CHECKOUT_SPEC = Path(__file__).resolve().parents[1] / "k8s" / "base" / "training-job.yaml"


@pytest.mark.skipif(not CHECKOUT_SPEC.is_file(), reason="no k8s/base/training-job.yaml in this checkout")
def test_job_manifest_from_the_deployment_spec(tmp_path):
    """The deployment's spec (YAML anchors shared between containers) fills in without cross-talk."""
    spec = _spec(tmp_path)
    manifest = build_job_manifest(load_job_spec(CHECKOUT_SPEC), spec, image="registry/presafe-vllm:1")
    pod = manifest["spec"]["template"]["spec"]
    trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
    assert trainer["args"] == ["--config", str(spec.config_path), "--output", str(spec.output_dir)]
    assert {"name": "PRESAFE_JOB_ID", "value": spec.job_id} in trainer["env"]
    for init in pod.get("initContainers", []):
        assert all(e["name"] != "PRESAFE_JOB_ID" for e in init.get("env", []))
    assert {c["image"] for c in pod["containers"] + pod.get("initContainers", [])} == {"registry/presafe-vllm:1"}
    assert manifest["metadata"]["name"] == "presafe-train-job-abc123"


def test_find_job_spec_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("PRESAFE_K8S_JOB_SPEC", str(tmp_path / "mine.yaml"))
    assert find_job_spec() == tmp_path / "mine.yaml"
    assert find_job_spec(tmp_path / "explicit.yaml") == tmp_path / "explicit.yaml"
    monkeypatch.delenv("PRESAFE_K8S_JOB_SPEC")
    checkout = Path(__file__).resolve().parents[1] / "k8s" / "base" / "training-job.yaml"
    assert find_job_spec() == (checkout if checkout.is_file() else PACKAGED_JOB_TEMPLATE)
    with pytest.raises(ValueError, match="no 'kind: Job'"):
        (tmp_path / "empty.yaml").write_text("kind: Service\n")
        load_job_spec(tmp_path / "empty.yaml")


class FakeK8s:
    """The few BatchV1Api / CoreV1Api calls the runner makes, answering with real client models.

    A stand-in for an API server (no cluster here); the Job "runs" for ``ticks`` status polls.
    """

    def __init__(self, log: bytes, outcome: str = "succeeded", exit_code: int = 0, ticks: int = 2):
        from kubernetes.client import (
            V1ContainerState,
            V1ContainerStateTerminated,
            V1ContainerStatus,
            V1ObjectMeta,
            V1Pod,
            V1PodList,
            V1PodStatus,
        )

        self.created: list[tuple[str, dict]] = []
        self.deleted: list[str] = []
        self.log, self.outcome, self.ticks = log, outcome, ticks
        terminated = V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=exit_code))
        self.pod = V1Pod(metadata=V1ObjectMeta(name="trainer-pod"), status=V1PodStatus(container_statuses=[
            V1ContainerStatus(name="trainer", state=terminated, image="x", image_id="x", ready=False,
                              restart_count=0)]))
        self.pods = V1PodList(items=[self.pod])

    # BatchV1Api
    def create_namespaced_job(self, namespace, body):
        self.created.append((namespace, body))

    def read_namespaced_job_status(self, name, namespace):
        from kubernetes.client import V1Job, V1JobCondition, V1JobStatus
        from kubernetes.client.exceptions import ApiException

        if name in self.deleted:
            raise ApiException(status=404, reason="Not Found")
        self.ticks -= 1
        if self.ticks > 0:
            return V1Job(status=V1JobStatus(active=1))
        if self.outcome == "succeeded":
            return V1Job(status=V1JobStatus(succeeded=1))
        return V1Job(status=V1JobStatus(failed=1, conditions=[
            V1JobCondition(type="Failed", status="True", reason="BackoffLimitExceeded")]))

    def delete_namespaced_job(self, name, namespace, body=None):
        assert body.propagation_policy == "Background"
        self.deleted.append(name)

    # CoreV1Api
    def list_namespaced_pod(self, namespace, label_selector):
        assert label_selector.startswith("job-name=presafe-train-")
        return self.pods

    def read_namespaced_pod(self, name, namespace):
        return self.pod

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        assert follow and not _preload_content and container == "trainer"
        chunks = [self.log[i:i + 7] for i in range(0, len(self.log), 7)]
        return SimpleNamespace(stream=lambda amt, decode_content: iter(chunks), release_conn=lambda: None)


async def test_kubernetes_runner_against_a_fake_api(tmp_path):
    log = b'loading\n{"stage": "align", "progress": 0.5}\r\nsaving'
    fake = FakeK8s(log)
    runner = KubernetesRunner(namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=fake, core_api=fake,
                              poll_s=0.01)
    handle = await runner.start(_spec(tmp_path))
    namespace, body = fake.created[0]
    assert namespace == "ml" and body["metadata"]["name"] == handle.ref == "presafe-train-job-abc123"
    lines, outcome = await asyncio.gather(_collect(handle), handle.wait())
    assert lines == ["loading", json.dumps({"stage": "align", "progress": 0.5}), "saving"]
    assert outcome.ok

    failing = FakeK8s(b"", outcome="failed", exit_code=137)
    runner = KubernetesRunner(namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=failing,
                              core_api=failing, poll_s=0.01)
    handle = await runner.start(_spec(tmp_path))
    outcome = await handle.wait()
    assert outcome.exit_code == 137 and "BackoffLimitExceeded" in outcome.detail

    cancelled = FakeK8s(b"", ticks=10_000)
    runner = KubernetesRunner(namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=cancelled,
                              core_api=cancelled, poll_s=0.01)
    handle = await runner.start(_spec(tmp_path))
    waiter = asyncio.create_task(handle.wait())
    await asyncio.sleep(0.05)
    await handle.cancel()
    outcome = await asyncio.wait_for(waiter, 5)
    assert outcome.exit_code is None and "deleted" in outcome.detail
    assert await runner.reap(handle.ref, "job-abc123") is True


class PodFaultK8s(FakeK8s):
    """A Job whose pod never gets its trainer going: the pod status is ``pod`` (None: no pod at all);
    the Job stays active (as Kubernetes keeps it) until deleted."""

    def __init__(self, pod_status=None, no_pod: bool = False):
        super().__init__(b"", ticks=10**9)
        from kubernetes.client import V1ObjectMeta, V1Pod, V1PodList

        self.pods = V1PodList(items=[] if no_pod else [V1Pod(metadata=V1ObjectMeta(name="trainer-pod"),
                                                             status=pod_status)])
        self.pod = self.pods.items[0] if self.pods.items else None

    def read_namespaced_pod_log(self, name, namespace, container, follow, _preload_content):
        from kubernetes.client.exceptions import ApiException

        raise ApiException(status=400, reason="container \"trainer\" is waiting to start")


def _waiting(reason, message="", init=False):
    from kubernetes.client import V1ContainerState, V1ContainerStateWaiting, V1ContainerStatus, V1PodStatus

    cs = V1ContainerStatus(name="fetch" if init else "trainer", image="x", image_id="", ready=False, restart_count=0,
                           state=V1ContainerState(waiting=V1ContainerStateWaiting(reason=reason, message=message)))
    return V1PodStatus(phase="Pending", **({"init_container_statuses": [cs]} if init else {"container_statuses": [cs]}))


def _init_failed():
    from kubernetes.client import V1ContainerState, V1ContainerStateTerminated, V1ContainerStatus, V1PodStatus

    cs = V1ContainerStatus(name="models-pull", image="x", image_id="", ready=False, restart_count=0,
                           state=V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=2, reason="Error")))
    return V1PodStatus(phase="Failed", init_container_statuses=[cs])


def _unschedulable():
    from kubernetes.client import V1PodCondition, V1PodStatus

    return V1PodStatus(phase="Pending", conditions=[V1PodCondition(
        type="PodScheduled", status="False", reason="Unschedulable",
        message="0/3 nodes are available: 3 Insufficient nvidia.com/gpu.")])


@pytest.mark.parametrize("fake, expected", [
    (lambda: PodFaultK8s(_waiting("ImagePullBackOff", 'Back-off pulling image "presafe-vllm:nope"')),
     'container trainer: ImagePullBackOff: Back-off pulling image "presafe-vllm:nope"'),
    (lambda: PodFaultK8s(_waiting("InvalidImageName")), "container trainer: InvalidImageName"),
    (lambda: PodFaultK8s(_waiting("CreateContainerConfigError", 'secret "x" not found')),
     'CreateContainerConfigError: secret "x" not found'),
    (lambda: PodFaultK8s(_waiting("ImagePullBackOff", init=True)), "init container fetch: ImagePullBackOff"),
    (lambda: PodFaultK8s(_init_failed()), "init container models-pull failed (exit code 2, Error)"),
    (lambda: PodFaultK8s(_unschedulable()),
     "not running after 0.3s (Unschedulable: 0/3 nodes are available: 3 Insufficient nvidia.com/gpu.)"),
    (lambda: PodFaultK8s(no_pod=True), "not running after 0.3s (no pod was created)"),
])
async def test_kubernetes_runner_ends_when_the_trainer_never_starts(tmp_path, fake, expected):
    """Each pod failure ends lines() and wait() with the reason (no hang), and the Job is deleted."""
    api = fake()
    runner = KubernetesRunner(namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=api, core_api=api,
                              poll_s=0.02, start_timeout_s=0.3)
    handle = await runner.start(_spec(tmp_path))
    lines = await asyncio.wait_for(_collect(handle), 10)
    outcome = await asyncio.wait_for(handle.wait(), 10)
    assert not outcome.ok and expected in outcome.detail, outcome.detail
    assert lines[-1] == f"[presafe] the trainer never started: {expected}" or expected in lines[-1]
    assert api.deleted == [handle.ref]


async def test_kubernetes_cancel_before_the_pod_starts(tmp_path):
    api = PodFaultK8s(_waiting("ContainerCreating"))  # may still start: only a cancel ends it
    runner = KubernetesRunner(namespace="ml", spec_path=PACKAGED_JOB_TEMPLATE, batch_api=api, core_api=api,
                              poll_s=0.02, start_timeout_s=3600)
    handle = await runner.start(_spec(tmp_path))
    reader = asyncio.create_task(_collect(handle))
    await asyncio.sleep(0.2)
    assert not reader.done()
    await handle.cancel()
    assert await asyncio.wait_for(reader, 5) == []
    outcome = await asyncio.wait_for(handle.wait(), 5)
    assert outcome.exit_code is None and "deleted" in outcome.detail and api.deleted == [handle.ref]
