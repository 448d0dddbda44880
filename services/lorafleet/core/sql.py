"""Request-id idempotency over SQL, for the durable services (the scheduler).

`SqlIdempotencyStore` implements `lorafleet.core.idempotency.IdempotencyStore`
over a table of its own, so a replayed `request_id` returns the first answer
even after a restart. The database itself is `lorafleet.core.database.Database`.
"""

from __future__ import annotations

import time

import sqlalchemy as sa

from lorafleet.core.database import Database
from lorafleet.core.idempotency import StoredResponse

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


def _key(scope: str, request_id: str) -> sa.ColumnElement[bool]:
    return sa.and_(idempotency_table.c.scope == scope, idempotency_table.c.request_id == request_id)


class SqlIdempotencyStore:
    """`IdempotencyStore` over SQL; survives restarts.

    Rows are kept `ttl_s`; `prune()` drops older ones (call it periodically).
    """

    def __init__(self, db: Database, *, ttl_s: float = 7 * 24 * 3600) -> None:
        self._db = db
        self._ttl_s = ttl_s

    async def create_tables(self) -> None:
        await self._db.create_all(idempotency_metadata)

    async def get(self, scope: str, request_id: str) -> StoredResponse | None:
        row = await self._db.read(
            lambda conn: conn.execute(
                sa.select(idempotency_table).where(_key(scope, request_id))
            ).first()
        )
        if row is None or time.time() - row.created_at > self._ttl_s:
            return None
        return StoredResponse(row.fingerprint, row.response, row.created_at)

    async def put(self, scope: str, request_id: str, stored: StoredResponse) -> None:
        def put(conn: sa.Connection) -> None:
            values = {
                "fingerprint": stored.fingerprint,
                "response": stored.response,
                "created_at": time.time(),
            }
            exists = conn.execute(
                sa.select(idempotency_table.c.request_id).where(_key(scope, request_id))
            ).first()
            if exists:
                conn.execute(
                    sa.update(idempotency_table).where(_key(scope, request_id)).values(**values)
                )
            else:
                conn.execute(
                    sa.insert(idempotency_table).values(
                        scope=scope, request_id=request_id, **values
                    )
                )

        await self._db.write(put)

    async def prune(self) -> int:
        cutoff = time.time() - self._ttl_s
        return await self._db.write(
            lambda conn: (
                conn.execute(
                    sa.delete(idempotency_table).where(idempotency_table.c.created_at < cutoff)
                ).rowcount
                or 0
            )
        )
