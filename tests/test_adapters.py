"""The adapter store: loadability check, versioned publish, promote/rollback, crash consistency."""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from service.adapters.store import (
    AdapterInvalid,
    AdapterNotFound,
    AdapterStore,
    NothingToRollBack,
    check_adapter,
)
from service.core.formats import REGISTRY
from service.core.gate import GateConfig, evaluate_gate


@pytest.fixture
def adapter(tiny_adapter_dir, tmp_path) -> Path:
    """A private copy of the tiny adapter to damage."""
    return Path(shutil.copytree(tiny_adapter_dir, tmp_path / "adapter"))


@pytest.fixture
def store(tmp_path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


def test_check_accepts_a_real_peft_adapter(adapter, tiny_llm_dir):
    path = adapter / "presafe-manifest.json"
    written = json.loads(path.read_text())
    written["metrics"]["harmful"]["refusal_rate"] = 0.8125  # not the fixture trainer's figure: read, not assumed
    path.write_text(json.dumps(written))
    assert check_adapter(adapter, expected_base=str(tiny_llm_dir)) == written


@pytest.mark.parametrize("damage, expected", [
    (lambda d: (d / "adapter_config.json").unlink(), "adapter_config.json is missing"),
    (lambda d: (d / "adapter_config.json").write_text("{not json"), "adapter_config.json does not parse"),
    (lambda d: (d / "adapter_config.json").write_text(json.dumps(
        {**json.loads((d / "adapter_config.json").read_text()), "peft_type": "IA3"})), "expected 'LORA'"),
    (lambda d: (d / "adapter_model.safetensors").unlink(), "adapter_model.safetensors is missing"),
    (lambda d: (d / "adapter_model.safetensors").write_bytes(
        (d / "adapter_model.safetensors").read_bytes()[:-100]), "not readable safetensors"),
    (lambda d: (d / "presafe-manifest.json").unlink(), "presafe-manifest.json is missing"),
])
def test_check_names_the_problem(adapter, damage, expected):
    damage(adapter)
    with pytest.raises(AdapterInvalid) as info:
        check_adapter(adapter)
    assert expected in str(info.value)


def test_check_rejects_nan_weights(adapter):
    path = adapter / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + header_len])
    name, meta = next((k, v) for k, v in header.items() if k != "__metadata__")
    assert meta["dtype"] == "F32"
    start = 8 + header_len + meta["data_offsets"][0]
    data[start:start + 4] = struct.pack("<f", float("nan"))
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterInvalid, match=f"tensor {name} has NaN"):
        check_adapter(adapter)


def test_check_rejects_another_base_model(adapter, tmp_path):
    other = tmp_path / "other-model"
    other.mkdir()
    with pytest.raises(AdapterInvalid, match="does not match the served base model"):
        check_adapter(adapter, expected_base=str(other))


def test_check_verifies_manifest_checksums(adapter):
    from service.core.assets import write_manifest

    manifest = json.loads((adapter / "presafe-manifest.json").read_text())
    (adapter / "presafe-manifest.json").unlink()
    write_manifest(adapter, **manifest)
    check_adapter(adapter)
    (adapter / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text() + " ")
    with pytest.raises(AdapterInvalid, match="adapter_config.json: checksum mismatch"):
        check_adapter(adapter)


def test_publish_versions_promote_and_rollback(store, adapter, tiny_llm_dir):
    v1 = store.publish(adapter, expected_base=str(tiny_llm_dir), job_id="job-1")
    v2 = store.publish(adapter, expected_base=str(tiny_llm_dir), job_id="job-2")
    assert (v1.name, v1.version, v2.name, v2.version) == ("presafe-v1", 1, "presafe-v2", 2)
    assert v2.job_id == "job-2" and v2.trainer_version == "tiny-0" and v2.size_bytes > 0
    assert [a.name for a in store.list()] == ["presafe-v1", "presafe-v2"]
    assert store.promoted() is None

    with pytest.raises(NothingToRollBack):
        store.rollback()
    store.promote("presafe-v1")
    store.promote("presafe-v2")
    registry = json.loads((store.root / REGISTRY).read_text())
    assert registry["promoted"] == "presafe-v2"  # top-level key, read by the gateway
    assert registry["history"] == ["presafe-v1", "presafe-v2"]
    assert [a.name for a in store.list() if a.promoted] == ["presafe-v2"]

    assert store.rollback() == ("presafe-v2", "presafe-v1")
    assert store.promoted() == "presafe-v1"
    with pytest.raises(NothingToRollBack):
        store.rollback()
    with pytest.raises(AdapterNotFound):
        store.promote("presafe-v9")
    with pytest.raises(AdapterNotFound):
        store.get("../etc")
    assert not [p for p in store.root.iterdir() if ".tmp-" in p.name]


