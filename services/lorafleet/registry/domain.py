"""The adapter registry's domain: adapters, versions, aliases, retention, reads.

Publishing lives in ``publish.py`` (two-phase, see its docstring for how version
numbers stay gap-free), background durable copies in ``copier.py``; this module
wires them together and serves everything else. Nothing here knows protobuf.

Retention keeps, per adapter, the newest ``keep_last`` READY versions, every
version an alias points at (``latest`` included) and every version younger than
``min_age_s``. A running experiment protects the version it trains or serves
from by pointing an alias at it (or simply by it being among the newest K).
Deleting a version removes the registry's own copy of its bytes; node-local
files it was published from belong to the node's cache and are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import BinaryIO

import structlog

from lorafleet.core.errors import DataLoss, LorafleetError, NotFound
from lorafleet.core.sql import IdempotencyRecord
from lorafleet.registry import fields
from lorafleet.registry import metrics as registry_metrics
from lorafleet.registry.blobs import BlobStore, sha256_of, version_prefix
from lorafleet.registry.copier import DurableCopier
from lorafleet.registry.publish import Chunk, Publisher, UploadHeader
from lorafleet.registry.store.sql import SqlMetadataStore
from lorafleet.registry.types import Adapter, FileDigest, LoraSpec, Page, Version, VersionState
from lorafleet.registry.uris import FileRoots

log = structlog.get_logger(__name__)


class VersionEvents:
    """Wakes watchers when this replica made a version READY. Watchers also poll
    the database, which is how they see versions published via other replicas."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        """Take this before reading the database, wait on it after: a notify in
        between is then never missed."""
        return self._event

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass
class OpenVersion:
    """A version's files, verified against their digests and open for reading."""

    version: Version
    adapter: Adapter
    uri: str
    readers: dict[str, BinaryIO]

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


@dataclass(frozen=True)
class RetentionPolicy:
    keep_last: int
    min_age_s: float


