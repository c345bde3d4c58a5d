"""The merged Deployment the admin rolls on promote (``service.jobs.rollout``), against a stand-in API server.

No cluster here: :class:`FakeApiServer` answers the two calls the rollout makes (read and patch one Deployment)
over real HTTP, so the real ``kubernetes`` client builds, sends and parses them (its kubeconfig, its bearer token,
its Content-Type). A PATCH that is not a JSON merge patch is refused as the API server would refuse it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.jobs.rollout import ANNOTATION, DeploymentRollout

NAMESPACE, NAME, TOKEN = "presafe", "presafe-vllm-promoted", "k8s-test-token"


def merge_patch(target, patch):
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeApiServer:
    """One Deployment behind ``GET``/``PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}``.

    A patch that changes the pod template bumps ``metadata.generation`` and starts a rollout (no pod updated
    yet); :meth:`rolled` is the Deployment controller finishing it. ``fail`` answers every call with that status.
    """

    def __init__(self, tmp_path: Path, replicas: int = 1):
        self.deployment = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "generation": 1},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": NAME}},
                     "template": {"metadata": {"labels": {"app": NAME}, "annotations": {ANNOTATION: ""}},
                                  "spec": {"containers": [{"name": "vllm", "image": "presafe-vllm"}]}}},
            "status": {"observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
                       "readyReplicas": replicas, "availableReplicas": replicas},
        }
        self.patches: list[tuple[str, dict]] = []  # (content type, body)
        self.fail: int | None = None
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, message: str) -> None:
                self._reply(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message,
                                   "code": code})

            def _route(self) -> bool:
                if self.headers.get("authorization") != f"Bearer {TOKEN}":
                    self._status(401, "Unauthorized")
                    return False
                if server.fail is not None:
                    self._status(server.fail, "the API server is unavailable")
                    return False
                if self.path.split("?")[0] != f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/{NAME}":
                    self._status(404, f"{self.path} not found")
                    return False
                return True

            def do_GET(self):
                if self._route():
                    with server.lock:
                        self._reply(200, server.deployment)

            def do_PATCH(self):
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"null")
                if not self._route():
                    return
                kind = self.headers.get("content-type", "")
                if kind != "application/merge-patch+json" or not isinstance(body, dict):
                    self._status(415 if kind != "application/merge-patch+json" else 400, f"not a merge patch: {kind}")
                    return
                with server.lock:
                    server.patches.append((kind, body))
                    before = server.deployment["spec"]
                    server.deployment = merge_patch(server.deployment, body)
                    if server.deployment["spec"] != before:
                        server.deployment["metadata"]["generation"] += 1
                        server.deployment["status"]["updatedReplicas"] = 0
                    self._reply(200, server.deployment)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.kubeconfig = tmp_path / "kubeconfig"
        self.kubeconfig.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "admin", "user": {"token": TOKEN}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "admin", "namespace": NAMESPACE}}]}))

    @property
    def annotation(self) -> str | None:
        with self.lock:
            return self.deployment["spec"]["template"]["metadata"]["annotations"].get(ANNOTATION)

    def rolled(self) -> None:
        """The controller has replaced every pod."""
        with self.lock:
            d = self.deployment
            n = d["spec"]["replicas"]
            d["status"].update(observedGeneration=d["metadata"]["generation"], replicas=n, updatedReplicas=n,
                               readyReplicas=n, availableReplicas=n)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def api(tmp_path, monkeypatch):
    server = FakeApiServer(tmp_path)
    monkeypatch.setenv("KUBECONFIG", str(server.kubeconfig))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("PRESAFE_K8S_NAMESPACE", NAMESPACE)
    yield server
    server.close()


def test_promote_rolls_the_deployment_with_a_merge_patch_and_reports_progress(api):
    pods: list[dict] = []  # the merged replicas as the gateway sees them

    async def scenario():
        rollout = DeploymentRollout(NAME, replicas=lambda: pods, interval=0.05)
        async with rollout.serving("v2") as merged:
            assert merged is False  # no pod serves v2 yet: the alias goes through LoRA meanwhile
        assert api.patches == [("application/merge-patch+json",
                                {"spec": {"template": {"metadata": {"annotations": {ANNOTATION: "v2"}}}}})]
        assert api.annotation == "v2"
        status = rollout.status("v2")
        assert status["mode"] == "lora" and "rolling deployment presafe-vllm-promoted to v2" in status["reason"]
        assert status["rollout"]["adapter"] == "v2" and status["rollout"]["complete"] is False

        pods.extend([{"url": "http://a", "admitted": True, "models": ["v1"]},
                     {"url": "http://b", "admitted": True, "models": ["v2"]}])  # the surge pod is up
        await rollout.refresh()
        status = rollout.status("v2")
        assert status["mode"] == "merged" and status["reason"] is None
        assert status["rollout"]["complete"] is False  # an old pod still serves v1

        del pods[0]
        api.rolled()
        await rollout.refresh()
        status = rollout.status("v2")
        assert status["rollout"]["complete"] is True and status["rollout"]["updated"] == 1
        assert rollout.status(None)["mode"] == "none"

    asyncio.run(scenario())


def test_api_failure_leaves_the_promote_standing_and_the_loop_rolls_it_later(api):
    """The API refuses the patch: the promote still stands (LoRA serves the alias), the status says why, and the
    loop names the promoted adapter once the API answers again; it also undoes a hand edit."""
    promoted = {"name": "v2"}

    async def scenario():
        rollout = DeploymentRollout(NAME, replicas=list, interval=0.05)
        api.fail = 503
        async with rollout.serving("v2") as merged:
            assert merged is False
        status = rollout.status("v2")
        assert status["mode"] == "lora" and "503" in status["reason"] and "patching" in status["rollout"]["error"]
        assert api.annotation == ""
        rollout.start(lambda: promoted["name"])
        await asyncio.sleep(0.3)
        assert api.annotation == ""  # still down: nothing rolled, the loop keeps trying
        api.fail = None
        for _ in range(100):
            if api.annotation == "v2":
                break
            await asyncio.sleep(0.05)
        assert api.annotation == "v2" and rollout.status("v2")["rollout"]["error"] is None
        with api.lock:  # someone edits the annotation by hand
            api.deployment["spec"]["template"]["metadata"]["annotations"][ANNOTATION] = "v0"
        for _ in range(100):
            if api.annotation == "v2":
                break
            await asyncio.sleep(0.05)
        assert api.annotation == "v2"
        await rollout.close()

    asyncio.run(scenario())
