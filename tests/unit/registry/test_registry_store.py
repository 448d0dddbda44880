"""The SQL metadata store on SQLite: durability settings and gap-free numbers."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from lorafleet.core.errors import Aborted
from lorafleet.registry.store.sql import SqlMetadataStore
from lorafleet.registry.types import Adapter, FileDigest, LoraSpec

FILES = (
    FileDigest("adapter_config.json", "a" * 64, 1),
    FileDigest("adapter_model.safetensors", "b" * 64, 2),
)


@pytest.fixture
async def store(tmp_path):
    opened = await SqlMetadataStore.open(f"sqlite:///{tmp_path / 'r.db'}")
    await opened.create_adapter(
        Adapter("exp-1", "", "tiny", LoraSpec(rank=4, alpha=8.0), {}, 0, time.time())
    )
    yield opened
    await opened.close()


async def reserve(store, parent: int, attempt: str, request_id: str = ""):
    reservation, _ = await store.reserve_version(
        "exp-1",
        expected_parent_version=parent,
        files=FILES,
        sha256="c" * 64,
        size_bytes=3,
        training_step=0,
        metrics={},
        source_uri="",
        request_id=request_id,
        attempt_id=attempt,
        owner="me",
        lease_s=60,
    )
    return reservation


async def test_sqlite_runs_in_wal_with_full_sync_and_busy_timeout(store):
    pragmas = await store.read(
        lambda conn: {
            name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "busy_timeout", "foreign_keys")
        }
    )
    assert pragmas == {
        "journal_mode": "wal",
        "synchronous": 2,
        "busy_timeout": 30000,
        "foreign_keys": 1,
    }


async def test_released_numbers_are_reused_so_no_gap_opens(store):
    first = await reserve(store, 0, "a" * 32)
    assert first.version == 1
    with pytest.raises(Aborted) as exc:
        await reserve(store, 0, "b" * 32)
    assert exc.value.reason == "PUBLISH_IN_PROGRESS"
    assert await store.release_version(first)
    second = await reserve(store, 0, "b" * 32)
    assert second.version == 1
    ready = await store.finalize_version(second, durable_uri="file:///x", idempotency_record=None)
    assert ready.version == 1 and ready.aliases == ("latest",)
    # A superseded attempt cannot finalize over the number it lost.
    with pytest.raises(Aborted) as exc:
        await store.finalize_version(first, durable_uri="", idempotency_record=None)
    assert exc.value.reason == "PUBLISH_SUPERSEDED"
    third = await reserve(store, 1, "c" * 32, request_id="retry-me")
    # A retry with the same request_id takes the earlier attempt's number over.
    again = await reserve(store, 1, "d" * 32, request_id="retry-me")
    assert third.version == again.version == 2
    rows = await store.read(
        lambda conn: conn.execute(sa.text("SELECT version, state FROM registry_versions")).all()
    )
    assert sorted(rows) == [(1, "READY"), (2, "PENDING")]
    assert [a.version for a in await store.recover("me")] == [2]
