"""Stage 2 across processes: `torchrun --nproc_per_node 2` (gloo on CPU) of `presafe train align` on the tiny
models, against one process with the same config (the optimizer step keeps batch_size × grad_accum examples);
warm-up, decision head and resume (through the pipeline's launcher, `align.processes`) included.

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


def config(llm: Path, **align) -> dict:
    return {"models": {"base": str(llm)}, "data": {"max_train_prompts": 8}, "align": {**ALIGN, "batch_size": 4, **align}}


def launch(processes: int, work: Path, llm: Path, teacher: Path, classifier: Path,
           *extra: str) -> subprocess.CompletedProcess:
    config_file = write_yaml(work / f"align-{processes}.yaml", config(llm))
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    launcher = torchrun if processes > 1 else []
    cmd = [sys.executable, *launcher, "-m", "training.cli", "train", "align", "--config", str(config_file), "--teacher", str(teacher),
           "--classifier", str(classifier), "--out", str(work / f"out-{processes}"), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, check=False)


def losses(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log_history.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def runs(tiny_llm_dir, teacher_file, tiny_classifier_dir, tmp_path_factory):  # noqa: F811
    work = tmp_path_factory.mktemp("ddp")
    one = launch(1, work, tiny_llm_dir, teacher_file, tiny_classifier_dir)
    two = launch(2, work, tiny_llm_dir, teacher_file, tiny_classifier_dir)
    return work, one, two


def test_two_processes_train_like_one_on_the_same_global_batch(runs):
    work, one, two = runs
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    single, double = losses(work / "out-1"), losses(work / "out-2")
    assert [r["step"] for r in single] == [r["step"] for r in double] == [1, 2]
    assert single[0]["epoch"] == double[0]["epoch"] == 0.5  # 8 examples, 4 per step: each rank reads 2 of them
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


def test_pipeline_launcher_resumes_on_two_processes(runs, tiny_llm_dir, teacher_file, tiny_classifier_dir):  # noqa: F811
    """The pipeline's align stage with align.processes=2: torchrun of the same command, resuming from the
    shared checkpoint, progress reported per step, rank 0's log only, the result read from metrics.json."""
    from service.core.config import PipelineConfig
    from training.align.launch import train_align_processes

    work, _, two = runs
    assert two.returncode == 0
    cfg = PipelineConfig.model_validate(config(tiny_llm_dir, max_steps=3, processes=2))
    lines, fractions = [], []
    result = train_align_processes(cfg, teacher_file, tiny_classifier_dir, work / "out-2", 2, lines.append,
                                   fractions.append)
    assert result.metrics["steps"] == 3 and result.metrics["resumed_from"].endswith("checkpoint-2")
    assert json.loads((work / "out-2" / "metrics.json").read_text()) == result.metrics
    assert fractions == [1.0]  # steps 1-2 were done before; step 3 of 3 reported as a fraction
    assert sum("resuming from" in line for line in lines) == 1  # one process's console
    assert result.adapter == work / "out-2" / "adapter" and (result.adapter / "adapter_config.json").is_file()


def test_pipeline_launcher_names_the_failure(tmp_path, tiny_llm_dir, teacher_file):  # noqa: F811
    """A stage that fails on its processes raises AlignError with their last lines; nothing is left half written."""
    from service.core.config import PipelineConfig
    from training.align.data import AlignError
    from training.align.launch import train_align_processes

    cfg = PipelineConfig.model_validate(config(tiny_llm_dir, processes=2))
    with pytest.raises(AlignError, match=r"(?s)failed \(exit [1-9].*classifier"):
        train_align_processes(cfg, teacher_file, tmp_path / "no-classifier", tmp_path / "out", 2, lambda _: None,
                              lambda _: None)
    assert not (tmp_path / "out").exists()


def test_a_failure_on_another_rank_than_the_console_s_is_named(tmp_path, tiny_llm_dir, teacher_file, monkeypatch):  # noqa: F811
    """The console shows rank 0 only: when rank 1 fails first and rank 0 is stopped mid-way, the error still
    names rank 1's exception (read from the launcher's per-rank logs). Rank 0 is held back by a sitecustomize."""
    from service.core.config import PipelineConfig
    from training.align.data import AlignError
    from training.align.launch import train_align_processes

    hold = tmp_path / "hold"
    hold.mkdir()
    (hold / "sitecustomize.py").write_text("import os, time\nif os.environ.get('LOCAL_RANK') == '0':\n    time.sleep(300)\n")
    monkeypatch.setenv("PYTHONPATH", str(hold))
    cfg = PipelineConfig.model_validate(config(tiny_llm_dir, processes=2))
    with pytest.raises(AlignError, match=r"(?s)failed \(exit [1-9].*rank 1.*classifier"):
        train_align_processes(cfg, teacher_file, tmp_path / "no-classifier", tmp_path / "out", 2, lambda _: None,
                              lambda _: None)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("batch", "accum", "processes", "expected"), [
    (4, 1, 1, (4, 1)), (4, 1, 2, (2, 1)), (4, 4, 2, (4, 2)), (4, 4, 8, (2, 1)), (8, 2, 4, (4, 1)), (3, 2, 2, (3, 1)),
    (4, 3, 8, None), (1, 1, 2, None)])
def test_processes_share_the_optimizer_step(batch, accum, processes, expected):
    """Each process takes an equal share of batch_size × grad_accum examples per optimizer step."""
    from training.align.data import AlignError
    from training.align.train import per_process_batch

    if expected is None:
        with pytest.raises(AlignError, match=f"multiple of {processes}"):
            per_process_batch(batch, accum, processes)
        return
    micro, steps = per_process_batch(batch, accum, processes)
    assert (micro, steps) == expected and micro * steps * processes == batch * accum and micro <= batch


def test_processes_setting_is_validated():
    from service.core.config import ConfigError, load_config

    assert load_config(None, ["align.processes=auto"]).align.processes == "auto"
    assert load_config(None, ["align.processes=2"]).align.processes == 2
    for bad in ("0", "two"):
        with pytest.raises(ConfigError, match="processes"):
            load_config(None, [f"align.processes={bad}"])
