"""CoT-ON vs CoT-OFF report: counts per source, markdown, JSON and a real PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.core.assets import AssetError
from training.cli import app
from training.report import build_report, write_cot_report
from training.teacher import Generation, Provenance, Sampling, TeacherRecord


def gen(mode: str, refusal: bool, closed: bool = True) -> Generation:
    prov = Provenance(model="m", backend="vllm", template_mode=mode, judge="pattern",
                      sampling=Sampling(max_tokens=256 if mode == "cot-on" else 128))
    text = "I can't help with that." if refusal else "Sure, here it is."
    return Generation(text=text, answer=text if closed else "", think_closed=closed, refusal=refusal,
                      path="refuse_pre_cot" if refusal else "answer_without_cot", provenance=prov)


def record(i: int, source: str, label: str, on: bool | None, off: bool | None, closed: bool = True) -> TeacherRecord:
    return TeacherRecord(id=f"{source}-{i}", prompt="p", source=source, label=label, split="test",
                         decision="refuse" if label == "harmful" else "comply", teacher={"kind": "labels"},
                         cot_on=None if on is None else gen("cot-on", on, closed),
                         cot_off=None if off is None else gen("cot-off", off))


def sample() -> list[TeacherRecord]:
    # advbench: CoT-ON refuses 1/4, CoT-OFF 3/4 (the paper's pattern); one CoT-ON answer unfinished
    recs = [record(0, "advbench", "harmful", True, True), record(1, "advbench", "harmful", False, True),
            record(2, "advbench", "harmful", False, True), record(3, "advbench", "harmful", False, False, closed=False)]
    recs += [record(i, "freshqa", "benign", False, i == 0) for i in range(5)]
    recs += [record(9, "donotanswer", "harmful", True, None), record(10, "donotanswer", "benign", None, None)]
    return recs


def write(path: Path, recs) -> Path:
    path.write_text("".join(r.model_dump_json(exclude_none=True) + "\n" for r in recs))
    return path


def test_counts_per_source_and_label():
    report = build_report(sample())
    groups = {g.name: g for g in report.groups}
    adv = groups["advbench (harmful)"]
    assert (adv.modes["cot_on"].refused, adv.modes["cot_on"].n, adv.modes["cot_off"].refused) == (1, 4, 3)
    assert adv.modes["cot_on"].unfinished == 1 and adv.teacher_refuse == 4
    assert groups["freshqa (benign)"].modes["cot_off"].rate == pytest.approx(0.2)
    dna = groups["donotanswer (harmful)"]
    assert (dna.modes["cot_on"].n, dna.modes["cot_off"].n) == (1, 0)  # absent parts are not counted
    assert groups["donotanswer (benign)"].prompts == 1
    harmful = report.totals["harmful"]
    assert (harmful.prompts, harmful.modes["cot_on"].refused, harmful.modes["cot_on"].n) == (5, 2, 5)
    assert list(report.totals) == ["harmful", "benign"]
    assert report.models == ["m"] and report.judges == ["pattern"]
    assert adv.modes["cot_off"].ci95() == pytest.approx([0.3006, 0.9544], abs=1e-4)  # Wilson 95% of 3/4
    assert adv.modes["cot_on"].ci95() == pytest.approx([0.0456, 0.6994], abs=1e-4)  # 1/4


def test_writes_markdown_json_and_png(tmp_path):
    teacher = write(tmp_path / "t.jsonl", sample())
    _, paths = write_cot_report(teacher, tmp_path / "out")
    md = paths["md"].read_text()
    assert "| advbench (harmful) | 4 | 4 | 25.0% (1/4; 95% CI 5–70) | 75.0% (3/4; 95% CI 30–95)" in md
    data = json.loads(paths["json"].read_text())
    adv = next(g for g in data["groups"] if g["source"] == "advbench")
    assert adv["CoT-ON"]["refusal_rate"] == 0.25 and adv["CoT-OFF"]["refusal_rate"] == 0.75
    assert adv["CoT-OFF"]["ci95"] == [0.3006, 0.9544]
    assert data["sampling"]["CoT-ON"]["max_tokens"] == 256
    from PIL import Image  # matplotlib's own dependency

    with Image.open(paths["png"]) as img:
        assert img.format == "PNG" and img.width > 500 and img.height > 300


def test_no_generations_is_a_clear_error(tmp_path):
    teacher = write(tmp_path / "t.jsonl", [record(0, "advbench", "harmful", None, None)])
    with pytest.raises(AssetError, match="no CoT-ON or CoT-OFF answers"):
        write_cot_report(teacher, tmp_path / "out")


def test_cli(tmp_path):
    teacher = write(tmp_path / "t.jsonl", sample())
    res = CliRunner().invoke(app, ["train", "report", "--teacher", str(teacher), "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.png").stat().st_size > 1000
    res = CliRunner().invoke(app, ["train", "report", "--teacher", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no teacher output" in res.output
