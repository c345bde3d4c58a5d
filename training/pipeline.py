"""``presafe train run``: the whole PreSafe pipeline, from a config file to a published adapter.

Stages, each resumable (a stage whose output is complete is skipped on a rerun):

1. ``models``     pull the known base model and classifier backbone (no-op for paths / HF ids)
2. ``data``       build the default query pool (unless ``data.pool`` names one)
3. ``teacher``    teacher decisions for every prompt; the base model's CoT-ON answers for the
                  training sample's comply prompts (Path B self-distillation targets)
4. ``classifier`` fine-tune the BERT decision classifier on prompt → teacher decision
5. ``align``      PreSafe LoRA (L_sft + λ·L_decision)
6. ``ablation``   the same with λ = 0 (plain LoRA-SFT), when ``eval.ablation`` is on
7. ``eval``       serve base + adapter(s) with vLLM and run ``presafe eval`` side by side
8. ``publish``    adapter + manifest (version, base model, config, data hashes, metrics):
                  into ``--output`` (the admin job contract), or into the adapter store,
                  promoted when the config's gate passes

Progress: a rich status line per stage for people; when stdout is not a terminal (the admin's job
runner) also one JSON progress line per step (:func:`service.core.progress.emit_progress`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console

from service.core.assets import KNOWN_MODELS, MANIFEST, atomic_dir, pull_model, resolve_model, sha256_file
from service.core.config import ConfigError, PipelineConfig
from service.core.formats import ADAPTER_CLASSIFIER
from service.core.labels import COMPLY
from service.core.progress import emit_progress
from service.core.settings import get_settings

STAGES = ("models", "data", "teacher", "classifier", "align", "ablation", "eval", "publish")
# Share of the whole run each stage takes on the CPU default (for the overall progress figure).
WEIGHTS = {"models": 0.02, "data": 0.01, "teacher": 0.15, "classifier": 0.10, "align": 0.40,
           "ablation": 0.15, "eval": 0.15, "publish": 0.02}
# The config sections each stage's output depends on: a rerun in the same run dir redoes exactly the stages
# whose sections changed (and those after them that read their output: the list is cumulative).
_UPSTREAM = ("models", "data", "teacher")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "teacher": _UPSTREAM, "classifier": (*_UPSTREAM, "classifier"),
    "align": (*_UPSTREAM, "classifier", "align"), "ablation": (*_UPSTREAM, "classifier", "align"),
    "eval": (*_UPSTREAM, "classifier", "align", "eval"),
}


# Settings that change how fast a stage runs, not what it writes: changing them keeps the stage's output.
SPEED_ONLY = {"align": ("processes",)}
# Align settings applied after training (the adapter's operating point, Pipeline._scale): changing them keeps the
# trained adapter, sets its scale again and evaluates it again.
OPERATING_POINT = ("lora_scale", "lora_scale_grid", "lora_scale_min_refusal")


def _outcome(config: dict, section: str):
    """A config section without its :data:`SPEED_ONLY` and :data:`OPERATING_POINT` keys."""
    value = config.get(section)
    if isinstance(value, dict) and section == "align":
        return {k: v for k, v in value.items() if k not in (*SPEED_ONLY[section], *OPERATING_POINT)}
    return value


def _operating_point(config: dict) -> dict:
    align = config.get("align") or {}
    return {k: align.get(k) for k in OPERATING_POINT}


class PipelineError(RuntimeError):
    """The pipeline cannot go on; the message says which stage and why."""


@dataclass
class Progress:
    """One progress display: a line per stage for people, JSON lines for the job runner."""

    stages: tuple[str, ...]
    json_lines: bool = field(default_factory=lambda: not sys.stdout.isatty())
    console: Console = field(default_factory=lambda: Console(stderr=True))
    done_weight: float = 0.0
    started: float = field(default_factory=time.monotonic)

    @property
    def total_weight(self) -> float:
        return sum(WEIGHTS[s] for s in self.stages) or 1.0

    def overall(self, stage: str, fraction: float) -> float:
        return min(1.0, (self.done_weight + WEIGHTS[stage] * fraction) / self.total_weight)

    def begin(self, stage: str) -> None:
        index = self.stages.index(stage) + 1
        self.console.rule(f"[bold cyan]stage {index}/{len(self.stages)}: {stage}")
        self.update(stage, 0.0)

    def update(self, stage: str, fraction: float, **metrics: float) -> None:
        if self.json_lines:
            emit_progress(stage, round(self.overall(stage, fraction), 4), metrics or None)

    def log(self, message: str) -> None:
        self.console.print(f"  [dim]{time.monotonic() - self.started:7.1f}s[/dim] {message}")

    def end(self, stage: str, note: str = "", **metrics: float) -> None:
        self.update(stage, 1.0, **metrics)
        self.done_weight += WEIGHTS[stage]
        self.console.print(f"[green]✓[/green] {stage} {note}")

    def within(self, stage: str, start: float = 0.0, end: float = 1.0) -> Callable[[float], None]:
        """A callback taking a sub-task's fraction done to the stage's ``start..end`` share."""
        return lambda fraction: self.update(stage, start + (end - start) * min(max(fraction, 0.0), 1.0))

    def trainer_callback(self, stage: str):
        """A ``TrainerCallback`` reporting ``global_step / max_steps`` as the stage's progress."""
        from training.align.train import StepFraction

        return StepFraction(self.within(stage))

    def skip(self, stage: str, why: str) -> None:
        self.done_weight += WEIGHTS[stage]
        self.update(stage, 1.0)
        self.console.print(f"[yellow]↷[/yellow] {stage}: {why}")


