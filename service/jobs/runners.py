"""Where a training job runs: a local subprocess (default) or a Kubernetes Job, behind one interface.

A runner starts ``<train command> --config <job dir>/config.yaml --output <job dir>/output`` and
gives back a :class:`RunHandle`: the trainer's output lines (stdout and stderr together; the
progress lines of :mod:`service.jobs.store` among them), its outcome, and cancellation. The default
train command is ``presafe train run`` (as ``python -m training.cli train run``); set
``PRESAFE_TRAIN_COMMAND`` to use another one.

The Kubernetes runner needs the ``k8s`` extra (``kubernetes`` client, imported lazily), runs
in-cluster (service-account config; a kubeconfig is the fallback), and takes its Job spec from
``PRESAFE_K8S_JOB_SPEC``, else ``k8s/base/training-job.yaml`` of the checkout, else the packaged
``service/jobs/k8s_job_template.yaml``; ``PRESAFE_K8S_NAMESPACE`` and ``PRESAFE_K8S_TRAIN_IMAGE``
override the namespace and the containers' image. A trainer that never starts (image pull back-off,
failed or stuck init container, bad container config, a pod unschedulable or absent for
``PRESAFE_K8S_START_TIMEOUT_S``, default 900) ends the run with the reason and its Job is deleted;
cancel works at any point. ``$PRESAFE_HOME`` must be the same shared volume, at the same
path, in the gateway and in the training pod (config in, adapter out).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
import re
import shlex
import signal
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

PACKAGED_JOB_TEMPLATE = Path(__file__).with_name("k8s_job_template.yaml")
CHECKOUT_JOB_SPEC = Path(__file__).resolve().parents[2] / "k8s" / "base" / "training-job.yaml"
_SPLIT = re.compile(rb"\r\n|\r|\n")


def default_train_command() -> list[str]:
    """``$PRESAFE_TRAIN_COMMAND`` (shell-split) or ``python -m training.cli train run``."""
    configured = os.environ.get("PRESAFE_TRAIN_COMMAND")
    if configured:
        return shlex.split(configured)
    return [sys.executable, "-m", "training.cli", "train", "run"]


@dataclass(frozen=True)
class RunSpec:
    """What to run for one job."""

    job_id: str
    config_path: Path
    output_dir: Path


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: ``exit_code`` 0 is success; None when unknown (e.g. the Job was deleted)."""

    exit_code: int | None
    detail: str

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class RunHandle(ABC):
    """A started run."""

    ref: str  # pid (local) or Job name (kubernetes), stored in the job row

    @abstractmethod
    def lines(self) -> AsyncIterator[str]:
        """The trainer's output, line by line, until it ends."""

    @abstractmethod
    async def wait(self) -> RunOutcome:
        """Wait for the end of the run."""

    @abstractmethod
    async def cancel(self, grace_s: float = 10.0) -> None:
        """Stop the run (terminate, then kill after ``grace_s``)."""


class Runner(ABC):
    """Starts runs; ``kind`` names it in job rows."""

    kind: str

    @abstractmethod
    async def start(self, spec: RunSpec) -> RunHandle:
        """Start the trainer for ``spec``."""

    @abstractmethod
    async def reap(self, ref: str, job_id: str) -> bool:
        """Stop what is left of a run a previous gateway process started; True if something was."""

    async def attach(self, ref: str, job_id: str) -> RunHandle | None:
        """Follow a run a previous gateway process started, if that is possible and it still exists."""
        return None


# --------------------------------------------------------------------------- local subprocess


SECRET_ENV = re.compile(r"TOKEN|SECRET|PASSW|API_?KEY|CREDENTIAL|PRIVATE_KEY|AUTH|COOKIE", re.IGNORECASE)


