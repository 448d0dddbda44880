"""Typed client of the SchedulerService: submit and follow experiments.

Give it one address, or every scheduler replica's ("h1:50052,h2:50052", or a
"dns:///name:50052" that resolves to them): then calls go to whichever replica
leads, wait for the next leader during a failover, and a watch carries on
across it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.api.scheduler.v1 import scheduler_pb2_grpc
from lorafleet.client._base import AsyncServiceClient, SyncBridge
from lorafleet.client.registry import parse_selector
from lorafleet.core.errors import Unavailable
from lorafleet.environment.structs import dict_to_struct


def _rid(request_id: str | None) -> str:
    return request_id or uuid.uuid4().hex


def builtin_spec(
    task: str,
    *,
    base_model: str = "tiny",
    params: Mapping[str, Any] | None = None,
    rank: int = 0,
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
    init_from: str = "",
) -> pb.ExperimentSpec:
    """An ExperimentSpec for a built-in task; zero values mean the scheduler's defaults
    (rank 8, or the source adapter's with `init_from`).

    `init_from` ("exp-1a2b@7", "exp-1a2b@best", "exp-1a2b" for its latest) starts
    from that registry version's weights instead of fresh ones.
    """
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
    if init_from:
        spec.init_from.CopyFrom(parse_selector(init_from))
    return spec


_TERMINAL = frozenset(
    {pb.EXPERIMENT_STATE_COMPLETED, pb.EXPERIMENT_STATE_FAILED, pb.EXPERIMENT_STATE_CANCELLED}
)
# How long a watch keeps trying to reopen its stream after it broke (a leader
# that died is replaced after its lease, 15 s by default, plus a start-up).
WATCH_RECONNECT_S = 60.0


class AsyncSchedulerClient(AsyncServiceClient):
    STUB = scheduler_pb2_grpc.SchedulerServiceStub

    # Only the leader's is SERVING: given every replica, calls follow the leader.
    REPLICA_HEALTH_SERVICE = pb.DESCRIPTOR.services_by_name["SchedulerService"].full_name

    async def submit(
        self, spec: pb.ExperimentSpec, *, experiment_id: str = "", request_id: str | None = None
    ) -> pb.Experiment:
        request = pb.SubmitExperimentRequest(
            request_id=_rid(request_id), spec=spec, experiment_id=experiment_id
        )
        return (await self._unary(self.stub.SubmitExperiment, request)).experiment

    async def validate(self, spec: pb.ExperimentSpec, *, experiment_id: str = "") -> pb.Experiment:
        """The experiment `submit` would create (defaults filled, `init_from`
        pinned), or the error it would raise; creates nothing."""
        request = pb.SubmitExperimentRequest(
            spec=spec, experiment_id=experiment_id, validate_only=True
        )
        return (await self._unary(self.stub.SubmitExperiment, request)).experiment

    async def get(self, experiment_id: str) -> pb.Experiment:
        request = pb.GetExperimentRequest(experiment_id=experiment_id)
        return (await self._unary(self.stub.GetExperiment, request)).experiment

    async def list(
        self, states: Iterable[int] = (), *, labels: Mapping[str, str] | None = None
    ) -> list[pb.Experiment]:
        """Every experiment (all pages), optionally only in `states` and only
        those whose spec labels include `labels`."""
        out: list[pb.Experiment] = []
        token = ""
        while True:
            response = await self._unary(
                self.stub.ListExperiments,
                pb.ListExperimentsRequest(
                    states=list(states),
                    page_token=token,
                    page_size=500,
                    labels=dict(labels or {}),
                ),
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
        self, experiment_id: str, *, from_step: int = 0, reconnect_s: float = WATCH_RECONNECT_S
    ) -> AsyncIterator[pb.WatchExperimentResponse]:
        """Step metrics and lifecycle events, replayed then live; ends when the
        experiment reaches a terminal state.

        When an open stream breaks with UNAVAILABLE (the scheduler leading it
        went away), it is reopened for up to `reconnect_s` from the step after
        the last one seen, and lifecycle events already seen are not repeated:
        a failover shows as a pause, then the next steps. A stream that cannot
        be opened in the first place (a standby's NOT_LEADER, say) raises at once.
        """
        last_step = from_step
        lifecycle_seen = 0
        opened = finished = False
        broke_at: float | None = None
        while True:
            request = pb.WatchExperimentRequest(experiment_id=experiment_id, from_step=last_step)
            lifecycle_now = 0
            try:
                async for event in self._server_stream(self.stub.WatchExperiment, request):
                    opened, broke_at = True, None
                    if event.WhichOneof("event") == "lifecycle":
                        # The server replays every lifecycle event on each open.
                        lifecycle_now += 1
                        if lifecycle_now <= lifecycle_seen:
                            continue
                        lifecycle_seen = lifecycle_now
                        finished = finished or event.lifecycle.state in _TERMINAL
                    else:
                        last_step = event.step.step
                    yield event
                if finished or not opened:
                    return
                # Ended before the experiment did: its server stopped.
                error: Unavailable | None = None
            except Unavailable as exc:
                if not opened:
                    raise
                error = exc
            now = time.monotonic()
            broke_at = now if broke_at is None else broke_at
            if now - broke_at >= reconnect_s:
                raise error or Unavailable(
                    f"the watch of {experiment_id!r} ended before the experiment did and could"
                    f" not be reopened within {reconnect_s:g} s",
                    reason="WATCH_BROKEN",
                )
            await asyncio.sleep(0.5)

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