def test_publish_of_a_bad_adapter_stores_nothing(store, adapter):
    (adapter / "adapter_config.json").write_text("[]")
    with pytest.raises(AdapterInvalid):
        store.publish(adapter)
    assert store.list() == []
    assert [p.name for p in store.root.iterdir()] == [".lock"]


@pytest.mark.parametrize("plant", ["file-link", "dir-link", "nested-link", "fifo", "output-link"])
def test_publish_never_follows_a_link_out_of_the_trainer_output(store, adapter, tmp_path, plant):
    secret = tmp_path / "secret.txt"
    secret.write_text("admin-only")
    source = adapter
    if plant == "file-link":
        (adapter / "notes.txt").symlink_to(secret)
    elif plant == "dir-link":
        (adapter / "extra").symlink_to(tmp_path, target_is_directory=True)
    elif plant == "nested-link":
        (adapter / "sub").mkdir()
        (adapter / "sub" / "weights.bin").symlink_to(secret)
    elif plant == "fifo":
        os.mkfifo(adapter / "pipe")
    else:
        source = tmp_path / "output"
        source.symlink_to(adapter, target_is_directory=True)
    with pytest.raises(AdapterInvalid, match="symbolic link|not a regular file"):
        store.publish(source)
    assert store.list() == [] and not any(p.name != ".lock" for p in store.root.glob("*"))
    assert not any(p.read_bytes() == b"admin-only" for p in store.root.rglob("*") if p.is_file())


def test_publish_names_are_length_limited_everywhere(store, adapter):
    from pydantic import ValidationError

    from service.adapters.store import AdapterError
    from service.core.config import PublishConfig
    from service.core.formats import NAME_RE

    ok = "n" * 48
    assert PublishConfig(name=ok).name == ok
    for bad in ("n" * 49, "x" * 10_000, "bad/name", "-x", "presafe-v3"):
        with pytest.raises(ValidationError):
            PublishConfig(name=bad)
        with pytest.raises(AdapterError):
            store.publish(adapter, prefix=bad)
    info = store.publish(adapter, prefix=ok)
    for _ in range(2):
        info = store.publish(adapter, prefix=ok)
    assert NAME_RE.match(info.name) and store.exists(info.name)  # every version stays addressable


def test_recover_removes_temp_dirs_and_dangling_registry_entries(store, adapter):
    store.publish(adapter)
    store.publish(adapter)
    store.promote("presafe-v1")
    store.promote("presafe-v2")
    (store.root / ".presafe-v3.tmp-abc").mkdir()
    (store.root / ".registry.json.tmp-xyz").write_text("{")
    shutil.rmtree(store.root / "presafe-v2")  # e.g. removed by hand
    report = store.recover()
    assert sorted(report.removed_temp) == [".presafe-v3.tmp-abc", ".registry.json.tmp-xyz"]
    assert report.dropped == ["presafe-v2"]
    assert report.promoted == "presafe-v1" and store.promoted() == "presafe-v1"
    assert store.read_registry().history == ["presafe-v1"]
    assert store.recover().registry_rewritten is False  # idempotent


def _metrics(refusal=0.9, over=0.05, acc=0.5, base=(0.1, 0.02, 0.5)) -> dict:
    m = {"harmful": {"refusal_rate": refusal}, "benign": {"over_refusal_rate": over}, "arithmetic": {"accuracy": acc}}
    if base is not None:
        m["base"] = {"harmful": {"refusal_rate": base[0]}, "benign": {"over_refusal_rate": base[1]},
                     "arithmetic": {"accuracy": base[2]}}
    return m


def test_gate_absolute_bounds():
    metrics = _metrics(over=0.06, base=(0.1, 0.05, 0.5))
    assert evaluate_gate(GateConfig(), metrics).passed
    result = evaluate_gate(GateConfig(min={"harmful.refusal_rate": 0.95}, max={"benign.over_refusal_rate": 0.05,
                                                                                "missing.metric": 1}), metrics)
    assert not result.passed
    assert result.reasons == ["harmful.refusal_rate=0.9 is below the minimum 0.95",
                              "benign.over_refusal_rate=0.06 is above the maximum 0.05",
                              "metric missing.metric missing from the manifest"]
    assert evaluate_gate(GateConfig(min={"harmful.refusal_rate": 0.5}), metrics).passed


@pytest.mark.parametrize("metrics, reason", [
    (_metrics(refusal=0.04), "harmful.refusal_rate=0.04 is more than 0.05 below the base model's 0.1"),
    (_metrics(over=0.08), "benign.over_refusal_rate=0.08 is more than 0.05 above the base model's 0.02"),
    (_metrics(acc=0.47), "arithmetic.accuracy=0.47 is more than 0.02 below the base model's 0.5"),
    (_metrics(base=None), "no reference value for harmful.refusal_rate (from the base model)"),
    ({"harmful": {"refusal_rate": 0.9}}, "metric benign.over_refusal_rate missing from the manifest"),
    ({}, "metric harmful.refusal_rate missing from the manifest"),
])
def test_the_default_gate_fails_closed(metrics, reason):
    """``{}`` is the default gate: relative to the reference, and a missing figure fails."""
    for gate in (GateConfig(), GateConfig.model_validate({})):
        result = evaluate_gate(gate, metrics)
        assert not result.passed and reason in result.reasons, result.reasons
    assert evaluate_gate(GateConfig(), _metrics()).passed
    assert evaluate_gate(GateConfig(), _metrics(refusal=0.05, over=0.07, acc=0.48)).passed  # within the margins


