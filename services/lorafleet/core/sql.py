"""SQL plumbing shared by the durable services (registry, scheduler).

`create_engine(url)` gives an async SQLAlchemy engine with the settings the
services rely on: SQLite in WAL mode with synchronous=FULL (an acknowledged
write survives a crash) and a busy timeout (several writers in one process or
several processes wait instead of failing), PostgreSQL through asyncpg.

`SqlIdempotencyStore` implements `lorafleet.core.idempotency.IdempotencyStore`
over a table of its own, so a replayed `request_id` returns the first answer
even after a restart.
"""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from lorafleet.core.idempotency import StoredResponse

SQLITE_BUSY_TIMEOUT_MS = 30_000


def create_engine(url: str, *, echo: bool = False) -> AsyncEngine:
    """An async engine for `url` (sqlite+aiosqlite:///path or postgresql+asyncpg://...).

    Plain `sqlite:///` and `postgresql://` URLs are accepted and mapped to their
    async drivers; the parent directory of a SQLite file is created.
    """
    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg2"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    if parsed.drivername.startswith("sqlite"):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, echo=echo)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        # aiosqlite's own BEGIN handling would defer the write lock to the first
        # write; BEGIN IMMEDIATE takes it at the start, so two read-then-write
        # transactions serialise instead of failing with "database is locked".
        event.listen(engine.sync_engine, "begin", _sqlite_begin_immediate)
        return engine
    return create_async_engine(parsed, echo=echo, pool_pre_ping=True)


def is_sqlite(engine: AsyncEngine) -> bool:
    return engine.dialect.name == "sqlite"


def _sqlite_pragmas(dbapi_connection: object, _record: object) -> None:
    # Let SQLAlchemy, not the driver, issue BEGIN (see _sqlite_begin_immediate).
    dbapi_connection.isolation_level = None  # type: ignore[attr-defined]
    cursor = dbapi_connection.cursor()  # type: ignore[attr-defined]
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(connection: sa.Connection) -> None:
    connection.exec_driver_sql("BEGIN IMMEDIATE")


idempotency_metadata = sa.MetaData()

idempotency_table = sa.Table(
    "idempotency_keys",
    idempotency_metadata,
    sa.Column("scope", sa.String(128), primary_key=True),
    sa.Column("request_id", sa.String(128), primary_key=True),
    sa.Column("fingerprint", sa.LargeBinary, nullable=False),
    sa.Column("response", sa.LargeBinary, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)


class SqlIdempotencyStore:
    """`IdempotencyStore` over SQL; survives restarts.

    Rows are kept `ttl_s`; `prune()` drops older ones (call it periodically).
    """

    def __init__(self, engine: AsyncEngine, *, ttl_s: float = 7 * 24 * 3600) -> None:
        self._engine = engine
        self._ttl_s = ttl_s

    async def create_tables(self) -> None:
        async with self._engine.begin() as conn:
            await conn.run_sync(idempotency_metadata.create_all)

    async def get(self, scope: str, request_id: str) -> StoredResponse | None:
        async with self._engine.connect() as conn:
            row = (
                await conn.execute(
                    sa.select(idempotency_table).where(
                        idempotency_table.c.scope == scope,
                        idempotency_table.c.request_id == request_id,
                    )
                )
            ).first()
        if row is None or time.time() - row.created_at > self._ttl_s:
            return None
        return StoredResponse(row.fingerprint, row.response, row.created_at)

    async def put(self, scope: str, request_id: str, stored: StoredResponse) -> None:
        async with self._engine.begin() as conn:
            exists = (
                await conn.execute(
                    sa.select(idempotency_table.c.request_id).where(
                        idempotency_table.c.scope == scope,
                        idempotency_table.c.request_id == request_id,
                    )
                )
            ).first()
            values = {
                "fingerprint": stored.fingerprint,
                "response": stored.response,
                "created_at": time.time(),
            }
            if exists:
                await conn.execute(
                    sa.update(idempotency_table)
                    .where(
                        idempotency_table.c.scope == scope,
                        idempotency_table.c.request_id == request_id,
                    )
                    .values(**values)
                )
            else:
                await conn.execute(
                    sa.insert(idempotency_table).values(
                        scope=scope, request_id=request_id, **values
                    )
                )

    async def prune(self) -> int:
        async with self._engine.begin() as conn:
            result = await conn.execute(
                sa.delete(idempotency_table).where(
                    idempotency_table.c.created_at < time.time() - self._ttl_s
                )
            )
        return result.rowcount or 0
