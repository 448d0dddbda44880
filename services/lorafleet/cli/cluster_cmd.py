"""`lorafleet up` and `lorafleet demo`: the mesh on one machine."""

from __future__ import annotations

import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from lorafleet.cluster.local import ClusterError, LocalCluster
from lorafleet.cluster.topology import SCHEDULER_SERVICE, scheduler_replicas, start_local_mesh
from lorafleet.core.logging import configure_logging
from lorafleet.core.tls_certs import write_mesh_certs

console = Console(stderr=True)


def _default_run_dir() -> Path:
    return Path("runs") / datetime.now().strftime("cluster-%Y%m%d-%H%M%S")


def _health_table(cluster: LocalCluster) -> Table:
    table = Table(title="lorafleet local cluster")
    for column in ("service", "address", "pid", "health", "log"):
        table.add_column(column)
    health = cluster.health()
    replicas = scheduler_replicas(cluster)
    for name, running in cluster.services.items():
        status = health[name]
        colour = "green" if status == "SERVING" else "red"
        if len(replicas) > 1 and name in replicas and running.process.poll() is None:
            # Replicas: alive, and which one leads.
            leads = cluster.health_of(running.address, SCHEDULER_SERVICE) == "SERVING"
            status = f"{cluster.health_of(running.address)} ({'leader' if leads else 'standby'})"
            colour = "green" if status.startswith("SERVING") else "red"
        table.add_row(
            name,
            running.address if running.port else "-",
            str(running.process.pid),
            f"[{colour}]{status}[/{colour}]",
            str(running.log_path),
        )
    return table


def _start(run_dir: Path, nodes: int, replicas: int = 1, tls: bool = False) -> LocalCluster:
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    certs = write_mesh_certs(run_dir / "tls") if tls else None
    cluster = LocalCluster(run_dir, tls=certs)
    schedulers = "scheduler" if replicas == 1 else f"{replicas} scheduler replicas"
    with console.status(f"starting registry, {nodes} node(s) and {schedulers} in {run_dir} ..."):
        try:
            start_local_mesh(cluster, nodes=nodes, scheduler_replicas=replicas)
        except (ClusterError, KeyboardInterrupt) as exc:
            console.print(f"[red]cluster failed to start:[/red] {exc}")
            cluster.stop_all()
            sys.exit(1)
    return cluster


def _stop(cluster: LocalCluster) -> bool:
    with console.status("stopping services ..."):
        codes = cluster.stop_all()
    clean = all(code == 0 for code in codes.values())
    summary = ", ".join(f"{name}={code}" for name, code in codes.items())
    console.print(f"stopped: {summary}" + ("" if clean else "  [red](unclean exit)[/red]"))
    return clean


