"""The durable store for version bytes: a local directory or an S3-compatible bucket.

Keys look like ``adapters/<adapter_id>/<version:08d>-<attempt>/<file>``: the
attempt id keeps a superseded, still-running publish from ever writing over the
bytes of the attempt that now holds the same version number.

Local writes are crash-safe: temp file in the target directory, fsync, rename,
fsync of the directory, so after a crash a key either holds all of its bytes or
does not exist. Every write hashes what it wrote and refuses bytes that do not
match the expected sha256.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import BinaryIO, Protocol
from urllib.parse import urlsplit

import structlog

from lorafleet.core.errors import DataLoss, InvalidArgument, NotFound, Unavailable

log = structlog.get_logger(__name__)

COPY_BUFFER_BYTES = 1 << 20


def version_prefix(adapter_id: str, version: int, attempt_id: str) -> str:
    return f"adapters/{adapter_id}/{version:08d}-{attempt_id[:12]}"


def sha256_of(f: BinaryIO) -> tuple[str, int]:
    """Hash ``f`` from its current position to the end; returns (hex, bytes)."""
    digest = hashlib.sha256()
    size = 0
    while chunk := f.read(COPY_BUFFER_BYTES):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


class BlobStore(Protocol):
    """Where the registry keeps its own copy of every version."""

    def uri_for(self, prefix: str) -> str:
        """The URI of a version directory (what goes into ``AdapterVersion.uris``)."""
        ...

    def prefix_of(self, uri: str) -> str | None:
        """The key prefix of a version URI of this store, or None if not ours."""
        ...

    async def put(self, key: str, source: BinaryIO, sha256: str) -> None:
        """Store ``source`` (read to its end) at ``key``; DataLoss if its bytes do
        not hash to ``sha256`` (nothing is left at ``key`` then)."""
        ...

    async def put_local_file(self, key: str, path: Path, sha256: str) -> None:
        """Like ``put`` for a finished, fsynced local file the caller gives up
        (a local store may rename it into place instead of copying)."""
        ...

    async def open(self, key: str) -> BinaryIO:
        """A seekable reader of ``key``'s bytes (remote stores spool to a local
        temp file). NotFound when missing."""
        ...

    async def delete_prefix(self, prefix: str) -> None: ...

    async def close(self) -> None: ...


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_hashing(source: BinaryIO, dest: BinaryIO) -> str:
    digest = hashlib.sha256()
    while chunk := source.read(COPY_BUFFER_BYTES):
        digest.update(chunk)
        dest.write(chunk)
    return digest.hexdigest()


class LocalBlobStore:
    """Versions under a local directory (the default durable store)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(os.path.realpath(root))
        self.root.mkdir(parents=True, exist_ok=True)

    def uri_for(self, prefix: str) -> str:
        return (self.root / prefix).as_uri()

    def prefix_of(self, uri: str) -> str | None:
        parts = urlsplit(uri)
        if parts.scheme != "file":
            return None
        path = os.path.normpath(parts.path)
        root = str(self.root)
        if not path.startswith(root + os.sep):
            return None
        return path[len(root) + 1 :]

    def _path(self, key: str) -> Path:
        path = self.root / key
        if ".." in Path(key).parts or key.startswith("/"):
            raise InvalidArgument(f"invalid blob key {key!r}", reason="INVALID_BLOB_KEY")
        return path

    def _make_parents(self, path: Path) -> None:
        # fsync every directory this write created, from the top down, so the new
        # entry survives a power loss together with the file.
        missing = []
        parent = path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        path.parent.mkdir(parents=True, exist_ok=True)
        for created in reversed(missing):
            _fsync_dir(created.parent)

    def _put_sync(self, key: str, source: BinaryIO, sha256: str) -> None:
        dest = self._path(key)
        self._make_parents(dest)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                actual = _copy_hashing(source, out)
                out.flush()
                os.fsync(out.fileno())
            if actual != sha256:
                raise DataLoss(
                    f"bytes for {key} hash to {actual}, expected {sha256}",
                    reason="DIGEST_MISMATCH",
                    metadata={"key": key},
                )
            os.replace(tmp, dest)
            _fsync_dir(dest.parent)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise

    async def put(self, key: str, source: BinaryIO, sha256: str) -> None:
        await asyncio.to_thread(self._put_sync, key, source, sha256)

    def _put_local_sync(self, key: str, path: Path, sha256: str) -> None:
        dest = self._path(key)
        self._make_parents(dest)
        try:
            os.replace(path, dest)
        except OSError:
            # Another filesystem: copy (hashing again on the way).
            with open(path, "rb") as source:
                self._put_sync(key, source, sha256)
            os.unlink(path)
            return
        _fsync_dir(dest.parent)

    async def put_local_file(self, key: str, path: Path, sha256: str) -> None:
        await asyncio.to_thread(self._put_local_sync, key, path, sha256)

    def _open_sync(self, key: str) -> BinaryIO:
        try:
            fd = os.open(self._path(key), os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NotFound(f"blob {key} is missing", reason="BLOB_MISSING") from None
        return os.fdopen(fd, "rb")

    async def open(self, key: str) -> BinaryIO:
        return await asyncio.to_thread(self._open_sync, key)

    def _delete_sync(self, prefix: str) -> None:
        path = self._path(prefix)
        shutil.rmtree(path, ignore_errors=True)
        if path.parent.exists():
            _fsync_dir(path.parent)

    async def delete_prefix(self, prefix: str) -> None:
        await asyncio.to_thread(self._delete_sync, prefix)

    async def close(self) -> None:
        return None


class S3BlobStore:
    """Versions in an S3-compatible bucket (boto3, run in worker threads).

    S3 PUTs are atomic per object, so no temp-and-rename dance is needed; the
    bytes are hashed on the way up and the object deleted if they do not match.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None,
        region: str,
        spool_dir: Path,
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise InvalidArgument(
                "durable_url is s3:// but boto3 is not installed (pip install lorafleet[s3])",
                reason="S3_UNAVAILABLE",
            ) from exc
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise InvalidArgument(f"invalid S3 URL {url!r}", reason="INVALID_URI")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.spool_dir = spool_dir
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._client = boto3.client(
            "s3",
            endpoint_url=endpoint_url,
            region_name=region,
            config=Config(retries={"max_attempts": 5, "mode": "standard"}),
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri_for(self, prefix: str) -> str:
        return f"s3://{self.bucket}/{self._key(prefix)}"

    def prefix_of(self, uri: str) -> str | None:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.netloc != self.bucket:
            return None
        path = parts.path.lstrip("/")
        if self.prefix:
            if not path.startswith(self.prefix + "/"):
                return None
            path = path[len(self.prefix) + 1 :]
        return path

    async def ensure_bucket(self) -> None:
        def run() -> None:
            from botocore.exceptions import ClientError

            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError:
                self._client.create_bucket(Bucket=self.bucket)

        await self._call(run)

    async def _call(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"S3 object missing: {exc}", reason="BLOB_MISSING") from None
            raise Unavailable(f"S3 error: {exc}", reason="BLOB_STORE_UNAVAILABLE") from exc
        except BotoCoreError as exc:
            raise Unavailable(f"S3 error: {exc}", reason="BLOB_STORE_UNAVAILABLE") from exc

    def _put_sync(self, key: str, source: BinaryIO, sha256: str) -> None:
        # Spool first: the hash must be known before the object becomes visible
        # under its key, and boto3 may re-read the body on retries.
        with tempfile.TemporaryFile(dir=self.spool_dir) as spool:
            actual = _copy_hashing(source, spool)
            if actual != sha256:
                raise DataLoss(
                    f"bytes for {key} hash to {actual}, expected {sha256}",
                    reason="DIGEST_MISMATCH",
                    metadata={"key": key},
                )
            spool.seek(0)
            self._client.upload_fileobj(
                spool, self.bucket, self._key(key), ExtraArgs={"Metadata": {"sha256": sha256}}
            )

    async def put(self, key: str, source: BinaryIO, sha256: str) -> None:
        await self._call(self._put_sync, key, source, sha256)

    async def put_local_file(self, key: str, path: Path, sha256: str) -> None:
        def run() -> None:
            with open(path, "rb") as source:
                self._put_sync(key, source, sha256)
            os.unlink(path)

        await self._call(run)

    def _open_sync(self, key: str) -> BinaryIO:
        # Returned open to the caller, who closes it.
        spool = tempfile.TemporaryFile(dir=self.spool_dir)  # noqa: SIM115
        try:
            self._client.download_fileobj(self.bucket, self._key(key), spool)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return spool  # type: ignore[return-value]

    async def open(self, key: str) -> BinaryIO:
        return await self._call(self._open_sync, key)

    def _delete_sync(self, prefix: str) -> None:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix) + "/"):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys})

    async def delete_prefix(self, prefix: str) -> None:
        await self._call(self._delete_sync, prefix)

    async def close(self) -> None:
        self._client.close()


def new_attempt_id() -> str:
    return uuid.uuid4().hex


async def open_blob_store(
    url: str, *, endpoint_url: str | None, region: str, spool_dir: Path
) -> BlobStore:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return LocalBlobStore(Path(parts.path))
    if parts.scheme == "s3":
        store = S3BlobStore(url, endpoint_url=endpoint_url, region=region, spool_dir=spool_dir)
        await store.ensure_bucket()
        return store
    raise InvalidArgument(
        f"durable_url must be file:// or s3://, got {url!r}", reason="UNSUPPORTED_URI_SCHEME"
    )
