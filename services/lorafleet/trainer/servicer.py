"""The TrainerService servicer: proto <-> engine, nothing else of substance.

- Train work (ForwardBackward, TrainStep, OptimStep, ComputeLogprobs) goes through
  the :class:`~lorafleet.lora.fusing.FusingQueue`, so concurrent requests of
  different adapters share one fused pass; the queue runs torch in a worker
  thread and hands each request its own result or error (a bad request fails
  alone, with its own code and reason).
- Every other engine call takes the engine's lock, which a fused pass may hold
  for a while, so it runs in a worker thread too (``asyncio.to_thread``): the
  event loop never waits on torch.
- Every state-changing RPC replays its first answer for a repeated
  ``request_id`` (in memory: a restarted trainer is rebuilt by the scheduler from
  checkpoints, and its request ids are new).

Error codes (each with an ``ErrorInfo.reason``): unknown adapter NOT_FOUND
(ADAPTER_NOT_FOUND), no free slot RESOURCE_EXHAUSTED (NO_FREE_SLOT), rank above the
node maximum FAILED_PRECONDITION (RANK_ABOVE_NODE_MAX), token/shape mismatches
INVALID_ARGUMENT (LOGPROBS_LENGTH_MISMATCH, INVALID_PROMPT_LENGTH,
TOKEN_OUT_OF_RANGE, ...), a checkpoint whose bytes do not match DATA_LOSS
(STATE_DIGEST_MISMATCH), a registry version conflict ABORTED.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar

import structlog
from google.protobuf.message import Message

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.trainer.v1 import trainer_pb2 as pb
from lorafleet.api.trainer.v1 import trainer_pb2_grpc
from lorafleet.core.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    LorafleetError,
    NotFound,
)
from lorafleet.core.idempotency import IdempotencyStore, fingerprint_of, once
from lorafleet.core.server import ServiceBinding
from lorafleet.lora.engine import STATE_FORMAT, TrainEngine
from lorafleet.lora.errors import adapter_exists, rank_above_node_max
from lorafleet.lora.fusing import FusingQueue
from lorafleet.lora.peft_io import file_digests
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.types import LogprobRequest, OptimizerConfig, RequestError
from lorafleet.trainer import convert
from lorafleet.trainer import metrics as trainer_metrics
from lorafleet.trainer.fencing import AdapterFences
from lorafleet.trainer.storage import AdapterCache, StateStore, check_id, local_path

log = structlog.get_logger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["TrainerService"]
R = TypeVar("R", bound=Message)

# Registry answers that mean "the version was not taken": the directory written
# for it can go. Anything else (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL) leaves
# it unknown whether the registry recorded the version, so the files stay for
# the retry (which rewrites identical bytes anyway).
_REJECTED = (InvalidArgument, NotFound, Aborted, FailedPrecondition, AlreadyExists, DataLoss)


class Registry(Protocol):
    """What the trainer needs of the registry (``AsyncRegistryClient`` has it)."""

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
    ) -> Any: ...

    async def create_adapter(
        self,
        adapter_id: str,
        *,
        lora: adapter_pb2.LoraSpec | Mapping[str, Any],
        base_model: str,
        experiment_id: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
    ) -> Any: ...

    async def get_version(self, adapter_id: str, version: int) -> Any: ...

    async def resolve(
        self, selector: str | adapter_pb2.AdapterSelector, *, node_id: str = ""
    ) -> Any: ...

    async def download_version(self, adapter_id: str, version: int, dest_dir: Path) -> Path: ...


def process_memory_bytes() -> int:
    """Proportional set size of this process (shared pages split among their
    users: what a co-located rollout + trainer really cost), falling back to RSS."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def state_metadata(data: bytes) -> dict[str, Any]:
    """The metadata a ``TrainEngine.save_state`` blob carries (spec, optimizer,
    step, base model), read from the safetensors header without loading tensors."""
    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        for value in (header.get("__metadata__") or {}).values():
            meta = json.loads(value)
            if isinstance(meta, dict) and meta.get("format") == STATE_FORMAT:
                return meta
    except (ValueError, TypeError, AttributeError):
        pass
    raise InvalidArgument("not a lorafleet trainer state checkpoint", reason="INVALID_STATE")


