"""Background copies of by-reference versions into the durable store.

A version published by reference is READY as soon as its node-local files are
verified; copying them to the durable store happens here, off the publish path.
The durable URI is recorded only after the copy was written, read back and
hashed to the version's digests. Versions still without a durable copy are
re-queued at start, so a restart loses no copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import structlog

from lorafleet.core.errors import LorafleetError, Unavailable
from lorafleet.registry import metrics as registry_metrics
from lorafleet.registry.blobs import BlobStore, sha256_of, version_prefix
from lorafleet.registry.store.sql import SqlMetadataStore
from lorafleet.registry.types import FileDigest, Version
from lorafleet.registry.uris import FileRoots

log = structlog.get_logger(__name__)

# Backoff between tries of one copy: transient store outages heal in seconds,
# and a long wait only delays durability, never a publish.
_BACKOFF_S = (0.5, 2.0, 5.0, 15.0, 30.0)


@dataclass(frozen=True)
class CopyJob:
    adapter_id: str
    version: int
    attempt_id: str
    source_uri: str
    files: tuple[FileDigest, ...]

    @classmethod
    def of(cls, version: Version) -> CopyJob:
        return cls(
            version.adapter_id, version.version, version.attempt_id, version.uris[0], version.files
        )


class DurableCopier:
    def __init__(
        self,
        *,
        store: SqlMetadataStore,
        blobs: BlobStore,
        roots: FileRoots,
        workers: int,
        max_attempts: int,
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._roots = roots
        self._workers = workers
        self._max_attempts = max_attempts
        self._queue: asyncio.Queue[tuple[CopyJob, int]] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._retries: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        for version in await self._store.versions_without_durable_copy():
            if version.uris:
                self.enqueue(version)
        self._tasks = [asyncio.create_task(self._work()) for _ in range(self._workers)]

    def enqueue(self, version: Version) -> None:
        self._queue.put_nowait((CopyJob.of(version), 1))

    async def drain(self) -> None:
        """Wait until every queued copy finished (tests, orderly shutdown)."""
        await self._queue.join()
        while self._retries:
            await asyncio.gather(*self._retries, return_exceptions=True)
            await self._queue.join()

    async def close(self) -> None:
        for task in [*self._tasks, *self._retries]:
            task.cancel()
        for task in [*self._tasks, *self._retries]:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _work(self) -> None:
        while True:
            job, attempt = await self._queue.get()
            try:
                started = time.perf_counter()
                await self._copy(job)
                registry_metrics.DURABLE_COPIES.labels("ok").inc()
                registry_metrics.DURABLE_COPY_SECONDS.observe(time.perf_counter() - started)
            except (Unavailable, OSError) as exc:
                if attempt >= self._max_attempts:
                    registry_metrics.DURABLE_COPIES.labels("failed").inc()
                    log.error(
                        "durable_copy_gave_up",
                        adapter_id=job.adapter_id,
                        version=job.version,
                        attempts=attempt,
                        error=str(exc),
                    )
                else:
                    delay = _BACKOFF_S[min(attempt - 1, len(_BACKOFF_S) - 1)]
                    registry_metrics.DURABLE_COPIES.labels("retry").inc()
                    log.warning(
                        "durable_copy_retry",
                        adapter_id=job.adapter_id,
                        version=job.version,
                        attempt=attempt,
                        delay_s=delay,
                        error=str(exc),
                    )
                    self._schedule_retry(job, attempt + 1, delay)
            except LorafleetError as exc:
                # Source gone or no longer matching its digest: retrying cannot help.
                registry_metrics.DURABLE_COPIES.labels("failed").inc()
                log.error(
                    "durable_copy_failed",
                    adapter_id=job.adapter_id,
                    version=job.version,
                    reason=exc.reason,
                    error=exc.message,
                )
            except Exception:
                registry_metrics.DURABLE_COPIES.labels("failed").inc()
                log.exception(
                    "durable_copy_crashed", adapter_id=job.adapter_id, version=job.version
                )
            finally:
                self._queue.task_done()

    def _schedule_retry(self, job: CopyJob, attempt: int, delay: float) -> None:
        async def later() -> None:
            await asyncio.sleep(delay)
            self._queue.put_nowait((job, attempt))

        task = asyncio.create_task(later())
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    async def _copy(self, job: CopyJob) -> None:
        location = self._roots.locate(job.source_uri)
        prefix = version_prefix(job.adapter_id, job.version, job.attempt_id)
        for f in job.files:
            source = await asyncio.to_thread(self._roots.open_file, location, f.name)
            with source:
                await self._blobs.put(f"{prefix}/{f.name}", source, f.sha256)
        # Read back what the store now holds: the copy counts only once it is
        # known to be intact where it will be served from.
        for f in job.files:
            reader = await self._blobs.open(f"{prefix}/{f.name}")
            with reader:
                actual, _ = await asyncio.to_thread(sha256_of, reader)
            if actual != f.sha256:
                await self._blobs.delete_prefix(prefix)
                raise Unavailable(
                    f"durable copy of {f.name} read back as {actual}", reason="COPY_NOT_VERIFIED"
                )
        uri = self._blobs.uri_for(prefix)
        if await self._store.add_durable_uri(job.adapter_id, job.version, job.attempt_id, uri):
            registry_metrics.DURABLE_COPY_BYTES.inc(sum(f.size_bytes for f in job.files))
            log.info("durable_copy_done", adapter_id=job.adapter_id, version=job.version, uri=uri)
        else:
            # Deleted while we copied: do not leave bytes behind for it.
            await self._blobs.delete_prefix(prefix)