@dataclass
class RunPaths:
    """Where each stage of a run writes."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def teacher(self) -> Path:
        return self.root / "teacher.jsonl"

    @property
    def classifier(self) -> Path:
        return self.root / "classifier"

    @property
    def align(self) -> Path:
        return self.root / "align"

    @property
    def align_sft(self) -> Path:
        return self.root / "align-sft"

    @property
    def eval(self) -> Path:
        return self.root / "eval"

    @property
    def vllm_log(self) -> Path:
        return self.root / "eval" / "vllm.log"


def copy_classifier(source: Path, target: Path) -> dict[str, str]:
    """The files the gateway needs of a trained classifier (the HF dir, its ONNX export and ``metrics.json``)
    into ``target``, with a fresh manifest; returns their sha256 by relative path."""
    from service.core.assets import write_manifest

    target.mkdir(parents=True)
    for item in sorted(source.iterdir()):
        if item.is_file() and item.name != MANIFEST:
            shutil.copy2(item, target / item.name)
    return write_manifest(target, kind="presafe-classifier")["files"]


def tree_digest(files: dict[str, str]) -> str:
    """One sha256 for a set of files (relative path → sha256)."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _complete(path: Path, marker: str) -> bool:
    return (path / marker).is_file()


async def _all_ready(supervisors: list, timeout: float = 900) -> None:
    """Wait until every vLLM server is ready (they start side by side)."""
    await asyncio.gather(*(s.wait_ready(timeout=timeout) for s in supervisors))


