"""The promoted adapter merged on pods of their own, moved by a rolling update (Kubernetes mode), end to end.

Real parts: the gateway process (with /admin), the shared LoRA vLLM test server, and "pods" that run the
image's own ``presafe-vllm --merged`` (docker/start-vllm.py: merge, template, real vLLM). The Kubernetes API is
:class:`test_rollout.FakeApiServer` (real HTTP, the real client); the test plays the kubelet: it starts a pod on
the adapter the Deployment's annotation names and stops the old one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import VLLMServer
from test_admin_e2e import E2E, MESSAGES, wait_until
from test_merged_serving import served_requests
from test_rollout import NAME, NAMESPACE, FakeApiServer

from service.vllm_server import free_port

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

START_VLLM = Path(__file__).parents[1] / "docker" / "start-vllm.py"


class MergedPod:
    """``presafe-vllm --merged`` as the Deployment's pod runs it: its own home, the shared adapter store."""

    def __init__(self, e2e: E2E, adapter: str, port: int, root: Path):
        home = root / f"pod-{adapter}"
        home.mkdir(parents=True)
        (home / "adapters").symlink_to(e2e.home / "adapters")  # the adapters volume
        self.url = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("PRESAFE_")}
        env.update({"PRESAFE_HOME": str(home), "PRESAFE_BASE_MODEL": str(e2e.base), "PRESAFE_MERGED_ADAPTER": adapter,
                    "PRESAFE_VLLM_PORT": str(port), "PRESAFE_VLLM_HOST": "127.0.0.1", "PRESAFE_VLLM_ALLOW_NO_KEY": "1",
                    "PRESAFE_VLLM_MAX_MODEL_LEN": "1024", "VLLM_CPU_KVCACHE_SPACE": "1"})
        self.log_path = root / f"pod-{adapter}.log"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, str(START_VLLM), "--merged"], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

    wait_ready = VLLMServer.wait_ready  # the same readiness wait (its proc, url, log_path)

    def served_names(self) -> list[str]:
        return [m["id"] for m in httpx.get(f"{self.url}/v1/models", timeout=30).json()["data"]]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture
def cluster(vllm_server, tiny_llm_dir, tiny_adapter_dir, tmp_path):
    api = FakeApiServer(tmp_path)
    ports = [free_port(), free_port()]  # the pods' addresses (the headless Service's DNS answer)
    e2e = E2E(vllm_server, tmp_path, tiny_llm_dir, tiny_adapter_dir)
    e2e.gateway.env.update({"PRESAFE_MERGED_URL": ",".join(f"http://127.0.0.1:{p}" for p in ports),
                            "PRESAFE_MERGED_DEPLOYMENT": NAME, "PRESAFE_K8S_NAMESPACE": NAMESPACE,
                            "KUBECONFIG": str(api.kubeconfig), "PRESAFE_REPLICA_HEALTH_S": "0.5"})
    e2e.gateway.env.pop("KUBERNETES_SERVICE_HOST", None)
    pods: list[MergedPod] = []
    try:
        yield e2e, api, ports, pods
    finally:
        for pod in pods:
            pod.kill()
        e2e.close()
        api.close()


def serving(e2e: E2E) -> dict:
    return e2e.admin("GET", "/adapters", timeout=300).json()["serving"]


def alias(e2e: E2E, n: int) -> set[str]:
    """``n`` requests on the alias (public client): the models that answered; every one must succeed."""
    client = e2e.client()
    return {client.chat.completions.create(model="presafe", messages=MESSAGES, max_tokens=4).model for _ in range(n)}


@pytest.mark.timeout(1800)  # two merged pods start (merge + vLLM) on 2 cores beside the LoRA server
def test_promote_rolls_the_merged_pods_and_the_alias_follows(cluster, tmp_path):
    e2e, api, ports, pods = cluster
    e2e.start(stored=2)  # v1 promoted: answered through LoRA until a merged pod serves it
    v1, v2 = e2e.name(1), e2e.name(2)
    wait_until(lambda: api.annotation == v1, timeout=60, what="the admin names v1 in the pod template")
    assert serving(e2e)["mode"] == "lora"

    # the kubelet starts a pod on what the template names
    pods.append(MergedPod(e2e, api.annotation, ports[0], tmp_path))
    pods[0].wait_ready(900)
    assert pods[0].served_names() == [v1]  # the adapter's name only: never the unaligned base
    api.rolled()
    wait_until(lambda: serving(e2e)["mode"] == "merged", timeout=60, what="v1 served merged")
    # the admin reads the Deployment every PRESAFE_WATCH_S (1 s here)
    wait_until(lambda: serving(e2e)["rollout"]["complete"], timeout=30, what="the rollout complete")
    assert serving(e2e)["rollout"]["adapter"] == v1
    lora_before, pod_before = served_requests(e2e.vllm.url), served_requests(pods[0].url)
    assert alias(e2e, 4) == {v1}
    assert served_requests(pods[0].url) - pod_before == 4 and served_requests(e2e.vllm.url) == lora_before

    # promote v2: the template names it at once; until a pod serves it the alias goes through LoRA
    resp = e2e.admin("POST", f"/adapters/{v2}/promote")
    assert resp.status_code == 200, resp.text
    assert api.annotation == v2 and api.patches[-1][0] == "application/merge-patch+json"
    status = serving(e2e)
    assert status["mode"] == "lora" and v2 in status["reason"] and status["rollout"]["complete"] is False
    lora_before, pod_before = served_requests(e2e.vllm.url), served_requests(pods[0].url)
    assert alias(e2e, 4) == {v2}
    assert served_requests(e2e.vllm.url) - lora_before == 4 and served_requests(pods[0].url) == pod_before

    # the surge pod on v2 comes up beside the old one; then the old one goes
    pods.append(MergedPod(e2e, api.annotation, ports[1], tmp_path))
    pods[1].wait_ready(900)
    wait_until(lambda: serving(e2e)["mode"] == "merged", timeout=60, what="v2 served merged")
    assert serving(e2e)["rollout"]["complete"] is False  # the old pod still runs
    pods[0].kill()
    api.rolled()
    wait_until(lambda: serving(e2e)["rollout"]["complete"], timeout=60, what="the rollout complete")
    lora_before, pod_before = served_requests(e2e.vllm.url), served_requests(pods[1].url)
    assert alias(e2e, 4) == {v2}
    assert served_requests(pods[1].url) - pod_before == 4 and served_requests(e2e.vllm.url) == lora_before

    # the merged pod dies: requests that had not started go to the LoRA replicas, none fails
    pods[1].kill()
    assert alias(e2e, 6) == {v2}
    wait_until(lambda: serving(e2e)["mode"] == "lora", timeout=30, what="the dead pod ejected")
