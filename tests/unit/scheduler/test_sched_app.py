"""The scheduler's wiring keeps request_id answers for `idempotency_ttl_s`:
older rows are swept when it starts, newer ones still replay."""

from __future__ import annotations

import time

import sqlalchemy as sa

from lorafleet.core.database import Database
from lorafleet.scheduler.app import build_app
from lorafleet.scheduler.config import SchedulerSettings
from lorafleet.scheduler.store import idempotency, metadata

SCOPE = "/lorafleet.scheduler.v1.SchedulerService/SubmitExperiment"


async def test_start_sweeps_expired_answers(tmp_path):
    url = f"sqlite:///{tmp_path}/scheduler.db"
    db = Database(url)
    await db.create_all(metadata)
    now = time.time()
    await db.write(
        lambda conn: conn.execute(
            idempotency.insert(),
            [
                {"scope": SCOPE, "request_id": rid, "fingerprint": b"f", "response": b"r",
                 "created_at": created_at}
                for rid, created_at in (("expired", now - 7200), ("live", now - 60))
            ],
        )
    )
    await db.dispose()

    app = await build_app(SchedulerSettings(database_url=url, idempotency_ttl_s=3600))
    try:
        db = Database(url)
        left = await db.read(
            lambda conn: conn.execute(sa.select(idempotency.c.request_id)).scalars().all()
        )
        await db.dispose()
    finally:
        await app.shutdown()
    assert left == ["live"]
