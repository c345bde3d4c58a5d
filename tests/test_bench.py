"""The overhead benches judge their targets: a miss is a non-zero exit (``--report-only``: 0)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gateway_overhead
import train_overhead


def row(stream=True, ratio=0.99, added=1.0) -> dict:
    return {"stream": stream, "concurrency": 1, "tok_s_ratio": ratio, "added_ttft_p50_ms": added}


def test_gateway_overhead_targets():
    assert gateway_overhead.missed_targets([row(), row(stream=False)], fake=False) == []
    assert gateway_overhead.missed_targets([row(ratio=0.96)], fake=False) == [
        "streamed c=1: tokens/s ratio 0.960 < 0.97"]
    assert gateway_overhead.missed_targets([row(ratio=0.2)], fake=True) == []  # a fake's tokens/s is no model's
    assert gateway_overhead.missed_targets([row(added=5.01, stream=False)], fake=True) == [
        "non-streamed c=1: added median latency 5.01 ms > 5 ms"]
    assert gateway_overhead.missed_targets([row(added=2.0)], fake=True, max_added_ms=1.5) != []


def test_train_overhead_targets():
    assert train_overhead.missed_targets({"step_time_ratio": 1.2, "peak_memory_ratio": 1.1}) == []
    assert train_overhead.missed_targets({"step_time_ratio": 1.21}) == ["step-time ratio 1.210 > 1.2"]
    assert train_overhead.missed_targets({"step_time_ratio": 1.0, "peak_memory_ratio": 1.15}) == [
        "peak-memory ratio 1.150 > 1.1"]


@pytest.mark.parametrize("extra, code", [([], 1), (["--report-only"], 0)])
def test_gateway_overhead_against_a_fake_upstream_exits_on_a_miss(tmp_path, extra, code):
    """The whole bench, a real gateway process before the in-process fake vLLM; a target nothing can meet
    (an added latency below -1 ms) is missed: exit 1, or 0 with --report-only."""
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gateway_overhead.py"), "--fake-upstream", "--rounds", "2",
                           "--warmup", "1", "--requests-per-round", "3", "--max-tokens", "5", "--max-added-ms", "-1",
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "PRESAFE_HOME": str(tmp_path / "home")})
    assert proc.returncode == code, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())
    assert [(r["stream"], r["concurrency"], r["rounds"]) for r in rows] == [(True, 1, 2), (False, 1, 2)]
    assert all(r["gateway_tok_s"] > 0 and r["direct_tok_s"] > 0 for r in rows)  # 5 tokens counted each way
    assert "NOT met: streamed c=1: added median latency" in proc.stdout
