"""serve() in a real process: port from the log, graceful SIGTERM, exit code 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import grpc
import grpc.aio
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.core.channel import make_channel

HERE = Path(__file__).resolve().parent
SERVICES_DIR = HERE.parents[2] / "services"
SERVICE = "lorafleet.testing.v1.SlowEchoService"
GRACE_S = 5.0


class ServerProcess:
    """The child process plus its stderr, parsed as JSON log events as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict] = []
        self.raw: list[str] = []
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for line in self.proc.stderr:
            text = line.decode().strip()
            self.raw.append(text)
            try:
                event = json.loads(text)
            except json.JSONDecodeError:
                continue
            async with self._changed:
                self.events.append(event)
                self._changed.notify_all()

    async def wait_for(self, name: str, timeout_s: float = 10.0) -> dict:
        async def found() -> dict:
            async with self._changed:
                while True:
                    for event in self.events:
                        if event.get("event") == name:
                            return event
                    if self._reader.done():
                        raise AssertionError(f"process ended before {name}: {self.raw}")
                    await self._changed.wait()

        return await asyncio.wait_for(found(), timeout_s)

    def index(self, name: str) -> int:
        return [e.get("event") for e in self.events].index(name)


async def launch(extra_env: dict[str, str] | None = None, **settings: str) -> ServerProcess:
    env = {
        **os.environ,
        **(extra_env or {}),
        "PYTHONPATH": str(SERVICES_DIR),
        "LORAFLEET_SLOWECHO_GRACE_PERIOD_S": str(GRACE_S),
        "LORAFLEET_SLOWECHO_LOG_FORMAT": "json",
        **{f"LORAFLEET_SLOWECHO_{key.upper()}": value for key, value in settings.items()},
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "slow_echo_server.py"),
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return ServerProcess(proc)


async def stop(server: ServerProcess) -> None:
    if server.proc.returncode is None:
        server.proc.kill()
        await server.proc.wait()
    await server._reader


@pytest.fixture
async def server_process():
    server = await launch()
    try:
        yield server
    finally:
        await stop(server)


async def test_sigterm_drains_in_flight_calls_then_exits_zero(server_process):
    started = await server_process.wait_for("server_started", timeout_s=20)
    port = started["port"]
    assert isinstance(port, int) and port > 0
    assert started["host"] == "127.0.0.1"
    address = f"127.0.0.1:{port}"

    async with make_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE), timeout=5)
        assert check.status == health_pb2.HealthCheckResponse.SERVING

        # A watcher (a load balancer, wait_for_serving) must hear NOT_SERVING
        # pushed to it, not only find out when calls start failing.
        watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=15)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        slow_echo = channel.unary_unary(
            f"/{SERVICE}/SlowEcho",
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        slow_call = asyncio.ensure_future(
            slow_echo(wrappers_pb2.StringValue(value="in-flight"), timeout=15)
        )
        await server_process.wait_for("slow_call_started")

        loop = asyncio.get_running_loop()
        signalled_at = loop.time()
        server_process.proc.send_signal(signal.SIGTERM)
        await server_process.wait_for("shutdown_requested")
        pushed = await asyncio.wait_for(watch.read(), 1.0)
        assert pushed.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # an open stream would otherwise hold shutdown for the grace

        # New work is turned away at once: health says NOT_SERVING, or the
        # server already refuses new calls.
        refused = None
        while refused is None and loop.time() - signalled_at < 1.0:
            try:
                check = await health.Check(
                    health_pb2.HealthCheckRequest(service=SERVICE), timeout=0.5
                )
                if check.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    refused = "NOT_SERVING"
            except grpc.aio.AioRpcError as exc:
                refused = exc.code().name
            await asyncio.sleep(0.02)
        assert refused is not None, "still SERVING 1 s after SIGTERM"

        response = await slow_call
        assert response.value == "in-flight"

    returncode = await asyncio.wait_for(server_process.proc.wait(), GRACE_S)
    assert returncode == 0, server_process.raw
    assert loop.time() - signalled_at < GRACE_S

    await server_process._reader
    # Shutdown order: drain, then close resources, then report stopped.
    order = [
        server_process.index(name)
        for name in (
            "shutdown_requested",
            "slow_call_finished",
            "resources_closed",
            "server_stopped",
        )
    ]
    assert order == sorted(order), server_process.raw
    assert not [e for e in server_process.events if e.get("level") in ("error", "critical")]


async def test_a_second_sigterm_while_the_process_winds_down_is_only_logged():
    # A supervisor (docker stop, k8s, a test's teardown) may signal again while
    # worker threads finish after serve() has returned; that must not turn a
    # clean stop into death by signal (exit -15).
    linger_s = 3.0  # the window for the second signal, with room for a loaded machine
    server = await launch(extra_env={"SLOW_ECHO_LINGER_S": str(linger_s)})
    try:
        await server.wait_for("server_started", timeout_s=20)
        server.proc.send_signal(signal.SIGTERM)
        await server.wait_for("server_stopped")
        server.proc.send_signal(signal.SIGTERM)
        returncode = await asyncio.wait_for(server.proc.wait(), GRACE_S + linger_s)
        await server._reader
    finally:
        await stop(server)
    assert returncode == 0, server.raw
    repeated = [e for e in server.events if e.get("event") == "shutdown_already_in_progress"]
    assert [e["signal"] for e in repeated] == ["SIGTERM"], server.raw


async def test_port_clash_fails_loudly_with_exit_code_1(server_process):
    port = (await server_process.wait_for("server_started", timeout_s=20))["port"]
    # Same fixed port again: with SO_REUSEPORT off this must not silently share it.
    second = await launch(port=str(port))
    try:
        returncode = await asyncio.wait_for(second.proc.wait(), 20)
        await second._reader
    finally:
        await stop(second)
    assert returncode == 1, second.raw
    failed = [e for e in second.events if e.get("event") == "service_failed"]
    assert len(failed) == 1 and "Failed to bind" in failed[0]["exception"]
    assert any(e.get("event") == "server_bind_failed" for e in second.events)
    assert not any(e.get("event") == "server_started" for e in second.events)
