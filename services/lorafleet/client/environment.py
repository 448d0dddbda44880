"""Typed client of any EnvironmentService (lorafleet's built-in one or yours)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lorafleet.api.environment.v1 import environment_pb2 as pb
from lorafleet.api.environment.v1 import environment_pb2_grpc
from lorafleet.client._base import AsyncServiceClient, SyncBridge
from lorafleet.environment.structs import dict_to_struct


class AsyncEnvironmentClient(AsyncServiceClient):
    STUB = environment_pb2_grpc.EnvironmentServiceStub

    async def describe(self) -> pb.DescribeEnvironmentResponse:
        return await self._unary(self.stub.DescribeEnvironment, pb.DescribeEnvironmentRequest())

    async def sample_prompts(
        self,
        task: str,
        num_prompts: int,
        *,
        params: Mapping[str, Any] | None = None,
        seed: int = 0,
        step: int = 0,
        eval: bool = False,
        experiment_id: str = "",
        timeout_s: float | None = None,
    ) -> list[pb.EnvPrompt]:
        request = pb.SamplePromptsRequest(
            experiment_id=experiment_id,
            task=task,
            task_params=dict_to_struct(dict(params or {})),
            num_prompts=num_prompts,
            seed=seed,
            step=step,
            eval=eval,
        )
        response = await self._unary(self.stub.SamplePrompts, request, timeout_s)
        return list(response.prompts)

    async def score(
        self,
        task: str,
        items: Sequence[tuple[pb.EnvPrompt, str]],
        *,
        params: Mapping[str, Any] | None = None,
        experiment_id: str = "",
        timeout_s: float | None = None,
    ) -> list[pb.ScoreResult]:
        request = pb.ScoreRequest(
            experiment_id=experiment_id,
            task=task,
            task_params=dict_to_struct(dict(params or {})),
            items=[pb.ScoreItem(prompt=p, completion=c) for p, c in items],
        )
        response = await self._unary(self.stub.Score, request, timeout_s)
        return list(response.results)


class EnvironmentClient(SyncBridge):
    """Blocking twin of `AsyncEnvironmentClient`."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncEnvironmentClient(address, **kwargs))
