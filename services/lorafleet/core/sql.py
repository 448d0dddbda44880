"""Request-id idempotency over SQL, for the services with a database (the
scheduler and the registry).

`SqlIdempotencyStore` implements `lorafleet.core.idempotency.IdempotencyStore`
over a table of the service's own database (`idempotency_table`), so a replayed
`request_id` gets the first answer after a restart and from any replica. The
rules are the same in every service:

- An answer replays for `ttl_s` after it was stored. After that the id counts as
  new: `get` no longer sees the row, the next answer replaces it, and `sweep`
  deletes it.
- The first answer wins. A `put` that finds a live row leaves it: the change's
  own transaction wrote it (`IdempotencyRecord`), or another replica answered
  the same id in between.

A change that must never be applied without its answer being kept (a crash
between the two would apply it twice on the client's retry) writes the answer in
its own transaction (`SqlIdempotencyStore.record`, then `IdempotencyRecord.write`);
`once` is then given `SqlIdempotencyStore.in_transaction()`, whose `put` has
nothing left to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError

from lorafleet.core.database import Database
from lorafleet.core.idempotency import MAX_REQUEST_ID_LENGTH, StoredResponse

log = structlog.get_logger(__name__)

DEFAULT_TTL_S = 7 * 24 * 3600.0


def idempotency_table(name: str, metadata: sa.MetaData) -> sa.Table:
    """The table of first answers, named by the service that owns it."""
    return sa.Table(
        name,
        metadata,
        sa.Column("scope", sa.String(255), primary_key=True),
        sa.Column("request_id", sa.String(MAX_REQUEST_ID_LENGTH), primary_key=True),
        sa.Column("fingerprint", sa.LargeBinary, nullable=False),
        sa.Column("response", sa.LargeBinary, nullable=False),
        # Indexed for the sweep, which deletes by age.
        sa.Column("created_at", sa.Float, nullable=False, index=True),
    )


@dataclass(frozen=True)
class IdempotencyRecord:
    """A first answer to store in the same transaction as the change it
    describes, so a crash can never leave one without the other. Made by
    `SqlIdempotencyStore.record`; the change calls `write` in its transaction."""

    store: SqlIdempotencyStore
    scope: str
    request_id: str
    fingerprint: bytes
    encode: Callable[[Any], bytes]
    """Turns the change's result into the serialized response."""

    def write(self, conn: sa.Connection, result: Any) -> None:
        self.store.write_in(conn, self.scope, self.request_id,
                            StoredResponse(self.fingerprint, self.encode(result)))


class SqlIdempotencyStore:
    """`IdempotencyStore` over ``table`` in ``db``; see the module docstring."""

    def __init__(self, db: Database, table: sa.Table, *, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._db = db
        self._table = table
        self._ttl_s = ttl_s
        self._clock = clock
        """Wall-clock seconds, as stored in ``created_at``; injectable for expiry tests."""
        self._sweeper: asyncio.Task[None] | None = None
        # One view for the store's life: `once` serializes duplicates per store object.
        self._in_transaction = InTransactionIdempotencyStore(self)

    def _key(self, scope: str, request_id: str) -> sa.ColumnElement[bool]:
        return sa.and_(self._table.c.scope == scope, self._table.c.request_id == request_id)

    def _live_after(self) -> float:
        return self._clock() - self._ttl_s

    async def get(self, scope: str, request_id: str) -> StoredResponse | None:
        query = sa.select(self._table).where(self._key(scope, request_id))
        row = await self._db.read(lambda conn: conn.execute(query).first())
        if row is None or row.created_at < self._live_after():
            return None
        return StoredResponse(bytes(row.fingerprint), bytes(row.response), row.created_at)

    async def put(self, scope: str, request_id: str, stored: StoredResponse) -> None:
        def put(conn: sa.Connection) -> None:
            found = conn.execute(
                sa.select(self._table.c.created_at).where(self._key(scope, request_id))
            ).first()
            if found is None or found.created_at < self._live_after():
                self.write_in(conn, scope, request_id, stored)
            # else: the first answer wins.

        try:
            await self._db.write(put)
        except IntegrityError:
            # Another replica inserted the same key between our check and insert:
            # its answer is the first one.
            log.debug("idempotency_put_raced", scope=scope, request_id=request_id)

    def write_in(self, conn: sa.Connection, scope: str, request_id: str,
                 stored: StoredResponse) -> None:
        """Insert an answer inside the caller's transaction. An expired answer
        under the same key is replaced; a live one makes the insert fail
        (IntegrityError), as two first answers must not both commit."""
        conn.execute(
            sa.delete(self._table).where(
                self._key(scope, request_id), self._table.c.created_at < self._live_after()
            )
        )
        conn.execute(
            self._table.insert().values(
                scope=scope,
                request_id=request_id,
                fingerprint=stored.fingerprint,
                response=stored.response,
                created_at=self._clock(),
            )
        )

    def record(self, scope: str, request_id: str, fingerprint: bytes,
               encode: Callable[[Any], bytes]) -> IdempotencyRecord | None:
        """The in-transaction answer of a request (None without a request_id)."""
        if not request_id:
            return None
        return IdempotencyRecord(self, scope, request_id, fingerprint, encode)

    async def sweep(self) -> int:
        """Delete the answers older than ``ttl_s``; how many were deleted."""
        delete = sa.delete(self._table).where(self._table.c.created_at < self._live_after())
        return await self._db.write(lambda conn: conn.execute(delete).rowcount or 0)

    def start_sweeping(self) -> None:
        """Sweep in the background until `close`: every quarter of ``ttl_s``, at
        most hourly, so the table holds little more than ``ttl_s`` of answers
        however long the service runs."""
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(
                self._sweep_every(min(self._ttl_s / 4, 3600.0)),
                name=f"sweep-{self._table.name}",
            )

    async def close(self) -> None:
        """Stop background sweeping (the database is the caller's to close)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None

    async def _sweep_every(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                swept = await self.sweep()
            except Exception:
                # Logged and retried at the next interval: a missed sweep only
                # keeps old rows a little longer.
                log.exception("idempotency_sweep_failed", table=self._table.name)
                continue
            if swept:
                log.info("idempotency_swept", table=self._table.name, rows=swept)

    def in_transaction(self) -> InTransactionIdempotencyStore:
        """The view of this store for changes that write their own answers."""
        return self._in_transaction


class InTransactionIdempotencyStore:
    """The store ``once`` sees when every change writes its own answer inside its
    transaction (`IdempotencyRecord`): reads go to SQL, the after-the-fact ``put`` has
    nothing left to do."""

    def __init__(self, store: SqlIdempotencyStore) -> None:
        self._store = store

    async def get(self, scope: str, request_id: str) -> StoredResponse | None:
        return await self._store.get(scope, request_id)

    async def put(self, scope: str, request_id: str, stored: StoredResponse) -> None:
        return None