@click.command("up")
@click.option(
    "--nodes", type=click.IntRange(min=1), default=1, show_default=True, help="Nodes to start."
)
@click.option(
    "--scheduler-replicas",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Scheduler replicas: one leads, the others stand by; an exited replica is"
    " restarted on its port while another one lives.",
)
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="State and logs.")
@click.option(
    "--tls",
    is_flag=True,
    help="Mutual TLS on every connection, with a throwaway CA and certificate written"
    " under the run directory (tls/); CLI commands find them through cluster.json.",
)
@click.option("--check", is_flag=True, help="Start, print health, stop (exit 1 if any unhealthy).")
def up_command(
    nodes: int, scheduler_replicas: int, run_dir: Path | None, tls: bool, check: bool
) -> None:
    """Start the whole mesh as local processes; Ctrl-C stops it cleanly."""
    configure_logging("console", "warning")
    cluster = _start(run_dir or _default_run_dir(), nodes, scheduler_replicas, tls)
    console.print(_health_table(cluster))
    console.print(f"addresses written to {cluster.run_dir / 'cluster.json'}")
    if cluster.client_tls is not None:
        env = " ".join(f"{k}={v}" for k, v in sorted(cluster.client_tls.as_env().items()))
        console.print(
            "mutual TLS on every connection; CLI commands here read the files from"
            f" cluster.json; other clients: {env}"
        )
    healthy = all(status == "SERVING" for status in cluster.health().values())
    if check:
        clean = _stop(cluster)
        sys.exit(0 if healthy and clean else 1)
    console.print("[bold]running[/bold]; press Ctrl-C to stop")
    stop = {"requested": False}

    def on_signal(signum: int, frame: object) -> None:
        stop["requested"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop["requested"]:
        health = cluster.health()
        for name, status in health.items():
            if not status.startswith("EXITED"):
                continue
            if _restart_replica(cluster, name, status, health):
                continue
            console.print(f"[red]{name} {status}[/red]; see {cluster.services[name].log_path}")
            stop["requested"] = True
        time.sleep(1.0)
    sys.exit(0 if _stop(cluster) else 1)


def _restart_replica(
    cluster: LocalCluster, name: str, status: str, health: dict[str, str]
) -> bool:
    """A scheduler replica exited while another one lives: start the exited one
    again on its port, as a supervisor would. It stands by, unless it finds the
    lease free (its clean stop released it and no replica has taken it yet) and
    leads again. False when it was the last replica."""
    replicas = scheduler_replicas(cluster)
    if name not in replicas or not any(
        not health[other].startswith("EXITED") for other in replicas if other != name
    ):
        return False
    console.print(f"[yellow]{name} {status}[/yellow]; restarting it on its port")
    try:
        cluster.restart(name, ready_when="")
    except ClusterError as exc:
        console.print(f"[red]{name} did not restart:[/red] {exc}")
        return False
    cluster.write_manifest()
    return True


DEMO_TASKS = ("count", "copy", "reverse", "sort")


@click.command("demo")
@click.option("--run-dir", type=click.Path(path_type=Path), default=None, help="State and logs.")
@click.option("--steps", type=int, default=30, show_default=True, help="Steps per experiment.")
@click.option(
    "--tasks",
    default=",".join(DEMO_TASKS),
    show_default=True,
    help="Comma-separated built-in tasks, one experiment each.",
)
def demo_command(run_dir: Path | None, steps: int, tasks: str) -> None:
    """The main job: several concurrent RL experiments on one hot node.

    Builds the tiny model if needed, starts registry + node + scheduler, submits
    one experiment per task, shows live progress, prints base vs final accuracy,
    writes a reward-curve PNG per experiment, stops the cluster, and exits 1 if
    any experiment failed to improve.
    """
    from lorafleet.client.scheduler import SchedulerClient, builtin_spec
    from lorafleet.cluster.progress import final_table, follow_live, plot_reward_curves
    from lorafleet.models.cache import ensure_tiny_model

    configure_logging("console", "warning")
    task_list = [t.strip() for t in tasks.split(",") if t.strip()]
    with console.status("preparing the tiny model (built once, then cached) ..."):
        model_dir = ensure_tiny_model()
    console.print(f"tiny model: {model_dir}")
    cluster = _start(run_dir or _default_run_dir(), nodes=1)
    console.print(_health_table(cluster))
    started = time.monotonic()
    ok = False
    try:
        with SchedulerClient(
            cluster.services["scheduler"].address, tls=cluster.client_tls
        ) as scheduler:
            ids = [
                scheduler.submit(
                    builtin_spec(task, max_steps=steps, seed=index, display_name=f"demo-{task}"),
                    experiment_id=f"demo-{task}",
                ).experiment_id
                for index, task in enumerate(task_list)
            ]
            results = follow_live(scheduler, ids, console, started=started)
            wall_s = time.monotonic() - started
        console.print(final_table(results, wall_s))
        plots = plot_reward_curves(results, cluster.run_dir / "plots")
        console.print("reward curves: " + ", ".join(str(p) for p in plots))
        ok = all(r.improved for r in results)
        if not ok:
            console.print("[red]some experiments did not improve over the base model[/red]")
    except KeyboardInterrupt:
        console.print("interrupted")
    finally:
        _stop(cluster)
    sys.exit(0 if ok else 1)
