"""`lorafleet adapters ls | get | versions | pull | alias`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from lorafleet.api.registry.v1 import registry_pb2 as pb
from lorafleet.cli.failures import fail
from lorafleet.cli.targets import address_options, resolve_address
from lorafleet.client.registry import RegistryClient, parse_selector
from lorafleet.core.errors import LorafleetError

console = Console()


def _client(options: dict[str, Any]) -> RegistryClient:
    return RegistryClient(resolve_address(options["registry"], "registry", options["cluster_file"]))


def _fail(err: LorafleetError) -> None:
    fail(console, err)


@click.group("adapters")
def adapters_group() -> None:
    """Adapters and their versions in the registry."""


@adapters_group.command("ls")
@click.option("--experiment", default="", help="Only this experiment's adapters.")
@address_options
def ls_command(experiment: str, **options: Any) -> None:
    """List adapters."""
    with _client(options) as client:
        try:
            adapters = client.list_adapters(experiment_id=experiment)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        click.echo(json.dumps([json_format.MessageToDict(a) for a in adapters], indent=2))
        return
    table = Table(title="adapters")
    for column in ("adapter", "experiment", "base model", "rank", "alpha", "latest"):
        table.add_column(column)
    for a in adapters:
        table.add_row(
            a.adapter_id,
            a.experiment_id or "-",
            a.base_model,
            str(a.lora.rank),
            f"{a.lora.alpha:g}",
            str(a.latest_version),
        )
    console.print(table)


@adapters_group.command("get")
@click.argument("selector")
@address_options
def get_command(selector: str, **options: Any) -> None:
    """Resolve ADAPTER[@VERSION|@ALIAS|@latest] and show the version."""
    with _client(options) as client:
        try:
            resolved = client.resolve(selector)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        click.echo(json.dumps(json_format.MessageToDict(resolved), indent=2, sort_keys=True))
        return
    v = resolved.version
    console.print(
        f"[bold]{v.name}[/bold] {pb.VersionState.Name(v.state)} "
        f"step {v.training_step} parent {v.parent_version}"
    )
    console.print(f"  sha256 {v.sha256}  {v.size_bytes} bytes  aliases {list(v.aliases)}")
    for uri in v.uris:
        console.print(f"  {uri}")
    for key, value in sorted(v.metrics.items()):
        console.print(f"  {key} = {value:.4g}")


@adapters_group.command("versions")
@click.argument("adapter_id")
@address_options
def versions_command(adapter_id: str, **options: Any) -> None:
    """List an adapter's versions."""
    with _client(options) as client:
        try:
            versions = client.list_versions(adapter_id)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        click.echo(json.dumps([json_format.MessageToDict(v) for v in versions], indent=2))
        return
    table = Table(title=f"{adapter_id} versions")
    for column in ("version", "state", "step", "reward", "aliases", "size"):
        table.add_column(column)
    for v in versions:
        table.add_row(
            str(v.version),
            pb.VersionState.Name(v.state).removeprefix("VERSION_STATE_"),
            str(v.training_step),
            f"{v.metrics.get('reward_mean', 0.0):.3f}",
            ",".join(v.aliases),
            str(v.size_bytes),
        )
    console.print(table)


@adapters_group.command("pull")
@click.argument("selector")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="Directory to write (default ./<adapter>-v<N>).",
)
@address_options
def pull_command(selector: str, out_dir: Path | None, **options: Any) -> None:
    """Download a version as a PEFT directory (checked against its sha256)."""
    with _client(options) as client:
        try:
            version = client.resolve(selector).version
            dest = out_dir or Path(f"{version.adapter_id}-v{version.version}")
            path = client.download_version(version.adapter_id, version.version, dest)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        click.echo(
            json.dumps({"path": str(path), "version": version.version, "sha256": version.sha256})
        )
    else:
        console.print(
            f"pulled {version.name} into {path} "
            "(load with peft.PeftModel.from_pretrained(base, path))"
        )


@adapters_group.command("alias")
@click.argument("selector")
@click.argument("alias")
@address_options
def alias_command(selector: str, alias: str, **options: Any) -> None:
    """Point ALIAS at ADAPTER@VERSION (e.g. `adapters alias exp-1@7 best`)."""
    parsed = parse_selector(selector)
    with _client(options) as client:
        try:
            version = client.resolve(parsed).version
            client.set_alias(parsed.adapter_id, alias, version.version)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        click.echo(
            json.dumps({"adapter": parsed.adapter_id, "alias": alias, "version": version.version})
        )
    else:
        console.print(f"{parsed.adapter_id}@{alias} -> version {version.version}")
