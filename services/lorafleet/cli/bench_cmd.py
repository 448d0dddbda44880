"""`lorafleet bench ...`: the benchmark scripts of `benchmarks/`, behind the CLI.

The scripts stay plain scripts (`python benchmarks/<name>.py` runs the same
thing) and own their options; this command only finds the script in the source
checkout and hands it the rest of the command line, so there is one definition
of every option.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import click

# services/lorafleet/cli/bench_cmd.py -> the checkout root holding benchmarks/.
BENCHMARKS_DIR = Path(__file__).resolve().parents[3] / "benchmarks"


def _load_script(name: str) -> ModuleType:
    path = BENCHMARKS_DIR / f"{name}.py"
    if not path.is_file():
        raise click.ClickException(
            f"{path} not found: `lorafleet bench` runs the scripts of a source checkout "
            "(benchmarks/ next to services/)"
        )
    spec = importlib.util.spec_from_file_location(f"lorafleet_bench_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # Registered before running it: dataclasses and pydantic look their module up.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@click.group("bench")
def bench_group() -> None:
    """Benchmarks: print a table, write JSON (and a plot) under runs/bench/."""


@bench_group.command(
    "throughput",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def throughput_command(args: tuple[str, ...]) -> None:
    """N experiments: all at once on one hot node vs single-tenant cold and warm
    (--help for the options)."""
    module = _load_script("throughput")
    sys.exit(module.main(list(args), prog="lorafleet bench throughput"))
