"""Adapter resolvers: the registry over gRPC, and an in-memory one.

:class:`RegistryResolver` is what the service uses: ``ResolveVersion`` (with this
node's id, so the registry prefers the version's ``file://`` on this node),
``DownloadVersion`` (verified chunk stream) and ``WatchAdapters``.

:class:`InMemoryResolver` is a small named fake with the same behaviour (versions
numbered per adapter, ``latest``, aliases, a watch stream): for engine-level
tests, benchmarks and embedding the engine without a registry.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from lorafleet.core.errors import NotFound
from lorafleet.rollout.adapters import digest_directory
from lorafleet.rollout.types import (
    CONFIG_FILE,
    LATEST,
    WEIGHTS_FILE,
    AdapterRef,
    AdapterSelection,
    FileDigest,
)


def ref_from_pb(ref: Any) -> AdapterRef:
    """``lorafleet.common.v1.AdapterRef`` -> domain ref."""
    return AdapterRef(
        adapter_id=ref.adapter_id,
        version=int(ref.version),
        uri=ref.uri,
        sha256=ref.sha256,
        size_bytes=int(ref.size_bytes),
        files=tuple(
            FileDigest(name=f.name, sha256=f.sha256, size_bytes=int(f.size_bytes))
            for f in ref.files
        ),
        rank=int(ref.lora.rank) if ref.HasField("lora") else 0,
        alpha=float(ref.lora.alpha) if ref.HasField("lora") else 0.0,
        base_model=ref.base_model,
    )


def ref_to_pb(ref: AdapterRef) -> Any:
    from lorafleet.api.common.v1 import adapter_pb2

    message = adapter_pb2.AdapterRef(
        adapter_id=ref.adapter_id,
        version=ref.version,
        uri=ref.uri,
        sha256=ref.sha256,
        size_bytes=ref.size_bytes,
        files=[
            adapter_pb2.FileDigest(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes)
            for f in ref.files
        ],
        base_model=ref.base_model,
    )
    if ref.rank:
        message.lora.CopyFrom(adapter_pb2.LoraSpec(rank=ref.rank, alpha=ref.alpha))
    return message


def selector_to_pb(selection: AdapterSelection) -> Any:
    from lorafleet.api.common.v1 import adapter_pb2

    if selection.version is not None:
        return adapter_pb2.AdapterSelector(
            adapter_id=selection.adapter_id, version=selection.version
        )
    return adapter_pb2.AdapterSelector(adapter_id=selection.adapter_id, alias=selection.alias)


class RegistryResolver:
    """Resolves through the AdapterRegistryService (``lorafleet.client.registry``)."""

    def __init__(self, client: Any, *, node_id: str = "") -> None:
        self.client = client
        """An ``AsyncRegistryClient``."""
        self.node_id = node_id

    async def resolve(self, selection: AdapterSelection) -> AdapterRef:
        response = await self.client.resolve(selector_to_pb(selection), node_id=self.node_id)
        return ref_from_pb(response.ref)

    async def download(self, ref: AdapterRef, dest_dir: Path) -> None:
        await self.client.download_version(ref.adapter_id, ref.version, dest_dir)

    async def watch(self) -> AsyncIterator[AdapterRef]:
        async for message in self.client.watch():
            yield ref_from_pb(message.ref)

    async def close(self) -> None:
        await self.client.close()


class InMemoryResolver:
    """An in-process registry of version directories (a named fake)."""

    def __init__(self) -> None:
        self._versions: dict[str, dict[int, AdapterRef]] = {}
        self._aliases: dict[tuple[str, str], int] = {}
        self._paths: dict[tuple[str, int], Path] = {}
        self._watchers: list[asyncio.Queue[AdapterRef]] = []
        self.resolve_calls = 0

    def publish(
        self, adapter_id: str, directory: Path, *, uri: str | None = None, rank: int = 0
    ) -> AdapterRef:
        """Record ``directory`` as the adapter's next version and announce it.
        ``uri`` defaults to the directory's ``file://``; pass another to force
        consumers to download."""
        directory = Path(directory).absolute()
        files, digest = digest_directory(directory)
        versions = self._versions.setdefault(adapter_id, {})
        version = max(versions, default=0) + 1
        ref = AdapterRef(
            adapter_id=adapter_id,
            version=version,
            uri=uri or directory.as_uri(),
            sha256=digest,
            size_bytes=sum(f.size_bytes for f in files),
            files=files,
            rank=rank,
        )
        versions[version] = ref
        self._paths[ref.key] = directory
        for queue in self._watchers:
            queue.put_nowait(ref)
        return ref

    def set_alias(self, adapter_id: str, alias: str, version: int) -> None:
        self._aliases[(adapter_id, alias)] = version

    async def resolve(self, selection: AdapterSelection) -> AdapterRef:
        self.resolve_calls += 1
        versions = self._versions.get(selection.adapter_id)
        if not versions:
            raise NotFound(
                f"adapter {selection.adapter_id!r} does not exist", reason="ADAPTER_NOT_FOUND"
            )
        if selection.version is not None:
            version = selection.version
        elif selection.alias == LATEST:
            version = max(versions)
        else:
            found = self._aliases.get((selection.adapter_id, selection.alias))
            if found is None:
                raise NotFound(f"no alias {selection}", reason="ALIAS_NOT_FOUND")
            version = found
        ref = versions.get(version)
        if ref is None:
            raise NotFound(f"{selection} does not exist", reason="VERSION_NOT_FOUND")
        return ref

    async def download(self, ref: AdapterRef, dest_dir: Path) -> None:
        source = self._paths[ref.key]
        dest_dir.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            await asyncio.to_thread(shutil.copyfile, source / name, dest_dir / name)

    async def watch(self) -> AsyncIterator[AdapterRef]:
        queue: asyncio.Queue[AdapterRef] = asyncio.Queue()
        self._watchers.append(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._watchers.remove(queue)

    async def close(self) -> None:
        return None