def _write_json(path: Path, data: dict) -> None:
    """Replace ``path`` with ``data`` at once (a stopped run never leaves half a file)."""
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def _file_sha(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None


class Pipeline:
    """Runs the stages of one :class:`PipelineConfig` in a run directory."""

    def __init__(self, cfg: PipelineConfig, run_dir: Path | None = None, progress: Progress | None = None,
                 until: str | None = None):
        """``until``: the last stage to run (the rest are left for a later run in the same run dir)."""
        self.cfg = cfg
        self.paths = RunPaths((run_dir or cfg.run_dir or get_settings().runs_dir / cfg.name).expanduser())
        if until is not None and until not in STAGES:
            raise PipelineError(f"unknown stage {until!r}; stages: {', '.join(STAGES)}")
        last = STAGES.index(until or STAGES[-1])
        wanted = tuple(s for s in STAGES[:last + 1] if s != "ablation" or cfg.eval.ablation)
        self.progress = progress or Progress(wanted)
        self.stages = self.progress.stages
        self.results: dict[str, dict] = {}

    # ------------------------------------------------------------------ run directory

    def prepare(self, fresh: bool = False) -> None:
        """Create the run dir. In a run dir made with another config, the outputs of the stages whose
        config sections changed (:data:`STAGE_SECTIONS`) are discarded so those stages run again; the
        rest are kept. ``fresh`` discards everything."""
        data = self.cfg.model_dump(mode="json")
        if self.paths.root.exists() and fresh:
            shutil.rmtree(self.paths.root)
        elif self.paths.config.is_file():
            try:
                before = yaml.safe_load(self.paths.config.read_text(encoding="utf-8"))
            except yaml.YAMLError:
                before = None
            if not isinstance(before, dict):
                raise PipelineError(f"{self.paths.config} is unreadable; pass --fresh to start the run again")
            for stage, sections in STAGE_SECTIONS.items():
                changed = [s for s in sections if _outcome(before, s) != _outcome(data, s)]
                outputs = [p for p in self.stage_outputs(stage) if p.exists()]
                if changed and outputs:
                    self.progress.log(f"{stage}: config changed in {', '.join(changed)}; running it again")
                    for path in outputs:
                        shutil.rmtree(path) if path.is_dir() else path.unlink()
            if _operating_point(before) != _operating_point(data):
                self._reset_operating_point()
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self.paths.config.write_text(yaml.safe_dump(data, sort_keys=True))

    def _reset_operating_point(self) -> None:
        """The trained adapters stay; their scale is set again (:meth:`_scale`) and the eval runs again."""
        for align in (self.paths.align, self.paths.align_sft):
            metrics_path = align / "metrics.json"
            if metrics_path.is_file():
                metrics = json.loads(metrics_path.read_text())
                if metrics.pop("lora_scale", None) is not None:
                    metrics.pop("calibration", None)
                    _write_json(metrics_path, metrics)
                    self.progress.log(f"align: operating point changed (align.lora_scale*); {align.name} is "
                                      "scaled again, not retrained")
        if self.paths.eval.exists():
            shutil.rmtree(self.paths.eval)

    def stage_outputs(self, stage: str) -> list[Path]:
        """What a stage writes into the run dir (discarded when its config changes)."""
        from training.align.train import checkpoints_dir

        p = self.paths
        return {"teacher": [p.teacher], "classifier": [p.classifier],
                "align": [p.align, checkpoints_dir(p.align)], "ablation": [p.align_sft, checkpoints_dir(p.align_sft)],
                "eval": [p.eval]}.get(stage, [])

    # ------------------------------------------------------------------ stages

    def stage_models(self) -> None:
        for name in (self.cfg.models.base, self.cfg.models.classifier_backbone):
            if name in KNOWN_MODELS:
                pull_model(name, progress=self.progress.log)
        self.progress.end("models")

    def stage_data(self) -> None:
        if self.cfg.data.pool is None:
            from training.data import pull_pool

            pool = pull_pool(seed=self.cfg.data.seed, progress=self.progress.log)
            self.progress.end("data", f"{len(pool.records)} prompts → {pool.path}")
        else:
            path = self.cfg.data.pool_path()
            if not path.is_file():
                raise PipelineError(f"data.pool: no query pool at {path}")
            self.progress.end("data", str(path))

    def _teacher(self, cot_on: bool, cot_off: bool):
        from training.teacher import Teacher, TeacherRun

        run = TeacherRun(model=self.cfg.models.base, seed=self.cfg.data.seed, cot_on=cot_on, cot_off=cot_off)
        return Teacher(self.cfg.teacher, run, self.progress.log)

    def stage_teacher(self) -> None:
        from training.data import load_pool, sft_sample
        from training.teacher import iter_teacher

        records = load_pool(self.cfg.data.pool_path()).records
        kind = self.cfg.teacher.kind
        # 1. the decision of every prompt (the classifier learns them all, reports on test/heldout)
        decisions = self._teacher(cot_on=False, cot_off=kind == "cot-off")
        decisions.run(records, self.paths.teacher, on_progress=self.progress.within("teacher", 0.0, 0.3))
        # 2. the base model's CoT-ON answers (Path B targets) for the prompts of the align sample that
        #    the teacher complies with; Path A (refuse) targets are fixed refusals, no generation needed
        train = [r for r in iter_teacher(self.paths.teacher) if r.split == self.cfg.data.train_split]
        data = self.cfg.data
        comply = {r.id for r in sft_sample(train, data.max_train_prompts, data.seed, data.sft_sources)
                  if r.decision == COMPLY}
        teacher = self._teacher(cot_on=True, cot_off=False)
        try:
            result = teacher.run([r for r in records if r.id in comply], self.paths.teacher,
                                 on_progress=self.progress.within("teacher", 0.3, 1.0))
        finally:
            teacher.close()
        self.progress.end("teacher", f"{result.total} comply prompts of the training sample with CoT-ON answers "
                                     f"({result.written} new, {result.seconds:.0f}s)")

    def stage_classifier(self) -> None:
        if _complete(self.paths.classifier, "metrics.json"):
            self.progress.skip("classifier", f"already trained ({self.paths.classifier})")
            return
        from training.classifier import train_classifier

        result = train_classifier(self.cfg.classifier, self.cfg.models.classifier_backbone, self.paths.teacher,
                                  self.paths.classifier, log=self.progress.log,
                                  callbacks=[self.progress.trainer_callback("classifier")])
        self.results["classifier"] = m = result.metrics
        figures = [f"threshold {m['threshold']:.3f}"]
        for split in ("test", "heldout"):
            if s := m["splits"].get(split):
                pairs = f", pairs {s['pairs']['accuracy']:.2f}" if s.get("pairs") else ""
                figures.append(f"{split} F1 {s['f1']:.2f}{pairs}")
        self.progress.end("classifier", f"{'; '.join(figures)} ({result.seconds:.0f}s)")

    def _align(self, stage: str, cfg: PipelineConfig, output: Path) -> None:
        if _complete(output, "metrics.json") and (output / "adapter" / "adapter_config.json").is_file():
            if "lora_scale" not in json.loads((output / "metrics.json").read_text()):
                self._scale(stage, cfg, output)  # trained, stopped before its operating point was set
            self.progress.skip(stage, f"already trained ({output})")
            return
        from training.align.launch import resolved_processes, train_align_processes
        from training.align.train import train_align

        processes = resolved_processes(cfg.align)
        if processes > 1:
            result = train_align_processes(cfg, self.paths.teacher, self.paths.classifier, output, processes,
                                           log=self.progress.log, report=self.progress.within(stage))
        else:
            result = train_align(cfg, self.paths.teacher, self.paths.classifier, output, log=self.progress.log,
                                 resume=True, callbacks=[self.progress.trainer_callback(stage)])
        self.results[stage] = self._scale(stage, cfg, output)
        losses = {k: v for k in ("final_sft_loss", "final_decision_loss") if (v := result.metrics.get(k)) is not None}
        self.progress.end(stage, f"adapter → {result.adapter} (LoRA scale {self.results[stage]['lora_scale']:g})",
                          **{f"{stage}.{k}": v for k, v in losses.items()})

    def _scale(self, stage: str, cfg: PipelineConfig, output: Path) -> dict:
        """Set the trained adapter's operating point (``align.lora_scale``: fixed, or calibrated on the style-matched
        prompts of ``data.eval_split``); the scale and its calibration go into ``metrics.json``. Idempotent: the
        adapter's ``lora_alpha`` is set from the trained one, never multiplied twice."""
        from training.align.calibrate import write_scale

        a = cfg.align
        metrics_path = output / "metrics.json"
        metrics = json.loads(metrics_path.read_text())
        calibration = None
        scale = a.lora_scale
        if scale == "calibrate":
            write_scale(output / "adapter", a.lora_alpha, 1.0)  # measured from the adapter as trained
            calibration = self._calibrate(stage, cfg, output / "adapter")
            scale = calibration.scale
        write_scale(output / "adapter", a.lora_alpha, float(scale))
        metrics["lora_scale"] = float(scale)
        if calibration is not None:
            metrics["calibration"] = calibration.to_dict()
        _write_json(metrics_path, metrics)
        return metrics

    def _calibrate(self, stage: str, cfg: PipelineConfig, adapter: Path):
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from training.align.calibrate import calibrate_scale
        from training.align.model import load_base_tokenizer, torch_dtype
        from training.teacher import iter_teacher

        sources = set(cfg.classifier.threshold_sources)
        records = [r for r in iter_teacher(self.paths.teacher)
                   if r.split == cfg.data.eval_split and r.source in sources]
        if len({r.decision for r in records}) < 2:
            raise PipelineError(f"align.lora_scale=calibrate: the teacher file has no {cfg.data.eval_split} prompts of "
                                f"both decisions from {', '.join(sorted(sources))} (classifier.threshold_sources)")
        tokenizer = load_base_tokenizer(cfg.models)
        base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.models.base), dtype=torch_dtype(cfg.models.dtype))
        model = PeftModel.from_pretrained(base, adapter).eval()
        self.progress.log(f"{stage}: calibrating the LoRA scale on {len(records)} {cfg.data.eval_split} prompts "
                          f"({', '.join(sorted(sources))}; grid {', '.join(f'{s:g}' for s in cfg.align.lora_scale_grid)})")
        calibration = calibrate_scale(model, tokenizer, records, grid=cfg.align.lora_scale_grid,
                                      min_harmful_refusal=cfg.align.lora_scale_min_refusal, log=self.progress.log)
        self.progress.log(f"{stage}: LoRA scale {calibration.scale:g} ({calibration.seconds:.0f}s)")
        return calibration

    def stage_align(self) -> None:
        self._align("align", self.cfg, self.paths.align)

    def stage_ablation(self) -> None:
        sft = self.cfg.model_copy(deep=True)
        sft.align.lambda_decision = 0.0
        self._align("ablation", sft, self.paths.align_sft)

    def served_adapters(self) -> dict[str, Path]:
        adapters = {"presafe": self.paths.align / "adapter"}
        if "ablation" in self.stages:
            adapters["presafe-sft"] = self.paths.align_sft / "adapter"
        return adapters

    def stage_eval(self) -> None:
        if _complete(self.paths.eval, "eval.json"):
            self.progress.skip("eval", f"already evaluated ({self.paths.eval})")
            return
        from transformers import AutoTokenizer

        from service.core.cot import serving_chat_template, template_text
        from service.vllm_server import VLLMSupervisor
        from training.evaluate.report import write_eval_report
        from training.evaluate.run import EvalJournal, EvalRun, KnownRows, evaluate

        model = resolve_model(self.cfg.models.base)
        template = self.paths.eval / "chat_template.jinja"
        template.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(model)
        served_template = serving_chat_template(tokenizer, self.cfg.models.chat_template and
                                                template_text(self.cfg.models.chat_template))
        template.write_text(served_template)
        adapters = self.served_adapters()
        e = self.cfg.eval
        plan, *merged = self.eval_plans(model, template, adapters)
        supervisors = [VLLMSupervisor(p, get_settings(), self.paths.vllm_log if p is plan else
                                      self.paths.vllm_log.with_name(f"vllm-{p.served_name}.log"))
                       for p in (plan, *merged)]
        self.progress.log(f"starting {len(supervisors)} vLLM server(s) for evaluation (log: {self.paths.vllm_log})")
        for supervisor in supervisors:
            supervisor.start()
        try:
            asyncio.run(_all_ready(supervisors))
            self.progress.update("eval", 0.2)
            models = ["base", *adapters]
            run = EvalRun(base_url=plan.url, models=models, seed=self.cfg.data.seed,
                          model_urls={p.served_name: p.url for p in merged},
                          scoring_concurrency=e.concurrency if e.serve_merged else 1,  # no LoRA engine then
                          ablation={"presafe": "presafe", "sft": "presafe-sft"} if "ablation" in self.stages else None)
            cache = self.base_rows_path(model, served_template) if e.reuse_base else None
            known = KnownRows.load(cache) if cache else None
            if known:
                self.progress.log(f"reusing the base model's answers from {cache}")
            # a stopped eval stage goes on from its finished requests when rerun with the same models and settings
            journal = EvalJournal(self.paths.eval / "responses.partial.jsonl",
                                  self.answers_key(model, served_template, adapters))
            if journal.path.is_file():
                self.progress.log(f"keeping the answers of a stopped eval in {journal.path} (those that still apply)")
            result = evaluate(e, run, pool_path=self.cfg.data.pool_path(), known=known, journal=journal,
                              on_progress=self.progress.within("eval", 0.2, 0.95))
            base_rows = [r for r in result.rows if r.model == "base"]
            if cache and all(r.error is None for r in base_rows):  # failed requests are asked again next time
                KnownRows(base_rows, {"base": result.starts_in_think["base"]}).save(cache)
            write_eval_report(result, self.paths.eval)
            journal.path.unlink(missing_ok=True)  # responses.jsonl has them all now
            shutil.rmtree(self.paths.eval / "merged", ignore_errors=True)  # merged again when the eval reruns
        finally:
            for supervisor in supervisors:
                supervisor.stop()
        self.results["eval"] = json.loads((self.paths.eval / "eval.json").read_text())
        headline = {f"{section}.{name}": value for section, values in self.headline_metrics().items()
                    if section not in ("base", "sft_only") for name, value in values.items() if value is not None}
        self.progress.end("eval", f"report → {self.paths.eval / 'eval.md'}", **headline)

    def eval_plans(self, model: str, template: Path, adapters: dict[str, Path]) -> list:
        """The eval's vLLM servers, the base's first: with ``eval.serve_merged`` each adapter merged on a server of
        its own (as the gateway serves the alias), else one server with the adapters through LoRA. All run the
        serving dtype (``vllm_dtype``, as the gateway does), not ``models.dtype`` (the training one)."""
        from service.vllm_server import EmbeddedPlan, adapter_rank, free_port, lora_rank_bound

        # EmbeddedPlan's own dtype default is the serving dtype: no --dtype from the training config
        common = {"chat_template": template, "think_open": True, "max_model_len": 2048}
        if self.cfg.eval.serve_merged:
            return [EmbeddedPlan(model=model, served_name="base", port=free_port(), lora=False, **common),
                    *(EmbeddedPlan(model=str(self.merged_adapter(name, path, model)), served_name=name,
                                   port=free_port(), lora=False, **common) for name, path in adapters.items())]
        return [EmbeddedPlan(model=model, served_name="base", port=free_port(), adapters=adapters,
                             max_lora_rank=lora_rank_bound([adapter_rank(p) for p in adapters.values()]), **common)]

    def merged_adapter(self, name: str, adapter: Path, model: str) -> Path:
        """``adapter`` merged into the base under ``eval/merged/<name>`` (kept while it is current)."""
        from service.adapters.merge import merge_adapter, merged_is_current

        out = self.paths.eval / "merged" / name
        if not merged_is_current(out, adapter):
            self.progress.log(f"merging {name} into the base for its own vLLM ({out})")
            merge_adapter(adapter, model, out, published=False)  # saved in the serving dtype
        return out

    def base_rows_path(self, model: str, chat_template: str) -> Path:
        """Where the base model's eval answers are kept for reuse: keyed by everything that shapes them
        (model files, served template, dtype, query pool, eval selection and sampling)."""
        key = self.answers_key(model, chat_template, {})
        return get_settings().root / "eval-cache" / f"base-{key[:16]}.jsonl"

    def answers_key(self, model: str, chat_template: str, adapters: dict[str, Path]) -> str:
        """A digest of what shapes the eval's answers: the base model's and ``adapters``' files, the served
        template, dtype, query pool, eval selection and sampling."""
        from vllm import __version__ as vllm_version

        from service.vllm_server import vllm_dtype

        def files(path: str | Path):
            root = Path(path)
            return sorted((str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns)
                          for f in root.rglob("*") if f.is_file()) if root.is_dir() else str(path)

        e = self.cfg.eval
        # the base is served as it is either way: serve_merged shapes the adapters' answers only
        same = {"ablation", "concurrency", "reuse_base", *(() if adapters else ("serve_merged",))}
        key = {"version": 1, "model": files(model), "template": chat_template,
               "dtype": vllm_dtype(get_settings()),
               "pool": _file_sha(self.cfg.data.pool_path()), "seed": self.cfg.data.seed, "vllm": vllm_version,
               "eval": e.model_dump(mode="json", exclude=same)}
        if adapters:
            key["adapters"] = {name: files(path) for name, path in sorted(adapters.items())}
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

    # ------------------------------------------------------------------ publish

    def headline_metrics(self) -> dict:
        """The manifest's ``metrics``: the adapter's headline eval figures (gate paths), base beside them."""
        eval_json = self.paths.eval / "eval.json"
        if not eval_json.is_file():
            return {}
        from training.evaluate.stats import headline

        models = json.loads(eval_json.read_text())["models"]
        metrics = headline(models["presafe"])
        metrics["base"] = headline(models["base"])
        if "presafe-sft" in models:
            metrics["sft_only"] = headline(models["presafe-sft"])
        return metrics

    def manifest(self) -> dict:
        align_metrics = self.paths.align / "metrics.json"
        classifier_metrics = self.paths.classifier / "metrics.json"
        data = {"pool_sha256": _file_sha(self.cfg.data.pool_path()), "teacher_sha256": _file_sha(self.paths.teacher)}
        config = self.cfg.model_dump(mode="json")
        digest = hashlib.sha256(json.dumps({"config": config, "data": data}, sort_keys=True).encode()).hexdigest()
        return {
            "version": f"{self.cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}-{digest[:8]}",
            "base_model": resolve_model(self.cfg.models.base),
            "config": config,
            "data": data,
            "metrics": self.headline_metrics(),
            "training": json.loads(align_metrics.read_text()) if align_metrics.is_file() else {},
            "classifier": json.loads(classifier_metrics.read_text()) if classifier_metrics.is_file() else {},
            "eval_report": str(self.paths.eval / "eval.md"),
        }

    def write_adapter(self, target: Path) -> None:
        """Adapter files, the classifier it was trained with (``classifier/``: the gateway's verdicts for
        this adapter) and the manifest into ``target``, atomically (never a half-written adapter)."""
        with atomic_dir(target) as tmp:
            for item in (self.paths.align / "adapter").iterdir():
                if item.is_file() and not item.is_symlink():  # never a link out of the run dir
                    shutil.copy2(item, tmp / item.name)
            manifest = self.manifest()
            if (self.paths.classifier / "metrics.json").is_file():
                manifest["classifier_files"] = copy_classifier(self.paths.classifier, tmp / ADAPTER_CLASSIFIER)
                manifest["classifier_sha256"] = tree_digest(manifest["classifier_files"])
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))

    def stage_publish(self, output: Path | None) -> None:
        if output is not None:
            self.write_adapter(output)
            # the admin's retrain job stores, gates and promotes it: say so, a CLI user gets no gate verdict here
            self.progress.end("publish", f"adapter → {output} (written only: not stored, gated or promoted)")
            return
        from service.adapters.release import release
        from service.adapters.store import AdapterStore
        from service.core.gate import GateConfig

        staged = self.paths.root / "publish"
        self.write_adapter(staged)
        store = AdapterStore(self.cfg.publish.adapters_dir or get_settings().adapters_dir)
        # the default gate (vs the promoted adapter, else the base), tightened by publish.gate: fails closed
        done = release(store, staged, prefix=self.cfg.publish.name, gate=GateConfig().tightened(self.cfg.publish.gate),
                       expected_base=resolve_model(self.cfg.models.base), run_dir=str(self.paths.root))
        if done.promoted:
            note = f"{done.info.name} published and promoted"
        else:
            note = f"{done.info.name} published, not promoted: {'; '.join(done.verdict.reasons)}"
        self.progress.end("publish", note)

    # ------------------------------------------------------------------ all

    def run(self, output: Path | None = None, fresh: bool = False) -> dict:
        self.prepare(fresh)
        steps: dict[str, Callable[[], None]] = {
            "models": self.stage_models, "data": self.stage_data, "teacher": self.stage_teacher,
            "classifier": self.stage_classifier, "align": self.stage_align, "ablation": self.stage_ablation,
            "eval": self.stage_eval, "publish": lambda: self.stage_publish(output),
        }
        for stage in self.stages:
            self.progress.begin(stage)
            try:
                steps[stage]()
            except (PipelineError, ConfigError):
                raise
            except Exception as exc:  # a stage's own error, named with its stage
                raise PipelineError(f"stage {stage} failed: {type(exc).__name__}: {exc}") from exc
        self.progress.console.print(f"[bold green]done[/bold green] in {time.monotonic() - self.progress.started:.0f}s"
                                    f" — run dir {self.paths.root}")
        return self.headline_metrics()