def trainer_environ(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The gateway's environment without its secrets (names matching :data:`SECRET_ENV`, e.g.
    ``PRESAFE_ADMIN_TOKEN``, ``PRESAFE_VLLM_API_KEY``, ``*_API_KEY``, ``HF_TOKEN``): what a trainer gets.
    A secret the trainer needs is given to :class:`LocalRunner` explicitly (``env``)."""
    environ = os.environ if environ is None else environ
    return {k: v for k, v in environ.items() if not SECRET_ENV.search(k)}


class LocalHandle(RunHandle):
    def __init__(self, proc: asyncio.subprocess.Process):
        self.proc = proc
        self.ref = str(proc.pid)

    async def lines(self) -> AsyncIterator[str]:
        assert self.proc.stdout is not None
        buffer = b""
        while chunk := await self.proc.stdout.read(1 << 16):
            *complete, buffer = _SPLIT.split(buffer + chunk)
            for raw in complete:
                yield raw.decode("utf-8", errors="replace")
        if buffer:
            yield buffer.decode("utf-8", errors="replace")

    async def wait(self) -> RunOutcome:
        code = await self.proc.wait()
        if code < 0:
            return RunOutcome(code, f"trainer killed by signal {signal.Signals(-code).name}")
        return RunOutcome(code, "trainer finished" if code == 0 else f"trainer exited with code {code}")

    async def cancel(self, grace_s: float = 10.0) -> None:
        if self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.proc.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            await self.proc.wait()


class LocalRunner(Runner):
    """The trainer as a child process in its own session (so cancel reaches its whole group)."""

    kind = "local"

    def __init__(self, command: Sequence[str] | None = None, env: dict[str, str] | None = None):
        self.command = list(command) if command else default_train_command()
        self.env = dict(env or {})

    async def start(self, spec: RunSpec) -> RunHandle:
        env = {**trainer_environ(), **self.env, "PRESAFE_JOB_ID": spec.job_id, "PYTHONUNBUFFERED": "1"}
        proc = await asyncio.create_subprocess_exec(
            *self.command, "--config", str(spec.config_path), "--output", str(spec.output_dir),
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            env=env, start_new_session=True)
        return LocalHandle(proc)

    async def reap(self, ref: str, job_id: str) -> bool:
        """Kill the process group of ``ref`` if that process is still this job's trainer."""
        try:
            pid = int(ref)
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (ValueError, OSError):
            return False
        if job_id not in cmdline:  # the pid was reused by something else
            return False
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
            return True
        return False


# --------------------------------------------------------------------------- Kubernetes Job


def find_job_spec(explicit: Path | str | None = None) -> Path:
    """The Job spec file to use (explicit, ``PRESAFE_K8S_JOB_SPEC``, ``k8s/``, packaged template)."""
    explicit = explicit or os.environ.get("PRESAFE_K8S_JOB_SPEC")
    if explicit:
        return Path(explicit)
    return CHECKOUT_JOB_SPEC if CHECKOUT_JOB_SPEC.is_file() else PACKAGED_JOB_TEMPLATE


def load_job_spec(path: Path) -> dict[str, Any]:
    """The ``kind: Job`` document of a (possibly multi-document) YAML file."""
    for doc in yaml.safe_load_all(Path(path).read_text(encoding="utf-8")):
        if isinstance(doc, dict) and doc.get("kind") == "Job":
            return doc
    raise ValueError(f"{path} holds no 'kind: Job' document")


