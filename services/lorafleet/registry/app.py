"""Wires the registry from its settings: stores, publisher, copier, servicer.

Shutdown order (after the server stopped serving RPCs): stop the background
idempotency sweeps, copier and retention tasks first (they use the stores), then
the blob store, then the database pool.
"""

from __future__ import annotations

from dataclasses import dataclass

import structlog

from lorafleet.core.app import ServiceApp
from lorafleet.core.sql import SqlIdempotencyStore
from lorafleet.registry.blobs import BlobStore, open_blob_store
from lorafleet.registry.config import RegistrySettings
from lorafleet.registry.copier import DurableCopier
from lorafleet.registry.domain import AdapterRegistry, RetentionPolicy
from lorafleet.registry.publish import Publisher
from lorafleet.registry.service import RegistryServicer, servicer_binding
from lorafleet.registry.store.schema import idempotency as idempotency_answers
from lorafleet.registry.store.sql import SqlMetadataStore
from lorafleet.registry.uris import FileRoots
from lorafleet.registry.validation import Limits

log = structlog.get_logger(__name__)


@dataclass
class RegistryRuntime:
    """Everything ``build_app`` wires, for callers (tests, benchmarks, the
    co-located mesh) that also want the domain object."""

    registry: AdapterRegistry
    store: SqlMetadataStore
    blobs: BlobStore
    idempotency: SqlIdempotencyStore
    app: ServiceApp

    async def close(self) -> None:
        await self.idempotency.close()
        await self.registry.close()
        await self.blobs.close()
        await self.store.close()


async def build_runtime(settings: RegistrySettings) -> RegistryRuntime:
    """Open the stores, recover from a previous crash, start the copier."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = await SqlMetadataStore.open(settings.resolved_database_url)
    try:
        blobs = await open_blob_store(
            settings.resolved_durable_url,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            spool_dir=settings.data_dir / "spool",
        )
    except BaseException:
        await store.close()
        raise
    roots = FileRoots(settings.file_roots)
    limits = Limits(
        max_header_bytes=settings.max_header_bytes,
        max_tensors=settings.max_tensors,
        max_config_bytes=settings.max_config_bytes,
    )
    registry = AdapterRegistry(
        store=store,
        blobs=blobs,
        roots=roots,
        publisher_factory=lambda on_ready: Publisher(
            store=store,
            blobs=blobs,
            roots=roots,
            limits=limits,
            max_version_bytes=settings.max_version_bytes,
            staging_dir=settings.staging_dir,
            owner=settings.resolved_replica_id,
            lease_s=settings.pending_lease_s,
            idle_timeout_s=settings.upload_idle_timeout_s,
            on_ready=on_ready,
        ),
        copier=DurableCopier(
            store=store,
            blobs=blobs,
            roots=roots,
            workers=settings.copy_workers,
            max_attempts=settings.copy_max_attempts,
        ),
        retention=RetentionPolicy(
            keep_last=settings.keep_last_versions, min_age_s=settings.retention_min_age_s
        ),
        max_lora_rank=settings.max_lora_rank,
        watch_poll_interval_s=settings.watch_poll_interval_s,
    )
    idempotency = SqlIdempotencyStore(
        store.db, idempotency_answers, ttl_s=settings.idempotency_ttl_s
    )
    runtime = RegistryRuntime(
        registry=registry,
        store=store,
        blobs=blobs,
        idempotency=idempotency,
        app=ServiceApp(
            bindings=[
                servicer_binding(
                    RegistryServicer(
                        registry,
                        idempotency,
                        upload_header_timeout_s=settings.upload_idle_timeout_s,
                    )
                )
            ]
        ),
    )
    runtime.app.on_shutdown.append(runtime.close)
    try:
        swept = await idempotency.sweep()
        await registry.start()
        idempotency.start_sweeping()
    except BaseException:
        await runtime.close()
        raise
    log.info(
        "registry_ready",
        database=store.db.url.render_as_string(hide_password=True),
        durable_url=settings.resolved_durable_url,
        file_roots={node: str(path) for node, path in settings.file_roots.items()},
        replica_id=settings.resolved_replica_id,
        idempotency_swept=swept,
    )
    return runtime


async def build_app(settings: RegistrySettings) -> ServiceApp:
    return (await build_runtime(settings)).app
