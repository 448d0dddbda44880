"""The SQL database behind a durable service (registry, scheduler).

A transaction is one plain function of a ``sqlalchemy.Connection``; `Database`
runs it and hands back its result:

    version = await db.write(lambda conn: finalize(conn, reservation))

Why plain functions instead of ``await conn.execute(...)`` statement by
statement: the services' transactions are short runs of statements with no
other I/O in between. Under SQLAlchemy's asyncio layer over aiosqlite, every
execute, fetch and cursor close is a hand-off to the driver's thread and a
wake-up of the event loop; a select + insert + update transaction cost 1.13 ms
of CPU that way against 0.42 ms as one function run in one hop (WAL,
``synchronous=FULL``), and at eight concurrent experiments those hand-offs were
a large share of the registry's and the scheduler's CPU.

- SQLite (the embedded default): the standard library's driver. The function
  runs on a small pool of threads, one hop per transaction. WAL mode with
  ``synchronous=FULL`` (an acknowledged commit survives a power loss) and a busy
  timeout (writers in other processes queue instead of failing). Writes begin
  with ``BEGIN IMMEDIATE``, which takes the write lock up front, so two
  read-check-write transactions serialise instead of failing with "database is
  locked"; writers of this process queue on an asyncio lock first, off the
  busy-timeout retry loop.
- PostgreSQL: asyncpg under SQLAlchemy's async engine; the function runs with
  ``AsyncConnection.run_sync`` (no thread: asyncpg lives on the event loop).

URLs: ``sqlite:///path`` and ``postgresql://...``; the async driver names of
earlier configs (``sqlite+aiosqlite``, ``postgresql+asyncpg``) mean the same.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

T = TypeVar("T")
Transaction = Callable[[sa.Connection], T]

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_THREADS = 4
"""Threads that run SQLite transactions: reads run beside the one writer (WAL)."""

_BEGIN = "lorafleet_sqlite_begin"
_SQLITE_DRIVERS = ("sqlite", "sqlite+pysqlite", "sqlite+aiosqlite")
_POSTGRES_DRIVERS = ("postgresql", "postgres", "postgresql+asyncpg", "postgresql+psycopg2")


class Database:
    """Runs transactions against one database; see the module docstring."""

    def __init__(self, url: str) -> None:
        parsed = sa.make_url(url)
        self.url = parsed
        self.is_sqlite = parsed.drivername in _SQLITE_DRIVERS
        if self.is_sqlite:
            self._sync = _sqlite_engine(parsed)
            self._sync_writes = self._sync.execution_options(**{_BEGIN: "IMMEDIATE"})
            # One in-memory database lives in one connection, used by one thread.
            self._threads = ThreadPoolExecutor(
                max_workers=1 if _in_memory(parsed) else SQLITE_THREADS,
                thread_name_prefix="sqlite",
            )
            self._write_lock = asyncio.Lock()
            self._async: AsyncEngine | None = None
        elif parsed.drivername in _POSTGRES_DRIVERS:
            self._async = create_async_engine(
                parsed.set(drivername="postgresql+asyncpg"), pool_pre_ping=True
            )
        else:
            raise ValueError(
                f"unsupported database URL {parsed.render_as_string(hide_password=True)!r}:"
                " use sqlite:///path or postgresql://user@host/db"
            )

    @property
    def dialect_name(self) -> str:
        return "sqlite" if self.is_sqlite else "postgresql"

    async def read(self, transaction: Transaction[T]) -> T:
        """Run ``transaction`` in a read transaction and return its result."""
        if self._async is not None:
            return await self._run_async(transaction)
        return await self._in_thread(self._sync, transaction)

    async def write(self, transaction: Transaction[T]) -> T:
        """Run ``transaction`` in a write transaction; it commits when the
        function returns and rolls back when it raises."""
        if self._async is not None:
            return await self._run_async(transaction)
        async with self._write_lock:
            return await self._in_thread(self._sync_writes, transaction)

    async def create_all(self, metadata: sa.MetaData) -> None:
        await self.write(metadata.create_all)

    async def dispose(self) -> None:
        if self._async is not None:
            await self._async.dispose()
            return
        # Let running transactions finish, then close the pooled connections.
        await asyncio.get_running_loop().run_in_executor(None, self._threads.shutdown)
        self._sync.dispose()

    async def _run_async(self, transaction: Transaction[T]) -> T:
        assert self._async is not None
        async with self._async.begin() as conn:
            return await conn.run_sync(transaction)

    async def _in_thread(self, engine: sa.Engine, transaction: Transaction[T]) -> T:
        # Like asyncio.to_thread, on this database's own threads (structlog's
        # context variables travel with the call).
        call = functools.partial(
            contextvars.copy_context().run, _run_in_transaction, engine, transaction
        )
        return await asyncio.get_running_loop().run_in_executor(self._threads, call)


def _run_in_transaction(engine: sa.Engine, transaction: Transaction[T]) -> T:
    with engine.begin() as conn:
        return transaction(conn)


def _in_memory(url: sa.URL) -> bool:
    return url.database in (None, "", ":memory:")


def _sqlite_engine(url: sa.URL) -> sa.Engine:
    url = url.set(drivername="sqlite+pysqlite")
    in_memory = _in_memory(url)
    if not in_memory:
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url,
        # Connections move between this database's threads, one at a time.
        connect_args={"check_same_thread": False},
        **({"poolclass": StaticPool} if in_memory else {}),
    )
    event.listen(engine, "connect", _sqlite_pragmas)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: object) -> None:
    # The driver's own implicit BEGIN is turned off so that _sqlite_begin
    # decides between DEFERRED (reads) and IMMEDIATE (writes).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    for pragma in (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=FULL",
        f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
        "PRAGMA foreign_keys=ON",
    ):
        cursor.execute(pragma)
    cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    conn.exec_driver_sql(f"BEGIN {conn.get_execution_options().get(_BEGIN, 'DEFERRED')}")
