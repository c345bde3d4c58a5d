"""Stage 2 across processes: `torchrun --nproc_per_node 2` (gloo on CPU) of `presafe train align` on the tiny
models, against one process on the same global batch; warm-up, decision head and resume included.

(`accelerate launch --cpu --num_processes 2` starts ONE process on CPU: it exits 0 but trains alone.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_align import teacher_file, tiny_classifier_dir, write_yaml  # noqa: F401 - fixtures

ALIGN = {"lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "grad_accum": 1, "max_steps": 2, "save_steps": 1,
         "decision_head": "linear", "lambda_decision": 5.0, "decision_layers": [-1], "projector_warmup_steps": 1,
         "grad_probe_steps": 0, "max_target_length": 32, "max_prompt_length": 96, "learning_rate": 1e-2,
         "projector_lr": 1e-2, "sft_loss_per": "example", "extra_refuse_prompts": 0, "decision_only_prompts": 0}


def launch(processes: int, batch_size: int, work: Path, llm: Path, teacher: Path, classifier: Path,
           *extra: str) -> subprocess.CompletedProcess:
    config = write_yaml(work / f"align-{processes}.yaml", {
        "models": {"base": str(llm)}, "data": {"max_train_prompts": 8},
        "align": {**ALIGN, "batch_size": batch_size}})
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    launcher = torchrun if processes > 1 else []
    cmd = [sys.executable, *launcher, "-m", "training.cli", "train", "align", "--config", str(config), "--teacher", str(teacher),
           "--classifier", str(classifier), "--out", str(work / f"out-{processes}"), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)


def losses(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_llm_dir, teacher_file, tiny_classifier_dir, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("ddp")
    one = launch(1, 4, work, tiny_llm_dir, teacher_file, tiny_classifier_dir)
    two = launch(2, 2, work, tiny_llm_dir, teacher_file, tiny_classifier_dir)
    return work, one, two


def test_two_processes_train_like_one_on_the_same_global_batch(runs):
    work, one, two = runs
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = losses(work / "out-1"), losses(work / "out-2")
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2]
    assert single[0]["epoch"] == double[0]["epoch"] == 0.5  # 8 examples, 4 per step: each rank reads its half
    assert single[0]["projector_warmup"] == double[0]["projector_warmup"] == 1  # step 1: the head alone
    for a, b in zip(single, double, strict=True):  # per-example means over 2 × 2 rows = over 4 rows
        for key in ("loss", "decision_loss", *(("sft_loss",) if "sft_loss" in a else ())):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-4), (a["step"], key)
    assert "sft_loss" in single[1] and "sft_loss" in double[1]  # step 2 trains LoRA through both losses


def test_only_rank_zero_writes_the_adapter(runs):
    work, _, two = runs
    out = work / "out-2"
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "decision_head").is_dir()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert (two.stdout + two.stderr).count("adapter →") == 1  # one writer, one announcement
    assert not [p for p in work.iterdir() if p.name.startswith(".out-2")]  # no half-written temp dir left


def test_two_processes_resume_from_their_checkpoint(runs, tiny_llm_dir, teacher_file, tiny_classifier_dir):  # noqa: F811
    work, _, two = runs
    assert two.returncode == 0
    again = launch(2, 2, work, tiny_llm_dir, teacher_file, tiny_classifier_dir, "--resume", "--max-steps", "3")
    assert again.returncode == 0, again.stderr[-3000:]
    metrics = json.loads((work / "out-2" / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["resumed_from"].endswith("checkpoint-2")
