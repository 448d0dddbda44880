"""Scheduler metrics from StepMetrics and state changes: per-experiment series,
experiments by state, node slots, and retention of finished experiments."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY

from lorafleet.api.common.v1 import metrics_pb2
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.scheduler import metrics
from lorafleet.scheduler.metrics import SchedulerMetrics
from lorafleet.scheduler.types import NodeRecord


def value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


@dataclass
class FakeNode:
    record: NodeRecord
    experiments: set[str] = field(default_factory=set)


@pytest.fixture
def nodes() -> dict[str, FakeNode]:
    return {}


@pytest.fixture
def sched(nodes):
    m = SchedulerMetrics(lambda: nodes.values())
    yield m
    m.close()


def _exp() -> str:
    return f"exp-{uuid.uuid4().hex[:8]}"


def _step(step: int, *, timed: bool = True, eval_accuracy: float | None = None):
    m = metrics_pb2.StepMetrics(
        step=step,
        adapter_version=step,
        min_policy_version=step - 2,
        reward_mean=0.25 * step,
        reward_std=0.1,
        accuracy=0.5,
        rollout_tokens=100,
        zero_advantage_sequences=3,
    )
    if timed:
        m.times.CopyFrom(
            metrics_pb2.PhaseTimes(
                rollout_ms=300, reward_ms=20, train_ms=150, publish_ms=30,
                queue_wait_ms=40, step_ms=540,
            )
        )
    if eval_accuracy is not None:
        m.eval_accuracy = eval_accuracy
    return m


def test_steps_become_per_experiment_series(sched):
    e = _exp()
    sched.step(e, _step(1))
    sched.step(e, _step(2, eval_accuracy=0.75))
    assert value("lorafleet_experiment_steps_total", experiment=e) == 2
    assert value("lorafleet_experiment_reward_mean", experiment=e) == 0.5
    assert value("lorafleet_experiment_accuracy", experiment=e) == 0.5
    assert value("lorafleet_experiment_eval_accuracy", experiment=e) == 0.75
    assert value("lorafleet_experiment_adapter_version", experiment=e) == 2
    assert value("lorafleet_experiment_policy_lag_versions", experiment=e) == 1
    assert value("lorafleet_experiment_rollout_tokens_total", experiment=e) == 200
    assert value("lorafleet_experiment_zero_advantage_samples_total", experiment=e) == 6
    assert value("lorafleet_experiment_step_seconds_count", experiment=e) == 2
    assert value("lorafleet_experiment_step_seconds_sum", experiment=e) == pytest.approx(1.08)
    assert value("lorafleet_experiment_queue_wait_seconds_sum", experiment=e) == pytest.approx(
        0.08
    )
    for phase, seconds in (("rollout", 0.3), ("reward", 0.02), ("train", 0.15), ("publish", 0.03)):
        assert value(
            "lorafleet_experiment_phase_seconds_sum", experiment=e, phase=phase
        ) == pytest.approx(2 * seconds), phase


def test_adopted_step_without_times_counts_but_is_not_timed(sched):
    e = _exp()
    sched.step(e, _step(1, timed=False))
    assert value("lorafleet_experiment_steps_total", experiment=e) == 1
    assert value("lorafleet_experiment_step_seconds_count", experiment=e) is None
    assert value("lorafleet_experiment_phase_seconds_count", experiment=e, phase="train") is None


def test_experiments_by_state_and_finished(sched):
    a, b = _exp(), _exp()
    running = value("lorafleet_scheduler_experiments", state="RUNNING") or 0
    queued = value("lorafleet_scheduler_experiments", state="QUEUED") or 0
    completed = value("lorafleet_scheduler_experiments_finished_total", state="COMPLETED") or 0
    sched.experiment_state(a, pb.EXPERIMENT_STATE_QUEUED)
    sched.experiment_state(b, pb.EXPERIMENT_STATE_QUEUED)
    sched.experiment_state(a, pb.EXPERIMENT_STATE_RUNNING)
    assert value("lorafleet_scheduler_experiments", state="RUNNING") == running + 1
    assert value("lorafleet_scheduler_experiments", state="QUEUED") == queued + 1
    sched.experiment_state(a, pb.EXPERIMENT_STATE_COMPLETED)
    sched.experiment_state(a, pb.EXPERIMENT_STATE_COMPLETED)  # recorded twice: counted once
    assert value("lorafleet_scheduler_experiments", state="RUNNING") == running
    assert (
        value("lorafleet_scheduler_experiments_finished_total", state="COMPLETED")
        == completed + 1
    )


def test_node_slots_read_at_scrape_time(sched, nodes):
    node_id = f"node-{uuid.uuid4().hex[:6]}"
    nodes[node_id] = FakeNode(
        NodeRecord(node_id, "r:1", "t:1", "tiny", slots=4, max_rank=16), {"x", "y"}
    )
    assert value("lorafleet_scheduler_node_slots_used", node=node_id) == 2
    assert value("lorafleet_scheduler_node_slots_total", node=node_id) == 4
    assert value("lorafleet_scheduler_node_ready", node=node_id) == 1
    nodes[node_id].experiments.add("z")
    nodes[node_id].record.state = pb.NODE_STATE_LOST
    assert value("lorafleet_scheduler_node_slots_used", node=node_id) == 3
    assert value("lorafleet_scheduler_node_ready", node=node_id) == 0
    del nodes[node_id]
    assert value("lorafleet_scheduler_node_slots_used", node=node_id) is None


def test_finished_experiments_series_are_dropped_past_the_limit(sched):
    first = _exp()
    sched.step(first, _step(1, eval_accuracy=0.5))
    sched.experiment_state(first, pb.EXPERIMENT_STATE_FAILED)
    later = [_exp() for _ in range(metrics.FINISHED_SERIES_KEPT)]
    for e in later[:-1]:
        sched.step(e, _step(1))
        sched.experiment_state(e, pb.EXPERIMENT_STATE_COMPLETED)
    # Exactly FINISHED_SERIES_KEPT finished so far: all still exported.
    assert value("lorafleet_experiment_steps_total", experiment=first) == 1
    sched.step(later[-1], _step(1))
    sched.experiment_state(later[-1], pb.EXPERIMENT_STATE_CANCELLED)
    for name in ("lorafleet_experiment_steps_total", "lorafleet_experiment_eval_accuracy",
                 "lorafleet_experiment_step_seconds_count"):
        assert value(name, experiment=first) is None, name
    phase = value("lorafleet_experiment_phase_seconds_count", experiment=first, phase="train")
    assert phase is None
    assert value("lorafleet_experiment_steps_total", experiment=later[0]) == 1
