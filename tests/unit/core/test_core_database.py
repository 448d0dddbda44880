"""`Database`: URLs it takes, commit and rollback, one thread per SQLite
transaction, serialised read-check-write, on SQLite and the real PostgreSQL."""

from __future__ import annotations

import asyncio
import threading

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from lorafleet.core.database import Database

metadata = sa.MetaData()
counters = sa.Table(
    "counters",
    metadata,
    sa.Column("name", sa.String(32), primary_key=True),
    sa.Column("value", sa.Integer, nullable=False),
)


def _value(conn: sa.Connection) -> int | None:
    return conn.execute(sa.select(counters.c.value).where(counters.c.name == "n")).scalar()


async def test_a_write_commits_when_it_returns_and_rolls_back_when_it_raises(db):
    await db.write(lambda conn: conn.execute(counters.insert().values(name="n", value=1)))
    assert await db.read(_value) == 1

    def bump_then_fail(conn: sa.Connection) -> None:
        conn.execute(counters.update().values(value=counters.c.value + 1))
        raise RuntimeError("changed my mind")

    with pytest.raises(RuntimeError, match="changed my mind"):
        await db.write(bump_then_fail)
    assert await db.read(_value) == 1


async def test_concurrent_read_check_writes_serialise(db):
    await db.write(lambda conn: conn.execute(counters.insert().values(name="n", value=0)))

    def increment(conn: sa.Connection) -> int:
        # Read, then write what was read plus one: two of these interleaving
        # would lose an increment.
        query = sa.select(counters.c.value).where(counters.c.name == "n").with_for_update()
        value = conn.execute(query).scalar_one()
        conn.execute(counters.update().values(value=value + 1))
        return value + 1

    seen = await asyncio.gather(*(db.write(increment) for _ in range(25)))
    assert sorted(seen) == list(range(1, 26))
    assert await db.read(_value) == 25


async def test_a_sqlite_transaction_runs_on_one_thread_off_the_event_loop(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/t.db")
    statement_threads: list[int] = []
    event.listen(
        db._sync,
        "before_cursor_execute",
        lambda *_args: statement_threads.append(threading.get_ident()),
    )
    try:
        await db.create_all(metadata)
        statement_threads.clear()

        def three_statements(conn: sa.Connection) -> int | None:
            conn.execute(counters.insert().values(name="n", value=7))
            conn.execute(counters.update().values(value=8))
            return _value(conn)

        assert await db.write(three_statements) == 8
    finally:
        await db.dispose()
    # BEGIN IMMEDIATE, three statements and COMMIT all ran on one thread of
    # the database's pool: one hand-off for the whole transaction.
    assert len(statement_threads) >= 3
    assert len(set(statement_threads)) == 1
    assert statement_threads[0] != threading.get_ident()


@pytest.mark.parametrize(
    "url",
    ["sqlite:///{dir}/a.db", "sqlite+aiosqlite:///{dir}/b.db", "sqlite+pysqlite:///{dir}/c.db"],
)
async def test_sqlite_urls_of_every_spelling_open_the_same_kind_of_database(url, tmp_path):
    db = Database(url.format(dir=tmp_path / "nested"))
    try:
        await db.create_all(metadata)
        mode = await db.read(lambda conn: conn.exec_driver_sql("PRAGMA journal_mode").scalar())
    finally:
        await db.dispose()
    assert db.is_sqlite and db.dialect_name == "sqlite"
    assert mode == "wal"


async def test_in_memory_sqlite_keeps_one_database_across_transactions():
    db = Database("sqlite:///:memory:")
    try:
        await db.create_all(metadata)
        await db.write(lambda conn: conn.execute(counters.insert().values(name="n", value=3)))
        assert await db.read(_value) == 3
    finally:
        await db.dispose()


def test_an_unsupported_url_is_refused_with_the_forms_that_work():
    with pytest.raises(ValueError, match=r"sqlite:///path or postgresql://"):
        Database("mysql://root:secret@db/lorafleet")
    with pytest.raises(ValueError) as exc:
        Database("mysql://root:secret@db/lorafleet")
    assert "secret" not in str(exc.value)