def k8s_job_name(job_id: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", f"presafe-train-{job_id}".lower())[:63].rstrip("-")


def build_job_manifest(spec: dict[str, Any], run: RunSpec, name: str | None = None,
                       image: str | None = None) -> dict[str, Any]:
    """Fill a Job spec for one run.

    In the trainer container (named ``trainer``, else the first), ``{config}``, ``{output}`` and
    ``{job_id}`` in ``command``/``args`` are replaced; without any placeholder, ``--config <path>
    --output <dir>`` is appended to ``args``. Also sets the name and labels, ``restartPolicy:
    Never``, ``backoffLimit: 0`` unless given, ``PRESAFE_JOB_ID`` in the container env, and
    ``image`` (``PRESAFE_K8S_TRAIN_IMAGE``) on every container and init container when given.
    """
    manifest = copy.deepcopy(spec)
    name = name or k8s_job_name(run.job_id)
    labels = {"app.kubernetes.io/name": "presafe-trainer", "presafe.dev/job-id": run.job_id}
    meta = manifest.setdefault("metadata", {})
    meta.pop("generateName", None)
    meta["name"] = name
    meta.setdefault("labels", {}).update(labels)
    job_spec = manifest.setdefault("spec", {})
    job_spec.setdefault("backoffLimit", 0)
    template = job_spec.setdefault("template", {})
    template.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    pod = template.setdefault("spec", {})
    pod["restartPolicy"] = "Never"
    containers = pod.get("containers") or []
    if not containers:
        raise ValueError("the Job spec has no containers")
    if image:
        for each in [*containers, *(pod.get("initContainers") or [])]:
            each["image"] = image
    container = next((c for c in containers if c.get("name") == "trainer"), containers[0])
    values = {"config": str(run.config_path), "output": str(run.output_dir), "job_id": run.job_id}
    placeholder = re.compile(r"\{(config|output|job_id)\}")
    found = False
    for key in ("command", "args"):
        items = container.get(key) or []
        if any(placeholder.search(str(v)) for v in items):
            found = True
            container[key] = [placeholder.sub(lambda m: values[m.group(1)], str(v)) for v in items]
    if not found:
        container["args"] = [*(container.get("args") or []), "--config", values["config"],
                             "--output", values["output"]]
    env = [e for e in container.get("env") or [] if e.get("name") != "PRESAFE_JOB_ID"]
    container["env"] = [*env, {"name": "PRESAFE_JOB_ID", "value": run.job_id}]
    return manifest


# Waiting reasons after which a container will not start without someone changing the spec or the image.
FATAL_WAITING = {"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "CreateContainerConfigError",
                 "CreateContainerError", "RunContainerError", "CrashLoopBackOff"}


def pod_start_problem(pod: Any) -> str | None:
    """Why ``pod``'s trainer will never start (failed or stuck init container, image pull, bad config,
    failed pod), or None while it may still start."""
    status = pod.status
    if status is None:
        return None
    for kind, statuses in (("init container", status.init_container_statuses),
                           ("container", status.container_statuses)):
        for cs in statuses or []:
            state = cs.state
            if state is None:
                continue
            if kind == "init container" and state.terminated and state.terminated.exit_code not in (0, None):
                reason = f", {state.terminated.reason}" if state.terminated.reason else ""
                return f"init container {cs.name} failed (exit code {state.terminated.exit_code}{reason})"
            if state.waiting and state.waiting.reason in FATAL_WAITING:
                message = f": {state.waiting.message[:300]}" if state.waiting.message else ""
                return f"{kind} {cs.name}: {state.waiting.reason}{message}"
    if status.phase == "Failed" and not any(cs.state and cs.state.terminated for cs in status.container_statuses or []):
        return f"pod failed before the trainer ran: {status.reason or ''} {status.message or ''}".strip()
    return None


def pod_pending_reason(pod: Any | None) -> str:
    """Why a pod has not started yet (e.g. ``Unschedulable: 0/3 nodes ...``), for a timeout message."""
    if pod is None:
        return "no pod was created"
    for cond in (pod.status.conditions if pod.status else None) or []:
        if cond.type == "PodScheduled" and cond.status == "False":
            return f"{cond.reason or 'not scheduled'}: {(cond.message or '')[:300]}".rstrip(": ")
    return f"pod {pod.metadata.name} is {(pod.status.phase if pod.status else None) or 'pending'}"


class KubernetesHandle(RunHandle):
    def __init__(self, runner: KubernetesRunner, name: str, container: str | None):
        self.runner = runner
        self.ref = name
        self.container = container
        self._done = threading.Event()
        self.failure: str | None = None  # why the trainer never started, once known

    def _pod(self) -> Any | None:
        pods = self.runner.core.list_namespaced_pod(self.runner.namespace, label_selector=f"job-name={self.ref}")
        items = sorted(pods.items or [], key=lambda p: (p.metadata.creation_timestamp is not None,
                                                        p.metadata.creation_timestamp))
        return items[-1] if items else None

    def _pod_name(self) -> str | None:
        pod = self._pod()
        return pod.metadata.name if pod is not None else None

    def _job_gone(self) -> bool:
        from kubernetes.client.exceptions import ApiException

        try:
            self.runner.batch.read_namespaced_job_status(self.ref, self.runner.namespace)
        except ApiException as exc:
            return exc.status == 404
        return False

    def _never_started(self, reason: str, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.failure = f"the trainer never started: {reason}"
        loop.call_soon_threadsafe(queue.put_nowait, f"[presafe] {self.failure}")
        from kubernetes.client import V1DeleteOptions

        with contextlib.suppress(Exception):  # nothing left to retry or to hold resources
            self.runner.batch.delete_namespaced_job(self.ref, self.runner.namespace,
                                                    body=V1DeleteOptions(propagation_policy="Background"))

    def _stream_logs(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        from kubernetes.client.exceptions import ApiException

        started = False
        try:
            deadline = time.monotonic() + self.runner.start_timeout_s
            while not self._done.is_set():  # wait for a pod that has started; give up on one that never will
                pod = self._pod()
                if pod is not None:
                    problem = pod_start_problem(pod)
                    if problem:
                        self._never_started(problem, loop, queue)
                        return
                    try:
                        resp = self.runner.core.read_namespaced_pod_log(
                            pod.metadata.name, self.runner.namespace, container=self.container, follow=True,
                            _preload_content=False)
                        break
                    except ApiException as exc:
                        if exc.status not in (400, 404):  # 400: container still creating
                            raise
                if time.monotonic() > deadline:
                    self._never_started(f"not running after {self.runner.start_timeout_s:g}s "
                                        f"({pod_pending_reason(pod)})", loop, queue)
                    return
                if self._job_gone():
                    return
                self._done.wait(self.runner.poll_s)
            else:
                return
            started = True
            buffer = b""
            try:
                for chunk in resp.stream(amt=None, decode_content=False):
                    *complete, buffer = _SPLIT.split(buffer + (chunk if isinstance(chunk, bytes) else chunk.encode()))
                    for raw in complete:
                        loop.call_soon_threadsafe(queue.put_nowait, raw.decode("utf-8", errors="replace"))
                if buffer:
                    loop.call_soon_threadsafe(queue.put_nowait, buffer.decode("utf-8", errors="replace"))
            finally:
                with contextlib.suppress(Exception):
                    resp.release_conn()
        except Exception as exc:  # noqa: BLE001 - logs are best effort; the outcome comes from the Job
            if started:
                loop.call_soon_threadsafe(queue.put_nowait, f"[presafe] log stream ended: {exc}")
            else:  # nobody would notice a pod that never starts
                self._never_started(f"the Kubernetes API failed while waiting for the pod: {exc}", loop, queue)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, None)

    async def lines(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        thread = threading.Thread(target=self._stream_logs, args=(loop, queue), daemon=True)
        thread.start()
        while (line := await queue.get()) is not None:
            yield line

    def _exit_code(self) -> int | None:
        with contextlib.suppress(Exception):
            pod = self._pod_name()
            if pod:
                status = self.runner.core.read_namespaced_pod(pod, self.runner.namespace).status
                for cs in status.container_statuses or []:
                    if (self.container is None or cs.name == self.container) and cs.state and cs.state.terminated:
                        return cs.state.terminated.exit_code
        return None

    async def wait(self) -> RunOutcome:
        from kubernetes.client.exceptions import ApiException

        try:
            while True:
                if self.failure:
                    return RunOutcome(None, f"Kubernetes Job {self.ref}: {self.failure}")
                try:
                    job = await asyncio.to_thread(self.runner.batch.read_namespaced_job_status,
                                                  self.ref, self.runner.namespace)
                except ApiException as exc:
                    if exc.status == 404:
                        return RunOutcome(None, f"Kubernetes Job {self.ref} was deleted")
                    raise
                status = job.status
                if status and (status.succeeded or 0) > 0:
                    return RunOutcome(0, f"Kubernetes Job {self.ref} succeeded")
                failed = [c for c in (status.conditions or []) if c.type == "Failed" and c.status == "True"] \
                    if status else []
                if status and ((status.failed or 0) > 0 or failed):
                    code = await asyncio.to_thread(self._exit_code)
                    reason = f": {failed[0].reason}" if failed and failed[0].reason else ""
                    return RunOutcome(code if code not in (None, 0) else 1,
                                      f"Kubernetes Job {self.ref} failed{reason}"
                                      + (f" (exit code {code})" if code is not None else ""))
                await asyncio.sleep(self.runner.poll_s)
        finally:
            self._done.set()

    async def cancel(self, grace_s: float = 10.0) -> None:
        from kubernetes.client import V1DeleteOptions
        from kubernetes.client.exceptions import ApiException

        self._done.set()  # a log stream still waiting for the pod stops now
        try:
            await asyncio.to_thread(
                self.runner.batch.delete_namespaced_job, self.ref, self.runner.namespace,
                body=V1DeleteOptions(propagation_policy="Background", grace_period_seconds=int(grace_s)))
        except ApiException as exc:
            if exc.status != 404:
                raise


def load_kube_config() -> None:
    """The pod's service account in a cluster, else ``$KUBECONFIG`` (read now: the client reads it at import),
    else ``~/.kube/config``."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)


def kube_namespace(namespace: str | None = None) -> str:
    """``namespace``, else ``$PRESAFE_K8S_NAMESPACE``, else the pod's own, else ``default``."""
    sa_namespace = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
    return (namespace or os.environ.get("PRESAFE_K8S_NAMESPACE")
            or (sa_namespace.read_text().strip() if sa_namespace.is_file() else "default"))


class KubernetesRunner(Runner):
    """Each run is a ``batch/v1`` Job built from the spec file (see :func:`build_job_manifest`)."""

    kind = "kubernetes"

    def __init__(self, namespace: str | None = None, spec_path: Path | str | None = None,
                 image: str | None = None, batch_api: Any = None, core_api: Any = None, poll_s: float = 2.0,
                 start_timeout_s: float | None = None):
        self.spec_path = find_job_spec(spec_path)
        self.start_timeout_s = (start_timeout_s if start_timeout_s is not None
                                else float(os.environ.get("PRESAFE_K8S_START_TIMEOUT_S", "900")))
        self.image = image or os.environ.get("PRESAFE_K8S_TRAIN_IMAGE") or None
        self.poll_s = poll_s
        if batch_api is None or core_api is None:
            from kubernetes import client

            load_kube_config()
            batch_api, core_api = client.BatchV1Api(), client.CoreV1Api()
        self.batch, self.core = batch_api, core_api
        self.namespace = kube_namespace(namespace)

    async def start(self, spec: RunSpec) -> RunHandle:
        manifest = build_job_manifest(load_job_spec(self.spec_path), spec, image=self.image)
        containers = manifest["spec"]["template"]["spec"]["containers"]
        container = next((c for c in containers if c.get("name") == "trainer"), containers[0]).get("name")
        await asyncio.to_thread(self.batch.create_namespaced_job, self.namespace, manifest)
        return KubernetesHandle(self, manifest["metadata"]["name"], container)

    async def attach(self, ref: str, job_id: str) -> RunHandle | None:
        """The Job ``ref`` of ``job_id`` if it still exists (running or finished): its logs and outcome."""
        from kubernetes.client.exceptions import ApiException

        try:
            job = await asyncio.to_thread(self.batch.read_namespaced_job_status, ref, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        labels = (getattr(getattr(job, "metadata", None), "labels", None) or {})
        if labels and labels.get("presafe.dev/job-id") not in (None, job_id):
            return None
        containers = load_job_spec(self.spec_path)["spec"]["template"]["spec"]["containers"]
        container = next((c for c in containers if c.get("name") == "trainer"), containers[0]).get("name")
        return KubernetesHandle(self, ref, container)

    async def reap(self, ref: str, job_id: str) -> bool:
        handle = KubernetesHandle(self, ref, None)
        try:
            await handle.cancel(grace_s=0)
        except Exception:  # noqa: BLE001 - best effort on start-up
            return False
        return True


def make_runner(kind: str | None = None, **kwargs: Any) -> Runner:
    """The runner named by ``kind`` or ``$PRESAFE_RUNNER`` (``local`` default, ``kubernetes``)."""
    kind = kind or os.environ.get("PRESAFE_RUNNER", "local")
    if kind == "local":
        return LocalRunner(**kwargs)
    if kind in ("kubernetes", "k8s"):
        return KubernetesRunner(**kwargs)
    raise ValueError(f"unknown runner {kind!r}; use 'local' or 'kubernetes'")
