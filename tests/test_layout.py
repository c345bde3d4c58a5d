"""The code layout's contracts: the import arrows (import-linter, also run by ``make lint``) and the one
``presafe`` command that spans both sides without training importing the service's HTTP layers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], check=False, cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_import_contracts_hold():
    proc = lint_imports(ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 broken" in proc.stdout


def test_a_forbidden_import_breaks_them(tmp_path):
    for part in ("service", "training"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / "service" / "adapters" / "store.py", "a", encoding="utf-8") as fh:
        fh.write("\nimport training.pipeline  # noqa: E402,F401\n")
    with open(tmp_path / "service" / "admin" / "routes.py", "a", encoding="utf-8") as fh:
        fh.write("\nimport service.gateway.proxy  # noqa: E402,F401\n")
    proc = lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "service.adapters.store -> training.pipeline" in proc.stdout
    assert "service.admin.routes -> service.gateway.proxy" in proc.stdout


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_presafe_serve_hands_over_to_the_service_cli():
    presafe = [sys.executable, "-m", "training.cli", "serve"]
    shown = run([*presafe, "--help"])
    assert shown.returncode == 0, shown.stderr
    assert "presafe serve" in shown.stdout and "--train-if-missing" in shown.stdout and "--vllm-url" in shown.stdout
    wrong = run([*presafe, "--no-such-flag"])
    assert wrong.returncode == 2 and "No such option" in wrong.stderr
