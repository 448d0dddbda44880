"""The leader lease on SQLite and on the real PostgreSQL: one leader at a time,
takeover only after the lease stood still for its duration on the standby's own
clock, and a fence that keeps a deposed leader's writes out of the database."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

from lorafleet.core.lease import LeaderLease, NotLeader, lease_table

metadata = sa.MetaData()
leases = lease_table("test_leases", metadata)
rows = sa.Table(
    "test_rows",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True),
    sa.Column("writer", sa.String(64), nullable=False),
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def replica(db, name: str, clock: Clock, **timings: float) -> LeaderLease:
    timings = {"duration_s": 15.0, "renew_deadline_s": 10.0, "retry_period_s": 2.0, **timings}
    return LeaderLease(
        db, leases, "scheduler", holder=name, address=f"{name}:1", clock=clock, **timings
    )


async def write_row(db, lease: LeaderLease, row_id: int) -> None:
    def write(conn: sa.Connection) -> None:
        lease.fence(conn)
        conn.execute(sa.insert(rows).values(id=row_id, writer=lease.holder))

    await db.write(write)


async def writers(db) -> dict[int, str]:
    result = await db.read(lambda conn: conn.execute(sa.select(rows)).all())
    return {r.id: r.writer for r in result}


async def test_one_leader_and_a_standby_that_waits_out_the_whole_duration(db):
    a_clock, b_clock = Clock(), Clock()
    a, b = replica(db, "a", a_clock), replica(db, "b", b_clock)
    assert await a.try_acquire_or_renew()
    assert a.leading
    assert not await b.try_acquire_or_renew()
    assert not b.leading
    assert await b.current() == await a.current()
    assert (await b.current()).holder == "a"

    # b first saw the row now; the leader stops renewing.
    b_clock.now += 14.9
    assert not await b.try_acquire_or_renew()
    b_clock.now += 0.2
    assert await b.try_acquire_or_renew()
    assert b.leading
    assert (await a.current()).holder == "b"
    assert (await a.current()).address == "b:1"

    # a, by its own clock still within its deadline, learns it was deposed on
    # its next round and never leads again.
    assert a.leading
    assert not await a.try_acquire_or_renew()
    assert not a.leading
    a_clock.now += 100
    assert not await a.try_acquire_or_renew()


async def test_a_renewing_leader_is_never_taken_over(db):
    a_clock, b_clock = Clock(), Clock()
    a, b = replica(db, "a", a_clock), replica(db, "b", b_clock)
    assert await a.try_acquire_or_renew()
    for _ in range(20):
        a_clock.now += 2
        b_clock.now += 2
        assert await a.try_acquire_or_renew()
        assert not await b.try_acquire_or_renew()
    # 40 s on b's clock, far past the duration: the row kept changing.
    assert (await b.current()).holder == "a"


async def test_a_leader_stops_counting_itself_leader_after_its_renew_deadline(db):
    clock = Clock()
    a = replica(db, "a", clock)
    assert await a.try_acquire_or_renew()
    clock.now += 9.9
    assert a.leading
    clock.now += 0.2
    assert not a.leading  # before any standby may take over (15 s)


async def test_release_hands_over_without_waiting(db):
    clock = Clock()
    a, b = replica(db, "a", clock), replica(db, "b", clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    await a.release()
    assert not a.leading
    assert await a.current() is None
    assert await b.try_acquire_or_renew()
    assert not await a.try_acquire_or_renew()


async def test_the_same_name_restarted_takes_its_lease_back_at_once(db):
    clock = Clock()
    before, after = replica(db, "sched-0", clock), replica(db, "sched-0", clock)
    assert await before.try_acquire_or_renew()
    assert await after.try_acquire_or_renew()
    assert not await before.try_acquire_or_renew()
    assert not before.leading


async def test_every_holding_has_a_higher_fencing_token_than_the_ones_before(db):
    a_clock, b_clock = Clock(), Clock()
    a, b = replica(db, "a", a_clock), replica(db, "b", b_clock)
    assert (a.fencing_token, b.fencing_token) == (0, 0)  # never held
    tokens = []
    assert await a.try_acquire_or_renew()
    tokens.append(a.fencing_token)
    for _ in range(3):  # renewals keep the holding's token
        assert await a.try_acquire_or_renew()
    assert a.fencing_token == tokens[-1]
    assert not await b.try_acquire_or_renew()
    b_clock.now += 15.0
    assert await b.try_acquire_or_renew()  # a takeover after expiry
    tokens.append(b.fencing_token)
    await b.release()
    c = replica(db, "c", Clock())
    assert await c.try_acquire_or_renew()  # a free lease
    tokens.append(c.fencing_token)
    again = replica(db, "c", Clock())
    assert await again.try_acquire_or_renew()  # the same name restarted
    tokens.append(again.fencing_token)
    assert tokens[0] >= 1
    assert tokens == sorted(set(tokens)), tokens


async def test_the_fence_lets_only_the_holder_write(db):
    a_clock, b_clock = Clock(), Clock()
    a, b = replica(db, "a", a_clock), replica(db, "b", b_clock)
    assert await a.try_acquire_or_renew()
    await write_row(db, a, 1)
    with pytest.raises(NotLeader) as standby_write:
        await write_row(db, b, 2)
    assert standby_write.value.reason == "NOT_LEADER"

    assert not await b.try_acquire_or_renew()
    b_clock.now += 16
    assert await b.try_acquire_or_renew()
    # a has not noticed (it would still count itself leader by its clock), yet
    # its write fails in the database and leaves nothing behind.
    assert a.leading
    with pytest.raises(NotLeader):
        await write_row(db, a, 3)
    await write_row(db, b, 4)
    assert await writers(db) == {1: "a", 4: "b"}


async def test_two_standbys_that_both_saw_it_expire_cannot_both_take_it(db):
    clock = Clock()
    a, b, c = (replica(db, n, clock) for n in "abc")
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    assert not await c.try_acquire_or_renew()
    stale = await db.read(lambda conn: conn.execute(sa.select(leases)).one())
    clock.now += 16
    assert await b.try_acquire_or_renew()
    # c's swap from the row it saw (as if its read raced b's takeover) changes nothing.
    swapped = await db.write(lambda conn: c._swap(conn, stale, renewed_at=0.0))
    assert swapped is False
    assert (await a.current()).holder == "b"
    assert not await c.try_acquire_or_renew()  # and the row just changed, so it waits again


async def test_run_elects_then_reports_the_loss_once(db):
    a = replica(db, "a", Clock(), duration_s=0.6, renew_deadline_s=0.4, retry_period_s=0.05)
    a._clock = asyncio.get_running_loop().time
    elected = asyncio.Event()
    lost: list[str] = []

    async def on_elected() -> None:
        elected.set()

    async def on_lost(reason: str) -> None:
        lost.append(reason)

    task = asyncio.create_task(a.run(on_elected, on_lost))
    await asyncio.wait_for(elected.wait(), 5)
    # Another process steals the row (as a standby would after a long pause).
    await db.write(lambda conn: conn.execute(sa.update(leases).values(holder="z", token="z" * 32)))
    await asyncio.wait_for(task, 5)
    assert lost == ["another replica holds the lease"]
    assert not a.leading


def test_timings_out_of_order_are_refused():
    with pytest.raises(ValueError, match="renew_deadline_s < duration_s"):
        LeaderLease(
            None, leases, "x", holder="a", duration_s=5, renew_deadline_s=5, retry_period_s=1
        )


async def test_a_takeover_waits_for_a_fenced_write_in_flight(db):
    """The fence holds the lease row (PostgreSQL: FOR SHARE; SQLite: the one
    write transaction) until the write commits, so a takeover lands after it,
    never between the fence check and the commit."""
    a_clock, b_clock = Clock(), Clock()
    a, b = replica(db, "a", a_clock), replica(db, "b", b_clock)
    assert await a.try_acquire_or_renew()
    assert not await b.try_acquire_or_renew()
    b_clock.now += 16
    async with holding_a_fenced_write(db, a, row_id=7):
        takeover = asyncio.create_task(b.try_acquire_or_renew())
        await asyncio.sleep(0.5)
        assert not takeover.done()
    assert await asyncio.wait_for(takeover, 10)
    assert await writers(db) == {7: "a"}


@contextlib.asynccontextmanager
async def holding_a_fenced_write(db, lease: LeaderLease, row_id: int):
    """An open write transaction of `lease` that has passed its fence and written
    a row; it commits when the block ends."""
    if db.is_sqlite:
        conn = sqlite3.connect(db.url.database, isolation_level=None, check_same_thread=False)
        conn.execute("BEGIN IMMEDIATE")
        [(token,)] = conn.execute("SELECT token FROM test_leases").fetchall()
        assert token == lease.token
        conn.execute("INSERT INTO test_rows (id, writer) VALUES (?, ?)", (row_id, lease.holder))
        try:
            yield
        finally:
            await asyncio.to_thread(conn.execute, "COMMIT")
            conn.close()
        return
    engine = create_async_engine(db.url.set(drivername="postgresql+asyncpg"))
    try:
        async with engine.connect() as conn:
            transaction = await conn.begin()
            await conn.run_sync(lease.fence)
            await conn.execute(sa.insert(rows).values(id=row_id, writer=lease.holder))
            try:
                yield
            finally:
                await transaction.commit()
    finally:
        await engine.dispose()


async def test_a_replica_that_cannot_take_over_gives_the_lease_back(db):
    a = replica(db, "a", Clock(), duration_s=0.6, renew_deadline_s=0.4, retry_period_s=0.05)
    lost: list[str] = []

    async def on_elected() -> None:
        raise RuntimeError("nodes unreachable")

    async def on_lost(reason: str) -> None:
        lost.append(reason)

    await asyncio.wait_for(a.run(on_elected, on_lost), 5)
    assert lost == ["could not take over: nodes unreachable"]
    assert await a.current() is None  # released: a standby need not wait it out
    assert await replica(db, "b", Clock()).try_acquire_or_renew()
