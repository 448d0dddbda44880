"""The Prometheus endpoint (start, port 0, clash, stop; serve() refusing to
start on a clash) and the gRPC server metrics the interceptor records, over a
real grpc.aio server."""

from __future__ import annotations

import asyncio
import socket
import urllib.request

import grpc
import grpc.aio
import pytest
from core_echo import ECHO_SERVICE, I64, EchoBehaviour, S, echo_binding, method, unary
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from lorafleet.core.channel import make_channel
from lorafleet.core.config import ServiceSettings
from lorafleet.core.metrics import start_metrics_endpoint
from lorafleet.core.server import serve


def handled(method_name: str, code: str, rpc_type: str = "unary") -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handled_total",
        {
            "grpc_type": rpc_type,
            "grpc_service": ECHO_SERVICE,
            "grpc_method": method_name,
            "grpc_code": code,
        },
    )
    return value or 0.0


def timed(method_name: str, rpc_type: str = "unary") -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handling_seconds_count",
        {"grpc_type": rpc_type, "grpc_service": ECHO_SERVICE, "grpc_method": method_name},
    )
    return value or 0.0


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.status == 200
        return response.read().decode()


def test_no_endpoint_without_metrics_port():
    assert start_metrics_endpoint(ServiceSettings()) is None


def test_endpoint_on_port_zero_logs_its_port_serves_and_stops():
    with capture_logs() as logs:
        endpoint = start_metrics_endpoint(ServiceSettings(metrics_port=0))
    assert endpoint is not None
    started = [e for e in logs if e["event"] == "metrics_started"]
    assert started and started[0]["port"] == endpoint.port > 0
    try:
        text = scrape(endpoint.port)
        # The library's own collectors and ours, from the default registry.
        assert "python_info" in text
        assert "# TYPE grpc_server_handled_total counter" in text
    finally:
        endpoint.close()
    with pytest.raises(OSError):
        scrape(endpoint.port)


def test_port_clash_fails_loudly():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with capture_logs() as logs, pytest.raises(OSError):
            start_metrics_endpoint(ServiceSettings(metrics_port=port))
    assert [e["port"] for e in logs if e["event"] == "metrics_bind_failed"] == [port]


async def test_interceptor_counts_rpcs_by_method_and_code(echo_server):
    before = {
        ("Echo", "OK"): handled("Echo", "OK"),
        ("Fail", "INVALID_ARGUMENT"): handled("Fail", "INVALID_ARGUMENT"),
        ("Fail", "INTERNAL"): handled("Fail", "INTERNAL"),
        ("Fail", "PERMISSION_DENIED"): handled("Fail", "PERMISSION_DENIED"),
    }
    echo_timed = timed("Echo")
    async with make_channel(echo_server.address) as channel:
        for _ in range(2):
            await unary(channel, "Echo")(S(value="hi"), timeout=5)
        for kind in ("invalid", "value_error", "grpc_abort"):
            with pytest.raises(grpc.aio.AioRpcError):
                await unary(channel, "Fail")(S(value=kind), timeout=5)
    assert handled("Echo", "OK") - before[("Echo", "OK")] == 2
    assert timed("Echo") - echo_timed == 2
    # A LorafleetError's own code, INTERNAL for a bug, a plain abort's code.
    for key in (("Fail", "INVALID_ARGUMENT"), ("Fail", "INTERNAL"), ("Fail", "PERMISSION_DENIED")):
        assert handled(*key) - before[key] == 1, key


async def test_interceptor_counts_streams_with_their_type(echo_server):
    server_stream = handled("CountUp", "RESOURCE_EXHAUSTED", "server_stream")
    bidi = handled("Double", "INVALID_ARGUMENT", "bidi_stream")
    async with make_channel(echo_server.address) as channel:
        count_up = channel.unary_stream(
            method("CountUp"),
            request_serializer=I64.SerializeToString,
            response_deserializer=I64.FromString,
        )
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for item in count_up(I64(value=3), timeout=5):
                got.append(item.value)
        assert got == [0, 1, 2] and info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        double = channel.stream_stream(
            method("Double"),
            request_serializer=I64.SerializeToString,
            response_deserializer=I64.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in double(iter([I64(value=1), I64(value=13)]), timeout=5):
                pass
    assert handled("CountUp", "RESOURCE_EXHAUSTED", "server_stream") - server_stream == 1
    assert handled("Double", "INVALID_ARGUMENT", "bidi_stream") - bidi == 1


async def test_deadline_is_counted_as_deadline_exceeded(echo_server):
    before = handled("Fail", "DEADLINE_EXCEEDED")
    async with make_channel(echo_server.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await unary(channel, "Fail")(S(value="sleep"), timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server learns of the deadline on its own schedule: wait for the handler.
    for _ in range(100):
        if handled("Fail", "DEADLINE_EXCEEDED") > before:
            break
        await asyncio.sleep(0.02)
    assert handled("Fail", "DEADLINE_EXCEEDED") - before == 1


async def test_serve_refuses_to_start_when_the_metrics_port_is_taken():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = ServiceSettings(metrics_port=taken.getsockname()[1])
        with capture_logs() as logs, pytest.raises(OSError):
            await asyncio.wait_for(serve([echo_binding(EchoBehaviour())], settings), 10)
    events = [e["event"] for e in logs]
    assert "metrics_bind_failed" in events and "server_started" not in events