def test_a_job_gate_tightens_never_loosens():
    operator = GateConfig(refusal_margin=0.02, min={"harmful.refusal_rate": 0.8})
    loose = GateConfig(refusal_margin=1.0, over_refusal_margin=1.0, retention_margin=1.0,
                       min={"harmful.refusal_rate": 0.0}, max={"benign.over_refusal_rate": 0.1})
    got = operator.tightened(loose)
    assert (got.refusal_margin, got.over_refusal_margin, got.retention_margin) == (0.02, 0.05, 0.02)
    assert got.min == {"harmful.refusal_rate": 0.8} and got.max == {"benign.over_refusal_rate": 0.1}
    assert operator.tightened(GateConfig(min={"harmful.refusal_rate": 0.9})).min == {"harmful.refusal_rate": 0.9}


def test_store_gate_compares_with_the_promoted_adapter_and_logs_promotions(store, adapter):
    def publish(**kw):
        manifest = json.loads((adapter / "presafe-manifest.json").read_text())
        manifest["metrics"] = _metrics(**kw)
        (adapter / "presafe-manifest.json").write_text(json.dumps(manifest))
        return store.publish(adapter).name

    v1 = publish(refusal=0.95)
    assert store.gate(v1, GateConfig()).reference_from == "base model"
    store.promote(v1)
    v2 = publish(refusal=0.85)  # far above the base, but 0.10 below the promoted adapter
    result = store.gate(v2, GateConfig())
    assert not result.passed and result.reference_from == f"promoted adapter {v1}"
    assert result.reasons == [f"harmful.refusal_rate=0.85 is more than 0.05 below the promoted adapter {v1}'s 0.95"]
    store.promote(v2, record={"forced": True, "gate": result.reasons})
    store.rollback()
    log = store.read_registry().promotions
    assert [(p["adapter"], p["action"], p.get("forced")) for p in log] == [
        (v1, "promote", False), (v2, "promote", True), (v1, "rollback", None)]
    assert log[1]["gate"] == result.reasons
    assert AdapterStore(store.root).read_registry().promotions == log  # persisted


CRASHER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import service.adapters.store as adapters

    point = sys.argv[3]
    def checkpoint(name):
        if name == point:
            os.kill(os.getpid(), signal.SIGKILL)
    adapters._checkpoint = checkpoint
    store = adapters.AdapterStore(Path(sys.argv[1]))
    info = store.publish(Path(sys.argv[2]))
    store.promote(info.name)
    print("completed", info.name)
""")

CRASH_POINTS = ["publish:copied", "publish:checked", "publish:recorded", "publish:renamed",
                "registry.json:written", "promote:before-registry", "none"]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_during_publish_leaves_a_consistent_store(store, adapter, tiny_llm_dir, tmp_path, point):
    """SIGKILL the publishing process at each step; after recover() the store and alias are consistent."""
    store.publish(adapter)
    store.promote("presafe-v1")
    script = tmp_path / "crasher.py"
    script.write_text(CRASHER)
    proc = subprocess.run([sys.executable, str(script), str(store.root), str(adapter), point],
                          check=False, capture_output=True, text=True, timeout=120)
    if point == "none":
        assert proc.returncode == 0, proc.stderr
    else:
        assert proc.returncode == -signal.SIGKILL, proc.stderr

    reopened = AdapterStore(store.root)
    reopened.recover(expected_base=str(tiny_llm_dir))
    leftovers = [p.name for p in store.root.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []
    for info in reopened.list():  # everything listed is complete and loadable
        check_adapter(Path(info.path), expected_base=str(tiny_llm_dir))
    registry = json.loads((store.root / REGISTRY).read_text())
    assert registry["promoted"] in {a.name for a in reopened.list()}
    assert all(reopened.exists(h) for h in registry["history"])
    expected = "presafe-v2" if point == "none" else "presafe-v1"
    assert registry["promoted"] == expected
    published = point in ("publish:renamed", "registry.json:written", "promote:before-registry", "none")
    assert reopened.exists("presafe-v2") is published
    # the next publish continues the numbering without clashing
    assert reopened.publish(adapter).name == ("presafe-v3" if published else "presafe-v2")


def test_store_does_not_import_torch():
    code = "import sys, service.adapters.store, service.jobs.store, service.jobs.runners; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
