"""SchedulerService: proto <-> `Scheduler`, with request_id replay."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc.aio
from google.protobuf.message import Message

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.api.scheduler.v1 import scheduler_pb2_grpc
from lorafleet.core.errors import InvalidArgument
from lorafleet.core.idempotency import IdempotencyStore, fingerprint_of, once
from lorafleet.scheduler.service import Scheduler, node_to_proto, to_proto

M = TypeVar("M", bound=Message)

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler, idempotency: IdempotencyStore) -> None:
        self.scheduler = scheduler
        self.idempotency = idempotency

    async def _once(
        self, method: str, request: Message, fn: Callable[[], Awaitable[M]], response_type: type[M]
    ) -> M:
        return await once(
            self.idempotency,
            f"lorafleet.scheduler.v1.SchedulerService/{method}",
            request.request_id,  # type: ignore[attr-defined]
            fingerprint_of(request),
            fn,
            response_type,
        )

    async def SubmitExperiment(
        self, request: pb.SubmitExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitExperimentResponse:
        async def submit() -> pb.SubmitExperimentResponse:
            record = await self.scheduler.submit(request.spec, request.experiment_id)
            return pb.SubmitExperimentResponse(experiment=to_proto(record))

        if request.validate_only:
            # Changes nothing, so it needs no request_id and is never replayed.
            record = await self.scheduler.validate(request.spec, request.experiment_id)
            return pb.SubmitExperimentResponse(experiment=to_proto(record))
        return await self._once("SubmitExperiment", request, submit, pb.SubmitExperimentResponse)

    async def GetExperiment(
        self, request: pb.GetExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetExperimentResponse:
        record = await self.scheduler.get(request.experiment_id)
        return pb.GetExperimentResponse(experiment=to_proto(record))

    async def ListExperiments(
        self, request: pb.ListExperimentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListExperimentsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must be >= 0", reason="INVALID_PAGE_SIZE")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        # The page token is the last id of the previous page (ids are unique and
        # the listing is ordered by id), so pages stay stable under inserts.
        records = await self.scheduler.list(
            list(request.states),
            after_id=request.page_token,
            limit=size + 1,
            labels=dict(request.labels),
        )
        page = records[:size]
        token = page[-1].experiment_id if len(records) > size else ""
        return pb.ListExperimentsResponse(
            experiments=[to_proto(r) for r in page], next_page_token=token
        )

    async def PauseExperiment(
        self, request: pb.PauseExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.PauseExperimentResponse:
        async def pause() -> pb.PauseExperimentResponse:
            record = await self.scheduler.pause(request.experiment_id)
            return pb.PauseExperimentResponse(experiment=to_proto(record))

        return await self._once("PauseExperiment", request, pause, pb.PauseExperimentResponse)

    async def ResumeExperiment(
        self, request: pb.ResumeExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResumeExperimentResponse:
        async def resume() -> pb.ResumeExperimentResponse:
            record = await self.scheduler.resume(request.experiment_id)
            return pb.ResumeExperimentResponse(experiment=to_proto(record))

        return await self._once("ResumeExperiment", request, resume, pb.ResumeExperimentResponse)

    async def CancelExperiment(
        self, request: pb.CancelExperimentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelExperimentResponse:
        async def cancel() -> pb.CancelExperimentResponse:
            record = await self.scheduler.cancel(request.experiment_id)
            return pb.CancelExperimentResponse(experiment=to_proto(record))

        return await self._once("CancelExperiment", request, cancel, pb.CancelExperimentResponse)

    async def WatchExperiment(
        self, request: pb.WatchExperimentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchExperimentResponse]:
        if request.from_step < 0:
            raise InvalidArgument("from_step must be >= 0", reason="INVALID_FROM_STEP")
        async for event in self.scheduler.watch(request.experiment_id, request.from_step):
            yield event

    async def PushData(
        self, request: pb.PushDataRequest, context: grpc.aio.ServicerContext
    ) -> pb.PushDataResponse:
        async def push() -> pb.PushDataResponse:
            pending = await self.scheduler.push_data(
                request.experiment_id, request.prompts, request.scored
            )
            return pb.PushDataResponse(pending_items=pending)

        return await self._once("PushData", request, push, pb.PushDataResponse)

    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterNodeResponse:
        async def register() -> pb.RegisterNodeResponse:
            await self.scheduler.register_node(request.node)
            handle = self.scheduler.nodes[request.node.node_id]
            return pb.RegisterNodeResponse(
                node=node_to_proto(handle),
                heartbeat_interval_ms=int(self.scheduler.settings.heartbeat_interval_s * 1000),
            )

        return await self._once("RegisterNode", request, register, pb.RegisterNodeResponse)

    async def NodeHeartbeat(
        self, request: pb.NodeHeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> pb.NodeHeartbeatResponse:
        state = await self.scheduler.heartbeat(request.node_id)
        return pb.NodeHeartbeatResponse(state=state)

    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesResponse:
        return pb.ListNodesResponse(nodes=[node_to_proto(n) for n in self.scheduler.list_nodes()])
