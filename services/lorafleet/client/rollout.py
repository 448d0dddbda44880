"""Typed client of the RolloutService.

    from lorafleet.client.rollout import RolloutClient
    with RolloutClient("127.0.0.1:50061") as rollout:
        out = rollout.generate(["12+3="], adapter="exp-1@latest", n=8, temperature=1.0)
        out.adapter_version                      # the version that served it
        out.results[0].completions[0].text       # first sample of the first prompt

``adapter`` is ``"exp"`` / ``"exp@latest"`` / ``"exp@best"`` / ``"exp@3"``, an
``AdapterSelector``, or None for the base model. Responses are the proto messages
(every field documented in ``protos/lorafleet/rollout/v1/rollout.proto``).
State-changing calls take an optional ``request_id`` (a fresh UUID when omitted);
pass the same one to retry safely.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from lorafleet.api.common.v1 import adapter_pb2, sampling_pb2
from lorafleet.api.rollout.v1 import rollout_pb2 as pb
from lorafleet.api.rollout.v1 import rollout_pb2_grpc
from lorafleet.client._base import AsyncServiceClient, SyncBridge

# Generation is a data-plane call: a batch of long samples on a busy node takes
# far longer than a control-plane call.
DEFAULT_GENERATE_TIMEOUT_S = 300.0

AdapterLike = str | adapter_pb2.AdapterSelector | None
PromptLike = str | Sequence[int]


def adapter_selector(adapter: AdapterLike) -> adapter_pb2.AdapterSelector | None:
    """ "exp" / "exp@latest" / "exp@best" / "exp@3" (or a selector, or None) ->
    ``AdapterSelector`` (None = base model)."""
    if adapter is None or isinstance(adapter, adapter_pb2.AdapterSelector):
        return adapter
    adapter_id, _, which = adapter.partition("@")
    if not which:
        return adapter_pb2.AdapterSelector(adapter_id=adapter_id)
    if which.isdigit():
        return adapter_pb2.AdapterSelector(adapter_id=adapter_id, version=int(which))
    return adapter_pb2.AdapterSelector(adapter_id=adapter_id, alias=which)


def _prompt(prompt: PromptLike) -> pb.Prompt:
    if isinstance(prompt, str):
        return pb.Prompt(text=prompt)
    return pb.Prompt(token_ids=pb.TokenIds(ids=list(prompt)))


def _rid(request_id: str | None) -> str:
    return request_id or str(uuid.uuid4())


class AsyncRolloutClient(AsyncServiceClient):
    STUB = rollout_pb2_grpc.RolloutServiceStub

    @staticmethod
    def generate_request(
        prompts: Sequence[PromptLike],
        *,
        adapter: AdapterLike = None,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 16,
        stop: Sequence[str] = (),
        seed: int | None = None,
        logprobs: bool = True,
        experiment_id: str = "",
        timeout_ms: int = 0,
    ) -> pb.GenerateRequest:
        sampling = sampling_pb2.SamplingParams(
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            stop=list(stop),
            skip_logprobs=not logprobs,
        )
        if seed is not None:
            sampling.seed = seed
        request = pb.GenerateRequest(
            prompts=[_prompt(p) for p in prompts],
            n=n,
            sampling=sampling,
            experiment_id=experiment_id,
            timeout_ms=timeout_ms,
        )
        selector = adapter_selector(adapter)
        if selector is not None:
            request.adapter.CopyFrom(selector)
        return request

    async def generate(
        self,
        prompts: Sequence[PromptLike],
        *,
        adapter: AdapterLike = None,
        n: int = 1,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_tokens: int = 16,
        stop: Sequence[str] = (),
        seed: int | None = None,
        logprobs: bool = True,
        experiment_id: str = "",
        timeout_s: float = DEFAULT_GENERATE_TIMEOUT_S,
    ) -> pb.GenerateResponse:
        """``n`` samples of each prompt (text or token ids) under ``adapter``."""
        request = self.generate_request(
            prompts,
            adapter=adapter,
            n=n,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            max_tokens=max_tokens,
            stop=stop,
            seed=seed,
            logprobs=logprobs,
            experiment_id=experiment_id,
        )
        return await self._unary(self.stub.Generate, request, timeout_s)

    async def generate_stream(
        self,
        prompts: Sequence[PromptLike],
        *,
        timeout_s: float = DEFAULT_GENERATE_TIMEOUT_S,
        **kwargs: Any,
    ) -> AsyncIterator[pb.GenerateStreamResponse]:
        """Deltas per (prompt_index, sample_index) as tokens are produced; same
        keyword arguments as ``generate``."""
        request = self.generate_request(prompts, **kwargs)
        async for message in self._server_stream(self.stub.GenerateStream, request, timeout_s):
            yield message

    async def compute_logprobs(
        self,
        sequences: Sequence[tuple[Sequence[int], int]],
        *,
        adapter: AdapterLike = None,
        timeout_s: float = DEFAULT_GENERATE_TIMEOUT_S,
    ) -> pb.ComputeLogprobsResponse:
        """Logprobs of the completion tokens of each ``(token_ids, prompt_length)``."""
        request = pb.ComputeLogprobsRequest(
            sequences=[
                sampling_pb2.TokenSequence(token_ids=list(ids), prompt_length=prompt_length)
                for ids, prompt_length in sequences
            ]
        )
        selector = adapter_selector(adapter)
        if selector is not None:
            request.adapter.CopyFrom(selector)
        return await self._unary(self.stub.ComputeLogprobs, request, timeout_s)

    async def load_adapter(
        self,
        adapter: str | adapter_pb2.AdapterSelector | adapter_pb2.AdapterRef,
        *,
        request_id: str | None = None,
        timeout_s: float | None = None,
    ) -> pb.LoadedAdapter:
        """Warm a version (by selector, or exactly this ``AdapterRef``)."""
        request = pb.LoadAdapterRequest(request_id=_rid(request_id))
        if isinstance(adapter, adapter_pb2.AdapterRef):
            request.ref.CopyFrom(adapter)
        else:
            selector = adapter_selector(adapter)
            assert selector is not None
            request.selector.CopyFrom(selector)
        return (await self._unary(self.stub.LoadAdapter, request, timeout_s)).adapter

    async def unload_adapter(
        self, adapter_id: str, version: int = 0, *, request_id: str | None = None
    ) -> int:
        """Unload one version (0: every version); returns how many were unloaded."""
        request = pb.UnloadAdapterRequest(
            request_id=_rid(request_id), adapter_id=adapter_id, version=version
        )
        return (await self._unary(self.stub.UnloadAdapter, request)).unloaded

    async def list_loaded(self) -> list[pb.LoadedAdapter]:
        response = await self._unary(self.stub.ListLoadedAdapters, pb.ListLoadedAdaptersRequest())
        return list(response.adapters)

    async def status(self) -> pb.GetRolloutStatusResponse:
        return await self._unary(self.stub.GetRolloutStatus, pb.GetRolloutStatusRequest())


class RolloutClient(SyncBridge):
    """Blocking twin of `AsyncRolloutClient`: ``RolloutClient(address)``."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncRolloutClient(address, **kwargs))
