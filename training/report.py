"""CoT-ON vs CoT-OFF refusal report (the paper's Figure 1 in spirit), from a teacher output JSONL.

For every (source, label) group of the teacher file: how often the base model refuses with its
chain of thought on and with it off, as judged by the refusal judge the teacher recorded. Written
as ``report.md``, ``report.json`` and ``report.png`` (grouped bar chart, matplotlib Agg backend).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel

from service.core.assets import AssetError
from service.core.labels import REFUSE
from training.evaluate.stats import wilson

MODES = ("cot_on", "cot_off")
MODE_NAMES = {"cot_on": "CoT-ON", "cot_off": "CoT-OFF"}


class ModeStats(BaseModel):
    n: int = 0
    refused: int = 0
    unfinished: int = 0  # cut off inside an unfinished think block (no decision reached)

    @property
    def rate(self) -> float | None:
        return self.refused / self.n if self.n else None

    def ci95(self) -> list[float] | None:
        """Wilson score interval of the refusal rate (:func:`training.evaluate.stats.wilson`)."""
        return wilson(self.refused, self.n)


class GroupStats(BaseModel):
    source: str
    label: str | None
    prompts: int
    teacher_refuse: int  # the teacher's decisions (what the classifier learns)
    modes: dict[str, ModeStats]

    @property
    def name(self) -> str:
        return f"{self.source} ({self.label})" if self.label else self.source


class Report(BaseModel):
    teacher_file: str
    models: list[str]
    judges: list[str]
    sampling: dict[str, dict]
    groups: list[GroupStats]
    totals: dict[str, GroupStats]  # by label: "harmful", "benign"


def build_report(records: Iterable) -> Report:
    """Aggregate :class:`training.teacher.TeacherRecord` s into per-group CoT-ON/OFF refusal counts."""
    groups: dict[tuple[str, str | None], GroupStats] = {}
    totals: dict[str, GroupStats] = {}
    models, judges, sampling = set(), set(), {}
    for rec in records:
        targets = [groups.setdefault((rec.source, rec.label), GroupStats(
            source=rec.source, label=rec.label, prompts=0, teacher_refuse=0,
            modes={m: ModeStats() for m in MODES}))]
        if rec.label:
            targets.append(totals.setdefault(rec.label, GroupStats(
                source="all", label=rec.label, prompts=0, teacher_refuse=0, modes={m: ModeStats() for m in MODES})))
        for g in targets:
            g.prompts += 1
            g.teacher_refuse += rec.decision == REFUSE
            for mode in MODES:
                gen = getattr(rec, mode)
                if gen is None:
                    continue
                stats = g.modes[mode]
                stats.n += 1
                stats.refused += gen.refusal
                stats.unfinished += not gen.think_closed
        for mode in MODES:
            gen = getattr(rec, mode)
            if gen is not None:
                models.add(gen.provenance.model)
                judges.add(gen.provenance.judge)
                sampling[MODE_NAMES[mode]] = gen.provenance.sampling.model_dump()
    ordered = sorted(groups.values(), key=lambda g: (g.label != "harmful", g.source, str(g.label)))
    return Report(teacher_file="", models=sorted(models), judges=sorted(judges), sampling=sampling,
                  groups=ordered, totals=dict(sorted(totals.items(), key=lambda kv: kv[0] != "harmful")))


def _pct(stats: ModeStats) -> str:
    if not stats.n:
        return "–"
    lo, hi = stats.ci95()
    return f"{100 * stats.rate:.1f}% ({stats.refused}/{stats.n}; 95% CI {100 * lo:.0f}–{100 * hi:.0f})"


def to_markdown(report: Report) -> str:
    lines = [
        f"# Refusal rate, CoT-ON vs CoT-OFF: {', '.join(report.models) or 'no generations'}",
        "",
        f"Teacher file: `{report.teacher_file}`; refusal judge: {', '.join(report.judges) or '–'}; sampling: "
        + "; ".join(f"{k} {json.dumps(v)}" for k, v in report.sampling.items()),
        "",
        "| source (label) | prompts | teacher refuses | CoT-ON refusal | CoT-OFF refusal | CoT-ON unfinished |",
        "|---|---:|---:|---|---|---:|",
    ]
    rows = [*report.groups, *report.totals.values()]
    for g in rows:
        name = f"**all ({g.label})**" if g.source == "all" else g.name
        lines.append(f"| {name} | {g.prompts} | {g.teacher_refuse} | {_pct(g.modes['cot_on'])} | "
                     f"{_pct(g.modes['cot_off'])} | {g.modes['cot_on'].unfinished} |")
    lines += ["", ("CoT-ON unfinished: the answer hit the token limit inside its think block (counted as not "
                   "refused: no decision was reached).")]
    return "\n".join(lines) + "\n"


def to_json(report: Report) -> dict:
    def group(g: GroupStats) -> dict:
        return {"source": g.source, "label": g.label, "prompts": g.prompts, "teacher_refuse": g.teacher_refuse,
                **{MODE_NAMES[m]: {**s.model_dump(), "refusal_rate": s.rate, "ci95": s.ci95()}
                   for m, s in g.modes.items()}}

    return {"teacher_file": report.teacher_file, "models": report.models, "judges": report.judges,
            "sampling": report.sampling, "groups": [group(g) for g in report.groups],
            "totals": {k: group(g) for k, g in report.totals.items()}}


def plot(report: Report, path: Path) -> None:
    """Grouped bars: refusal rate per group, CoT-ON beside CoT-OFF, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [*report.groups, *report.totals.values()]
    names = [f"all ({g.label})" if g.source == "all" else g.name for g in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    width = 0.38
    for k, (mode, colour) in enumerate((("cot_on", "#d62728"), ("cot_off", "#1f77b4"))):
        xs = [i + (k - 0.5) * width for i in range(len(rows))]
        rates = [100 * (g.modes[mode].rate or 0) for g in rows]
        cis = [g.modes[mode].ci95() for g in rows]
        err = [[r - 100 * c[0] if c else 0 for r, c in zip(rates, cis, strict=True)],
               [100 * c[1] - r if c else 0 for r, c in zip(rates, cis, strict=True)]]
        bars = ax.bar(xs, rates, width, yerr=err, capsize=3, color=colour, label=MODE_NAMES[mode])
        ax.bar_label(bars, labels=[f"{r:.0f}" if g.modes[mode].n else "–" for r, g in zip(rates, rows, strict=True)],
                     padding=2, fontsize=8)
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel("refusal rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"Refusal with CoT on vs off: {', '.join(report.models) or '?'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_cot_report(teacher_path: Path, out_dir: Path) -> tuple[Report, dict[str, Path]]:
    """Build the report of ``teacher_path`` and write ``report.{md,json,png}`` into ``out_dir``."""
    from training.teacher import iter_teacher

    report = build_report(iter_teacher(teacher_path))
    report.teacher_file = str(teacher_path)
    if not any(g.modes[m].n for g in report.groups for m in MODES):
        raise AssetError(f"{teacher_path} has no CoT-ON or CoT-OFF answers to compare; run the teacher with "
                         f"--cot-on --cot-off")
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "report.md", "json": out_dir / "report.json", "png": out_dir / "report.png"}
    paths["md"].write_text(to_markdown(report), encoding="utf-8")
    paths["json"].write_text(json.dumps(to_json(report), indent=2), encoding="utf-8")
    plot(report, paths["png"])
    return report, paths
