"""The scheduler store on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from lorafleet.api.common.v1 import metrics_pb2
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.core.database import Database
from lorafleet.core.errors import AlreadyExists, NotFound
from lorafleet.scheduler.store import SchedulerStore
from lorafleet.scheduler.types import Checkpoint, ExperimentRecord

PG_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request, tmp_path):
    if request.param == "sqlite":
        db = Database(f"sqlite:///{tmp_path}/scheduler.db")
        yield SchedulerStore(db)
        await db.dispose()
        return
    name = f"lorafleet_sched_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(PG_ADMIN_URL)
    try:
        async with admin.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
                sa.text(f"CREATE DATABASE {name}")
            )
    except (OSError, sa.exc.OperationalError, sa.exc.DBAPIError) as exc:
        await admin.dispose()
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}")
    db = Database(f"postgresql://postgres@127.0.0.1:5432/{name}")
    yield SchedulerStore(db)
    await db.dispose()
    async with admin.connect() as conn:
        await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(
            sa.text(f"DROP DATABASE {name}")
        )
    await admin.dispose()


def _record(experiment_id: str) -> ExperimentRecord:
    spec = pb.ExperimentSpec(base_model="tiny")
    spec.environment.builtin.task = "count"
    return ExperimentRecord(experiment_id, spec, adapter_id=experiment_id, create_time=time.time())


async def test_experiment_round_trip_and_duplicates(store):
    await store.create_tables()
    await store.insert_experiment(_record("exp-1"))
    with pytest.raises(AlreadyExists):
        await store.insert_experiment(_record("exp-1"))
    got = await store.get_experiment("exp-1")
    assert got.spec.environment.builtin.task == "count"
    assert got.state == pb.EXPERIMENT_STATE_QUEUED
    with pytest.raises(NotFound):
        await store.get_experiment("nope")


async def test_listing_by_labels_pages_over_the_whole_table(store):
    await store.create_tables()
    for i in range(9):
        record = _record(f"exp-{i}")
        record.spec.labels["sweep"] = "grid" if i % 3 else "other"
        record.spec.labels["seed"] = str(i % 2)
        await store.insert_experiment(record)
    await store.update_experiment("exp-4", state=pb.EXPERIMENT_STATE_COMPLETED)

    def ids(records):
        return [r.experiment_id for r in records]

    grid = ["exp-1", "exp-2", "exp-4", "exp-5", "exp-7", "exp-8"]
    assert ids(await store.list_experiments(labels={"sweep": "grid"})) == grid
    # Pages hold `limit` matches even when non-matching rows lie between them.
    first = await store.list_experiments(labels={"sweep": "grid"}, limit=4)
    assert ids(first) == grid[:4]
    rest = await store.list_experiments(labels={"sweep": "grid"}, after_id="exp-5", limit=4)
    assert ids(rest) == grid[4:]
    both = await store.list_experiments(labels={"sweep": "grid", "seed": "0"})
    assert ids(both) == ["exp-2", "exp-4", "exp-8"]
    queued = await store.list_experiments(
        [pb.EXPERIMENT_STATE_QUEUED], labels={"sweep": "grid", "seed": "0"}
    )
    assert ids(queued) == ["exp-2", "exp-8"]
    assert await store.list_experiments(labels={"sweep": "nope"}) == []


async def test_a_step_is_stored_once_and_advances_the_counter_atomically(store):
    await store.create_tables()
    await store.insert_experiment(_record("exp-2"))
    metrics = metrics_pb2.StepMetrics(step=1, adapter_version=2, reward_mean=0.5)
    assert await store.complete_step("exp-2", metrics, latest_version=2)
    # A replay of the same step changes nothing.
    assert not await store.complete_step("exp-2", metrics, latest_version=99)
    got = await store.get_experiment("exp-2")
    assert (got.current_step, got.latest_version) == (1, 2)
    assert [m.step for m in await store.list_steps("exp-2")] == [1]


async def test_a_step_stores_its_checkpoint_in_the_same_commit(store):
    await store.create_tables()
    await store.insert_experiment(_record("exp-4"))
    first = Checkpoint("file:///state/step-1", "a" * 64, 1)
    assert await store.complete_step(
        "exp-4", metrics_pb2.StepMetrics(step=1), checkpoint=first, latest_version=2
    )
    assert (await store.get_experiment("exp-4")).checkpoint == first
    # A step without a checkpoint keeps the last one.
    assert await store.complete_step("exp-4", metrics_pb2.StepMetrics(step=2), latest_version=3)
    got = await store.get_experiment("exp-4")
    assert (got.current_step, got.checkpoint) == (2, first)
    # A replayed step records neither its metrics nor its checkpoint.
    replayed = Checkpoint("file:///state/step-2-replayed", "b" * 64, 2)
    assert not await store.complete_step(
        "exp-4", metrics_pb2.StepMetrics(step=2), checkpoint=replayed, latest_version=3
    )
    assert (await store.get_experiment("exp-4")).checkpoint == first


async def test_concurrent_duplicate_steps_store_exactly_one(store):
    await store.create_tables()
    await store.insert_experiment(_record("exp-3"))
    metrics = metrics_pb2.StepMetrics(step=1, adapter_version=2)
    results = await asyncio.gather(
        *[store.complete_step("exp-3", metrics, latest_version=2) for _ in range(6)]
    )
    assert sum(results) == 1


async def test_pushed_data_is_consumed_once_in_order(store):
    await store.create_tables()
    await store.insert_experiment(_record("exp-4"))
    pending = await store.push_data("exp-4", [("prompt", {"text": f"p{i}"}) for i in range(5)])
    assert pending == 5
    first = await store.take_data("exp-4", "prompt", 3)
    rest = await store.take_data("exp-4", "prompt", 10)
    assert [p["text"] for p in first + rest] == ["p0", "p1", "p2", "p3", "p4"]
    assert await store.take_data("exp-4", "prompt", 10) == []


async def test_listing_filters_by_state_and_pages_by_id(store):
    await store.create_tables()
    for i in range(5):
        await store.insert_experiment(_record(f"exp-{i}"))
    await store.update_experiment("exp-2", state=pb.EXPERIMENT_STATE_RUNNING)
    running = await store.list_experiments([pb.EXPERIMENT_STATE_RUNNING])
    assert [r.experiment_id for r in running] == ["exp-2"]
    page = await store.list_experiments(after_id="exp-1", limit=2)
    assert [r.experiment_id for r in page] == ["exp-2", "exp-3"]
