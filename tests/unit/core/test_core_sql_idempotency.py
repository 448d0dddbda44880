"""`SqlIdempotencyStore`: replay across restarts, the first answer wins, expiry
and sweeps, answers written in the change's own transaction; on SQLite and the
real PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa
from google.protobuf import wrappers_pb2
from sqlalchemy.exc import IntegrityError

from lorafleet.core.database import Database
from lorafleet.core.idempotency import StoredResponse, once
from lorafleet.core.sql import SqlIdempotencyStore, idempotency_table

metadata = sa.MetaData()
answers = idempotency_table("test_answers", metadata)
changes = sa.Table("test_changes", metadata, sa.Column("n", sa.Integer, primary_key=True))

SCOPE = "/test.Service/Change"
TTL_S = 100.0


class Clock:
    """Wall-clock seconds the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(db, clock):
    return SqlIdempotencyStore(db, answers, ttl_s=TTL_S, clock=clock)


def answer(text: str) -> StoredResponse:
    return StoredResponse(fingerprint=b"f-" + text.encode(), response=text.encode())


async def rows(db: Database) -> list[tuple[str, bytes]]:
    return await db.read(
        lambda conn: [
            (r.request_id, bytes(r.response))
            for r in conn.execute(sa.select(answers).order_by(answers.c.request_id))
        ]
    )


async def test_answer_replays_after_a_restart(database_url, store, clock):
    await store.put(SCOPE, "r1", answer("first"))
    reopened = Database(database_url)
    try:
        got = await SqlIdempotencyStore(reopened, answers, ttl_s=TTL_S, clock=clock).get(
            SCOPE, "r1"
        )
    finally:
        await reopened.dispose()
    assert got is not None
    assert (got.fingerprint, got.response) == (b"f-first", b"first")
    assert await store.get("/test.Service/Other", "r1") is None


async def test_first_answer_wins(db, store):
    await store.put(SCOPE, "r1", answer("first"))
    await store.put(SCOPE, "r1", answer("second"))
    got = await store.get(SCOPE, "r1")
    assert got is not None and got.response == b"first"
    assert await rows(db) == [("r1", b"first")]


async def test_expired_answer_is_gone_and_replaced(db, store, clock):
    await store.put(SCOPE, "r1", answer("old"))
    clock.now += TTL_S - 1
    assert (await store.get(SCOPE, "r1")) is not None
    clock.now += 2
    assert await store.get(SCOPE, "r1") is None
    await store.put(SCOPE, "r1", answer("new"))
    got = await store.get(SCOPE, "r1")
    assert got is not None and got.response == b"new"
    assert await rows(db) == [("r1", b"new")]


async def test_sweep_deletes_only_expired_answers(db, store, clock):
    await store.put(SCOPE, "old", answer("old"))
    clock.now += TTL_S / 2
    await store.put(SCOPE, "young", answer("young"))
    clock.now += TTL_S / 2 + 1
    assert await store.sweep() == 1
    assert await rows(db) == [("young", b"young")]
    assert await store.sweep() == 0


async def test_once_over_sql_runs_once_and_replays_the_same_bytes(store):
    calls = 0

    async def change() -> wrappers_pb2.StringValue:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return wrappers_pb2.StringValue(value=f"call {calls}")

    results = await asyncio.gather(
        *(once(store, SCOPE, "r1", b"fp", change, wrappers_pb2.StringValue) for _ in range(3))
    )
    later = await once(store, SCOPE, "r1", b"fp", change, wrappers_pb2.StringValue)
    assert calls == 1
    assert {r.value for r in [*results, later]} == {"call 1"}


async def test_answer_written_in_the_change_transaction(db, store, clock):
    encode = lambda n: f"made {n}".encode()  # noqa: E731
    assert store.record(SCOPE, "", b"fp", encode) is None  # no request_id, nothing kept
    record = store.record(SCOPE, "r1", b"fp", encode)
    assert record is not None

    def failing_change(conn: sa.Connection) -> None:
        conn.execute(changes.insert().values(n=1))
        record.write(conn, 1)
        raise RuntimeError("the change failed after writing its answer")

    with pytest.raises(RuntimeError):
        await db.write(failing_change)
    assert await rows(db) == []  # rolled back together with the change

    def change(conn: sa.Connection) -> None:
        conn.execute(changes.insert().values(n=1))
        record.write(conn, 1)

    await db.write(change)
    view = store.in_transaction()
    assert view is store.in_transaction()  # one view, so `once` serializes duplicates
    got = await view.get(SCOPE, "r1")
    assert got is not None and got.response == b"made 1"
    await view.put(SCOPE, "r1", answer("ignored"))  # the change already wrote it
    assert await rows(db) == [("r1", b"made 1")]

    # A live answer under the key makes a second in-transaction answer fail...
    with pytest.raises(IntegrityError):
        await db.write(lambda conn: record.write(conn, 2))
    # ...an expired one is replaced.
    clock.now += TTL_S + 1
    await db.write(lambda conn: record.write(conn, 3))
    assert await rows(db) == [("r1", b"made 3")]


async def test_background_sweeps_until_closed(db):
    store = SqlIdempotencyStore(db, answers, ttl_s=0.2)  # sweeps every 0.05 s
    await store.put(SCOPE, "r1", answer("short-lived"))
    store.start_sweeping()
    store.start_sweeping()  # a second start keeps the one sweeper
    try:
        for _ in range(100):
            if not await rows(db):
                break
            await asyncio.sleep(0.05)
        assert await rows(db) == []
    finally:
        await store.close()
    await store.put(SCOPE, "r2", answer("kept"))
    await asyncio.sleep(0.4)
    assert await rows(db) == [("r2", b"kept")]  # closed: nothing sweeps any more


def test_ttl_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="ttl_s"):
        SqlIdempotencyStore(Database(f"sqlite:///{tmp_path}/x.db"), answers, ttl_s=0)
