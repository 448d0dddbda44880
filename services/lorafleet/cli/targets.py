"""Where the CLI finds a running cluster.

Order: an explicit `--scheduler/--registry` flag or its environment variable
(`LORAFLEET_SCHEDULER`, `LORAFLEET_REGISTRY`), else the `cluster.json` that
`lorafleet up` wrote (`--cluster-file` / `LORAFLEET_CLUSTER_FILE`, else the
newest `runs/*/cluster.json` under the current directory). A cluster started
with `lorafleet up --tls` is called with the certificate files its
`cluster.json` names; `LORAFLEET_TLS_*` (`lorafleet.core.tls`) otherwise.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from lorafleet.core.tls import ENV_PREFIX, ClientTls, configure_client_tls


def _newest_manifest() -> Path | None:
    candidates = sorted(Path("runs").glob("*/cluster.json"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve_address(explicit: str | None, service: str, cluster_file: Path | None) -> str:
    if explicit:
        return explicit
    manifest = cluster_file or _newest_manifest()
    if manifest is None or not manifest.is_file():
        raise click.UsageError(
            f"no {service} address: pass --{service} HOST:PORT, set LORAFLEET_{service.upper()},"
            " or start a cluster with `lorafleet up` in this directory"
        )
    entries = json.loads(manifest.read_text())
    if service not in entries:
        raise click.UsageError(f"{manifest} has no {service} entry")
    _adopt_cluster_tls(entries[service])
    if service != "scheduler":
        return entries[service]["address"]
    # Every scheduler replica (`up --scheduler-replicas`): the client then
    # follows whichever leads.
    replicas = sorted(name for name, e in entries.items() if e.get("service") == service)
    return ",".join(entries[name]["address"] for name in replicas)


def _adopt_cluster_tls(entry: dict[str, object]) -> None:
    """A cluster started with `up --tls` names its certificate files: this
    process calls it with them, unless LORAFLEET_TLS_CA_FILE says otherwise."""
    files = entry.get("tls")
    if not isinstance(files, dict) or os.environ.get(f"{ENV_PREFIX}CA_FILE"):
        return
    configure_client_tls(
        ClientTls(
            ca_file=Path(files["ca_file"]),
            cert_file=Path(files["cert_file"]),
            key_file=Path(files["key_file"]),
        )
    )


def address_options(fn):  # type: ignore[no-untyped-def]
    fn = click.option(
        "--cluster-file",
        type=click.Path(path_type=Path, dir_okay=False),
        envvar="LORAFLEET_CLUSTER_FILE",
        default=None,
        help="cluster.json written by `lorafleet up`.",
    )(fn)
    fn = click.option(
        "--registry",
        envvar="LORAFLEET_REGISTRY",
        default=None,
        help="Registry HOST:PORT, or several replicas', comma-separated (calls go to one"
        " that serves).",
    )(fn)
    fn = click.option(
        "--scheduler",
        envvar="LORAFLEET_SCHEDULER",
        default=None,
        help="Scheduler HOST:PORT, or every replica's, comma-separated (calls then go to"
        " the leader and follow a failover).",
    )(fn)
    return click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")(fn)
