"""create_server + ErrorInterceptor + channel retry policy, over real gRPC."""

from __future__ import annotations

import asyncio
import logging

import grpc
import grpc.aio
import pytest
from core_echo import ECHO_SERVICE, I64, EchoRequest, S, method, unary
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from structlog.testing import capture_logs

from lorafleet.core import errors
from lorafleet.core.channel import make_channel, make_sync_channel, wait_for_serving
from lorafleet.core.errors import error_from_rpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_reports_serving_for_service_and_server(echo_server):
    async with make_channel(echo_server.address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", ECHO_SERVICE):
            response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_reflection_lists_services(echo_server):
    async with make_channel(echo_server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        names = []
        async for response in stub.ServerReflectionInfo(iter([request]), timeout=5):
            names += [s.name for s in response.list_services_response.service]
    assert ECHO_SERVICE in names
    assert "grpc.health.v1.Health" in names
    assert "grpc.reflection.v1alpha.ServerReflection" in names


async def test_wait_for_serving(echo_server):
    await wait_for_serving(echo_server.address, ECHO_SERVICE, timeout_s=5)
    await echo_server.health.set(ECHO_SERVICE, NOT_SERVING)
    with pytest.raises(errors.Unavailable) as info:
        # Long enough for an answer on a loaded machine (a 0.3 s wait once saw
        # only its first check time out there).
        await wait_for_serving(echo_server.address, ECHO_SERVICE, timeout_s=2.0)
    assert info.value.reason == "NOT_SERVING"
    assert "NOT_SERVING" in info.value.message


async def test_wait_for_serving_nothing_listening():
    with pytest.raises(errors.Unavailable) as info:
        # Port 1 is privileged and never ours: connection refused at once.
        await wait_for_serving("127.0.0.1:1", timeout_s=0.3)
    assert info.value.reason == "NOT_SERVING"


async def test_lorafleet_error_becomes_rich_status_and_server_keeps_serving(echo_server):
    async with make_channel(echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Fail")(S(value="invalid"), timeout=5)
        exc = info.value
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert exc.details() == "echo text is bad"

        err = error_from_rpc(exc)
        assert type(err) is errors.InvalidArgument
        assert err.reason == "BAD_ECHO"
        assert err.domain == "lorafleet"
        assert err.metadata == {"field": "value"}
        assert err.message == "echo text is bad"

        # The raw wire form, read the way a non-lorafleet client would.
        details = dict(exc.trailing_metadata())["grpc-status-details-bin"]
        status = rpc_status.status_pb2.Status.FromString(details)
        assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        info_pb = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info_pb)
        assert (info_pb.reason, info_pb.domain) == ("BAD_ECHO", "lorafleet")

        assert (await unary(channel, "Echo")(S(value="still here"), timeout=5)).value == (
            "still here"
        )


async def test_sync_client_reads_rich_status(echo_server):
    def call() -> errors.LorafleetError:
        with make_sync_channel(echo_server.address) as channel:
            stub = channel.unary_unary(
                method("Precondition"),
                request_serializer=S.SerializeToString,
                response_deserializer=S.FromString,
            )
            try:
                stub(S(value="x"), timeout=5)
            except grpc.RpcError as exc:
                # The library's own parser agrees with ours on the sync path.
                assert (
                    rpc_status.from_call(exc).code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
                )
                return error_from_rpc(exc)
        raise AssertionError("call did not fail")

    err = await asyncio.to_thread(call)
    assert type(err) is errors.FailedPrecondition
    assert err.reason == "EXPERIMENT_NOT_RUNNING"


async def test_unexpected_exception_is_internal_and_logged_once(echo_server, caplog):
    caplog.set_level(logging.DEBUG)
    async with make_channel(echo_server.address) as channel:
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Fail")(S(value="value_error"), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in info.value.details()
    err = error_from_rpc(info.value)
    assert type(err) is errors.Internal
    assert err.reason == "INTERNAL"

    failed = [e for e in logs if e["event"] == "rpc_failed"]
    assert len(failed) == 1, logs
    assert failed[0]["log_level"] == "error"
    assert failed[0]["exc_info"] is True
    assert failed[0]["error_type"] == "ValueError"
    # grpc itself must not log the exception a second time.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


async def test_grpc_abort_passes_through_untouched(echo_server):
    async with make_channel(echo_server.address) as channel:
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Fail")(S(value="grpc_abort"), timeout=5)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "plain grpc abort"
    assert not [e for e in logs if e["event"] in ("rpc_failed", "rpc_error")]
    err = error_from_rpc(info.value)
    assert type(err) is errors.LorafleetError
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert err.reason == "UNKNOWN_REASON"


async def test_error_without_details_maps_by_code(echo_server):
    async with make_channel(echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "NoSuchMethod")(S(value=""), timeout=5)
        err = error_from_rpc(info.value)
        assert type(err) is errors.Unimplemented
        assert err.reason == "UNKNOWN_REASON"

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Fail")(S(value="sleep"), timeout=0.1)
        assert type(error_from_rpc(info.value)) is errors.DeadlineExceeded


async def test_channel_retries_unavailable(echo_server):
    async with make_channel(echo_server.address) as channel:
        response = await unary(channel, "Flaky")(S(value=""), timeout=10)
    assert response.value == "ok after 3"
    assert echo_server.behaviour.calls["flaky"] == 3


async def test_without_retry_policy_unavailable_reaches_caller(echo_server):
    # Proves the success above comes from the service config, not from luck.
    async with make_channel(echo_server.address, retry=False) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Flaky")(S(value=""), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert echo_server.behaviour.calls["flaky"] == 1


async def test_channel_does_not_retry_other_codes(echo_server):
    async with make_channel(echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Precondition")(S(value=""), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert echo_server.behaviour.calls["precondition"] == 1


async def test_unary_stream_error_after_items(echo_server):
    async with make_channel(echo_server.address) as channel:
        call = channel.unary_stream(
            method("CountUp"),
            request_serializer=I64.SerializeToString,
            response_deserializer=I64.FromString,
        )(I64(value=3), timeout=5)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in call:
                got.append(item.value)
    assert got == [0, 1, 2]
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error_from_rpc(info.value).reason == "STREAM_BUDGET"


async def test_stream_unary_ok_and_internal(echo_server):
    async with make_channel(echo_server.address) as channel:
        total = channel.stream_unary(
            method("Total"),
            request_serializer=I64.SerializeToString,
            response_deserializer=I64.FromString,
        )
        assert (await total(iter([I64(value=2), I64(value=5)]), timeout=5)).value == 7
        with capture_logs() as logs, pytest.raises(grpc.aio.AioRpcError) as info:
            await total(iter([I64(value=2), I64(value=-1)]), timeout=5)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert [e["event"] for e in logs].count("rpc_failed") == 1


async def test_stream_stream_writer_style(echo_server):
    async with make_channel(echo_server.address) as channel:
        double = channel.stream_stream(
            method("Double"),
            request_serializer=I64.SerializeToString,
            response_deserializer=I64.FromString,
        )
        assert [r.value async for r in double(iter([I64(value=1), I64(value=4)]), timeout=5)] == [
            2,
            8,
        ]
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for r in double(iter([I64(value=3), I64(value=13)]), timeout=5):
                got.append(r.value)
    assert got == [6]
    assert error_from_rpc(info.value).reason == "UNLUCKY"


async def test_request_context_bound_and_request_replayed(echo_server):
    behaviour = echo_server.behaviour
    async with make_channel(echo_server.address) as channel:
        remember = unary(channel, "Remember", EchoRequest, I64)
        first = await remember(EchoRequest(request_id="r-1", text="abc"), timeout=5)
        again = await remember(EchoRequest(request_id="r-1", text="abc"), timeout=5)
        assert first.value == again.value == 103
        assert behaviour.calls["remember"] == 1

        with pytest.raises(grpc.aio.AioRpcError) as info:
            await remember(EchoRequest(request_id="r-1", text="different"), timeout=5)
        assert error_from_rpc(info.value).reason == "REQUEST_ID_REUSED"

        # Concurrent duplicates over the wire: one execution, one answer.
        answers = await asyncio.gather(
            *(remember(EchoRequest(request_id="r-2", text="xy"), timeout=5) for _ in range(5))
        )
        assert {a.value for a in answers} == {202}
        assert behaviour.calls["remember"] == 2

    context = behaviour.seen_context[0]
    assert context["rpc"] == method("Remember")
    assert context["request_id"] == "r-1"
    assert context["peer"].startswith("ipv4:127.0.0.1:")
