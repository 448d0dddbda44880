"""Typed client of the SchedulerService: submit and follow experiments."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.api.scheduler.v1 import scheduler_pb2_grpc
from lorafleet.client._base import AsyncServiceClient, SyncBridge
from lorafleet.environment.structs import dict_to_struct


def _rid(request_id: str | None) -> str:
    return request_id or uuid.uuid4().hex


def builtin_spec(
    task: str,
    *,
    base_model: str = "tiny",
    params: Mapping[str, Any] | None = None,
    rank: int = 8,
    alpha: float = 0.0,
    max_steps: int = 20,
    prompts_per_step: int = 0,
    group_size: int = 0,
    learning_rate: float = 0.0,
    max_tokens: int = 0,
    max_staleness: int = 0,
    eval_every: int = 0,
    eval_prompts: int = 0,
    weight: float = 1.0,
    seed: int = 0,
    display_name: str = "",
    exact_match_reward: bool = False,
    logprob_gap_every: int = 0,
) -> pb.ExperimentSpec:
    """An ExperimentSpec for a built-in task; zero values mean the scheduler's defaults."""
    spec = pb.ExperimentSpec(
        display_name=display_name or task,
        base_model=base_model,
        weight=weight,
        seed=seed,
    )
    spec.environment.builtin.task = task
    spec.environment.builtin.params.CopyFrom(dict_to_struct(dict(params or {})))
    spec.lora.rank = rank
    spec.lora.alpha = alpha
    algo = spec.algorithm
    algo.max_steps = max_steps
    algo.prompts_per_step = prompts_per_step
    algo.group_size = group_size
    algo.learning_rate = learning_rate
    algo.max_tokens = max_tokens
    algo.max_staleness = max_staleness
    algo.eval_every = eval_every
    algo.eval_prompts = eval_prompts
    algo.exact_match_reward = exact_match_reward
    algo.logprob_gap_every = logprob_gap_every
    return spec


class AsyncSchedulerClient(AsyncServiceClient):
    def __init__(self, target: Any, **kwargs: Any) -> None:
        super().__init__(target, **kwargs)
        self.stub = scheduler_pb2_grpc.SchedulerServiceStub(self.channel)

    async def submit(
        self, spec: pb.ExperimentSpec, *, experiment_id: str = "", request_id: str | None = None
    ) -> pb.Experiment:
        request = pb.SubmitExperimentRequest(
            request_id=_rid(request_id), spec=spec, experiment_id=experiment_id
        )
        return (await self._unary(self.stub.SubmitExperiment, request)).experiment

    async def get(self, experiment_id: str) -> pb.Experiment:
        request = pb.GetExperimentRequest(experiment_id=experiment_id)
        return (await self._unary(self.stub.GetExperiment, request)).experiment

    async def list(self, states: Iterable[int] = ()) -> list[pb.Experiment]:
        """Every experiment (all pages), optionally only in `states`."""
        out: list[pb.Experiment] = []
        token = ""
        while True:
            response = await self._unary(
                self.stub.ListExperiments,
                pb.ListExperimentsRequest(states=list(states), page_token=token, page_size=500),
            )
            out.extend(response.experiments)
            token = response.next_page_token
            if not token:
                return out

    async def pause(self, experiment_id: str, *, request_id: str | None = None) -> pb.Experiment:
        request = pb.PauseExperimentRequest(
            request_id=_rid(request_id), experiment_id=experiment_id
        )
        return (await self._unary(self.stub.PauseExperiment, request, 600)).experiment

    async def resume(self, experiment_id: str, *, request_id: str | None = None) -> pb.Experiment:
        request = pb.ResumeExperimentRequest(
            request_id=_rid(request_id), experiment_id=experiment_id
        )
        return (await self._unary(self.stub.ResumeExperiment, request)).experiment

    async def cancel(self, experiment_id: str, *, request_id: str | None = None) -> pb.Experiment:
        request = pb.CancelExperimentRequest(
            request_id=_rid(request_id), experiment_id=experiment_id
        )
        return (await self._unary(self.stub.CancelExperiment, request, 120)).experiment

    async def watch(
        self, experiment_id: str, *, from_step: int = 0
    ) -> AsyncIterator[pb.WatchExperimentResponse]:
        """Step metrics and lifecycle events, replayed then live; ends when the
        experiment reaches a terminal state."""
        request = pb.WatchExperimentRequest(experiment_id=experiment_id, from_step=from_step)
        async for event in self._server_stream(self.stub.WatchExperiment, request):
            yield event

    async def push_prompts(
        self,
        experiment_id: str,
        prompts: Iterable[tuple[str, Mapping[str, Any]]],
        *,
        request_id: str | None = None,
    ) -> int:
        request = pb.PushDataRequest(
            request_id=_rid(request_id),
            experiment_id=experiment_id,
            prompts=[
                pb.DataPrompt(text=text, metadata=dict_to_struct(dict(meta)))
                for text, meta in prompts
            ],
        )
        return (await self._unary(self.stub.PushData, request)).pending_items

    async def nodes(self) -> list[pb.Node]:
        return list((await self._unary(self.stub.ListNodes, pb.ListNodesRequest())).nodes)


class SchedulerClient(SyncBridge):
    """Blocking twin of `AsyncSchedulerClient`."""

    def __init__(self, address: str, **kwargs: Any) -> None:
        super().__init__(lambda: AsyncSchedulerClient(address, **kwargs))
