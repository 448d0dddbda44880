"""Typed client of the AdapterRegistryService.

    from lorafleet.client.registry import RegistryClient
    with RegistryClient("127.0.0.1:50051") as registry:
        registry.create_adapter("exp-1", lora={"rank": 8, "alpha": 16}, base_model="tiny")
        v1 = registry.upload_version("exp-1", Path("out/v1"), expected_parent_version=0)
        ref = registry.resolve("exp-1@latest").ref
        registry.download_version("exp-1", ref.version, Path("/tmp/exp-1-v1"))

State-changing methods take an optional ``request_id`` and make a fresh UUID
when none is given; pass the same one again to retry a call safely (the server
replays its first answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.registry.v1 import registry_pb2 as pb
from lorafleet.api.registry.v1 import registry_pb2_grpc
from lorafleet.client._base import AsyncServiceClient, SyncBridge
from lorafleet.core.errors import DataLoss, InvalidArgument

VERSION_FILES = ("adapter_config.json", "adapter_model.safetensors")
DEFAULT_CHUNK_BYTES = 1 << 20
# Moving a large adapter takes longer than a control-plane call.
DEFAULT_TRANSFER_TIMEOUT_S = 600.0


def manifest_sha256(files: Iterable[adapter_pb2.FileDigest]) -> str:
    """The version digest of AdapterRef.sha256 (common/v1/adapter.proto): sha256 of
    "<name>\\t<sha256>\\t<size_bytes>\\n" for every file, sorted by name."""
    lines = "".join(
        f"{f.name}\t{f.sha256}\t{f.size_bytes}\n" for f in sorted(files, key=lambda f: f.name)
    )
    return hashlib.sha256(lines.encode()).hexdigest()


def digest_directory(directory: Path) -> tuple[list[adapter_pb2.FileDigest], str]:
    """Per-file digests and the manifest digest of a PEFT adapter directory."""
    files = []
    for name in VERSION_FILES:
        digest = hashlib.sha256()
        size = 0
        with open(Path(directory) / name, "rb") as f:
            while chunk := f.read(DEFAULT_CHUNK_BYTES):
                digest.update(chunk)
                size += len(chunk)
        files.append(adapter_pb2.FileDigest(name=name, sha256=digest.hexdigest(), size_bytes=size))
    return files, manifest_sha256(files)


def parse_selector(selector: str) -> adapter_pb2.AdapterSelector:
    """ "exp", "exp@latest", "exp@best" or "exp@3" -> AdapterSelector."""
    adapter_id, _, which = selector.partition("@")
    if not adapter_id:
        raise InvalidArgument(f"invalid selector {selector!r}", reason="INVALID_SELECTOR")
    if not which:
        return adapter_pb2.AdapterSelector(adapter_id=adapter_id)
    if which.isdigit():
        return adapter_pb2.AdapterSelector(adapter_id=adapter_id, version=int(which))
    return adapter_pb2.AdapterSelector(adapter_id=adapter_id, alias=which)


def selector_text(selector: adapter_pb2.AdapterSelector) -> str:
    """The inverse of `parse_selector`: "exp@3", "exp@best", "exp@latest"."""
    which = selector.WhichOneof("version_selector")
    suffix = str(selector.version) if which == "version" else selector.alias or "latest"
    return f"{selector.adapter_id}@{suffix}"


def _lora(spec: adapter_pb2.LoraSpec | Mapping[str, Any]) -> adapter_pb2.LoraSpec:
    if isinstance(spec, adapter_pb2.LoraSpec):
        return spec
    return adapter_pb2.LoraSpec(**dict(spec))


def _rid(request_id: str | None) -> str:
    return request_id or str(uuid.uuid4())


class AsyncRegistryClient(AsyncServiceClient):
    STUB = registry_pb2_grpc.AdapterRegistryServiceStub

    # Every replica's is SERVING: given several, calls spread over them.
    REPLICA_HEALTH_SERVICE = pb.DESCRIPTOR.services_by_name["AdapterRegistryService"].full_name

    # adapters

    async def create_adapter(
        self,
        adapter_id: str,
        *,
        lora: adapter_pb2.LoraSpec | Mapping[str, Any],
        base_model: str,
        experiment_id: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> pb.Adapter:
        request = pb.CreateAdapterRequest(
            request_id=_rid(request_id),
            adapter_id=adapter_id,
            experiment_id=experiment_id,
            base_model=base_model,
            lora=_lora(lora),
            labels=dict(labels or {}),
        )
        return (await self._unary(self.stub.CreateAdapter, request)).adapter

    async def get_adapter(self, adapter_id: str) -> pb.Adapter:
        response = await self._unary(
            self.stub.GetAdapter, pb.GetAdapterRequest(adapter_id=adapter_id)
        )
        return response.adapter

    async def list_adapters(
        self, *, experiment_id: str = "", page_size: int = 0
    ) -> list[pb.Adapter]:
        """Every adapter (of ``experiment_id`` when set), following page tokens."""
        out: list[pb.Adapter] = []
        token = ""
        while True:
            response = await self._unary(
                self.stub.ListAdapters,
                pb.ListAdaptersRequest(
                    experiment_id=experiment_id, page_size=page_size, page_token=token
                ),
            )
            out.extend(response.adapters)
            token = response.next_page_token
            if not token:
                return out

    async def delete_adapter(
        self, adapter_id: str, *, force: bool = False, request_id: str | None = None
    ) -> None:
        await self._unary(
            self.stub.DeleteAdapter,
            pb.DeleteAdapterRequest(
                request_id=_rid(request_id), adapter_id=adapter_id, force=force
            ),
        )

    # publishing

    async def publish_version(
        self,
        adapter_id: str,
        source: Path | str,
        *,
        expected_parent_version: int,
        training_step: int = 0,
        metrics: Mapping[str, float] | None = None,
        files: Iterable[adapter_pb2.FileDigest] | None = None,
        sha256: str | None = None,
        request_id: str | None = None,
    ) -> pb.PublishVersionResponse:
        """Publish by reference: ``source`` is a version directory the registry
        can read (a local Path or a file:// URI). Digests are computed here when
        not given (the registry verifies them either way)."""
        if isinstance(source, Path):
            directory, uri = source, source.absolute().as_uri()
        else:
            uri = source
            parts = urlsplit(source)
            directory = Path(unquote(parts.path)) if parts.scheme == "file" else None
        if files is None:
            if directory is None:
                raise InvalidArgument(
                    "files and sha256 are required for non-local URIs", reason="FILES_REQUIRED"
                )
            file_list, digest = await asyncio.to_thread(digest_directory, directory)
        else:
            file_list = list(files)
            digest = manifest_sha256(file_list)
        request = pb.PublishVersionRequest(
            request_id=_rid(request_id),
            adapter_id=adapter_id,
            expected_parent_version=expected_parent_version,
            uri=uri,
            sha256=sha256 if sha256 is not None else digest,
            files=file_list,
            training_step=training_step,
            metrics=dict(metrics or {}),
        )
        return await self._unary(self.stub.PublishVersion, request)

    async def upload_version(
        self,
        adapter_id: str,
        directory: Path,
        *,
        expected_parent_version: int,
        training_step: int = 0,
        metrics: Mapping[str, float] | None = None,
        request_id: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_BYTES,
        files: Iterable[adapter_pb2.FileDigest] | None = None,
        timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
    ) -> pb.UploadVersionResponse:
        """Publish by streaming the two files of ``directory`` to the registry
        (digests computed here unless ``files`` gives them)."""
        directory = Path(directory)
        if files is None:
            files, _ = await asyncio.to_thread(digest_directory, directory)
        files = list(files)
        header = pb.UploadVersionHeader(
            request_id=_rid(request_id),
            adapter_id=adapter_id,
            expected_parent_version=expected_parent_version,
            files=files,
            training_step=training_step,
            metrics=dict(metrics or {}),
        )

        async def messages() -> AsyncIterator[pb.UploadVersionRequest]:
            yield pb.UploadVersionRequest(header=header)
            for f in files:
                with open(directory / f.name, "rb") as handle:
                    offset = 0
                    while data := await asyncio.to_thread(handle.read, chunk_size):
                        yield pb.UploadVersionRequest(
                            chunk=pb.FileChunk(file_name=f.name, offset=offset, data=data)
                        )
                        offset += len(data)

        return await self._unary(self.stub.UploadVersion, messages(), timeout_s)

    # reading

    async def get_version(self, adapter_id: str, version: int) -> pb.AdapterVersion:
        response = await self._unary(
            self.stub.GetVersion, pb.GetVersionRequest(adapter_id=adapter_id, version=version)
        )
        return response.version

    async def list_versions(
        self, adapter_id: str, *, include_inactive: bool = False, page_size: int = 0
    ) -> list[pb.AdapterVersion]:
        out: list[pb.AdapterVersion] = []
        token = ""
        while True:
            response = await self._unary(
                self.stub.ListVersions,
                pb.ListVersionsRequest(
                    adapter_id=adapter_id,
                    include_inactive=include_inactive,
                    page_size=page_size,
                    page_token=token,
                ),
            )
            out.extend(response.versions)
            token = response.next_page_token
            if not token:
                return out

    async def resolve(
        self, selector: str | adapter_pb2.AdapterSelector, *, node_id: str = ""
    ) -> pb.ResolveVersionResponse:
        """``resolve("exp@latest")``, ``resolve("exp@best")``, ``resolve("exp@3")``."""
        if isinstance(selector, str):
            selector = parse_selector(selector)
        return await self._unary(
            self.stub.ResolveVersion, pb.ResolveVersionRequest(selector=selector, node_id=node_id)
        )

    async def download_version(
        self,
        adapter_id: str,
        version: int,
        dest_dir: Path,
        *,
        chunk_size: int = 0,
        timeout_s: float = DEFAULT_TRANSFER_TIMEOUT_S,
    ) -> Path:
        """Download a version into ``dest_dir`` (created) and return it. Every file
        is checked against its sha256 and the manifest against the version's
        digest before it gets its final name; DataLoss otherwise."""
        dest_dir = Path(dest_dir)
        dest_dir.mkdir(parents=True, exist_ok=True)
        request = pb.DownloadVersionRequest(
            adapter_id=adapter_id, version=version, chunk_size_bytes=chunk_size
        )
        ref: adapter_pb2.AdapterRef | None = None
        partial: dict[str, Path] = {}
        handles: dict[str, Any] = {}
        digests: dict[str, Any] = {}
        try:
            async for message in self._server_stream(self.stub.DownloadVersion, request, timeout_s):
                if message.WhichOneof("part") == "ref":
                    ref = message.ref
                    for f in ref.files:
                        if f.name not in VERSION_FILES:
                            raise DataLoss(f"unexpected file {f.name!r}", reason="UNEXPECTED_FILE")
                        partial[f.name] = dest_dir / f".{f.name}.part"
                        handles[f.name] = open(partial[f.name], "wb")  # noqa: SIM115
                        digests[f.name] = hashlib.sha256()
                    continue
                chunk = message.chunk
                if chunk.file_name not in handles:
                    raise DataLoss(
                        f"chunk of unknown file {chunk.file_name!r}", reason="BAD_STREAM"
                    )
                handles[chunk.file_name].write(chunk.data)
                digests[chunk.file_name].update(chunk.data)
            if ref is None:
                raise DataLoss("download stream had no header", reason="BAD_STREAM")
            for f in ref.files:
                handles[f.name].close()
                size = partial[f.name].stat().st_size
                if digests[f.name].hexdigest() != f.sha256 or size != f.size_bytes:
                    raise DataLoss(
                        f"{f.name} of {adapter_id}@{version} does not match its sha256",
                        reason="DIGEST_MISMATCH",
                    )
            if manifest_sha256(ref.files) != ref.sha256:
                raise DataLoss("manifest digest mismatch", reason="DIGEST_MISMATCH")
            for f in ref.files:
                os.replace(partial[f.name], dest_dir / f.name)
            return dest_dir
        finally:
            for handle in handles.values():
                handle.close()
            for path in partial.values():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    async def watch(
        self, adapter_ids: Iterable[str] = (), *, after_version: int = 0
    ) -> AsyncIterator[pb.WatchAdaptersResponse]:
        """New READY versions as they are published (no deadline; stop iterating
        to end the stream)."""
        request = pb.WatchAdaptersRequest(
            adapter_ids=list(adapter_ids), after_version=after_version
        )
        async for message in self._server_stream(self.stub.WatchAdapters, request, None):
            yield message

    async def delete_version(
        self, adapter_id: str, version: int, *, request_id: str | None = None
    ) -> pb.AdapterVersion:
        response = await self._unary(
            self.stub.DeleteVersion,
            pb.DeleteVersionRequest(
                request_id=_rid(request_id), adapter_id=adapter_id, version=version
            ),
        )
        return response.version

    # aliases

    async def set_alias(
        self,
        adapter_id: str,
        alias: str,
        version: int,
        *,
        expected_current_version: int | None = None,
        request_id: str | None = None,
    ) -> pb.AdapterVersion:
        request = pb.SetAliasRequest(
            request_id=_rid(request_id), adapter_id=adapter_id, alias=alias, version=version
        )
        if expected_current_version is not None:
            request.expected_current_version = expected_current_version
        return (await self._unary(self.stub.SetAlias, request)).version

    async def delete_alias(
        self, adapter_id: str, alias: str, *, request_id: str | None = None
    ) -> None:
        await self._unary(
            self.stub.DeleteAlias,
            pb.DeleteAliasRequest(request_id=_rid(request_id), adapter_id=adapter_id, alias=alias),
        )

    async def list_aliases(self, adapter_id: str) -> dict[str, int]:
        response = await self._unary(
            self.stub.ListAliases, pb.ListAliasesRequest(adapter_id=adapter_id)
        )
        return {a.alias: a.version for a in response.aliases}


class RegistryClient(SyncBridge):
    """Blocking twin of `AsyncRegistryClient`: ``RegistryClient(address)``."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncRegistryClient(address, **kwargs))
