"""The `lorafleet` command: serve services, run a local cluster, build models."""

from __future__ import annotations

import click

from lorafleet import __version__
from lorafleet.cli.serve import serve_command


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lorafleet")
def cli() -> None:
    """lorafleet: many RL experiments at once on shared, always-hot LLM engines."""


cli.add_command(serve_command)


def _add_commands() -> None:
    from lorafleet.cli.adapters_cmd import adapters_group
    from lorafleet.cli.bench_cmd import bench_group
    from lorafleet.cli.cluster_cmd import demo_command, up_command
    from lorafleet.cli.experiments_cmd import COMMANDS
    from lorafleet.cli.model_cmd import model_group
    from lorafleet.cli.sweep_cmd import sweep_command

    cli.add_command(up_command)
    cli.add_command(demo_command)
    cli.add_command(model_group)
    cli.add_command(adapters_group)
    cli.add_command(bench_group)
    cli.add_command(sweep_command)
    for command in COMMANDS:
        cli.add_command(command)


_add_commands()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
