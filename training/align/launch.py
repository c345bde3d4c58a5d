"""Stage 2 on several processes: the pipeline runs ``presafe train align`` under ``torchrun`` on this machine.

``align.processes`` (``auto``: one per visible GPU) sets how many. The optimizer step keeps
``batch_size × grad_accum`` examples whatever the count (:func:`training.align.train.per_process_batch`), so more processes
change the speed, not the run (``tests/test_distributed_align.py`` checks the losses match one process).
Across nodes the same command runs under the Kubeflow Trainer (``k8s/components/kubeflow-trainer``).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections import deque
from collections.abc import Callable
from pathlib import Path

import yaml

from service.core.config import AlignConfig, PipelineConfig
from service.core.progress import parse_progress_line
from training.align.data import AlignError
from training.align.train import AlignResult

ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `training` and `service` packages
_EXCEPTION = re.compile(r"^(\[rank\d+\]:? )?[\w.]*(Error|Exception)\b.*:")  # "training...AlignError: no classifier"
# torchrun's own lines on a failed worker (glog warnings and errors, then a traceback): the worker's error came first
_LAUNCHER_FAILURE = re.compile(r"^(E\d{4} .*elastic.*failed|W\d{4} .*elastic.*closing signal)")


def resolved_processes(a: AlignConfig) -> int:
    """``align.processes`` as a number: ``auto`` is one per visible GPU (1 without one)."""
    if a.processes != "auto":
        return a.processes
    import torch

    return max(1, torch.cuda.device_count())


def torchrun_command(processes: int, config_file: Path, teacher: Path, classifier: Path, output: Path,
                     log_dir: Path) -> list[str]:
    """``presafe train align`` on ``processes`` local processes (rank 0's console only; every rank's output also
    in ``log_dir``), resuming from ``<output>.checkpoints`` and printing progress lines (:mod:`service.core.progress`)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "--local_ranks_filter", "0", "--log-dir", str(log_dir), "--tee", "3", "-m", "training.cli", "train", "align", "--config", str(config_file),
            "--teacher", str(teacher), "--classifier", str(classifier), "--out", str(output), "--resume",
            "--no-progress", "--progress-lines"]


def train_align_processes(cfg: PipelineConfig, teacher: Path, classifier: Path, output: Path, processes: int,
                          log: Callable[[str], None], report: Callable[[float], None]) -> AlignResult:
    """Run stage 2 on ``processes`` processes; ``report`` gets the fraction of steps done, ``log`` rank 0's
    lines. Returns what :func:`training.align.train.train_align` returns (from the written ``metrics.json``)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    config_file = output.with_name(f"{output.name}.config.yaml")
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=True), encoding="utf-8")
    threads = max(1, (os.cpu_count() or 1) // processes)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    with tempfile.TemporaryDirectory(prefix="presafe-align-logs-") as log_dir:
        cmd = torchrun_command(processes, config_file, teacher, classifier, output, Path(log_dir))
        log(f"{processes} processes: {' '.join(cmd[1:8])} …")
        code, console = _run(cmd, env, log, report)
        metrics_file = output / "metrics.json"
        if code != 0 or not metrics_file.is_file():
            raise AlignError(f"align on {processes} processes failed (exit {code}):\n"
                             + "\n".join(_failure_lines(Path(log_dir)) or console))
    return AlignResult(output, output / "adapter", json.loads(metrics_file.read_text()))


def _run(cmd: list[str], env: dict[str, str], log: Callable[[str], None],
         report: Callable[[float], None]) -> tuple[int, list[str]]:
    """Run the launcher, passing its lines to ``log`` and its progress to ``report``; returns the exit code and
    rank 0's last lines before torchrun's own failure report (the first exception line kept)."""
    tail: deque[str] = deque(maxlen=20)  # the processes' last lines, before torchrun's own failure report
    first_error: str | None = None  # the first exception line: another process's traceback may push it out of tail
    launcher_failed = False
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, bufsize=1)
    try:
        for line in proc.stdout:
            line = line.rstrip()
            event = parse_progress_line(line)
            if event is not None and event.progress is not None:
                report(event.progress)
            elif line.strip():
                launcher_failed = launcher_failed or bool(_LAUNCHER_FAILURE.match(line))
                if not launcher_failed:
                    tail.append(line)
                    if first_error is None and _EXCEPTION.match(line):
                        first_error = line
                log(line)
        code = proc.wait()
    finally:
        if proc.poll() is None:  # the pipeline was stopped: stop the processes too
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return code, _first_error_and_tail(first_error, list(tail))


def _first_error_and_tail(first_error: str | None, tail: list[str]) -> list[str]:
    """``tail``, led by the first exception line when another process's lines pushed it out."""
    return ([first_error] if first_error and first_error not in tail else []) + tail


def _failure_lines(log_dir: Path) -> list[str]:
    """Each rank's first exception line and last lines, from the launcher's per-rank logs. Read on failure because
    the console shows rank 0 only, and the rank that failed first may be another one (rank 0 is then stopped)."""
    lines: list[str] = []
    for file in sorted(log_dir.rglob("*.log"), key=lambda f: (f.parent.name, f.name)):
        rank_lines = [line.rstrip() for line in file.read_text(encoding="utf-8", errors="replace").splitlines()
                      if line.strip() and parse_progress_line(line.rstrip()) is None]
        first_error = next((line for line in rank_lines if _EXCEPTION.match(line)), None)
        if rank_lines:
            lines.append(f"[rank {file.parent.name}, {file.name}]")
            lines += _first_error_and_tail(first_error, rank_lines[-20:])
    return lines
