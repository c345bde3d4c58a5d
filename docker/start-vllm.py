#!/usr/bin/env python3
"""Start vLLM's OpenAI server for an external gateway exactly as the embedded mode would.

Installed in the images as ``presafe-vllm`` (the vLLM service of docker/compose.yaml and of the
Kubernetes manifests). It asks the gateway's own planner (:func:`service.vllm_server.
plan_embedded`) for the command: the base model ``$PRESAFE_BASE_MODEL`` (a known name resolves to
its directory under ``$PRESAFE_HOME/models``), served under the name the gateway expects, LoRA on
with runtime loading allowed, the adapter store's adapters preloaded, and the CoT serving chat
template. It then listens on all interfaces (``$PRESAFE_VLLM_PORT``, default 8000) and appends
``$PRESAFE_VLLM_ARGS`` (already part of the plan) and its own arguments; a later flag wins.

    presafe-vllm [--merged [--follow-promoted]] [--dry-run] [vLLM arguments...]

``--dry-run`` prints the command (JSON) instead of running it.

``--merged`` serves one adapter from its weights merged into the base, under the adapter's name, without LoRA
(the Deployment ``presafe-vllm-promoted`` of k8s/base/vllm-promoted.yaml): ``$PRESAFE_MERGED_ADAPTER`` (the
pod template's annotation, which the admin sets on promote: a rolling update), else the store's promoted one.
Until that adapter is in the store it waits; the merge is cached under ``$PRESAFE_HOME/merged/<name>``.
``--follow-promoted`` (the ``vllm-promoted`` service of docker/compose.yaml, which has no rolling update) runs
vLLM as a child and watches the store: once another adapter is promoted it stops vLLM and exits 0, for the
container's restart policy to start it again on the new one (the gateway sends the alias through LoRA meanwhile).

With ``$PRESAFE_VLLM_STATUS_PORT`` set (the merged Deployment), ``--merged`` also answers ``GET /live`` on that
port, for the pod's startup and liveness probes: 200 while it waits for its adapter (no restarts before the first
promotion, however long), merges it and vLLM starts (up to ``$PRESAFE_VLLM_START_TIMEOUT_S``, default 1800),
then vLLM's own ``/health``. vLLM then runs as its child. Readiness stays vLLM's ``/health`` on the API port.

vLLM's API (``/v1/*``: completions and the runtime LoRA routes) takes a bearer key: ``$PRESAFE_VLLM_API_KEY``,
else the file ``$PRESAFE_VLLM_API_KEY_FILE`` (created with a random key, mode 0600, when missing: the
gateway reads the same file). It reaches vLLM as ``VLLM_API_KEY`` (not on the command line). Without
either, vLLM does not start unless ``PRESAFE_VLLM_ALLOW_NO_KEY=1``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def build_command(extra: list[str]) -> tuple[list[str], dict]:
    from service.core.settings import Settings
    from service.vllm_server import plan_embedded

    settings = Settings()
    plan = plan_embedded(settings, port=settings.vllm_port or 8000)
    cmd = plan.command() + extra
    cmd[cmd.index("--host") + 1] = os.environ.get("PRESAFE_VLLM_HOST", "0.0.0.0")
    info = {"command": cmd, "served_name": plan.served_name, "think_open": plan.think_open,
            "adapters": sorted(plan.adapters)}
    return cmd, info


def merged_target(wait: bool) -> str | None:
    """The adapter to serve merged: ``$PRESAFE_MERGED_ADAPTER``, else the promoted one; waits (``wait``) until
    it is in the store, else None."""
    import time

    from service.adapters.store import AdapterStore
    from service.core.settings import Settings

    store, said = AdapterStore(Settings().adapters_dir), 0.0
    while True:
        adapter = os.environ.get("PRESAFE_MERGED_ADAPTER") or store.promoted()
        if adapter and store.exists(adapter):
            return adapter
        if not wait:
            return None
        if time.monotonic() - said > 60:
            print(f"presafe-vllm: waiting for {adapter or 'a promoted adapter'} in {store.root}", file=sys.stderr,
                  flush=True)
            said = time.monotonic()
        time.sleep(5)


def build_merged_command(extra: list[str], adapter: str) -> tuple[list[str], dict]:
    """vLLM on ``adapter`` merged into its base (merged now unless the cached merge is current)."""
    import subprocess

    from service.adapters.merge import merged_is_current
    from service.adapters.store import AdapterStore
    from service.core.settings import Settings
    from service.engines import merge_command, merged_plan

    settings = Settings()
    adapter_dir = AdapterStore(settings.adapters_dir).path(adapter)
    merged = settings.root / "merged" / adapter
    if not merged_is_current(merged, adapter_dir):
        print(f"presafe-vllm: merging {adapter} into its base ({merged})", file=sys.stderr, flush=True)
        subprocess.run(merge_command(settings, adapter_dir, merged), check=True, stdout=sys.stderr)
    plan = merged_plan(settings, adapter, merged, adapter_dir, port=settings.vllm_port or 8000,
                       work=settings.root / "merged" / ".serve" / adapter)
    cmd = plan.command() + extra
    cmd[cmd.index("--host") + 1] = os.environ.get("PRESAFE_VLLM_HOST", "0.0.0.0")
    return cmd, {"command": cmd, "served_name": plan.served_name, "merged": str(merged), "adapters": []}


def follow_promoted(cmd: list[str], env: dict, adapter: str, interval: float = 2.0, watch: bool = True) -> int:
    """Run vLLM (``cmd``) as a child while ``adapter`` stays the promoted one; when another (in the store) is
    promoted, stop it and return 0 (``watch=False``: the store is not watched). SIGTERM/SIGINT stop it too;
    vLLM's own exit status is returned otherwise."""
    from service.adapters.store import AdapterStore
    from service.core.settings import Settings

    store = AdapterStore(Settings().adapters_dir)
    child = subprocess.Popen(cmd, env=env)
    stop: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: stop.append(signum))
    try:
        while not stop:
            if child.poll() is not None:
                return child.returncode
            promoted = store.promoted() if watch else None
            if promoted and promoted != adapter and store.exists(promoted):
                print(f"presafe-vllm: {promoted} is promoted now (serving {adapter}): stopping for a restart on it",
                      file=sys.stderr, flush=True)
                return 0
            time.sleep(interval)
        return 0
    finally:
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


