"""Where the trainer writes: the node-local adapter cache and state checkpoints.

Layout (all under directories from the settings, made absolute at start):

- ``<adapter_cache_dir>/<adapter_id>/v<N>/`` — version N of a registry adapter, in
  PEFT's layout (``adapter_config.json`` + ``adapter_model.safetensors``), written
  into a hidden staging directory next to it and renamed into place, so a reader
  (registry, rollout) never sees a half-written version directory;
- ``<state_dir>/<adapter_id>/step-<step>-<sha256 prefix>.safetensors`` — SaveState
  checkpoints (adapter weights + AdamW moments + step + spec + optimizer config),
  written to a temp file and renamed; their bytes are deterministic, so the same
  state always lands at the same name with the same digest;
- ``<state_dir>/fencing-tokens.jsonl`` — the highest fencing token per adapter
  (``trainer/fencing.py``), read back at start.

Torch-free: this module only moves bytes and files.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lorafleet.core.errors import DataLoss, InvalidArgument, NotFound, ResourceExhausted
from lorafleet.core.validation import ID_PATTERN

_ID_RE = re.compile(ID_PATTERN)
DOWNLOADS_SUBDIR = ".trainer-downloads"


def check_id(value: str, field: str) -> str:
    """Adapter ids become directory names: they must be the mesh's id form."""
    if not _ID_RE.fullmatch(value or ""):
        raise InvalidArgument(
            f"{field} {value!r} must match {ID_PATTERN}",
            reason="INVALID_ADAPTER_ID",
            metadata={"field": field},
        )
    return value


def local_path(uri: str) -> Path:
    """The absolute path of a ``file://`` URI (INVALID_ARGUMENT for anything else)."""
    parts = urlsplit(uri)
    if parts.scheme != "file":
        raise InvalidArgument(
            f"only file:// URIs are supported here, got {parts.scheme or 'no'} scheme",
            reason="UNSUPPORTED_URI_SCHEME",
            metadata={"uri": uri},
        )
    path = unquote(parts.path)
    if parts.netloc not in ("", "localhost") or not path.startswith("/"):
        raise InvalidArgument(
            "file:// URIs must be file:///absolute/path",
            reason="INVALID_URI",
            metadata={"uri": uri},
        )
    return Path(path)


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass(frozen=True)
class AdapterCache:
    """The node-local adapter cache directory (shared with the rollout service)."""

    root: Path

    def version_dir(self, adapter_id: str, version: int) -> Path:
        return self.root / adapter_id / f"v{version}"

    def staging_dir(self, adapter_id: str, version: int) -> Path:
        """A fresh hidden directory beside the version's final place (same file
        system, so the final rename is atomic)."""
        parent = self.root / adapter_id
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".v{version}.", suffix=".tmp", dir=parent))

    def download_dir(self) -> Path:
        base = self.root / DOWNLOADS_SUBDIR
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="dl-", dir=base))

    @staticmethod
    def commit(staging: Path, final: Path) -> None:
        """Rename ``staging`` to ``final`` (which must not exist)."""
        os.rename(staging, final)
        _fsync_dir(final.parent)

    @staticmethod
    def remove(path: Path) -> None:
        shutil.rmtree(path, ignore_errors=True)


@dataclass(frozen=True)
class SavedState:
    uri: str
    sha256: str
    size_bytes: int


class StateStore:
    """SaveState checkpoints as files; handed around as ``file://`` URI + sha256."""

    def __init__(self, root: Path, *, max_bytes: int, keep_last: int = 0) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self.keep_last = keep_last
        """Checkpoints kept per adapter (newest steps first); 0 keeps every one."""

    def write(self, adapter_id: str, step: int, data: bytes) -> SavedState:
        digest = hashlib.sha256(data).hexdigest()
        directory = self.root / adapter_id
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"step-{step:08d}-{digest[:16]}.safetensors"
        tmp = directory / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(directory)
        self._prune(directory, keep=path)
        return SavedState(path.as_uri(), digest, len(data))

    def _prune(self, directory: Path, keep: Path) -> None:
        # A scheduler checkpoints every few steps and keeps only the newest URI;
        # older files would otherwise pile up in the node cache (tmpfs).
        if self.keep_last <= 0:
            return
        files = sorted(directory.glob("step-*.safetensors"), key=lambda p: p.name, reverse=True)
        for old in files[self.keep_last :]:
            if old != keep:
                with contextlib.suppress(OSError):
                    old.unlink()

    def read(self, uri: str, sha256: str) -> bytes:
        """The checkpoint's bytes, verified against ``sha256`` (DATA_LOSS otherwise)."""
        path = local_path(uri)
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise InvalidArgument(
                    f"{uri} is not a file", reason="STATE_NOT_A_FILE", metadata={"uri": uri}
                )
            if size > self.max_bytes:
                raise ResourceExhausted(
                    f"state checkpoint of {size} bytes exceeds max_state_bytes {self.max_bytes}",
                    reason="STATE_TOO_LARGE",
                    metadata={"uri": uri},
                )
            data = path.read_bytes()
        except FileNotFoundError:
            raise NotFound(
                f"state checkpoint {uri} does not exist",
                reason="STATE_NOT_FOUND",
                metadata={"uri": uri},
            ) from None
        except PermissionError:
            raise NotFound(
                f"state checkpoint {uri} is not readable here",
                reason="STATE_NOT_FOUND",
                metadata={"uri": uri},
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.lower():
            raise DataLoss(
                f"state checkpoint {uri} has sha256 {actual}, expected {sha256}",
                reason="STATE_DIGEST_MISMATCH",
                metadata={"uri": uri, "expected_sha256": sha256, "actual_sha256": actual},
            )
        return data
