"""RPCs whose implementation has not landed answer UNIMPLEMENTED with a reason."""

from __future__ import annotations

import grpc
import pytest

from lorafleet.api.trainer.v1 import trainer_pb2, trainer_pb2_grpc
from lorafleet.core.app import unimplemented_methods
from lorafleet.core.channel import make_channel
from lorafleet.core.config import ServiceSettings
from lorafleet.core.errors import error_from_rpc
from lorafleet.core.server import ServiceBinding, create_server, start_server

SERVICE = trainer_pb2.DESCRIPTOR.services_by_name["TrainerService"]


class PartialTrainer(trainer_pb2_grpc.TrainerServiceServicer):
    async def GetTrainerStatus(self, request, context):
        return trainer_pb2.GetTrainerStatusResponse(slots_total=3)


@pytest.fixture
async def stub():
    servicer = unimplemented_methods(
        PartialTrainer(), SERVICE, issue="issue 99", keep={"GetTrainerStatus"}
    )
    binding = ServiceBinding(
        SERVICE.full_name,
        lambda s: trainer_pb2_grpc.add_TrainerServiceServicer_to_server(servicer, s),
    )
    settings = ServiceSettings()
    server, port, health = await create_server("127.0.0.1:0", [binding], settings=settings)
    await start_server(server, health, [binding])
    async with make_channel(f"127.0.0.1:{port}") as channel:
        yield trainer_pb2_grpc.TrainerServiceStub(channel)
    await server.stop(grace=None)


async def test_missing_rpc_is_unimplemented_with_reason_and_issue(stub):
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.TrainStep(trainer_pb2.TrainStepRequest(adapter_id="a"), timeout=5)
    err = error_from_rpc(info.value)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert err.reason == "NOT_IMPLEMENTED_YET"
    assert "TrainStep" in err.message and "issue 99" in err.message


async def test_kept_rpcs_still_work(stub):
    response = await stub.GetTrainerStatus(trainer_pb2.GetTrainerStatusRequest(), timeout=5)
    assert response.slots_total == 3
