"""A hand-registered echo service for real grpc.aio servers in core tests.

Our own protos are not needed: request/response types are protobuf well-known
wrappers, plus one message with a ``request_id`` field built at runtime in a
private descriptor pool (so the interceptor's request_id binding and the
idempotency helpers see a realistic request).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import grpc.aio
import structlog
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2

from lorafleet.core import errors
from lorafleet.core.idempotency import InMemoryIdempotencyStore, fingerprint_of, once
from lorafleet.core.server import ServiceBinding

ECHO_SERVICE = "lorafleet.testing.v1.EchoService"


def _build_echo_request() -> type:
    file = descriptor_pb2.FileDescriptorProto(
        name="lorafleet/testing/v1/echo.proto", package="lorafleet.testing.v1", syntax="proto3"
    )
    msg = file.message_type.add(name="EchoRequest")
    for number, (name, kind) in enumerate(
        [
            ("request_id", descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
            ("text", descriptor_pb2.FieldDescriptorProto.TYPE_STRING),
            ("count", descriptor_pb2.FieldDescriptorProto.TYPE_INT64),
        ],
        start=1,
    ):
        msg.field.add(
            name=name,
            number=number,
            type=kind,
            label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL,
        )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(
        pool.FindMessageTypeByName("lorafleet.testing.v1.EchoRequest")
    )


EchoRequest = _build_echo_request()
S = wrappers_pb2.StringValue
I64 = wrappers_pb2.Int64Value


@dataclass
class EchoBehaviour:
    """The servicer's knobs and what it observed; tests read ``calls``."""

    calls: Counter = field(default_factory=Counter)
    unavailable_before_success: int = 2
    store: InMemoryIdempotencyStore = field(default_factory=InMemoryIdempotencyStore)
    seen_context: list[dict] = field(default_factory=list)

    async def echo(self, request: S, context: grpc.aio.ServicerContext) -> S:
        self.calls["echo"] += 1
        return S(value=request.value)

    async def fail(self, request: S, context: grpc.aio.ServicerContext) -> S:
        self.calls["fail"] += 1
        kind = request.value
        if kind == "invalid":
            raise errors.InvalidArgument(
                "echo text is bad", reason="BAD_ECHO", metadata={"field": "value"}
            )
        if kind == "value_error":
            raise ValueError("secret internal detail")
        if kind == "grpc_abort":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "plain grpc abort")
        if kind == "sleep":
            await asyncio.sleep(5)
        return S(value="ok")

    async def flaky(self, request: S, context: grpc.aio.ServicerContext) -> S:
        self.calls["flaky"] += 1
        if self.calls["flaky"] <= self.unavailable_before_success:
            raise errors.Unavailable("warming up")
        return S(value=f"ok after {self.calls['flaky']}")

    async def precondition(self, request: S, context: grpc.aio.ServicerContext) -> S:
        self.calls["precondition"] += 1
        raise errors.FailedPrecondition("not ready", reason="EXPERIMENT_NOT_RUNNING")

    async def remember(self, request, context: grpc.aio.ServicerContext) -> I64:
        self.seen_context.append(dict(structlog.contextvars.get_contextvars()))

        async def work() -> I64:
            self.calls["remember"] += 1
            await asyncio.sleep(0.05)
            return I64(value=self.calls["remember"] * 100 + len(request.text))

        return await once(
            self.store,
            "/lorafleet.testing.v1.EchoService/Remember",
            request.request_id,
            fingerprint_of(request),
            work,
            I64,
        )

    async def count_up(self, request: I64, context: grpc.aio.ServicerContext) -> AsyncIterator[I64]:
        for i in range(request.value):
            yield I64(value=i)
        raise errors.ResourceExhausted("stream budget spent", reason="STREAM_BUDGET")

    async def total(self, requests: AsyncIterator[I64], context: grpc.aio.ServicerContext) -> I64:
        total = 0
        async for item in requests:
            if item.value < 0:
                raise ValueError("negative")
            total += item.value
        return I64(value=total)

    async def double(self, requests: AsyncIterator[I64], context: grpc.aio.ServicerContext) -> None:
        # Writer-style streaming: a coroutine using context.write, not a generator.
        async for item in requests:
            if item.value == 13:
                raise errors.InvalidArgument("unlucky", reason="UNLUCKY")
            await context.write(I64(value=item.value * 2))


def _unary(fn, req_type=S, resp_type=S) -> grpc.RpcMethodHandler:
    return grpc.unary_unary_rpc_method_handler(
        fn,
        request_deserializer=req_type.FromString,
        response_serializer=resp_type.SerializeToString,
    )


def echo_binding(behaviour: EchoBehaviour) -> ServiceBinding:
    handlers = {
        "Echo": _unary(behaviour.echo),
        "Fail": _unary(behaviour.fail),
        "Flaky": _unary(behaviour.flaky),
        "Precondition": _unary(behaviour.precondition),
        "Remember": _unary(behaviour.remember, EchoRequest, I64),
        "CountUp": grpc.unary_stream_rpc_method_handler(
            behaviour.count_up, I64.FromString, I64.SerializeToString
        ),
        "Total": grpc.stream_unary_rpc_method_handler(
            behaviour.total, I64.FromString, I64.SerializeToString
        ),
        "Double": grpc.stream_stream_rpc_method_handler(
            behaviour.double, I64.FromString, I64.SerializeToString
        ),
    }
    return ServiceBinding(
        name=ECHO_SERVICE,
        register=lambda server: server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(ECHO_SERVICE, handlers),)
        ),
    )


def method(name: str) -> str:
    return f"/{ECHO_SERVICE}/{name}"


def unary(channel: grpc.aio.Channel, name: str, req_type=S, resp_type=S):
    return channel.unary_unary(
        method(name),
        request_serializer=req_type.SerializeToString,
        response_deserializer=resp_type.FromString,
    )
