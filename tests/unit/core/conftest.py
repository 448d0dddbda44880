"""Fixtures for lorafleet.core unit tests: a real echo server on port 0."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import structlog
from core_echo import EchoBehaviour, echo_binding

from lorafleet.core.config import ServiceSettings
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
