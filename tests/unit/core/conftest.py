"""Fixtures for lorafleet.core unit tests: a real echo server on port 0, and an
empty database on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import sqlalchemy as sa
import structlog
from core_echo import EchoBehaviour, echo_binding
from sqlalchemy.ext.asyncio import create_async_engine

from lorafleet.core.config import ServiceSettings
from lorafleet.core.database import Database
from lorafleet.core.server import create_server, start_server


@dataclass
class EchoServer:
    address: str
    behaviour: EchoBehaviour
    health: object


@pytest.fixture
async def echo_server() -> AsyncIterator[EchoServer]:
    behaviour = EchoBehaviour()
    binding = echo_binding(behaviour)
    server, port, health = await create_server("127.0.0.1:0", [binding], settings=ServiceSettings())
    await start_server(server, health, [binding])
    try:
        yield EchoServer(address=f"127.0.0.1:{port}", behaviour=behaviour, health=health)
    finally:
        await server.stop(grace=None)


@pytest.fixture
def restore_logging():
    """configure_logging mutates process-global state; put it back afterwards so
    a handler bound to a test's captured stderr never outlives the test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


PG_ADMIN_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"


async def _pg_admin(sql: str) -> None:
    admin = create_async_engine(PG_ADMIN_URL)
    try:
        async with admin.connect() as conn:
            await (await conn.execution_options(isolation_level="AUTOCOMMIT")).execute(sa.text(sql))
    finally:
        await admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request, tmp_path) -> AsyncIterator[str]:
    """The URL of a new, empty database: a SQLite file in a directory that does
    not exist yet, or a PostgreSQL database of its own, dropped afterwards."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/db/test.db"
        return
    name = f"lorafleet_test_{uuid.uuid4().hex[:8]}"
    try:
        await _pg_admin(f"CREATE DATABASE {name}")
    except (OSError, sa.exc.OperationalError, sa.exc.DBAPIError) as exc:
        pytest.skip(f"PostgreSQL at 127.0.0.1:5432 is unreachable: {exc}")
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    await _pg_admin(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
async def db(database_url, request) -> AsyncIterator[Database]:
    """A `Database` at ``database_url`` holding the tables of the test module's
    ``metadata``."""
    opened = Database(database_url)
    await opened.create_all(request.module.metadata)
    yield opened
    await opened.dispose()