class LaunchStatus:
    """The launcher's phase (``waiting`` → ``merging`` → ``starting`` → ``serving``) and what ``GET /live`` answers
    in it: 200 before vLLM runs and while it starts (until ``start_timeout`` s), then vLLM's ``/health``."""

    def __init__(self, health_url: str, start_timeout: float):
        self.health_url, self.start_timeout = health_url, start_timeout
        self.phase, self.started_at = "waiting", 0.0

    def set(self, phase: str) -> None:
        if phase == "starting":
            self.started_at = time.monotonic()
        self.phase = phase

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.health_url, timeout=3) as resp:
                return resp.status == 200
        except (OSError, urllib.error.URLError):
            return False

    def live(self) -> tuple[int, dict]:
        if self.phase in ("waiting", "merging"):
            return 200, {"phase": self.phase}
        if self.healthy():
            self.phase = "serving"
            return 200, {"phase": "serving"}
        if self.phase == "starting":
            waited = time.monotonic() - self.started_at
            if waited <= self.start_timeout:
                return 200, {"phase": "starting", "waited_s": round(waited)}
            return 503, {"phase": "starting", "error": f"vLLM not healthy after {self.start_timeout:g} s"}
        return 503, {"phase": self.phase, "error": "vLLM's /health failed"}


def serve_status(status: LaunchStatus, port: int) -> ThreadingHTTPServer:
    """Answer ``GET /live`` with ``status`` on ``port`` (all interfaces), from a daemon thread."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            code, body = status.live() if self.path == "/live" else (404, {"error": "not found"})
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:  # probes every few seconds: not logged
            pass

    server = ThreadingHTTPServer((os.environ.get("PRESAFE_VLLM_HOST", "0.0.0.0"), port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True, name="presafe-vllm-status").start()
    return server


def api_key(create: bool) -> str | None:
    """The key vLLM is to require: ``PRESAFE_VLLM_API_KEY``, else the key file (created when ``create``)."""
    import secrets
    from pathlib import Path

    if os.environ.get("PRESAFE_VLLM_API_KEY"):
        return os.environ["PRESAFE_VLLM_API_KEY"]
    path = os.environ.get("PRESAFE_VLLM_API_KEY_FILE")
    if not path:
        return None
    file = Path(path)
    if not file.is_file() and create:
        file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return file.read_text().strip() if file.is_file() else None


def main(argv: list[str]) -> int:
    dry_run, merged, follow = "--dry-run" in argv, "--merged" in argv, "--follow-promoted" in argv
    extra = [a for a in argv if a not in ("--dry-run", "--merged", "--follow-promoted")]
    if follow and not merged:
        print("presafe-vllm: --follow-promoted needs --merged", file=sys.stderr)
        return 2
    status_port = os.environ.get("PRESAFE_VLLM_STATUS_PORT")
    status = None
    if merged and status_port and not dry_run:
        vllm_port = os.environ.get("PRESAFE_VLLM_PORT") or "8000"
        status = LaunchStatus(f"http://127.0.0.1:{vllm_port}/health",
                              float(os.environ.get("PRESAFE_VLLM_START_TIMEOUT_S") or 1800))
        serve_status(status, int(status_port))
    if merged:
        adapter = merged_target(wait=not dry_run)
        if status is not None:
            status.set("merging")
        if adapter is None:
            print("presafe-vllm: --merged: no adapter to serve (PRESAFE_MERGED_ADAPTER unset or not in the store, "
                  "none promoted)", file=sys.stderr)
            return 2
        cmd, info = build_merged_command(extra, adapter)
    else:
        cmd, info = build_command(extra)
    key = api_key(create=not dry_run)
    info["api_key"] = "set" if key else ("from file" if os.environ.get("PRESAFE_VLLM_API_KEY_FILE") else "none")
    if dry_run:
        print(json.dumps(info))
        return 0
    if not key and os.environ.get("PRESAFE_VLLM_ALLOW_NO_KEY") != "1":
        print("presafe-vllm: no API key (PRESAFE_VLLM_API_KEY or PRESAFE_VLLM_API_KEY_FILE): refusing to expose "
              "vLLM's runtime LoRA routes without one (PRESAFE_VLLM_ALLOW_NO_KEY=1 to override)", file=sys.stderr)
        return 2
    env = {**os.environ} if merged else {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
    env.pop("PRESAFE_VLLM_API_KEY", None)
    if key:
        env["VLLM_API_KEY"] = key
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    print(f"presafe-vllm: {' '.join(cmd)}", file=sys.stderr, flush=True)
    if status is not None:
        status.set("starting")
    if follow or status is not None:  # a child: the watcher of the store, or the status server, stays
        return follow_promoted(cmd, env, adapter, watch=follow)
    os.execvpe(cmd[0], cmd, env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