def _pb_files(files: Iterable[Any]) -> list[adapter_pb2.FileDigest]:
    return [
        adapter_pb2.FileDigest(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes) for f in files
    ]


def _same_files(a: Iterable[Any], b: Iterable[Any]) -> bool:
    def key(files: Iterable[Any]) -> list[tuple[str, str, int]]:
        return sorted((f.name, f.sha256, int(f.size_bytes)) for f in files)

    return key(a) == key(b)


class TrainerServicer(trainer_pb2_grpc.TrainerServiceServicer):
    def __init__(
        self,
        engine: TrainEngine,
        queue: FusingQueue,
        registry: Registry,
        cache: AdapterCache,
        states: StateStore,
        idempotency: IdempotencyStore,
        *,
        node_id: str = "",
        base_model_name: str = "",
        fences: AdapterFences | None = None,
    ) -> None:
        self.engine = engine
        self.queue = queue
        self.registry = registry
        self.cache = cache
        self.states = states
        self.idempotency = idempotency
        self.node_id = node_id
        self.base_model_name = base_model_name or engine.base_model
        # Fixed for the life of the process; counted once, before adapters come and
        # go (counting walks the module tree, which adding an adapter changes).
        self.base_model_bytes = engine.base_model_bytes()
        # SaveVersion of one registry adapter: one at a time, so two calls never
        # race for the same v<N> directory.
        self._publish_locks: dict[str, asyncio.Lock] = {}
        self.fences = fences if fences is not None else AdapterFences()

    async def _once(
        self, method: str, request: Message, fn: Callable[[], Awaitable[R]], response_type: type[R]
    ) -> R:
        """Run a state-changing call once per request_id, fenced by its token (a
        replay of an answered call is not fenced: that call already happened)."""
        token = getattr(request, "fencing_token", 0)

        async def fenced() -> R:
            async with self.fences.hold(getattr(request, "adapter_id", ""), token):
                return await fn()

        return await once(
            self.idempotency,
            f"{SERVICE.full_name}/{method}",
            getattr(request, "request_id", ""),
            fingerprint_of(request),
            fenced if token else fn,
            response_type,
        )

    # --- adapters -------------------------------------------------------------------

    async def CreateAdapter(
        self, request: pb.CreateAdapterRequest, context: Any
    ) -> pb.CreateAdapterResponse:
        async def run() -> pb.CreateAdapterResponse:
            name = check_id(request.adapter_id, "adapter_id")
            optimizer = convert.optimizer_from_pb(request)
            if request.HasField("from_version"):
                # The version's own spec wins: a registered spec may leave the
                # target modules to the node's default while the files name them.
                info = await self._create_from_version(name, request.from_version, optimizer)
            else:
                spec = convert.lora_spec_from_pb(request.lora)
                info = await asyncio.to_thread(
                    self.engine.create_adapter, name, spec, optimizer, seed=int(request.seed)
                )
            return pb.CreateAdapterResponse(adapter=self._adapter_info(info))

        return await self._once("CreateAdapter", request, run, pb.CreateAdapterResponse)

    async def _create_from_version(
        self, name: str, selector: adapter_pb2.AdapterSelector, optimizer: OptimizerConfig
    ) -> Any:
        if self.engine.has_adapter(name):
            # Checked before any download; the engine checks again under its lock.
            raise adapter_exists(name)
        resolved = await self.registry.resolve(selector, node_id=self.node_id)
        ref = resolved.ref
        directory = await asyncio.to_thread(self._local_version_dir, ref)
        downloaded: Path | None = None
        if directory is None:
            downloaded = await asyncio.to_thread(self.cache.download_dir)
            directory = await self.registry.download_version(
                ref.adapter_id, ref.version, downloaded
            )
        try:
            info = await asyncio.to_thread(self.engine.load_peft, name, directory, optimizer)
        finally:
            if downloaded is not None:
                await asyncio.to_thread(AdapterCache.remove, downloaded)
        log.info(
            "adapter_created_from_version",
            adapter=name,
            source=ref.adapter_id,
            version=ref.version,
            in_place=downloaded is None,
        )
        return info

    @staticmethod
    def _local_version_dir(ref: adapter_pb2.AdapterRef) -> Path | None:
        """The version's ``file://`` directory when it is readable here and its
        files still hash to the registry's digests; else None (download it)."""
        if not ref.uri.startswith("file:"):
            return None
        try:
            directory = local_path(ref.uri)
            if not directory.is_dir() or not ref.files:
                return None
            local = file_digests(directory, [f.name for f in ref.files])
        except (LorafleetError, OSError):
            return None
        return directory if _same_files(local, ref.files) else None

    async def DropAdapter(
        self, request: pb.DropAdapterRequest, context: Any
    ) -> pb.DropAdapterResponse:
        async def run() -> pb.DropAdapterResponse:
            await asyncio.to_thread(self.engine.drop_adapter, request.adapter_id)
            return pb.DropAdapterResponse()

        return await self._once("DropAdapter", request, run, pb.DropAdapterResponse)

    # --- training ---------------------------------------------------------------------

    async def ForwardBackward(
        self, request: pb.ForwardBackwardRequest, context: Any
    ) -> pb.ForwardBackwardResponse:
        async def run() -> pb.ForwardBackwardResponse:
            req = convert.train_request_from_pb(request, with_learning_rate=False)
            result = await self.queue.forward_backward(req)
            if isinstance(result, RequestError):
                raise result.error
            return pb.ForwardBackwardResponse(metrics=convert.metrics_to_pb(result.metrics))

        return await self._once("ForwardBackward", request, run, pb.ForwardBackwardResponse)

    async def OptimStep(self, request: pb.OptimStepRequest, context: Any) -> pb.OptimStepResponse:
        async def run() -> pb.OptimStepResponse:
            lr = request.learning_rate if request.learning_rate > 0 else None
            result = await self.queue.optim_step(request.adapter_id, lr)
            return pb.OptimStepResponse(
                step=result.step, grad_norm=result.grad_norm, applied=result.applied
            )

        return await self._once("OptimStep", request, run, pb.OptimStepResponse)

    async def TrainStep(self, request: pb.TrainStepRequest, context: Any) -> pb.TrainStepResponse:
        async def run() -> pb.TrainStepResponse:
            req = convert.train_request_from_pb(request, with_learning_rate=True)
            result = await self.queue.train_step(req)
            if isinstance(result, RequestError):
                raise result.error
            return pb.TrainStepResponse(
                metrics=convert.metrics_to_pb(result.metrics),
                step=result.step,
                applied=result.applied,
            )

        return await self._once("TrainStep", request, run, pb.TrainStepResponse)

    async def ComputeLogprobs(
        self, request: pb.ComputeLogprobsRequest, context: Any
    ) -> pb.ComputeLogprobsResponse:
        req = LogprobRequest(
            adapter=request.adapter_id or None,
            sequences=tuple(convert.sequence_from_pb(s) for s in request.sequences),
        )
        result = await self.queue.compute_logprobs(req)
        if isinstance(result, RequestError):
            raise result.error
        return pb.ComputeLogprobsResponse(
            sequences=[pb.SequenceLogprobs(logprobs=list(lp)) for lp in result.logprobs_B_C]
        )

    # --- versions -----------------------------------------------------------------------

    async def SaveVersion(
        self, request: pb.SaveVersionRequest, context: Any
    ) -> pb.SaveVersionResponse:
        async def run() -> pb.SaveVersionResponse:
            registry_id = check_id(
                request.registry_adapter_id or request.adapter_id, "registry_adapter_id"
            )
            if request.expected_parent_version < 0:
                raise InvalidArgument(
                    "expected_parent_version must be >= 0",
                    reason="VALUE_OUT_OF_RANGE",
                    metadata={"field": "expected_parent_version"},
                )
            lock = self._publish_locks.setdefault(registry_id, asyncio.Lock())
            async with lock:
                # Timed inside the lock: waiting for an earlier save is not this one's cost.
                started = time.perf_counter()
                ref = await self._save_version(request, registry_id)
                trainer_metrics.observe_checkpoint(
                    "save_version", time.perf_counter() - started, ref.size_bytes
                )
            return pb.SaveVersionResponse(ref=ref)

        return await self._once("SaveVersion", request, run, pb.SaveVersionResponse)

    async def _save_version(
        self, request: pb.SaveVersionRequest, registry_id: str
    ) -> adapter_pb2.AdapterRef:
        # The directory is named before the registry numbers the version: the
        # registry gives parent + 1 or refuses (ABORTED), checked below.
        version = request.expected_parent_version + 1
        final = self.cache.version_dir(registry_id, version)
        staging = await asyncio.to_thread(self.cache.staging_dir, registry_id, version)
        try:
            saved = await asyncio.to_thread(self.engine.save_peft, request.adapter_id, staging)
            created = await self._place_version(staging, final, saved, registry_id, version)
        finally:
            await asyncio.to_thread(AdapterCache.remove, staging)
        uri = final.absolute().as_uri()
        try:
            response = await self._publish(request, registry_id, uri, saved)
        except _REJECTED:
            if created:
                await asyncio.to_thread(AdapterCache.remove, final)
            raise
        got = response.version.version if response.HasField("version") else response.ref.version
        if got != version:
            # The registry now points at these files as version `got`: deleting them
            # would break that version, so they stay; the caller must reconcile.
            log.error(
                "registry_version_number_mismatch",
                adapter=registry_id,
                expected=version,
                got=got,
                uri=uri,
            )
            raise Aborted(
                f"registry numbered the version {got}, expected {version}",
                reason="VERSION_NUMBER_MISMATCH",
                metadata={"expected_version": str(version), "version": str(got)},
            )
        log.info(
            "version_saved",
            adapter=request.adapter_id,
            registry_adapter=registry_id,
            version=version,
            uri=uri,
            sha256=saved.sha256,
            size_bytes=saved.size_bytes,
            training_step=request.training_step,
        )
        return response.ref

    async def _place_version(
        self, staging: Path, final: Path, saved: Any, registry_id: str, version: int
    ) -> bool:
        """Move the written version into ``final``; True when this call created it."""
        if not final.exists():
            await asyncio.to_thread(AdapterCache.commit, staging, final)
            return True
        existing = await asyncio.to_thread(file_digests, final, [f.name for f in saved.files])
        if _same_files(existing, saved.files):
            return False  # a retry after a lost answer: identical bytes already there
        try:
            await self.registry.get_version(registry_id, version)
        except NotFound:
            # Left over by an attempt the registry never recorded: replace it.
            log.warning("stale_version_dir_replaced", adapter=registry_id, version=version)
            aside = final.with_name(f".{final.name}.stale-{uuid.uuid4().hex[:8]}")
            await asyncio.to_thread(os.rename, final, aside)
            await asyncio.to_thread(AdapterCache.remove, aside)
            await asyncio.to_thread(AdapterCache.commit, staging, final)
            return True
        raise Aborted(
            f"version {version} of {registry_id!r} already exists with different content",
            reason="VERSION_EXISTS",
            metadata={"adapter_id": registry_id, "version": str(version)},
        )

    async def _publish(
        self, request: pb.SaveVersionRequest, registry_id: str, uri: str, saved: Any
    ) -> Any:
        publish_id = request.request_id or str(uuid.uuid4())

        async def publish() -> Any:
            return await self.registry.publish_version(
                registry_id,
                uri,
                expected_parent_version=request.expected_parent_version,
                training_step=request.training_step,
                metrics=dict(request.metrics),
                files=_pb_files(saved.files),
                sha256=saved.sha256,
                request_id=publish_id,
            )

        try:
            return await publish()
        except NotFound as e:
            if e.reason != "ADAPTER_NOT_FOUND":
                raise
        # Direct users (no scheduler) need not register the adapter first.
        with contextlib.suppress(AlreadyExists):
            await self.registry.create_adapter(
                registry_id,
                lora=convert.lora_spec_to_pb(saved.spec),
                base_model=self.base_model_name,
                request_id=f"{publish_id}:create-adapter"[:128],
            )
        log.info("registry_adapter_created", adapter=registry_id)
        return await publish()

    # --- state --------------------------------------------------------------------------

    async def SaveState(self, request: pb.SaveStateRequest, context: Any) -> pb.SaveStateResponse:
        async def run() -> pb.SaveStateResponse:
            name = check_id(request.adapter_id, "adapter_id")
            started = time.perf_counter()
            data = await asyncio.to_thread(self.engine.save_state, name)
            step = int(state_metadata(data)["step"])
            saved = await asyncio.to_thread(self.states.write, name, step, data)
            trainer_metrics.observe_checkpoint(
                "save_state", time.perf_counter() - started, saved.size_bytes
            )
            log.info(
                "state_saved", adapter=name, step=step, uri=saved.uri, size_bytes=saved.size_bytes
            )
            return pb.SaveStateResponse(
                uri=saved.uri, sha256=saved.sha256, size_bytes=saved.size_bytes, step=step
            )

        return await self._once("SaveState", request, run, pb.SaveStateResponse)

    async def LoadState(self, request: pb.LoadStateRequest, context: Any) -> pb.LoadStateResponse:
        async def run() -> pb.LoadStateResponse:
            name = check_id(request.adapter_id, "adapter_id")
            if not request.sha256:
                raise InvalidArgument(
                    "sha256 of the checkpoint is required",
                    reason="SHA256_REQUIRED",
                    metadata={"field": "sha256"},
                )
            started = time.perf_counter()
            data = await asyncio.to_thread(self.states.read, request.uri, request.sha256)
            info = await asyncio.to_thread(self._load_state, name, data)
            trainer_metrics.observe_checkpoint("load_state", time.perf_counter() - started)
            log.info("state_loaded", adapter=name, step=info.step, uri=request.uri)
            return pb.LoadStateResponse(adapter=self._adapter_info(info))

        return await self._once("LoadState", request, run, pb.LoadStateResponse)

    def _load_state(self, name: str, data: bytes) -> Any:
        """Create the adapter from the checkpoint, or replace the one loaded here
        (weights, moments, step, optimizer config and, if it differs, shape)."""
        meta = state_metadata(data)
        try:
            spec = LoraSpec.from_dict(meta["spec"])
            optimizer = OptimizerConfig.from_dict(meta["optimizer"])
        except (KeyError, TypeError, ValueError) as e:
            raise InvalidArgument(
                f"checkpoint metadata is incomplete: {e}", reason="INVALID_STATE"
            ) from e
        if not self.engine.has_adapter(name):
            return self.engine.load_state(name, data)
        try:
            return self.engine.load_state(name, data, optimizer)
        except FailedPrecondition as e:
            if e.reason != "STATE_SPEC_MISMATCH":
                raise
        # A different shape: check what can be checked before giving up the old one.
        if spec.rank > self.engine.max_rank:
            raise rank_above_node_max(spec.rank, self.engine.max_rank)
        self.engine.drop_adapter(name)
        return self.engine.load_state(name, data)

    # --- status -------------------------------------------------------------------------

    async def GetTrainerStatus(
        self, request: pb.GetTrainerStatusRequest, context: Any
    ) -> pb.GetTrainerStatusResponse:
        adapters = await asyncio.to_thread(self.engine.adapters)
        return pb.GetTrainerStatusResponse(
            base_model=self.base_model_name,
            slots_total=self.engine.slots_total,
            slots_used=len(adapters),
            max_rank=self.engine.max_rank,
            adapters=[self._adapter_info(a) for a in adapters],
            base_model_bytes=self.base_model_bytes,
            process_memory_bytes=await asyncio.to_thread(process_memory_bytes),
        )

    def _adapter_info(self, info: Any) -> pb.AdapterInfo:
        message = convert.adapter_info_to_pb(info)
        message.fencing_token = self.fences.highest(message.adapter_id)
        return message


def servicer_binding(servicer: TrainerServicer) -> ServiceBinding:
    return ServiceBinding(
        SERVICE.full_name,
        lambda server: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, server),
    )
