"""``lorafleet model ...``: build the tiny model, find cached models."""

from __future__ import annotations

import shutil
from pathlib import Path

import click


@click.group("model")
def model_group() -> None:
    """Build and locate base models."""


@model_group.command("build-tiny")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write the HF-format model into.",
)
@click.option("--seed", default=0, show_default=True, type=int, help="Build seed.")
@click.option("--force", is_flag=True, help="Replace an existing non-empty --out directory.")
def build_tiny(out_dir: Path, seed: int, force: bool) -> None:
    """Build and pre-train the tiny Llama deterministically; print base accuracy."""
    from rich.console import Console
    from rich.table import Table

    from lorafleet.models.tiny import build_tiny_model

    console = Console()
    if out_dir.exists() and any(out_dir.iterdir()):
        if not force:
            raise click.ClickException(f"{out_dir} exists and is not empty (use --force)")
        shutil.rmtree(out_dir)
    with console.status("building the tiny model") as status:
        report = build_tiny_model(out_dir, seed=seed, log=lambda line: status.update(line))

    table = Table(title=f"tiny model -> {report.path}")
    table.add_column("task")
    table.add_column("base accuracy (greedy exact match)", justify="right")
    table.add_column("mean reward", justify="right")
    for name in sorted(report.accuracy):
        table.add_row(name, f"{report.accuracy[name]:.3f}", f"{report.mean_reward[name]:.3f}")
    console.print(table)
    console.print(f"parameters: {report.num_parameters:,}")
    console.print(f"build time: {report.build_seconds:.1f} s")


@model_group.command("path")
def path() -> None:
    """Print the cached tiny model's path, building it first if needed."""
    from lorafleet.models.cache import ensure_tiny_model, is_built, tiny_model_path

    if not is_built(tiny_model_path()):
        click.echo("building the tiny model (once per cache directory)...", err=True)
    click.echo(str(ensure_tiny_model()))
