"""The scheduler's view of a node: its two services and its fair-share gates."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafleet.api.rollout.v1 import rollout_pb2_grpc
from lorafleet.api.trainer.v1 import trainer_pb2_grpc
from lorafleet.client._base import AsyncServiceClient
from lorafleet.scheduler.fairshare import FairShareGate
from lorafleet.scheduler.types import NodeRecord


class NodeRpc(AsyncServiceClient):
    """Raw stubs of one service plus the shared deadline/error handling."""

    async def call(self, method, request, timeout_s: float | None = None):  # type: ignore[no-untyped-def]
        return await self._unary(method, request, timeout_s)


@dataclass
class NodeHandle:
    record: NodeRecord
    rollout: NodeRpc
    trainer: NodeRpc
    rollout_gate: FairShareGate
    train_gate: FairShareGate
    experiments: set[str] = field(default_factory=set)
    probed_at: float = 0.0
    """When the supervisor last probed the node's health (time.time())."""

    @classmethod
    def connect(cls, record: NodeRecord, *, budget_tokens: int) -> NodeHandle:
        rollout = NodeRpc(record.rollout_address)
        trainer = NodeRpc(record.trainer_address)
        return cls(
            record=record,
            rollout=rollout,
            trainer=trainer,
            rollout_gate=FairShareGate(budget_tokens),
            train_gate=FairShareGate(budget_tokens),
        )

    @property
    def rollout_stub(self) -> rollout_pb2_grpc.RolloutServiceStub:
        # Through the client each time: after a certificate renewal its channel is new.
        return self.rollout.stub_for(rollout_pb2_grpc.RolloutServiceStub)

    @property
    def trainer_stub(self) -> trainer_pb2_grpc.TrainerServiceStub:
        return self.trainer.stub_for(trainer_pb2_grpc.TrainerServiceStub)

    @property
    def node_id(self) -> str:
        return self.record.node_id

    @property
    def free_slots(self) -> int:
        return self.record.slots - len(self.experiments)

    async def alive(self) -> bool:
        try:
            return (
                await self.rollout.health(timeout_s=2.0) == "SERVING"
                and await self.trainer.health(timeout_s=2.0) == "SERVING"
            )
        except Exception:
            return False

    async def close(self) -> None:
        await self.rollout.close()
        await self.trainer.close()
