"""The supervisor's health probes of static nodes: at the heartbeat's pace, not at
every tick; a silent node is probed once more before it is declared lost; a lost
node that answers again is ready again."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.scheduler import service as service_module
from lorafleet.scheduler.config import SchedulerSettings
from lorafleet.scheduler.service import SUPERVISOR_TICK_S, Scheduler
from lorafleet.scheduler.types import NodeRecord


@dataclass
class ProbedNode:
    """A node handle whose health the test sets, counting the probes."""

    record: NodeRecord
    healthy: bool = True
    probes: int = 0
    probed_at: float = 0.0
    experiments: set[str] = field(default_factory=set)

    @property
    def node_id(self) -> str:
        return self.record.node_id

    async def alive(self) -> bool:
        self.probes += 1
        return self.healthy


class NodeStore:
    def __init__(self) -> None:
        self.states: list[int] = []

    async def update_node(self, node_id: str, **fields: object) -> None:
        self.states.append(int(fields["state"]))  # type: ignore[call-overload]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(service_module.time, "time", clock.time)
    return clock


@pytest.fixture
def scheduler():
    settings = SchedulerSettings(heartbeat_interval_s=2.0, node_timeout_s=10.0)
    sched = Scheduler(NodeStore(), registry=None, settings=settings)  # type: ignore[arg-type]
    lost: list[str] = []

    async def node_lost(handle: ProbedNode) -> None:
        handle.record.state = pb.NODE_STATE_LOST
        lost.append(handle.node_id)

    sched._node_lost = node_lost  # type: ignore[method-assign]
    sched.lost = lost  # type: ignore[attr-defined]
    yield sched
    sched.metrics.close()


def _static_node(now: float) -> ProbedNode:
    record = NodeRecord("node-0", "r:1", "t:1", "tiny", slots=8, max_rank=16,
                        last_heartbeat=now, static=True)
    return ProbedNode(record)


async def _ticks(sched: Scheduler, clock: Clock, seconds: float) -> None:
    for _ in range(round(seconds / SUPERVISOR_TICK_S)):
        clock.now += SUPERVISOR_TICK_S
        await sched._check_nodes()


async def test_a_healthy_static_node_is_probed_at_the_heartbeat_pace(scheduler, clock):
    node = _static_node(clock.now)
    scheduler.nodes[node.node_id] = node
    await _ticks(scheduler, clock, 20.0)  # 80 supervisor ticks
    assert node.probes == 10  # one per heartbeat interval (2 s), not one per tick
    assert node.record.state == pb.NODE_STATE_READY
    assert scheduler.lost == []


async def test_a_dead_static_node_is_lost_after_the_timeout_then_found_again(
    scheduler, clock
):
    node = _static_node(clock.now)
    scheduler.nodes[node.node_id] = node
    node.healthy = False
    await _ticks(scheduler, clock, 9.5)
    assert scheduler.lost == []
    probes_before = node.probes
    await _ticks(scheduler, clock, 1.0)
    assert scheduler.lost == ["node-0"]
    # Declared lost only after a probe that found it silent still.
    assert node.probes > probes_before

    node.healthy = True
    await _ticks(scheduler, clock, 2.0)
    assert node.record.state == pb.NODE_STATE_READY
    assert scheduler.store.states == [pb.NODE_STATE_READY]


async def test_a_silent_node_that_answers_the_last_probe_is_not_lost(scheduler, clock):
    node = _static_node(clock.now)
    scheduler.nodes[node.node_id] = node
    await _ticks(scheduler, clock, SUPERVISOR_TICK_S)
    assert node.probes == 1
    # As after a failed node call: the runner zeroes the heartbeat so that the
    # next tick decides, well before the next probe is due; the node is fine by then.
    node.record.last_heartbeat = 0.0
    await _ticks(scheduler, clock, SUPERVISOR_TICK_S)
    assert node.probes == 2
    assert scheduler.lost == []
    assert node.record.last_heartbeat == clock.now


def test_the_probe_keeps_inside_a_short_timeout():
    sched = Scheduler(None, None, SchedulerSettings(heartbeat_interval_s=5.0, node_timeout_s=2.0))  # type: ignore[arg-type]
    try:
        assert sched._probe_interval_s == 0.5
    finally:
        sched.metrics.close()
