"""Durable scheduler state over SQL (SQLite by default, PostgreSQL by URL).

Why a step and its experiment row change in one transaction: a scheduler
restart resumes at `current_step`, so "metrics stored" and "counter advanced"
must never disagree (no step lost, none run twice).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from lorafleet.api.common.v1 import metrics_pb2
from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.core.database import Database, Transaction
from lorafleet.core.errors import AlreadyExists, NotFound
from lorafleet.core.lease import lease_table
from lorafleet.core.sql import idempotency_table
from lorafleet.scheduler.types import Checkpoint, ExperimentRecord, NodeRecord

T = TypeVar("T")

metadata = sa.MetaData()

experiments = sa.Table(
    "scheduler_experiments",
    metadata,
    sa.Column("experiment_id", sa.String(64), primary_key=True),
    sa.Column("spec", sa.LargeBinary, nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("state_reason", sa.Text, nullable=False, default=""),
    sa.Column("node_id", sa.String(64), nullable=False, default=""),
    sa.Column("current_step", sa.BigInteger, nullable=False, default=0),
    sa.Column("adapter_id", sa.String(64), nullable=False, default=""),
    sa.Column("latest_version", sa.BigInteger, nullable=False, default=0),
    sa.Column("base_accuracy", sa.Float, nullable=True),
    sa.Column("latest_accuracy", sa.Float, nullable=True),
    sa.Column("last_reward", sa.Float, nullable=False, default=0.0),
    sa.Column("last_accuracy", sa.Float, nullable=False, default=0.0),
    sa.Column("last_step_ms", sa.Float, nullable=False, default=0.0),
    sa.Column("checkpoint_uri", sa.Text, nullable=False, default=""),
    sa.Column("checkpoint_sha256", sa.String(64), nullable=False, default=""),
    sa.Column("checkpoint_step", sa.BigInteger, nullable=False, default=0),
    sa.Column("create_time", sa.Float, nullable=False),
    sa.Column("start_time", sa.Float, nullable=True),
    sa.Column("end_time", sa.Float, nullable=True),
    sa.Column("queue_wait_ms", sa.Float, nullable=False, default=0.0),
)

steps = sa.Table(
    "scheduler_steps",
    metadata,
    sa.Column("experiment_id", sa.String(64), primary_key=True),
    sa.Column("step", sa.BigInteger, primary_key=True),
    sa.Column("metrics", sa.LargeBinary, nullable=False),
    sa.Column("time", sa.Float, nullable=False),
)

events = sa.Table(
    "scheduler_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment_id", sa.String(64), nullable=False, index=True),
    sa.Column("event", sa.LargeBinary, nullable=False),
)

nodes = sa.Table(
    "scheduler_nodes",
    metadata,
    sa.Column("node_id", sa.String(64), primary_key=True),
    sa.Column("rollout_address", sa.String(256), nullable=False),
    sa.Column("trainer_address", sa.String(256), nullable=False),
    sa.Column("base_model", sa.String(256), nullable=False),
    sa.Column("slots", sa.Integer, nullable=False),
    sa.Column("max_rank", sa.Integer, nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("last_heartbeat", sa.Float, nullable=False),
    sa.Column("static", sa.Boolean, nullable=False, default=False),
)

pushed_data = sa.Table(
    "scheduler_pushed_data",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("experiment_id", sa.String(64), nullable=False, index=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("consumed", sa.Boolean, nullable=False, default=False),
)

# request_id -> first answer of the scheduler's state-changing RPCs
# (`lorafleet.core.sql`; the name predates the scheduler_ prefix of the others).
idempotency = idempotency_table("idempotency_keys", metadata)

# Which scheduler replica leads (`lorafleet.core.lease`): one row, "scheduler".
leases = lease_table("scheduler_leases", metadata)

_EXPERIMENT_FIELDS = {
    "state",
    "state_reason",
    "node_id",
    "current_step",
    "adapter_id",
    "latest_version",
    "base_accuracy",
    "latest_accuracy",
    "last_reward",
    "last_accuracy",
    "last_step_ms",
    "start_time",
    "end_time",
    "queue_wait_ms",
}


def _checkpoint_columns(checkpoint: Checkpoint) -> dict[str, object]:
    return {
        "checkpoint_uri": checkpoint.uri,
        "checkpoint_sha256": checkpoint.sha256,
        "checkpoint_step": checkpoint.step,
    }


def _record(row: sa.Row) -> ExperimentRecord:
    return ExperimentRecord(
        experiment_id=row.experiment_id,
        spec=pb.ExperimentSpec.FromString(row.spec),
        state=row.state,
        state_reason=row.state_reason,
        node_id=row.node_id,
        current_step=row.current_step,
        adapter_id=row.adapter_id,
        latest_version=row.latest_version,
        base_accuracy=row.base_accuracy,
        latest_accuracy=row.latest_accuracy,
        last_reward=row.last_reward,
        last_accuracy=row.last_accuracy,
        last_step_ms=row.last_step_ms,
        checkpoint=Checkpoint(row.checkpoint_uri, row.checkpoint_sha256, row.checkpoint_step),
        create_time=row.create_time,
        start_time=row.start_time,
        end_time=row.end_time,
        queue_wait_ms=row.queue_wait_ms,
    )


def _node(row: sa.Row) -> NodeRecord:
    return NodeRecord(
        node_id=row.node_id,
        rollout_address=row.rollout_address,
        trainer_address=row.trainer_address,
        base_model=row.base_model,
        slots=row.slots,
        max_rank=row.max_rank,
        state=row.state,
        last_heartbeat=row.last_heartbeat,
        static=row.static,
    )


class SchedulerStore:
    """Experiments, steps, events, nodes and pushed data; each method is one
    transaction (`lorafleet.core.database.Database`)."""

    def __init__(self, db: Database, fence: Transaction[None] | None = None) -> None:
        self.db = db
        self.fence = fence
        """Runs first in every write transaction and fails it unless this replica
        still holds the leader lease (a replica that lost it must not change a row)."""

    async def _write(self, transaction: Transaction[T]) -> T:
        fence = self.fence
        if fence is None:
            return await self.db.write(transaction)

        def fenced(conn: sa.Connection) -> T:
            fence(conn)
            return transaction(conn)

        return await self.db.write(fenced)

    async def create_tables(self) -> None:
        await self.db.create_all(metadata)

    # experiments -----------------------------------------------------------

    async def insert_experiment(self, record: ExperimentRecord) -> None:
        insert = sa.insert(experiments).values(
            experiment_id=record.experiment_id,
            spec=record.spec.SerializeToString(deterministic=True),
            state=record.state,
            state_reason=record.state_reason,
            node_id=record.node_id,
            current_step=0,
            adapter_id=record.adapter_id,
            latest_version=0,
            last_reward=0.0,
            last_accuracy=0.0,
            last_step_ms=0.0,
            checkpoint_uri="",
            checkpoint_sha256="",
            checkpoint_step=0,
            create_time=record.create_time,
            queue_wait_ms=0.0,
        )
        try:
            await self._write(lambda conn: conn.execute(insert))
        except IntegrityError as exc:
            raise AlreadyExists(
                f"experiment {record.experiment_id!r} already exists",
                reason="EXPERIMENT_EXISTS",
            ) from exc

    async def get_experiment(self, experiment_id: str) -> ExperimentRecord:
        query = sa.select(experiments).where(experiments.c.experiment_id == experiment_id)
        row = await self.db.read(lambda conn: conn.execute(query).first())
        if row is None:
            raise NotFound(
                f"experiment {experiment_id!r} does not exist", reason="EXPERIMENT_NOT_FOUND"
            )
        return _record(row)

    async def list_experiments(
        self,
        states: Iterable[int] = (),
        *,
        after_id: str = "",
        limit: int = 1000,
        labels: Mapping[str, str] | None = None,
    ) -> list[ExperimentRecord]:
        """Up to `limit` experiments after `after_id` in id order, only those in
        `states` (any when empty) whose spec labels include `labels`."""
        states = list(states)
        if not labels:
            return await self._experiments_page(states, after_id, limit)
        # Labels live inside the stored spec: read pages in id order and keep
        # the matches until `limit` of them are found or the table ends.
        wanted = dict(labels)
        found: list[ExperimentRecord] = []
        cursor = after_id
        while len(found) < limit:
            page = await self._experiments_page(states, cursor, limit)
            found += [r for r in page if wanted.items() <= dict(r.spec.labels).items()]
            if len(page) < limit:
                break
            cursor = page[-1].experiment_id
        return found[:limit]

    async def _experiments_page(
        self, states: list[int], after_id: str, limit: int
    ) -> list[ExperimentRecord]:
        query = sa.select(experiments).order_by(experiments.c.experiment_id).limit(limit)
        if states:
            query = query.where(experiments.c.state.in_(states))
        if after_id:
            query = query.where(experiments.c.experiment_id > after_id)
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        return [_record(r) for r in rows]

    async def update_experiment(self, experiment_id: str, **fields: object) -> None:
        unknown = set(fields) - _EXPERIMENT_FIELDS
        if unknown:
            raise ValueError(f"not experiment fields: {sorted(unknown)}")
        update = (
            sa.update(experiments)
            .where(experiments.c.experiment_id == experiment_id)
            .values(**fields)
        )
        await self._write(lambda conn: conn.execute(update))

    async def save_checkpoint(self, experiment_id: str, checkpoint: Checkpoint) -> None:
        update = (
            sa.update(experiments)
            .where(experiments.c.experiment_id == experiment_id)
            .values(**_checkpoint_columns(checkpoint))
        )
        await self._write(lambda conn: conn.execute(update))

    # steps -------------------------------------------------------------------

    async def complete_step(
        self,
        experiment_id: str,
        metrics: metrics_pb2.StepMetrics,
        *,
        checkpoint: Checkpoint | None = None,
        **fields: object,
    ) -> bool:
        """Store step `metrics.step` and advance the experiment to it, atomically,
        with the step's trainer checkpoint when it saved one (one commit per step:
        a checkpoint is never recorded for a step the database does not have).

        Returns False (and changes nothing) when that step is already stored:
        a replayed step after a restart must not count twice.
        """
        unknown = set(fields) - _EXPERIMENT_FIELDS
        if unknown:
            raise ValueError(f"not experiment fields: {sorted(unknown)}")
        if checkpoint is not None:
            fields.update(_checkpoint_columns(checkpoint))
        insert = sa.insert(steps).values(
            experiment_id=experiment_id,
            step=metrics.step,
            metrics=metrics.SerializeToString(deterministic=True),
            time=time.time(),
        )
        advance = (
            sa.update(experiments)
            .where(experiments.c.experiment_id == experiment_id)
            .values(current_step=metrics.step, **fields)
        )

        def complete(conn: sa.Connection) -> None:
            conn.execute(insert)
            conn.execute(advance)

        try:
            await self._write(complete)
        except IntegrityError:
            return False
        return True

    async def list_steps(
        self, experiment_id: str, *, after_step: int = 0
    ) -> list[metrics_pb2.StepMetrics]:
        query = (
            sa.select(steps.c.metrics)
            .where(steps.c.experiment_id == experiment_id, steps.c.step > after_step)
            .order_by(steps.c.step)
        )
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        return [metrics_pb2.StepMetrics.FromString(r.metrics) for r in rows]

    # lifecycle events ----------------------------------------------------------

    async def add_event(self, experiment_id: str, event: pb.LifecycleEvent) -> None:
        insert = sa.insert(events).values(
            experiment_id=experiment_id, event=event.SerializeToString()
        )
        await self._write(lambda conn: conn.execute(insert))

    async def list_events(self, experiment_id: str) -> list[pb.LifecycleEvent]:
        query = (
            sa.select(events.c.event)
            .where(events.c.experiment_id == experiment_id)
            .order_by(events.c.id)
        )
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        return [pb.LifecycleEvent.FromString(r.event) for r in rows]

    # nodes -------------------------------------------------------------------

    async def upsert_node(self, node: NodeRecord) -> None:
        values = {
            "rollout_address": node.rollout_address,
            "trainer_address": node.trainer_address,
            "base_model": node.base_model,
            "slots": node.slots,
            "max_rank": node.max_rank,
            "state": node.state,
            "last_heartbeat": node.last_heartbeat,
            "static": node.static,
        }

        def upsert(conn: sa.Connection) -> None:
            updated = conn.execute(
                sa.update(nodes).where(nodes.c.node_id == node.node_id).values(**values)
            )
            if not updated.rowcount:
                conn.execute(sa.insert(nodes).values(node_id=node.node_id, **values))

        await self._write(upsert)

    async def list_nodes(self) -> list[NodeRecord]:
        query = sa.select(nodes).order_by(nodes.c.node_id)
        rows = await self.db.read(lambda conn: conn.execute(query).all())
        return [_node(r) for r in rows]

    async def update_node(self, node_id: str, **fields: object) -> None:
        update = sa.update(nodes).where(nodes.c.node_id == node_id).values(**fields)
        await self._write(lambda conn: conn.execute(update))

    # pushed data (continual learning) ---------------------------------------------

    async def push_data(self, experiment_id: str, items: Sequence[tuple[str, dict]]) -> int:
        rows = [
            {
                "experiment_id": experiment_id,
                "kind": kind,
                "payload": json.dumps(payload, sort_keys=True),
                "consumed": False,
            }
            for kind, payload in items
        ]
        pending = (
            sa.select(sa.func.count())
            .select_from(pushed_data)
            .where(
                pushed_data.c.experiment_id == experiment_id,
                pushed_data.c.consumed.is_(False),
            )
        )

        def push(conn: sa.Connection) -> int:
            if rows:
                conn.execute(sa.insert(pushed_data), rows)
            return int(conn.scalar(pending) or 0)

        return await self._write(push)

    async def take_data(self, experiment_id: str, kind: str, limit: int) -> list[dict]:
        """Oldest unconsumed pushed items of `kind`, marked consumed."""
        oldest = (
            sa.select(pushed_data.c.id, pushed_data.c.payload)
            .where(
                pushed_data.c.experiment_id == experiment_id,
                pushed_data.c.kind == kind,
                pushed_data.c.consumed.is_(False),
            )
            .order_by(pushed_data.c.id)
            .limit(limit)
        )

        def take(conn: sa.Connection) -> list[sa.Row]:
            rows = conn.execute(oldest).all()
            if rows:
                conn.execute(
                    sa.update(pushed_data)
                    .where(pushed_data.c.id.in_([r.id for r in rows]))
                    .values(consumed=True)
                )
            return rows

        return [json.loads(r.payload) for r in await self._write(take)]
