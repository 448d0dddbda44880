"""The gRPC servicer: protobuf in, domain calls, protobuf out. No logic of its own
beyond request_id replay, which wraps every state-changing RPC."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import structlog
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.registry.v1 import registry_pb2, registry_pb2_grpc
from lorafleet.core.errors import DataLoss, DeadlineExceeded, InvalidArgument
from lorafleet.core.idempotency import fingerprint_of, once
from lorafleet.core.server import ServiceBinding
from lorafleet.core.sql import IdempotencyRecord, SqlIdempotencyStore
from lorafleet.registry.domain import AdapterRegistry
from lorafleet.registry.publish import Chunk, UploadHeader
from lorafleet.registry.types import Adapter, FileDigest, LoraSpec, Version, VersionState

SERVICE = registry_pb2.DESCRIPTOR.services_by_name["AdapterRegistryService"]
MAX_DOWNLOAD_CHUNK = 4 << 20
DEFAULT_DOWNLOAD_CHUNK = 1 << 20

R = TypeVar("R", bound=Message)
T = TypeVar("T")

_STATES = {
    VersionState.PENDING: registry_pb2.VERSION_STATE_PENDING,
    VersionState.READY: registry_pb2.VERSION_STATE_READY,
    VersionState.FAILED: registry_pb2.VERSION_STATE_FAILED,
    VersionState.DELETED: registry_pb2.VERSION_STATE_DELETED,
}


# -- conversions --------------------------------------------------------------


def _timestamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def spec_to_proto(spec: LoraSpec) -> adapter_pb2.LoraSpec:
    return adapter_pb2.LoraSpec(
        rank=spec.rank,
        alpha=spec.alpha,
        target_modules=list(spec.target_modules),
        dropout=spec.dropout,
        use_rslora=spec.use_rslora,
    )


def spec_from_proto(spec: adapter_pb2.LoraSpec) -> LoraSpec:
    return LoraSpec(
        rank=spec.rank,
        alpha=spec.alpha,
        target_modules=tuple(spec.target_modules),
        dropout=spec.dropout,
        use_rslora=spec.use_rslora,
    )


def files_from_proto(files: Any) -> tuple[FileDigest, ...]:
    return tuple(FileDigest(f.name, f.sha256, f.size_bytes) for f in files)


def files_to_proto(files: tuple[FileDigest, ...]) -> list[adapter_pb2.FileDigest]:
    return [
        adapter_pb2.FileDigest(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes) for f in files
    ]


def adapter_to_proto(adapter: Adapter) -> registry_pb2.Adapter:
    return registry_pb2.Adapter(
        name=f"adapters/{adapter.adapter_id}",
        adapter_id=adapter.adapter_id,
        experiment_id=adapter.experiment_id,
        base_model=adapter.base_model,
        lora=spec_to_proto(adapter.lora),
        latest_version=adapter.latest_version,
        labels=dict(adapter.labels),
        create_time=_timestamp(adapter.create_time),
    )


def version_to_proto(version: Version) -> registry_pb2.AdapterVersion:
    return registry_pb2.AdapterVersion(
        name=f"adapters/{version.adapter_id}/versions/{version.version}",
        adapter_id=version.adapter_id,
        version=version.version,
        parent_version=version.parent_version,
        state=_STATES[version.state],
        training_step=version.training_step,
        metrics=dict(version.metrics),
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        files=files_to_proto(version.files),
        uris=list(version.uris),
        aliases=list(version.aliases),
        create_time=_timestamp(version.create_time),
        failure_reason=version.failure_reason,
    )


def ref_to_proto(version: Version, adapter: Adapter, uri: str) -> adapter_pb2.AdapterRef:
    return adapter_pb2.AdapterRef(
        adapter_id=version.adapter_id,
        version=version.version,
        uri=uri,
        sha256=version.sha256,
        size_bytes=version.size_bytes,
        files=files_to_proto(version.files),
        lora=spec_to_proto(adapter.lora),
        base_model=adapter.base_model,
    )


# -- servicer -----------------------------------------------------------------


class RegistryServicer(registry_pb2_grpc.AdapterRegistryServiceServicer):
    def __init__(
        self,
        registry: AdapterRegistry,
        idempotency: SqlIdempotencyStore,
        *,
        upload_header_timeout_s: float = 60.0,
    ) -> None:
        """Every change stores its first answer in its own transaction (see
        ``_idempotent``), in ``idempotency``'s table of the registry database."""
        self._registry = registry
        self._idempotency = idempotency
        self._upload_header_timeout_s = upload_header_timeout_s

    async def _idempotent(
        self,
        method: str,
        request: Message,
        change: Callable[[IdempotencyRecord | None], Awaitable[T]],
        to_response: Callable[[T], R],
        response_type: type[R],
        fingerprint: bytes | None = None,
    ) -> R:
        """Replay the first answer for a repeated request_id; otherwise run the
        change, storing its answer in the change's own transaction."""
        scope = f"{SERVICE.full_name}/{method}"
        request_id: str = request.request_id  # type: ignore[attr-defined]
        fingerprint = fingerprint or fingerprint_of(request)
        record = self._idempotency.record(
            scope, request_id, fingerprint, lambda r: to_response(r).SerializeToString()
        )

        async def run() -> R:
            return to_response(await change(record))

        return await once(
            self._idempotency.in_transaction(), scope, request_id, fingerprint, run, response_type
        )

    # adapters

    async def CreateAdapter(self, request, context):  # noqa: N802
        def respond(adapter: Adapter) -> registry_pb2.CreateAdapterResponse:
            return registry_pb2.CreateAdapterResponse(adapter=adapter_to_proto(adapter))

        return await self._idempotent(
            "CreateAdapter",
            request,
            lambda record: self._registry.create_adapter(
                request.adapter_id,
                experiment_id=request.experiment_id,
                base_model=request.base_model,
                lora=spec_from_proto(request.lora),
                labels=dict(request.labels),
                record=record,
            ),
            respond,
            registry_pb2.CreateAdapterResponse,
        )

    async def GetAdapter(self, request, context):  # noqa: N802
        adapter = await self._registry.get_adapter(request.adapter_id)
        return registry_pb2.GetAdapterResponse(adapter=adapter_to_proto(adapter))

    async def ListAdapters(self, request, context):  # noqa: N802
        page = await self._registry.list_adapters(
            request.experiment_id, request.page_size, request.page_token
        )
        return registry_pb2.ListAdaptersResponse(
            adapters=[adapter_to_proto(a) for a in page.items], next_page_token=page.next_page_token
        )

    async def DeleteAdapter(self, request, context):  # noqa: N802
        return await self._idempotent(
            "DeleteAdapter",
            request,
            lambda record: self._registry.delete_adapter(
                request.adapter_id, force=request.force, record=record
            ),
            lambda _: registry_pb2.DeleteAdapterResponse(),
            registry_pb2.DeleteAdapterResponse,
        )

    # publishing

    async def PublishVersion(self, request, context):  # noqa: N802
        # Spec and base model never change, so the adapter read up front is the
        # one the answer (also written inside the publish transaction) names.
        adapter = await self._registry.get_adapter(request.adapter_id)

        def respond(version: Version) -> registry_pb2.PublishVersionResponse:
            return registry_pb2.PublishVersionResponse(
                version=version_to_proto(version),
                ref=ref_to_proto(version, adapter, version.uris[0]),
            )

        return await self._idempotent(
            "PublishVersion",
            request,
            lambda record: self._registry.publish_by_reference(
                request.adapter_id,
                expected_parent_version=request.expected_parent_version,
                uri=request.uri,
                sha256=request.sha256,
                files=files_from_proto(request.files),
                training_step=request.training_step,
                metrics=dict(request.metrics),
                request_id=request.request_id,
                record=record,
            ),
            respond,
            registry_pb2.PublishVersionResponse,
        )

    async def UploadVersion(self, request_iterator, context):  # noqa: N802
        messages = request_iterator.__aiter__()
        try:
            first = await asyncio.wait_for(
                messages.__anext__(), timeout=self._upload_header_timeout_s
            )
        except StopAsyncIteration:
            raise InvalidArgument("empty upload stream", reason="UPLOAD_HEADER_MISSING") from None
        except TimeoutError:
            raise DeadlineExceeded(
                "no upload header arrived in time", reason="UPLOAD_IDLE_TIMEOUT"
            ) from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument(
                "the first message of an upload must be its header", reason="UPLOAD_HEADER_MISSING"
            )
        h = first.header
        header = UploadHeader(
            adapter_id=h.adapter_id,
            expected_parent_version=h.expected_parent_version,
            files=files_from_proto(h.files),
            training_step=h.training_step,
            metrics=dict(h.metrics),
            request_id=h.request_id,
        )
        adapter = await self._registry.get_adapter(h.adapter_id)

        async def chunks() -> AsyncIterator[Chunk]:
            async for message in messages:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("header sent twice", reason="UPLOAD_HEADER_REPEATED")
                c = message.chunk
                yield Chunk(c.file_name, c.offset, c.data)

        def respond(version: Version) -> registry_pb2.UploadVersionResponse:
            return registry_pb2.UploadVersionResponse(
                version=version_to_proto(version),
                ref=ref_to_proto(version, adapter, version.durable_uri or version.uris[0]),
            )

        async def change(record: IdempotencyRecord | None) -> Version:
            return await self._registry.upload(header, chunks(), record)

        # The header pins the content (per-file sha256), so it is the fingerprint.
        # Stream handlers get no request context from the interceptor; bind it here.
        with structlog.contextvars.bound_contextvars(request_id=h.request_id):
            return await self._idempotent(
                "UploadVersion",
                h,
                change,
                respond,
                registry_pb2.UploadVersionResponse,
            )

    # reading

    async def GetVersion(self, request, context):  # noqa: N802
        version = await self._registry.get_version(request.adapter_id, request.version)
        return registry_pb2.GetVersionResponse(version=version_to_proto(version))

    async def ListVersions(self, request, context):  # noqa: N802
        page = await self._registry.list_versions(
            request.adapter_id,
            include_inactive=request.include_inactive,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return registry_pb2.ListVersionsResponse(
            versions=[version_to_proto(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def ResolveVersion(self, request, context):  # noqa: N802
        selector = request.selector
        which = selector.WhichOneof("version_selector")
        if which == "version" and selector.version <= 0:
            raise InvalidArgument("selector.version must be >= 1", reason="INVALID_VERSION")
        version, adapter, uri = await self._registry.resolve(
            selector.adapter_id,
            version=selector.version if which == "version" else 0,
            alias=selector.alias if which == "alias" else "",
            node_id=request.node_id,
        )
        return registry_pb2.ResolveVersionResponse(
            version=version_to_proto(version), ref=ref_to_proto(version, adapter, uri)
        )

    async def DownloadVersion(self, request, context):  # noqa: N802
        chunk_size = request.chunk_size_bytes or DEFAULT_DOWNLOAD_CHUNK
        if not 0 < chunk_size <= MAX_DOWNLOAD_CHUNK:
            raise InvalidArgument(
                f"chunk_size_bytes must be in (0, {MAX_DOWNLOAD_CHUNK}]",
                reason="INVALID_CHUNK_SIZE",
            )
        opened = await self._registry.open_version(request.adapter_id, request.version)
        try:
            yield registry_pb2.DownloadVersionResponse(
                ref=ref_to_proto(opened.version, opened.adapter, opened.uri)
            )
            for f in opened.version.files:
                reader = opened.readers[f.name]
                offset = 0
                # Hashed again on the way out: bytes that changed after the check
                # end the stream with DATA_LOSS instead of completing it.
                digest = hashlib.sha256()
                while data := await asyncio.to_thread(reader.read, chunk_size):
                    digest.update(data)
                    yield registry_pb2.DownloadVersionResponse(
                        chunk=registry_pb2.FileChunk(file_name=f.name, offset=offset, data=data)
                    )
                    offset += len(data)
                if digest.hexdigest() != f.sha256:
                    raise DataLoss(
                        f"{f.name} changed while it was being served",
                        reason="BLOB_CORRUPT",
                        metadata={"adapter_id": request.adapter_id, "file": f.name},
                    )
        finally:
            opened.close()

    async def WatchAdapters(self, request, context):  # noqa: N802
        async for version, adapter in self._registry.watch(
            list(request.adapter_ids), request.after_version
        ):
            yield registry_pb2.WatchAdaptersResponse(
                version=version_to_proto(version),
                ref=ref_to_proto(version, adapter, self._registry.choose_uri(version)),
            )

    async def DeleteVersion(self, request, context):  # noqa: N802
        return await self._idempotent(
            "DeleteVersion",
            request,
            lambda record: self._registry.delete_version(
                request.adapter_id, request.version, record
            ),
            lambda version: registry_pb2.DeleteVersionResponse(version=version_to_proto(version)),
            registry_pb2.DeleteVersionResponse,
        )

    # aliases

    async def SetAlias(self, request, context):  # noqa: N802
        expected = (
            request.expected_current_version
            if request.HasField("expected_current_version")
            else None
        )
        return await self._idempotent(
            "SetAlias",
            request,
            lambda record: self._registry.set_alias(
                request.adapter_id, request.alias, request.version, expected, record
            ),
            lambda version: registry_pb2.SetAliasResponse(version=version_to_proto(version)),
            registry_pb2.SetAliasResponse,
        )

    async def DeleteAlias(self, request, context):  # noqa: N802
        return await self._idempotent(
            "DeleteAlias",
            request,
            lambda record: self._registry.delete_alias(request.adapter_id, request.alias, record),
            lambda _: registry_pb2.DeleteAliasResponse(),
            registry_pb2.DeleteAliasResponse,
        )

    async def ListAliases(self, request, context):  # noqa: N802
        pairs = await self._registry.list_aliases(request.adapter_id)
        return registry_pb2.ListAliasesResponse(
            aliases=[registry_pb2.Alias(alias=a, version=v) for a, v in pairs]
        )


def servicer_binding(servicer: RegistryServicer) -> ServiceBinding:
    return ServiceBinding(
        SERVICE.full_name,
        lambda server: registry_pb2_grpc.add_AdapterRegistryServiceServicer_to_server(
            servicer, server
        ),
    )
