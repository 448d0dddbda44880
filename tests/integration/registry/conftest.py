"""Fixtures of the registry integration tests: real servers on port 0, real
SQLite / PostgreSQL, a real S3-compatible server (moto)."""

from __future__ import annotations

import pytest
from registry_harness import (
    SPEC,
    create_pg_database,
    drop_pg_database,
    make_settings,
    pg_reachable,
    start_registry,
)


@pytest.fixture(scope="session")
def postgres_available() -> None:
    why = pg_reachable()
    if why is not None:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable ({why})")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request, tmp_path):
    """A fresh, empty metadata database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'shared' / 'registry.db'}"
        return
    request.getfixturevalue("postgres_available")
    url, name = create_pg_database()
    try:
        yield url
    finally:
        drop_pg_database(name)


@pytest.fixture
async def registry(tmp_path):
    running = await start_registry(make_settings(tmp_path))
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def adapter(registry):
    """A fresh adapter "exp-1" with the default spec."""
    return await registry.client.create_adapter("exp-1", lora=SPEC, base_model="tiny-llama")


@pytest.fixture
def registry_in_thread(tmp_path):
    """A registry served from its own event loop thread, for blocking clients."""
    import asyncio
    import threading

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = asyncio.run_coroutine_threadsafe(
        start_registry(make_settings(tmp_path)), loop
    ).result(30)
    try:
        yield running.address
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
