"""`lorafleet submit | ls | get | watch | pause | resume | cancel | nodes`."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import click
import yaml
from google.protobuf import json_format
from rich import box
from rich.console import Console
from rich.live import Live
from rich.table import Table

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.cli.failures import fail
from lorafleet.cli.tables import fitted_table
from lorafleet.cli.targets import address_options, resolve_address
from lorafleet.client.registry import parse_selector, selector_text
from lorafleet.client.scheduler import SchedulerClient, builtin_spec
from lorafleet.core.errors import InvalidArgument, LorafleetError

console = Console()


def _client(options: dict[str, Any]) -> SchedulerClient:
    address = resolve_address(options["scheduler"], "scheduler", options["cluster_file"])
    return SchedulerClient(address)


def _fail(err: LorafleetError) -> None:
    fail(console, err)


def _state(state: int) -> str:
    return pb.ExperimentState.Name(state).removeprefix("EXPERIMENT_STATE_").lower()


def _accuracy(experiment: pb.Experiment, field: str) -> str:
    return f"{getattr(experiment, field):.2f}" if experiment.HasField(field) else "-"


def _dump(message: Any) -> None:
    click.echo(json.dumps(json_format.MessageToDict(message), indent=2, sort_keys=True))


def experiments_table(experiments: list[pb.Experiment]) -> Table:
    # Reasons follow the table (`print_experiments`), where they may take a whole line.
    rows = []
    for e in experiments:
        env = e.spec.environment
        task = env.builtin.task if env.WhichOneof("kind") == "builtin" else env.remote.address
        if e.spec.HasField("init_from"):
            task += f"\n↳ {selector_text(e.spec.init_from)}"
        rows.append(
            (
                e.experiment_id,
                task,
                _state(e.state),
                e.node_id or "-",
                f"{e.current_step}/{e.spec.algorithm.max_steps or '∞'}",
                str(e.latest_version),
                f"{e.last_step.reward_mean:.3f}",
                f"{_accuracy(e, 'base_accuracy')}→{_accuracy(e, 'latest_accuracy')}",
            )
        )
    headers = ("id", "task", "state", "node", "step", "ver", "reward", "acc")
    return fitted_table("experiments", headers, rows)


def stop_reasons(experiments: list[pb.Experiment]) -> list[str]:
    """Why each experiment that is not running to completion stopped or waits."""
    return [
        f"{e.experiment_id} {_state(e.state)}: {e.state_reason}"
        for e in experiments
        if e.state_reason and e.state != pb.EXPERIMENT_STATE_COMPLETED
    ]


def print_experiments(experiments: list[pb.Experiment]) -> None:
    """The table, then the reasons (they may take whole lines)."""
    console.print(experiments_table(experiments))
    for line in stop_reasons(experiments):
        console.print(line)


def load_spec_file(path: Path) -> pb.ExperimentSpec:
    text = path.read_text()
    data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    try:
        return json_format.ParseDict(data or {}, pb.ExperimentSpec())
    except json_format.ParseError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--spec") from exc


def _selector(ctx: click.Context, param: click.Parameter, text: str) -> Any:
    if not text:
        return None
    try:
        return parse_selector(text)
    except InvalidArgument as exc:
        raise click.BadParameter(
            f"{text!r} is not ADAPTER[@VERSION|@ALIAS] ({exc.message})", ctx, param
        ) from exc


selector_option = click.option(
    "--init-from",
    default="",
    callback=_selector,
    metavar="ADAPTER[@VERSION|@ALIAS]",
    help="Start from this registry version's weights (e.g. another experiment's "
    "`exp-1a2b@best`) instead of fresh LoRA weights; pinned to a version at submit.",
)


def parse_params(values: tuple[str, ...]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--param")
        params[key] = yaml.safe_load(raw)
    return params


def spec_source_options(fn):  # type: ignore[no-untyped-def]
    """--spec FILE, or --task with --param and --steps, and --init-from: where
    `submit` and `sweep` take their (base) spec from."""
    for option in reversed(
        (
            click.option(
                "--spec",
                "spec_file",
                type=click.Path(path_type=Path, exists=True),
                help="ExperimentSpec as YAML or TOML (proto field names).",
            ),
            click.option("--task", help="Built-in task (when no --spec)."),
            click.option("--param", multiple=True, help="Task parameter KEY=VALUE (repeatable)."),
            click.option("--steps", type=int, default=20, show_default=True, help="0 = continual."),
            selector_option,
        )
    ):
        fn = option(fn)
    return fn


def build_spec(  # type: ignore[no-untyped-def]
    spec_file, task, param, steps, init_from, base_model, **builtin_options
) -> pb.ExperimentSpec:
    """The spec `spec_source_options` describe; `builtin_options` go to
    `builtin_spec` when it is built from --task."""
    if spec_file:
        spec = load_spec_file(spec_file)
    elif task:
        spec = builtin_spec(
            task,
            # Empty with --init-from: the source's.
            base_model=base_model or ("" if init_from else "tiny"),
            params=parse_params(param),
            max_steps=steps,
            **builtin_options,
        )
    else:
        raise click.UsageError("give --spec FILE or --task NAME")
    if init_from:
        spec.init_from.CopyFrom(init_from)
    return spec


@click.command("submit")
@spec_source_options
@click.option(
    "--rank", type=int, default=0, help="LoRA rank (0 = 8, or the --init-from adapter's)."
)
@click.option("--lr", type=float, default=0.0, help="Learning rate (0 = default 3e-3).")
@click.option("--group-size", type=int, default=0, help="Samples per prompt (0 = 8).")
@click.option("--prompts-per-step", type=int, default=0, help="0 = 16.")
@click.option("--max-staleness", type=int, default=0, help="Off-policy pipelining depth.")
@click.option(
    "--logprob-gap-every",
    type=int,
    default=0,
    help="On-policy runs: measure logprob_gap (vLLM vs trainer) every N steps "
    "(0 = 10, 1 = every step).",
)
@click.option("--weight", type=float, default=1.0, show_default=True, help="Fair-share weight.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--base-model", default=None, help="Default: tiny, or the --init-from adapter's.")
@click.option("--name", "display_name", default="", help="Display name.")
@click.option("--id", "experiment_id", default="", help="Experiment id (default: generated).")
@address_options
def submit_command(
    spec_file,
    task,
    param,
    steps,
    rank,
    init_from,
    lr,
    group_size,
    prompts_per_step,  # type: ignore[no-untyped-def]
    max_staleness,
    logprob_gap_every,
    weight,
    seed,
    base_model,
    display_name,
    experiment_id,
    **options,
):
    """Submit an experiment; it starts at once on a node with a free slot."""
    spec = build_spec(
        spec_file,
        task,
        param,
        steps,
        init_from,
        base_model,
        rank=rank,
        prompts_per_step=prompts_per_step,
        group_size=group_size,
        learning_rate=lr,
        max_staleness=max_staleness,
        logprob_gap_every=logprob_gap_every,
        weight=weight,
        seed=seed,
        display_name=display_name,
    )
    with _client(options) as client:
        try:
            experiment = client.submit(spec, experiment_id=experiment_id)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        _dump(experiment)
    else:
        origin = (
            f" from {selector_text(experiment.spec.init_from)}"
            if experiment.spec.HasField("init_from")
            else ""
        )
        console.print(
            f"submitted [bold]{experiment.experiment_id}[/bold]{origin} "
            f"({_state(experiment.state)}); follow it with "
            f"`lorafleet watch {experiment.experiment_id}`"
        )


@click.command("ls")
@click.option(
    "--label",
    "labels",
    multiple=True,
    metavar="KEY=VALUE",
    help="Only experiments with this spec label (repeatable; e.g. sweep=lr-grid).",
)
@address_options
def ls_command(labels, **options):  # type: ignore[no-untyped-def]
    """List experiments."""
    wanted = {}
    for item in labels:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--label")
        wanted[key] = value
    with _client(options) as client:
        try:
            experiments = client.list(labels=wanted)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        click.echo(json.dumps([json_format.MessageToDict(e) for e in experiments], indent=2))
    else:
        print_experiments(experiments)


@click.command("get")
@click.argument("experiment_id")
@address_options
def get_command(experiment_id, **options):  # type: ignore[no-untyped-def]
    """Show one experiment."""
    with _client(options) as client:
        try:
            experiment = client.get(experiment_id)
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        _dump(experiment)
    else:
        print_experiments([experiment])


def _lifecycle_action(name: str, method: str, doc: str):  # type: ignore[no-untyped-def]
    @click.command(name, help=doc)
    @click.argument("experiment_id")
    @address_options
    def command(experiment_id, **options):  # type: ignore[no-untyped-def]
        with _client(options) as client:
            try:
                experiment = getattr(client, method)(experiment_id)
            except LorafleetError as err:
                _fail(err)
        if options["as_json"]:
            _dump(experiment)
        else:
            console.print(
                f"{experiment.experiment_id}: {_state(experiment.state)}"
                f" ({experiment.state_reason})"
            )

    return command


pause_command = _lifecycle_action("pause", "pause", "Pause at the next step boundary.")
resume_command = _lifecycle_action("resume", "resume", "Resume a paused experiment.")
cancel_command = _lifecycle_action("cancel", "cancel", "Cancel an experiment.")


def _steps_table(experiment_id: str, rows: list[pb.WatchExperimentResponse], state: str) -> Table:
    # A light box and short headers, so eleven columns of numbers fit an
    # 80-column terminal without truncation.
    table = Table(title=f"{experiment_id} ({state})", box=box.SIMPLE_HEAD, padding=0)
    for column in (
        "step",
        "ver",
        "reward",
        "acc",
        "eval",
        "loss",
        "kl",
        "lp gap",
        "roll ms",
        "train ms",
        "tok/s",
    ):
        table.add_column(column, justify="right", no_wrap=True)
    for event in rows[-20:]:
        m = event.step
        tok_s = m.rollout_tokens / (m.times.step_ms / 1000) if m.times.step_ms else 0.0
        table.add_row(
            str(m.step),
            str(m.adapter_version),
            f"{m.reward_mean:.3f}",
            f"{m.accuracy:.3f}",
            f"{m.eval_accuracy:.3f}" if m.HasField("eval_accuracy") else "",
            f"{m.train.loss:.4f}",
            f"{m.train.kl:.4f}",
            # Measured only on the steps that asked vLLM for sampling logprobs.
            f"{m.train.logprob_gap:.1e}" if m.train.HasField("logprob_gap") else "",
            f"{m.times.rollout_ms:.0f}",
            f"{m.times.train_ms:.0f}",
            f"{tok_s:.0f}",
        )
    return table


@click.command("watch")
@click.argument("experiment_id")
@click.option("--from-step", type=int, default=0, help="Replay steps after this one.")
@address_options
def watch_command(experiment_id, from_step, **options):  # type: ignore[no-untyped-def]
    """Follow an experiment's steps live until it finishes (Ctrl-C to stop)."""
    steps: list[pb.WatchExperimentResponse] = []
    state = "?"
    with _client(options) as client:
        try:
            if options["as_json"]:
                for event in client.watch(experiment_id, from_step=from_step):
                    click.echo(json.dumps(json_format.MessageToDict(event), sort_keys=True))
                return
            with Live(_steps_table(experiment_id, steps, state), console=console) as live:
                for event in client.watch(experiment_id, from_step=from_step):
                    if event.WhichOneof("event") == "step":
                        steps.append(event)
                    else:
                        state = f"{_state(event.lifecycle.state)}: {event.lifecycle.reason}"
                    live.update(_steps_table(experiment_id, steps, state))
        except LorafleetError as err:
            _fail(err)
        except KeyboardInterrupt:
            pass


@click.command("nodes")
@address_options
def nodes_command(**options):  # type: ignore[no-untyped-def]
    """List nodes and their adapter slots."""
    with _client(options) as client:
        try:
            nodes = client.nodes()
        except LorafleetError as err:
            _fail(err)
    if options["as_json"]:
        click.echo(json.dumps([json_format.MessageToDict(n) for n in nodes], indent=2))
        return
    table = Table(title="nodes")
    for column in ("node", "state", "base model", "slots", "max rank", "rollout", "trainer"):
        table.add_column(column)
    for n in nodes:
        table.add_row(
            n.node_id,
            pb.NodeState.Name(n.state).removeprefix("NODE_STATE_").lower(),
            n.base_model,
            f"{n.slots_used}/{n.slots_total}",
            str(n.max_rank),
            n.rollout_address,
            n.trainer_address,
        )
    console.print(table)


COMMANDS = [
    submit_command,
    ls_command,
    get_command,
    watch_command,
    pause_command,
    resume_command,
    cancel_command,
    nodes_command,
]
