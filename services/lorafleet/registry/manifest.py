"""The version manifest: which files a version has and what they hash to.

A version is exactly the PEFT layout (``adapter_config.json`` +
``adapter_model.safetensors``); its digest is the sha256 of the manifest lines
``"<name>\\t<sha256>\\t<size_bytes>\\n"`` sorted by name, as documented on
``AdapterRef.sha256`` in ``common/v1/adapter.proto``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from lorafleet.core.errors import InvalidArgument, ResourceExhausted
from lorafleet.registry.types import CONFIG_FILE, VERSION_FILES, FileDigest

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# Names that mean "a pickle" to torch / transformers / peft. Loading any of them
# runs arbitrary code, so they are refused by name before anything is read.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def manifest_sha256(files: Iterable[FileDigest]) -> str:
    lines = "".join(
        f"{f.name}\t{f.sha256}\t{f.size_bytes}\n" for f in sorted(files, key=lambda f: f.name)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def check_declared_files(
    files: Iterable[FileDigest],
    *,
    max_version_bytes: int,
    max_config_bytes: int,
) -> tuple[FileDigest, ...]:
    """Validate the files a publish declares; return them sorted by name.

    Raises:
        InvalidArgument: PICKLE_REFUSED, UNEXPECTED_FILE, DUPLICATE_FILE,
            MISSING_FILE, INVALID_SHA256, INVALID_SIZE.
        ResourceExhausted: VERSION_TOO_LARGE, CONFIG_TOO_LARGE.
    """
    seen: dict[str, FileDigest] = {}
    for f in files:
        if f.name.lower().endswith(_PICKLE_SUFFIXES):
            raise InvalidArgument(
                f"{f.name!r} is a pickle file; only {CONFIG_FILE} + safetensors are accepted",
                reason="PICKLE_REFUSED",
                metadata={"file": f.name},
            )
        if f.name not in VERSION_FILES:
            raise InvalidArgument(
                f"unexpected file {f.name!r}: a version is exactly {', '.join(VERSION_FILES)}",
                reason="UNEXPECTED_FILE",
                metadata={"file": f.name},
            )
        if f.name in seen:
            raise InvalidArgument(f"file {f.name!r} is declared twice", reason="DUPLICATE_FILE")
        if not _SHA256_HEX.fullmatch(f.sha256):
            raise InvalidArgument(
                f"sha256 of {f.name!r} must be 64 lower-case hex digits",
                reason="INVALID_SHA256",
                metadata={"file": f.name},
            )
        if f.size_bytes <= 0:
            raise InvalidArgument(
                f"size_bytes of {f.name!r} must be positive", reason="INVALID_SIZE"
            )
        seen[f.name] = f
    missing = [name for name in VERSION_FILES if name not in seen]
    if missing:
        raise InvalidArgument(
            f"missing file(s): {', '.join(missing)}",
            reason="MISSING_FILE",
            metadata={"file": missing[0]},
        )
    if seen[CONFIG_FILE].size_bytes > max_config_bytes:
        raise ResourceExhausted(
            f"{CONFIG_FILE} is {seen[CONFIG_FILE].size_bytes} bytes; at most"
            f" {max_config_bytes} accepted",
            reason="CONFIG_TOO_LARGE",
        )
    total = sum(f.size_bytes for f in seen.values())
    if total > max_version_bytes:
        raise ResourceExhausted(
            f"version is {total} bytes; at most {max_version_bytes} accepted",
            reason="VERSION_TOO_LARGE",
            metadata={"size_bytes": str(total), "limit": str(max_version_bytes)},
        )
    return tuple(seen[name] for name in sorted(seen))


def check_manifest_digest(files: Iterable[FileDigest], declared: str) -> str:
    """Compare the declared version digest with the one the files imply."""
    actual = manifest_sha256(files)
    if declared != actual:
        raise InvalidArgument(
            "sha256 does not match the manifest of the declared files",
            reason="MANIFEST_DIGEST_MISMATCH",
            metadata={"expected": actual},
        )
    return actual