class AdapterRegistry:
    def __init__(
        self,
        *,
        store: SqlMetadataStore,
        blobs: BlobStore,
        roots: FileRoots,
        publisher_factory: Callable[[Callable[[Version], None]], Publisher],
        copier: DurableCopier,
        retention: RetentionPolicy,
        max_lora_rank: int,
        watch_poll_interval_s: float,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._roots = roots
        self._copier = copier
        self._retention = retention
        self._max_lora_rank = max_lora_rank
        self._watch_poll_interval_s = watch_poll_interval_s
        self._events = VersionEvents()
        self._background: set[asyncio.Task[None]] = set()
        # Per adapter, the wall time before which a retention pass would retire
        # nothing (see `_apply_retention`).
        self._retention_due: dict[str, float] = {}
        self.publisher = publisher_factory(self._on_ready)

    @property
    def copier(self) -> DurableCopier:
        return self._copier

    async def start(self) -> None:
        await self.publisher.recover()
        await self._copier.start()

    async def close(self) -> None:
        await self._copier.close()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def settle(self) -> None:
        """Wait for background work (copies, retention) to finish; for tests."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)
        await self._copier.drain()

    def _on_ready(self, version: Version) -> None:
        self._events.notify()
        if not version.durable_uri:
            self._copier.enqueue(version)
        self._spawn(self._apply_retention(version.adapter_id))

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- adapters -------------------------------------------------------------

    async def create_adapter(
        self,
        adapter_id: str,
        *,
        experiment_id: str,
        base_model: str,
        lora: LoraSpec,
        labels: dict[str, str],
        record: IdempotencyRecord | None = None,
    ) -> Adapter:
        adapter = Adapter(
            adapter_id=fields.adapter_id(adapter_id),
            experiment_id=fields.experiment_id(experiment_id),
            base_model=fields.base_model(base_model),
            lora=fields.lora_spec(lora, max_rank=self._max_lora_rank),
            labels=fields.labels(labels),
            latest_version=0,
            create_time=time.time(),
        )
        created = await self._store.create_adapter(adapter, record)
        log.info("adapter_created", adapter_id=adapter_id, experiment_id=experiment_id)
        return created

    async def get_adapter(self, adapter_id: str) -> Adapter:
        return await self._store.get_adapter(fields.adapter_id(adapter_id))

    async def list_adapters(
        self, experiment_id: str, page_size: int, page_token: str
    ) -> Page[Adapter]:
        fields.experiment_id(experiment_id)
        limit = fields.page_size(page_size)
        after = fields.decode_page_token(page_token, "adapters", experiment_id) or ""
        items = await self._store.list_adapters(experiment_id, str(after), limit + 1)
        more = len(items) > limit
        items = items[:limit]
        token = (
            fields.encode_page_token("adapters", experiment_id, items[-1].adapter_id)
            if more
            else ""
        )
        return Page(items, token)

    async def delete_adapter(
        self, adapter_id: str, *, force: bool, record: IdempotencyRecord | None = None
    ) -> None:
        gone = await self._store.delete_adapter(
            fields.adapter_id(adapter_id), force=force, record=record
        )
        for version in gone:
            await self._delete_blobs(version)
        log.info("adapter_deleted", adapter_id=adapter_id, versions=len(gone), force=force)

    # -- publishing -----------------------------------------------------------

    async def publish_by_reference(
        self,
        adapter_id: str,
        *,
        expected_parent_version: int,
        uri: str,
        sha256: str,
        files: tuple[FileDigest, ...],
        training_step: int,
        metrics: dict[str, float],
        request_id: str,
        record: IdempotencyRecord | None = None,
    ) -> Version:
        with registry_metrics.publish_attempt("reference") as attempt:
            fields.adapter_id(adapter_id)
            version = await self.publisher.publish_by_reference(
                adapter_id,
                expected_parent_version=fields.parent_version(expected_parent_version),
                uri=uri,
                sha256=sha256,
                files=files,
                training_step=training_step,
                metrics=fields.metrics(metrics),
                request_id=request_id,
                record=record,
            )
            attempt.stored(version.size_bytes)
        return version

    async def upload(
        self,
        header: UploadHeader,
        chunks: AsyncIterator[Chunk],
        record: IdempotencyRecord | None = None,
    ) -> Version:
        with registry_metrics.publish_attempt("upload") as attempt:
            fields.adapter_id(header.adapter_id)
            fields.parent_version(header.expected_parent_version)
            fields.metrics(header.metrics)
            version = await self.publisher.upload(header, chunks, record=record)
            attempt.stored(version.size_bytes)
        return version

    # -- reading --------------------------------------------------------------

    async def get_version(self, adapter_id: str, version: int) -> Version:
        return await self._store.get_version(
            fields.adapter_id(adapter_id), fields.version_number(version)
        )

    async def list_versions(
        self, adapter_id: str, *, include_inactive: bool, page_size: int, page_token: str
    ) -> Page[Version]:
        fields.adapter_id(adapter_id)
        limit = fields.page_size(page_size)
        scope = f"{adapter_id}:{int(include_inactive)}"
        after = fields.decode_page_token(page_token, "versions", scope) or 0
        items = await self._store.list_versions(
            adapter_id, include_inactive=include_inactive, after=int(after), limit=limit + 1
        )
        more = len(items) > limit
        items = items[:limit]
        token = fields.encode_page_token("versions", scope, items[-1].version) if more else ""
        return Page(items, token)

    async def resolve(
        self, adapter_id: str, *, version: int = 0, alias: str = "", node_id: str = ""
    ) -> tuple[Version, Adapter, str]:
        """The READY version a selector names, its adapter, and the URI to use:
        a file:// on ``node_id`` if it has one there, else the durable copy,
        else wherever it was published from."""
        with registry_metrics.resolving(version, alias):
            fields.adapter_id(adapter_id)
            if version < 0:
                fields.version_number(version)
            found = await self._store.resolve(adapter_id, version=version, alias=alias)
            adapter = await self._store.get_adapter(adapter_id)
        return found, adapter, self.choose_uri(found, node_id)

    def choose_uri(self, version: Version, node_id: str = "") -> str:
        if node_id:
            for uri in version.uris:
                if self._roots.node_of_uri(uri) == node_id:
                    return uri
        if version.durable_uri:
            return version.durable_uri
        return version.uris[0] if version.uris else ""

    async def open_version(self, adapter_id: str, version: int) -> OpenVersion:
        """Open a READY version's files from the first of its locations whose
        bytes still match their digests (durable copy first).

        Raises:
            DataLoss: BLOB_CORRUPT (every copy fails its digest), BLOB_MISSING.
        """
        found = await self.get_version(adapter_id, version)
        if found.state != VersionState.READY:
            raise NotFound(
                f"adapters/{adapter_id}/versions/{version} is {found.state}; nothing to serve",
                reason="VERSION_NOT_READY",
                metadata={"adapter_id": adapter_id, "version": str(version)},
            )
        adapter = await self._store.get_adapter(adapter_id)
        ordered = sorted(found.uris, key=lambda u: u != found.durable_uri)
        corrupt = False
        for uri in ordered:
            try:
                readers = await self._open_verified(uri, found.files)
            except DataLoss as exc:
                corrupt = True
                log.error(
                    "stored_bytes_corrupt",
                    adapter_id=adapter_id,
                    version=version,
                    uri=uri,
                    error=exc.message,
                )
                continue
            except (LorafleetError, OSError) as exc:
                log.warning(
                    "stored_bytes_unreadable",
                    adapter_id=adapter_id,
                    version=version,
                    uri=uri,
                    error=str(exc),
                )
                continue
            return OpenVersion(found, adapter, uri, readers)
        if corrupt:
            raise DataLoss(
                f"adapters/{adapter_id}/versions/{version}: stored bytes no longer match their"
                " sha256; refusing to serve them",
                reason="BLOB_CORRUPT",
                metadata={"adapter_id": adapter_id, "version": str(version)},
            )
        raise DataLoss(
            f"adapters/{adapter_id}/versions/{version}: no readable copy of its bytes",
            reason="BLOB_MISSING",
            metadata={"adapter_id": adapter_id, "version": str(version)},
        )

    async def _open_verified(self, uri: str, files: tuple[FileDigest, ...]) -> dict[str, BinaryIO]:
        prefix = self._blobs.prefix_of(uri)
        readers: dict[str, BinaryIO] = {}
        try:
            for f in files:
                if prefix is not None:
                    reader = await self._blobs.open(f"{prefix}/{f.name}")
                else:
                    location = self._roots.locate(uri)
                    reader = await asyncio.to_thread(self._roots.open_file, location, f.name)
                readers[f.name] = reader
                actual, size = await asyncio.to_thread(sha256_of, reader)
                if actual != f.sha256 or size != f.size_bytes:
                    raise DataLoss(
                        f"{f.name} at {uri} hashes to {actual} ({size} bytes), expected"
                        f" {f.sha256} ({f.size_bytes} bytes)",
                        reason="BLOB_CORRUPT",
                    )
                reader.seek(0)
        except BaseException:
            for reader in readers.values():
                reader.close()
            raise
        return readers

    async def watch(
        self, adapter_ids: list[str], after_version: int
    ) -> AsyncIterator[tuple[Version, Adapter]]:
        """READY versions as they appear (after replaying those newer than
        ``after_version`` when it is set), oldest first per adapter."""
        wanted = [fields.adapter_id(a, "adapter_ids") for a in adapter_ids] or None
        if after_version < 0:
            fields.parent_version(after_version)
        if after_version:
            cursors: dict[str, int] = {}
            default = after_version
        else:
            cursors = await self._store.latest_versions(wanted)
            default = 0  # adapters created after the call: every version is new
        adapters: dict[str, Adapter] = {}
        registry_metrics.WATCH_STREAMS.inc()
        try:
            while True:
                event = self._events.current()
                found, cursors = await self._store.ready_versions_after(cursors, wanted, default)
                for version in found:
                    adapter = adapters.get(version.adapter_id)
                    if adapter is None:
                        adapter = adapters[version.adapter_id] = await self._store.get_adapter(
                            version.adapter_id
                        )
                    yield version, adapter
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), self._watch_poll_interval_s)
        finally:
            registry_metrics.WATCH_STREAMS.dec()

    # -- deletion, aliases, retention ------------------------------------------

    async def delete_version(
        self, adapter_id: str, version: int, record: IdempotencyRecord | None = None
    ) -> Version:
        before, after = await self._store.delete_version(
            fields.adapter_id(adapter_id), fields.version_number(version), record
        )
        if before.state == VersionState.READY:
            await self._delete_blobs(before)
            log.info("version_deleted", adapter_id=adapter_id, version=version, by="request")
        return after

    async def _delete_blobs(self, version: Version) -> None:
        prefix = version_prefix(version.adapter_id, version.version, version.attempt_id)
        try:
            await self._blobs.delete_prefix(prefix)
        except Exception as exc:  # the metadata is already DELETED; bytes are only garbage now
            log.warning("blob_cleanup_failed", prefix=prefix, error=str(exc))

    async def _apply_retention(self, adapter_id: str, *, force: bool = False) -> None:
        """Retire what the policy allows. Runs after every publish, but skips the
        metadata store until the oldest version it could retire has aged past
        `min_age_s` (`_retention_due`); alias changes, which can free an older
        version at any moment, `force` a pass."""
        due = self._retention_due.get(adapter_id)
        if not force and due is not None and time.time() < due:
            return
        try:
            outcome = await self._store.apply_retention(
                adapter_id, keep_last=self._retention.keep_last, min_age_s=self._retention.min_age_s
            )
        except NotFound:
            self._retention_due.pop(adapter_id, None)
            return
        except Exception:
            log.exception("retention_failed", adapter_id=adapter_id)
            return
        if outcome.next_due_s is None:
            self._retention_due.pop(adapter_id, None)
        else:
            self._retention_due[adapter_id] = outcome.next_due_s
        doomed = outcome.retired
        for version in doomed:
            await self._delete_blobs(version)
        if doomed:
            registry_metrics.VERSIONS_RETIRED.inc(len(doomed))
            log.info(
                "versions_retired",
                adapter_id=adapter_id,
                versions=[v.version for v in doomed],
                keep_last=self._retention.keep_last,
            )

    async def set_alias(
        self,
        adapter_id: str,
        alias: str,
        version: int,
        expected_current_version: int | None,
        record: IdempotencyRecord | None = None,
    ) -> Version:
        result = await self._store.set_alias(
            fields.adapter_id(adapter_id),
            fields.user_alias(alias),
            fields.version_number(version),
            expected_current_version,
            record,
        )
        log.info("alias_set", adapter_id=adapter_id, alias=alias, version=version)
        # A moved alias may have let go of an old version.
        self._spawn(self._apply_retention(adapter_id, force=True))
        return result

    async def delete_alias(
        self, adapter_id: str, alias: str, record: IdempotencyRecord | None = None
    ) -> None:
        await self._store.delete_alias(
            fields.adapter_id(adapter_id), fields.user_alias(alias), record
        )
        log.info("alias_deleted", adapter_id=adapter_id, alias=alias)
        # The version it protected may now be past retention.
        self._spawn(self._apply_retention(adapter_id, force=True))

    async def list_aliases(self, adapter_id: str) -> list[tuple[str, int]]:
        return await self._store.list_aliases(fields.adapter_id(adapter_id))
