"""RolloutService over gRPC: a thin servicer, proto <-> domain and nothing else.

Errors are raised as ``LorafleetError`` and mapped to status by the core
interceptor. Operator RPCs that change state (LoadAdapter, UnloadAdapter) are
idempotent by ``request_id``: a replay gets the first answer.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from lorafleet.api.common.v1 import sampling_pb2
from lorafleet.api.rollout.v1 import rollout_pb2 as pb
from lorafleet.api.rollout.v1 import rollout_pb2_grpc
from lorafleet.core.errors import InvalidArgument
from lorafleet.core.idempotency import IdempotencyStore, fingerprint_of, once
from lorafleet.core.server import ServiceBinding
from lorafleet.rollout.resolvers import ref_from_pb
from lorafleet.rollout.service import GenerateCall, RolloutService
from lorafleet.rollout.types import (
    AdapterSelection,
    FinishReason,
    LoadedVersion,
    SamplingSpec,
    ScoreSequence,
)

SERVICE = pb.DESCRIPTOR.services_by_name["RolloutService"]

_FINISH_PB = {
    FinishReason.STOP: sampling_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: sampling_pb2.FINISH_REASON_LENGTH,
    FinishReason.ABORTED: sampling_pb2.FINISH_REASON_ABORTED,
}


def selection_from_pb(selector: Any, *, present: bool) -> AdapterSelection | None:
    """``AdapterSelector`` -> selection; unset (or an empty adapter_id) = the base model."""
    if not present or not selector.adapter_id:
        return None
    which = selector.WhichOneof("version_selector")
    if which == "version":
        return AdapterSelection.of(selector.adapter_id, int(selector.version))
    if which == "alias" and selector.alias:
        return AdapterSelection.of(selector.adapter_id, selector.alias)
    return AdapterSelection.of(selector.adapter_id, "latest")


def sampling_from_pb(params: Any) -> SamplingSpec:
    return SamplingSpec(
        temperature=float(params.temperature),
        top_p=float(params.top_p) if params.top_p > 0 else 1.0,
        top_k=int(params.top_k),
        max_tokens=int(params.max_tokens),
        stop=tuple(params.stop),
        seed=int(params.seed) if params.HasField("seed") else None,
        logprobs=not params.skip_logprobs,
    )


def call_from_pb(request: pb.GenerateRequest) -> GenerateCall:
    prompts: list[str | list[int]] = []
    for i, prompt in enumerate(request.prompts):
        which = prompt.WhichOneof("input")
        if which == "text":
            prompts.append(prompt.text)
        elif which == "token_ids":
            prompts.append(list(prompt.token_ids.ids))
        else:
            raise InvalidArgument(
                f"prompt {i} has neither text nor token_ids",
                reason="EMPTY_PROMPT",
                metadata={"field": f"prompts[{i}]"},
            )
    return GenerateCall(
        prompts=prompts,
        adapter=selection_from_pb(request.adapter, present=request.HasField("adapter")),
        n=int(request.n),
        sampling=sampling_from_pb(request.sampling),
        experiment_id=request.experiment_id,
        timeout_s=request.timeout_ms / 1000 if request.timeout_ms > 0 else None,
    )


def loaded_to_pb(loaded: LoadedVersion) -> pb.LoadedAdapter:
    return pb.LoadedAdapter(
        adapter_id=loaded.adapter_id,
        version=loaded.version,
        engine_name=loaded.engine_name,
        rank=loaded.rank,
        load_ms=loaded.load_ms,
        active=loaded.active,
    )


class RolloutServicer(rollout_pb2_grpc.RolloutServiceServicer):
    def __init__(self, rollout: RolloutService, idempotency: IdempotencyStore) -> None:
        self.rollout = rollout
        self.idempotency = idempotency

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        result = await self.rollout.generate(call_from_pb(request))
        return pb.GenerateResponse(
            results=[
                pb.PromptCompletions(
                    prompt_token_ids=r.prompt_token_ids,
                    completions=[
                        pb.Completion(
                            token_ids=s.token_ids_T,
                            text=s.text,
                            logprobs=s.logprobs_T,
                            finish_reason=_FINISH_PB[s.finish_reason],
                        )
                        for s in r.samples_N
                    ],
                )
                for r in result.results_P
            ],
            adapter_version=result.adapter_version,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        async for version, delta in self.rollout.generate_stream(call_from_pb(request)):
            yield pb.GenerateStreamResponse(
                prompt_index=delta.prompt_index,
                sample_index=delta.sample_index,
                token_ids=delta.token_ids,
                text=delta.text,
                logprobs=delta.logprobs,
                finish_reason=(
                    _FINISH_PB[delta.finish_reason]
                    if delta.finish_reason is not None
                    else sampling_pb2.FINISH_REASON_UNSPECIFIED
                ),
                adapter_version=version,
            )

    async def ComputeLogprobs(
        self, request: pb.ComputeLogprobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ComputeLogprobsResponse:
        selection = selection_from_pb(request.adapter, present=request.HasField("adapter"))
        sequences = [
            ScoreSequence(tuple(s.token_ids), int(s.prompt_length)) for s in request.sequences
        ]
        version, logprobs = await self.rollout.compute_logprobs(selection, sequences)
        return pb.ComputeLogprobsResponse(
            sequences=[pb.SequenceLogprobs(logprobs=lp) for lp in logprobs],
            adapter_version=version,
        )

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        async def load() -> pb.LoadAdapterResponse:
            which = request.WhichOneof("source")
            if which == "ref":
                if not request.ref.adapter_id or request.ref.version < 1 or not request.ref.uri:
                    raise InvalidArgument(
                        "ref needs adapter_id, version >= 1 and uri",
                        reason="INVALID_REF",
                        metadata={"field": "ref"},
                    )
                target: Any = ref_from_pb(request.ref)
            elif which == "selector" and request.selector.adapter_id:
                target = selection_from_pb(request.selector, present=True)
            else:
                raise InvalidArgument(
                    "LoadAdapter needs a selector or a ref",
                    reason="NO_ADAPTER_SOURCE",
                    metadata={"field": "source"},
                )
            loaded = await self.rollout.load_adapter(target)
            return pb.LoadAdapterResponse(adapter=loaded_to_pb(loaded))

        return await once(
            self.idempotency,
            SERVICE.methods_by_name["LoadAdapter"].full_name,
            request.request_id,
            fingerprint_of(request),
            load,
            pb.LoadAdapterResponse,
        )

    async def UnloadAdapter(
        self, request: pb.UnloadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.UnloadAdapterResponse:
        async def unload() -> pb.UnloadAdapterResponse:
            if not request.adapter_id:
                raise InvalidArgument(
                    "adapter_id is required",
                    reason="FIELD_EMPTY",
                    metadata={"field": "adapter_id"},
                )
            if request.version < 0:
                raise InvalidArgument(
                    "version must be >= 0",
                    reason="INVALID_ADAPTER_VERSION",
                    metadata={"field": "version"},
                )
            count = await self.rollout.unload_adapter(request.adapter_id, int(request.version))
            return pb.UnloadAdapterResponse(unloaded=count)

        return await once(
            self.idempotency,
            SERVICE.methods_by_name["UnloadAdapter"].full_name,
            request.request_id,
            fingerprint_of(request),
            unload,
            pb.UnloadAdapterResponse,
        )

    async def ListLoadedAdapters(
        self, request: pb.ListLoadedAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListLoadedAdaptersResponse:
        return pb.ListLoadedAdaptersResponse(
            adapters=[loaded_to_pb(v) for v in self.rollout.list_loaded()]
        )

    async def GetRolloutStatus(
        self, request: pb.GetRolloutStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRolloutStatusResponse:
        s = self.rollout.status()
        return pb.GetRolloutStatusResponse(
            engine=s.engine,
            base_model=s.base_model,
            max_loras=s.max_loras,
            max_cpu_loras=s.max_cpu_loras,
            max_lora_rank=s.max_lora_rank,
            max_model_len=s.max_model_len,
            running_requests=s.running_requests,
            queued_requests=s.queued_requests,
            process_memory_bytes=s.process_memory_bytes,
        )


def servicer_binding(servicer: RolloutServicer) -> ServiceBinding:
    return ServiceBinding(
        SERVICE.full_name,
        lambda server: rollout_pb2_grpc.add_RolloutServiceServicer_to_server(servicer, server),
    )
