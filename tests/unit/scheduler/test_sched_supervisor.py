"""The supervisor reads queued experiments from the store only while one waits:
an idle or fully placed cluster costs no store reads, and an experiment that
cannot be placed yet is looked at again on every tick."""

from __future__ import annotations

import asyncio
import time

import pytest

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.core.database import Database
from lorafleet.scheduler import service as service_module
from lorafleet.scheduler.config import SchedulerSettings
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.store import SchedulerStore
from lorafleet.scheduler.types import ExperimentRecord

TICK_S = 0.02


class CountingStore(SchedulerStore):
    """The real SQLite store, counting the supervisor's reads of queued experiments."""

    def __init__(self, db: Database) -> None:
        super().__init__(db)
        self.queued_reads = 0

    async def list_experiments(self, states, **kwargs):  # type: ignore[no-untyped-def]
        if list(states) == [pb.EXPERIMENT_STATE_QUEUED]:
            self.queued_reads += 1
        return await super().list_experiments(states, **kwargs)


class UnusedRegistry:
    """No experiment is placed here, so the registry is never called; only closed."""

    async def close(self) -> None:
        pass


@pytest.fixture
async def store(tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(service_module, "SUPERVISOR_TICK_S", TICK_S)
    db = Database(f"sqlite:///{tmp_path}/scheduler.db")
    store = CountingStore(db)
    await store.create_tables()
    yield store
    await db.dispose()


async def _run_supervisor(store: CountingStore, until) -> int:  # type: ignore[no-untyped-def]
    """Run a real scheduler's supervisor until ``until(ticks)`` holds (10 s at most,
    so a loaded machine slows the test instead of failing it); its tick count."""
    sched = Scheduler(store, UnusedRegistry(), SchedulerSettings())  # type: ignore[arg-type]
    ticks = 0
    check_nodes = sched._check_nodes

    async def counted_check_nodes() -> None:
        nonlocal ticks
        ticks += 1
        await check_nodes()

    sched._check_nodes = counted_check_nodes  # type: ignore[method-assign]
    await sched.start()
    try:
        deadline = time.monotonic() + 10.0
        while not until(ticks) and time.monotonic() < deadline:
            await asyncio.sleep(TICK_S)
    finally:
        await sched.close()
    return ticks


async def test_an_idle_scheduler_does_not_read_the_store_every_tick(store):
    ticks = await _run_supervisor(store, until=lambda ticks: ticks >= 20)
    assert ticks >= 20
    assert store.queued_reads == 0


async def test_a_waiting_experiment_is_looked_at_again_every_tick(store):
    spec = pb.ExperimentSpec(base_model="tiny")
    spec.environment.builtin.task = "count"
    await store.insert_experiment(
        ExperimentRecord("exp-waiting", spec, adapter_id="exp-waiting", create_time=time.time())
    )
    # No node serves it, so it stays queued and the supervisor keeps trying.
    await _run_supervisor(store, until=lambda ticks: store.queued_reads >= 5)
    assert store.queued_reads >= 5
    assert (await store.get_experiment("exp-waiting")).state == pb.EXPERIMENT_STATE_QUEUED
