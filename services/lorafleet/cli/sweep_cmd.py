"""`lorafleet sweep NAME --task T --grid lr=1e-3,3e-3 --grid seed=0,1 [--watch]`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click
from google.protobuf import json_format
from rich.console import Console
from rich.table import Table

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.cli.experiments_cmd import build_spec, spec_source_options, stop_reasons
from lorafleet.cli.failures import fail
from lorafleet.cli.tables import fitted_table
from lorafleet.cli.targets import address_options, resolve_address
from lorafleet.client.scheduler import SchedulerClient
from lorafleet.client.sweep import SWEEP_LABEL, SweepError, Variant, expand, matches, parse_grid
from lorafleet.cluster.progress import follow_live, plot_reward_curves, state_name
from lorafleet.core.errors import LorafleetError
from lorafleet.scheduler.types import TERMINAL_STATES

console = Console()
notes = Console(stderr=True)  # never mixed into --json output


@click.command("sweep")
@click.argument("name")
@click.option(
    "--grid",
    "grid_items",
    multiple=True,
    required=True,
    metavar="KEY=V1,V2,...",
    help="Values of one key (repeatable; one experiment per combination). Keys: lr, seed, "
    "rank, alpha, weight, any AlgorithmSpec field (group_size, kl_coef, ...), "
    "param.NAME for a task parameter, or a dotted ExperimentSpec path.",
)
@spec_source_options
@click.option("--base-model", default=None, help="Default: tiny, or the --init-from adapter's.")
@click.option("--watch", is_flag=True, help="Follow the sweep live, then rank its results.")
@click.option(
    "--plots",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="With --watch: write a reward-curve PNG per experiment here.",
)
@address_options
def sweep_command(
    name, grid_items, spec_file, task, param, steps, init_from, base_model, watch, plots, **options
):  # type: ignore[no-untyped-def]
    """Submit one experiment per combination of --grid values, all at once.

    Ids are NAME-0, NAME-1, ... and every experiment is labelled sweep=NAME (list
    them with `lorafleet ls --label sweep=NAME`). Running the same command again
    submits only what is missing, so an interrupted sweep can be finished and a
    running one followed with --watch.
    """
    base = build_spec(spec_file, task, param, steps, init_from, base_model)
    try:
        variants = expand(name, base, parse_grid(grid_items))
    except SweepError as exc:
        raise click.BadParameter(str(exc), param_hint="--grid / NAME") from exc
    address = resolve_address(options["scheduler"], "scheduler", options["cluster_file"])
    started = time.monotonic()
    # With --json, stdout holds the JSON alone: the live table goes to stderr.
    screen = notes if options["as_json"] else console
    with SchedulerClient(address) as client:
        try:
            experiments = _submit_missing(client, name, variants)
            if watch:
                ids = [v.experiment_id for v in variants]
                results = follow_live(client, ids, screen, started=started, title=f"sweep {name}")
                experiments = [r.experiment for r in results]
                if plots:
                    written = plot_reward_curves(results, plots)
                    screen.print(f"reward curves: {len(written)} PNGs under {plots}")
        except LorafleetError as err:
            fail(console, err)
    if options["as_json"]:
        click.echo(json.dumps([json_format.MessageToDict(e) for e in experiments], indent=2))
    else:
        console.print(results_table(name, variants, experiments))
        by_value = means_table(variants, experiments)
        if by_value is not None:
            console.print(by_value)
        for line in stop_reasons(experiments):
            console.print(line)
        if not watch and not all(e.state in TERMINAL_STATES for e in experiments):
            console.print(
                f"follow it with `lorafleet ls --label {SWEEP_LABEL}={name}`, or run this"
                " command again with --watch"
            )
    if watch and any(e.state == pb.EXPERIMENT_STATE_FAILED for e in experiments):
        raise SystemExit(1)


def _submit_missing(
    client: SchedulerClient, name: str, variants: list[Variant]
) -> list[pb.Experiment]:
    """Submit the variants not yet submitted; every variant's experiment, in order.

    Every missing variant is checked (validate_only) before any is submitted, so
    a bad value in the grid creates nothing.
    """
    existing = {e.experiment_id: e for e in client.list(labels={SWEEP_LABEL: name})}
    for variant in variants:
        found = existing.get(variant.experiment_id)
        if found is not None and not matches(found, variant):
            raise click.ClickException(
                f"sweep {name!r} already has {variant.experiment_id} with other grid values"
                f" ({_labels_shown(found)}); give this grid another name"
            )
    missing = [v for v in variants if v.experiment_id not in existing]
    for variant in missing:
        try:
            client.validate(variant.spec, experiment_id=variant.experiment_id)
        except LorafleetError as err:
            raise type(err)(
                f"{variant.experiment_id} ({_values_shown(variant)}): {err.message}",
                reason=err.reason,
                metadata=err.metadata,
            ) from err
    for variant in missing:
        existing[variant.experiment_id] = client.submit(
            variant.spec,
            experiment_id=variant.experiment_id,
            # A retried or repeated command replays instead of failing.
            request_id=f"sweep:{variant.experiment_id}",
        )
    if len(missing) < len(variants):
        notes.print(f"{len(variants) - len(missing)} already submitted, {len(missing)} new")
    return [existing[v.experiment_id] for v in variants]


def _values_shown(variant: Variant) -> str:
    return " ".join(f"{k}={v}" for k, v in variant.values.items())


def _labels_shown(experiment: pb.Experiment) -> str:
    prefix = f"{SWEEP_LABEL}."
    return " ".join(
        f"{k.removeprefix(prefix)}={v}"
        for k, v in sorted(experiment.spec.labels.items())
        if k.startswith(prefix)
    )


def results_table(name: str, variants: list[Variant], experiments: list[pb.Experiment]) -> Table:
    """The sweep's experiments, best final accuracy first (unevaluated last)."""
    keys = list(variants[0].values) if variants else []
    values = {v.experiment_id: v.values for v in variants}

    def rank(e: pb.Experiment) -> tuple[bool, float]:
        return (not e.HasField("latest_accuracy"), -e.latest_accuracy)

    def accuracy(e: pb.Experiment, field: str) -> str:
        return f"{getattr(e, field):.3f}" if e.HasField(field) else "-"

    rows = []
    for e in sorted(experiments, key=rank):
        evaluated = e.HasField("base_accuracy") and e.HasField("latest_accuracy")
        row_values = values.get(e.experiment_id, {})
        rows.append(
            (
                e.experiment_id,
                *(row_values.get(k, "") for k in keys),
                state_name(e.state),
                f"{e.current_step}/{e.spec.algorithm.max_steps or '∞'}",
                accuracy(e, "base_accuracy"),
                accuracy(e, "latest_accuracy"),
                f"{e.latest_accuracy - e.base_accuracy:+.3f}" if evaluated else "-",
            )
        )
    headers = ("experiment", *keys, "state", "step", "base acc", "acc", "gain")
    return fitted_table(f"sweep {name}", headers, rows)


def means_table(variants: list[Variant], experiments: list[pb.Experiment]) -> Table | None:
    """Mean final accuracy per value of each key that has several (over the
    other keys' values, e.g. seeds); None until an experiment is evaluated."""
    accuracy = {
        e.experiment_id: e.latest_accuracy for e in experiments if e.HasField("latest_accuracy")
    }
    if not accuracy or not variants:
        return None
    rows = []
    for key in variants[0].values:
        values = list(dict.fromkeys(v.values[key] for v in variants))
        if len(values) < 2:
            continue
        for value in values:
            got = [
                accuracy[v.experiment_id]
                for v in variants
                if v.values[key] == value and v.experiment_id in accuracy
            ]
            mean = f"{sum(got) / len(got):.3f}" if got else "-"
            rows.append((f"{key}={value}", mean, str(len(got))))
    if not rows:
        return None
    return fitted_table("mean final accuracy", ("value", "acc", "runs"), rows)
