"""A LoRA adapter merged into its base (``service.adapters.merge``, ``presafe train merge``) on a tiny random model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.core.assets import MANIFEST, verify_manifest, write_manifest
from service.core.formats import ADAPTER_CHAT_TEMPLATE

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"


@pytest.fixture(scope="module")
def tiny_adapter(tiny_llm_dir, tmp_path_factory) -> Path:
    """A rank-4 LoRA on the tiny Llama with non-zero B (so merging changes the weights), its manifest naming the
    base, and a chat template of its own."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-adapter") / "adapter"
    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj"],
                        init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(out, safe_serialization=True)
    (out / ADAPTER_CHAT_TEMPLATE).write_text(TEMPLATE)
    write_manifest(out, version="tiny-v1", base_model=str(tiny_llm_dir))
    return out


def test_merged_logits_equal_base_plus_adapter(tiny_llm_dir, tiny_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from service.adapters.merge import merge_adapter

    out = tmp_path / "merged"
    manifest = merge_adapter(tiny_adapter, None, out, "float32")  # the base the adapter names
    assert manifest["dtype"] == "float32" and manifest["base_model"] == str(tiny_llm_dir)
    assert manifest["kind"] == "merged-lora" and manifest["adapter_version"] == "tiny-v1"
    assert verify_manifest(out) == []
    assert "model.safetensors" in manifest["files"] and MANIFEST not in manifest["files"]
    assert not any("lora" in name for name in json.loads((out / "config.json").read_text()))

    ids = torch.tensor([[1, 520, 1306, 314, 260, 1811, 30, 2]])
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32)
        peft_logits = PeftModel.from_pretrained(base, str(tiny_adapter)).eval()(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_llm_dir, dtype=torch.float32).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(out).eval()
        merged_logits = merged(ids).logits
    assert merged.dtype == torch.float32
    assert (peft_logits - plain).abs().max() > 1e-2  # the adapter does change the model
    assert torch.allclose(merged_logits, peft_logits, atol=1e-4, rtol=0)
    # the chat template the adapter was trained with travels with the merged model
    assert AutoTokenizer.from_pretrained(out).chat_template == TEMPLATE
    assert (out / ADAPTER_CHAT_TEMPLATE).read_text() == TEMPLATE

    # a second merge replaces the first atomically; a tampered file is caught by the manifest
    merge_adapter(tiny_adapter, str(tiny_llm_dir), out, "float32")
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    (out / "config.json").write_text((out / "config.json").read_text() + " ")
    assert verify_manifest(out) == ["config.json: checksum mismatch"]


def test_the_default_merge_is_saved_in_the_dtype_vllm_serves_it_in(tiny_llm_dir, tiny_adapter, tmp_path,
                                                                   monkeypatch):
    """PRESAFE_VLLM_DTYPE=auto: what vLLM's own auto rule loads the (float32) base in, not the base's float32
    (which vLLM would downcast at every load, from twice the disk); an explicit serving dtype is kept."""
    from transformers import AutoConfig
    from vllm.config.model import _get_and_verify_dtype

    from service.adapters.merge import merge_adapter
    from service.core.settings import get_settings

    config = AutoConfig.from_pretrained(tiny_llm_dir)
    assert str(config.torch_dtype) == "torch.float32"
    vllm_auto = str(_get_and_verify_dtype(str(tiny_llm_dir), config, "auto", is_pooling_model=False))
    for setting, expected in (("auto", vllm_auto.removeprefix("torch.")), ("float32", "float32")):
        monkeypatch.setenv("PRESAFE_VLLM_DTYPE", setting)
        get_settings.cache_clear()
        out = tmp_path / setting
        assert merge_adapter(tiny_adapter, None, out)["dtype"] == expected
        saved = json.loads((out / "config.json").read_text())
        assert saved.get("dtype", saved.get("torch_dtype")) == expected
    get_settings.cache_clear()


def test_merge_cli_and_a_bad_adapter_gives_a_clear_error(tiny_llm_dir, tiny_adapter, tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    runner = CliRunner()

    def said(result) -> str:  # rich wraps long lines
        return " ".join(result.output.split())

    result = runner.invoke(app, ["train", "merge", "--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "is not a loadable LoRA adapter" in said(result) and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json")
    result = runner.invoke(app, ["train", "merge", "--adapter", str(broken), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "adapter_config.json" in said(result) and "Traceback" not in result.output

    result = runner.invoke(app, ["train", "merge", "--adapter", str(tiny_adapter), "--out", str(tmp_path / "m"),
                                 "--base", str(tiny_llm_dir)])
    assert result.exit_code == 0, result.output
    assert verify_manifest(tmp_path / "m") == []


def test_merged_weights_are_reused_only_for_the_adapter_they_were_made_from(tiny_llm_dir, tiny_adapter, tmp_path):
    """The serving side (service.engines) merges in a process of its own and reuses a merge only while it is intact
    and made from exactly this adapter's weights."""
    import shutil
    import subprocess
    import sys

    from service.adapters.merge import merged_is_current

    out = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "service.adapters.merge", str(tiny_adapter), str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["kind"] == "merged-lora"
    assert merged_is_current(out, tiny_adapter)

    other = tmp_path / "other-adapter"  # same name on disk, other weights: a stale merge
    shutil.copytree(tiny_adapter, other)
    weights = other / "adapter_model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-4:] = bytes(4)
    weights.write_bytes(bytes(raw))
    assert not merged_is_current(out, other)
    assert not merged_is_current(tmp_path / "missing", tiny_adapter)
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # tampered
    assert not merged_is_current(out, tiny_adapter)

    bad = subprocess.run([sys.executable, "-m", "service.adapters.merge", str(tmp_path / "nope"), str(tmp_path / "o")],
                         capture_output=True, text=True, check=False)
    assert bad.returncode == 1 and "is not a loadable LoRA adapter" in bad.stderr and "Traceback" not in bad.stderr
