"""Publishing a version, by reference or by upload; both two-phase.

Version numbers
---------------
A publish first *reserves* the next number as a PENDING row (in one transaction
that checks ``expected_parent_version`` against the latest READY version), then
verifies the bytes, then flips the row to READY and moves ``latest``, again in
one transaction. At most one PENDING row exists per adapter and it is always the
highest number, so:

- concurrent publishers on the same parent: the first reservation wins, every
  other one gets ABORTED (PUBLISH_IN_PROGRESS while the winner verifies,
  PARENT_VERSION_MISMATCH after it committed);
- a publish that fails (bad bytes, client gone, registry killed) *releases* its
  number: the PENDING row is deleted, nothing was ever READY under it, and since
  it was the highest number no gap opens. Versions clients can see are numbered
  1, 2, 3, ... without gaps or duplicates; FAILED is therefore never written by
  this implementation (the state stays in the API for other registries).
- a PENDING row carries a lease renewed while its attempt is alive; an expired
  one, or one left by an earlier attempt with the same ``request_id`` (a client
  retry), is taken over. At start a replica drops the PENDING rows it owned in
  its previous life (see ``recover``) and wipes its staging directory.

Idempotency: the request's answer is written in the same transaction as
PENDING -> READY, so a crash can never leave a READY version whose request_id a
retry would not find.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import structlog

from lorafleet.core.errors import DataLoss, DeadlineExceeded, InvalidArgument
from lorafleet.core.sql import IdempotencyRecord
from lorafleet.registry.blobs import BlobStore, new_attempt_id, sha256_of, version_prefix
from lorafleet.registry.manifest import (
    check_declared_files,
    check_manifest_digest,
    manifest_sha256,
)
from lorafleet.registry.store.sql import AbandonedAttempt, SqlMetadataStore
from lorafleet.registry.types import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    FileDigest,
    LoraSpec,
    Reservation,
    Version,
)
from lorafleet.registry.uris import FileLocation, FileRoots
from lorafleet.registry.validation import (
    Limits,
    check_adapter_config,
    check_lora_tensors,
    read_safetensors_header,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class UploadHeader:
    adapter_id: str
    expected_parent_version: int
    files: tuple[FileDigest, ...]
    training_step: int
    metrics: dict[str, float]
    request_id: str


@dataclass(frozen=True)
class Chunk:
    file_name: str
    offset: int
    data: bytes


def verify_version_files(
    open_file: Callable[[str], BinaryIO],
    declared: tuple[FileDigest, ...],
    spec: LoraSpec,
    limits: Limits,
    *,
    check_digests: bool,
) -> None:
    """Sizes, then structure against ``spec``, then (optionally) sha256: cheap
    checks first, so hostile input is refused before it is hashed.

    Raises:
        DataLoss: SIZE_MISMATCH, DIGEST_MISMATCH (bytes differ from their digests).
        InvalidArgument / ResourceExhausted: from ``validation``.
    """
    for f in declared:
        with open_file(f.name) as handle:
            size = os.fstat(handle.fileno()).st_size
            if size != f.size_bytes:
                raise DataLoss(
                    f"{f.name} is {size} bytes, declared {f.size_bytes}",
                    reason="SIZE_MISMATCH",
                    metadata={"file": f.name},
                )
            if f.name == WEIGHTS_FILE:
                check_lora_tensors(read_safetensors_header(handle, size, limits), spec)
            elif f.name == CONFIG_FILE:
                check_adapter_config(handle.read(limits.max_config_bytes + 1), spec)
            if check_digests:
                handle.seek(0)
                actual, _ = sha256_of(handle)
                if actual != f.sha256:
                    raise DataLoss(
                        f"{f.name} hashes to {actual}, declared {f.sha256}",
                        reason="DIGEST_MISMATCH",
                        metadata={"file": f.name},
                    )


async def _with_idle_timeout(
    chunks: AsyncIterator[Chunk], timeout_s: float
) -> AsyncIterator[Chunk]:
    iterator = chunks.__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(iterator.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise DeadlineExceeded(
                f"upload sent nothing for {timeout_s}s", reason="UPLOAD_IDLE_TIMEOUT"
            ) from None
        yield chunk


class _StagedFile:
    def __init__(self, path: Path) -> None:
        self.handle = open(path, "wb")  # noqa: SIM115 - closed in finish()/close()
        self.digest = hashlib.sha256()
        self.written = 0

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.handle.write(data)
        self.written += len(data)

    def finish(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def close(self) -> None:
        self.handle.close()


class Publisher:
    """Runs publish attempts: reserve, verify, store, finalize or release."""

    def __init__(
        self,
        *,
        store: SqlMetadataStore,
        blobs: BlobStore,
        roots: FileRoots,
        limits: Limits,
        max_version_bytes: int,
        staging_dir: Path,
        owner: str,
        lease_s: float,
        idle_timeout_s: float,
        on_ready: Callable[[Version], None],
    ) -> None:
        self._store = store
        self._blobs = blobs
        self._roots = roots
        self._limits = limits
        self._max_version_bytes = max_version_bytes
        self._staging_dir = staging_dir
        self._owner = owner
        self._lease_s = lease_s
        self._idle_timeout_s = idle_timeout_s
        self._on_ready = on_ready

    def _declared(self, files: tuple[FileDigest, ...]) -> tuple[FileDigest, ...]:
        return check_declared_files(
            files,
            max_version_bytes=self._max_version_bytes,
            max_config_bytes=self._limits.max_config_bytes,
        )

    async def recover(self) -> int:
        """Clean up after this replica's previous life; returns PENDING rows dropped."""
        abandoned = await self._store.recover(self._owner)
        for attempt in abandoned:
            await self._discard_blobs(attempt)
        await asyncio.to_thread(shutil.rmtree, self._staging_dir, True)
        self._staging_dir.mkdir(parents=True, exist_ok=True)
        if abandoned:
            log.info(
                "pending_publishes_recovered",
                count=len(abandoned),
                versions=[f"{a.adapter_id}/{a.version}" for a in abandoned],
            )
        return len(abandoned)

    async def _discard_blobs(self, attempt: AbandonedAttempt) -> None:
        prefix = version_prefix(attempt.adapter_id, attempt.version, attempt.attempt_id)
        try:
            await self._blobs.delete_prefix(prefix)
        except Exception as exc:  # leftovers are harmless; the publish must not fail for them
            log.warning("blob_cleanup_failed", prefix=prefix, error=str(exc))
        await asyncio.to_thread(shutil.rmtree, self._staging_dir / attempt.attempt_id, True)

    async def _reserve(
        self,
        adapter_id: str,
        *,
        expected_parent_version: int,
        declared: tuple[FileDigest, ...],
        training_step: int,
        metrics: dict[str, float],
        source_uri: str,
        request_id: str,
    ) -> Reservation:
        reservation, abandoned = await self._store.reserve_version(
            adapter_id,
            expected_parent_version=expected_parent_version,
            files=declared,
            sha256=manifest_sha256(declared),
            size_bytes=sum(f.size_bytes for f in declared),
            training_step=training_step,
            metrics=metrics,
            source_uri=source_uri,
            request_id=request_id,
            attempt_id=new_attempt_id(),
            owner=self._owner,
            lease_s=self._lease_s,
        )
        for attempt in abandoned:
            log.info(
                "pending_publish_taken_over",
                adapter_id=attempt.adapter_id,
                version=attempt.version,
                attempt_id=attempt.attempt_id,
            )
            await self._discard_blobs(attempt)
        return reservation

    @contextlib.asynccontextmanager
    async def _leased(self, reservation: Reservation) -> AsyncIterator[None]:
        async def renew() -> None:
            while True:
                await asyncio.sleep(self._lease_s / 3)
                if not await self._store.renew_lease(reservation, self._lease_s):
                    log.warning(
                        "pending_publish_lost",
                        adapter_id=reservation.adapter.adapter_id,
                        version=reservation.version,
                    )
                    return

        task = asyncio.create_task(renew())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _release(self, reservation: Reservation, error: BaseException) -> None:
        # Shielded: when the client went away the handler is being cancelled, and
        # the number must still be given back.
        async def run() -> None:
            await self._store.release_version(reservation)
            await self._discard_blobs(
                AbandonedAttempt(
                    reservation.adapter.adapter_id, reservation.version, reservation.attempt_id
                )
            )

        log.info(
            "publish_failed",
            adapter_id=reservation.adapter.adapter_id,
            version=reservation.version,
            error_type=type(error).__name__,
            reason=getattr(error, "reason", ""),
        )
        with contextlib.suppress(Exception):
            await asyncio.shield(run())

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
        record: IdempotencyRecord | None,
    ) -> Version:
        declared = self._declared(files)
        check_manifest_digest(declared, sha256)
        # Bad URIs are refused before a number is reserved.
        location = self._roots.locate(uri)
        reservation = await self._reserve(
            adapter_id,
            expected_parent_version=expected_parent_version,
            declared=declared,
            training_step=training_step,
            metrics=metrics,
            source_uri=Path(location.directory).as_uri(),
            request_id=request_id,
        )
        try:
            async with self._leased(reservation):
                await asyncio.to_thread(
                    self._verify_location, location, declared, reservation.adapter.lora
                )
                version = await self._store.finalize_version(
                    reservation, durable_uri="", idempotency_record=record
                )
        except BaseException as exc:
            await self._release(reservation, exc)
            raise
        log.info(
            "version_published",
            adapter_id=adapter_id,
            version=version.version,
            mode="reference",
            size_bytes=version.size_bytes,
        )
        self._on_ready(version)
        return version

    def _verify_location(
        self, location: FileLocation, declared: tuple[FileDigest, ...], spec: LoraSpec
    ) -> None:
        verify_version_files(
            lambda name: self._roots.open_file(location, name),
            declared,
            spec,
            self._limits,
            check_digests=True,
        )

    async def upload(
        self,
        header: UploadHeader,
        chunks: AsyncIterator[Chunk],
        *,
        record: IdempotencyRecord | None,
    ) -> Version:
        declared = self._declared(header.files)
        reservation = await self._reserve(
            header.adapter_id,
            expected_parent_version=header.expected_parent_version,
            declared=declared,
            training_step=header.training_step,
            metrics=header.metrics,
            source_uri="",
            request_id=header.request_id,
        )
        staging = self._staging_dir / reservation.attempt_id
        try:
            async with self._leased(reservation):
                await self._receive(staging, declared, chunks)
                await asyncio.to_thread(
                    verify_version_files,
                    lambda name: open(staging / name, "rb"),  # noqa: SIM115 - caller closes
                    declared,
                    reservation.adapter.lora,
                    self._limits,
                    check_digests=False,  # hashed while receiving
                )
                prefix = version_prefix(
                    header.adapter_id, reservation.version, reservation.attempt_id
                )
                for f in declared:
                    await self._blobs.put_local_file(
                        f"{prefix}/{f.name}", staging / f.name, f.sha256
                    )
                version = await self._store.finalize_version(
                    reservation,
                    durable_uri=self._blobs.uri_for(prefix),
                    idempotency_record=record,
                )
        except BaseException as exc:
            await self._release(reservation, exc)
            raise
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, staging, True))
        log.info(
            "version_published",
            adapter_id=header.adapter_id,
            version=version.version,
            mode="upload",
            size_bytes=version.size_bytes,
        )
        self._on_ready(version)
        return version

    async def _receive(
        self, staging: Path, declared: tuple[FileDigest, ...], chunks: AsyncIterator[Chunk]
    ) -> None:
        """Write the chunks to ``staging`` (in order, within the declared sizes,
        hashing as they come) and fsync them."""
        expected = {f.name: f for f in declared}
        staging.mkdir(parents=True, exist_ok=True)
        files = {name: _StagedFile(staging / name) for name in expected}
        try:
            async for chunk in _with_idle_timeout(chunks, self._idle_timeout_s):
                staged = files.get(chunk.file_name)
                if staged is None:
                    raise InvalidArgument(
                        f"chunk for undeclared file {chunk.file_name!r}",
                        reason="UNEXPECTED_FILE",
                        metadata={"file": chunk.file_name},
                    )
                if chunk.offset != staged.written:
                    raise InvalidArgument(
                        f"chunk of {chunk.file_name} at offset {chunk.offset}, expected"
                        f" {staged.written} (chunks of a file arrive in order)",
                        reason="CHUNK_OUT_OF_ORDER",
                        metadata={"file": chunk.file_name},
                    )
                if staged.written + len(chunk.data) > expected[chunk.file_name].size_bytes:
                    raise InvalidArgument(
                        f"{chunk.file_name} grows past its declared size"
                        f" {expected[chunk.file_name].size_bytes}",
                        reason="UPLOAD_EXCEEDS_DECLARED_SIZE",
                        metadata={"file": chunk.file_name},
                    )
                if chunk.data:
                    await asyncio.to_thread(staged.write, chunk.data)
            for name, staged in files.items():
                want = expected[name]
                if staged.written != want.size_bytes:
                    raise InvalidArgument(
                        f"{name}: received {staged.written} of {want.size_bytes} bytes",
                        reason="UPLOAD_INCOMPLETE",
                        metadata={"file": name},
                    )
                if staged.digest.hexdigest() != want.sha256:
                    raise DataLoss(
                        f"{name} hashes to {staged.digest.hexdigest()}, declared {want.sha256}",
                        reason="DIGEST_MISMATCH",
                        metadata={"file": name},
                    )
            for staged in files.values():
                await asyncio.to_thread(staged.finish)
        finally:
            for staged in files.values():
                staged.close()
