"""Start real registries (in-process grpc.aio servers on port 0) for the tests."""

from __future__ import annotations

import asyncio
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc.aio

from lorafleet.client.registry import AsyncRegistryClient
from lorafleet.core.server import create_server, start_server
from lorafleet.registry.app import RegistryRuntime, build_runtime
from lorafleet.registry.config import RegistrySettings

PG_ADMIN_DSN = os.environ.get("LORAFLEET_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")

SPEC = {"rank": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj"]}


@dataclass
class RunningRegistry:
    address: str
    settings: RegistrySettings
    runtime: RegistryRuntime
    server: grpc.aio.Server
    client: AsyncRegistryClient

    async def stop(self) -> None:
        await self.client.close()
        await self.server.stop(grace=None)
        await self.runtime.app.shutdown()


async def start_registry(settings: RegistrySettings) -> RunningRegistry:
    runtime = await build_runtime(settings)
    server, port, health = await create_server(
        "127.0.0.1:0", runtime.app.bindings, settings=settings
    )
    await start_server(server, health, runtime.app.bindings)
    address = f"127.0.0.1:{port}"
    return RunningRegistry(address, settings, runtime, server, AsyncRegistryClient(address))


def make_settings(tmp: Path, **overrides) -> RegistrySettings:
    values = {
        "data_dir": tmp / "registry",
        "file_roots": {"node-a": tmp / "node-a", "node-b": tmp / "node-b"},
        "retention_min_age_s": 0.0,
        "watch_poll_interval_s": 0.2,
        **overrides,
    }
    (tmp / "node-a").mkdir(parents=True, exist_ok=True)
    (tmp / "node-b").mkdir(parents=True, exist_ok=True)
    return RegistrySettings(**values)


def blob_files(settings: RegistrySettings) -> list[Path]:
    root = settings.data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def staging_files(settings: RegistrySettings) -> list[Path]:
    root = settings.staging_dir
    return sorted(p for p in root.rglob("*")) if root.exists() else []


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN_DSN, timeout=3)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def pg_reachable() -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        asyncio.run(_pg_admin("SELECT 1"))
    except Exception as exc:  # any failure means: skip, and say why
        return f"{type(exc).__name__}: {exc}"
    return None


def create_pg_database() -> tuple[str, str]:
    """A fresh database; returns (its SQLAlchemy URL, its name)."""
    name = f"lf_registry_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    return f"{base}/{name}", name


def drop_pg_database(name: str) -> None:
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
