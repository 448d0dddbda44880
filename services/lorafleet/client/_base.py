"""Plumbing shared by the typed clients: deadlines, error mapping, sync bridge.

Each service has one async client class (`AsyncXClient`) with a method per RPC;
the sync client is the same object driven from a private event loop thread
(`SyncBridge`), so the two can never drift apart.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.core.channel import (
    DEFAULT_TIMEOUT_S,
    PROCESS_DEFAULT,
    is_replica_set,
    make_channel,
    replica_target,
    replica_tls,
    resolve_client_tls,
)
from lorafleet.core.errors import error_from_rpc
from lorafleet.core.tls import ClientTls

T = TypeVar("T")


class AsyncServiceClient:
    """Owns (or borrows) one channel; converts failed calls to `LorafleetError`.

    A service that may run as several replicas names, in
    `REPLICA_HEALTH_SERVICE`, the health entry a replica reports SERVING while
    it takes calls. Given several replicas ("h1:p,h2:p", or a "dns:///name:port"
    that resolves to them), the client sends each call to a replica whose entry
    is SERVING (round robin among them), and while none is, calls wait for one,
    up to their deadline. For the scheduler only the leader's entry is SERVING,
    so calls follow the leader through a failover; every registry replica's is,
    so calls spread over them and go around one that stops."""

    REPLICA_HEALTH_SERVICE: str | None = None

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: ClientTls | None | object = PROCESS_DEFAULT,
    ) -> None:
        """`tls`: a `ClientTls` to call over TLS, None for plaintext; by default
        as the process does (``LORAFLEET_TLS_*``, see ``lorafleet.core.tls``)."""
        self._owns_channel = isinstance(target, str)
        self.follows_replicas = bool(
            isinstance(target, str) and self.REPLICA_HEALTH_SERVICE and is_replica_set(target)
        )
        if not isinstance(target, str):
            self.channel: grpc.aio.Channel = target
        elif self.follows_replicas:
            self.channel = make_channel(
                replica_target(target),
                health_service=self.REPLICA_HEALTH_SERVICE,
                tls=replica_tls(target, resolve_client_tls(tls)),
            )
        else:
            self.channel = make_channel(target, tls=tls)
        self.timeout_s = timeout_s
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def _unary(
        self, method: Callable[..., Awaitable[T]], request: Any, timeout_s: float | None = None
    ) -> T:
        try:
            return await method(
                request, timeout=timeout_s or self.timeout_s, wait_for_ready=self._wait()
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc

    def _wait(self) -> bool | None:
        # Given replicas: a call made while none serves (no scheduler leads yet,
        # every registry restarting) waits for one instead of failing at once
        # (the deadline still holds).
        return True if self.follows_replicas else None

    async def _server_stream(
        self, method: Callable[..., Any], request: Any, timeout_s: float | None = None
    ) -> AsyncIterator[Any]:
        """Yield a server stream's messages. `timeout_s=None` means no deadline:
        watch streams are meant to stay open."""
        call = method(request, timeout=timeout_s, wait_for_ready=self._wait())
        try:
            async for message in call:
                yield message
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from exc
        finally:
            call.cancel()

    async def health(self, service: str = "", timeout_s: float = 5.0) -> str:
        """The grpc.health.v1 status name of `service` ("" = the server)."""
        response = await self._unary(
            self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout_s
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    async def close(self) -> None:
        if self._owns_channel:
            await self.channel.close()

    async def __aenter__(self: T) -> T:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class SyncBridge:
    """Runs an async client on a private loop thread and exposes its methods as
    blocking calls (async generators become plain iterators).

    Why: grpc.aio channels are bound to one event loop; scripts, notebooks and
    the CLI want blocking calls without managing a loop.
    """

    def __init__(self, make_async: Callable[[], Any]) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._async = self._run(self._build(make_async))

    @staticmethod
    async def _build(make_async: Callable[[], Any]) -> Any:
        return make_async()  # the channel must be created inside the loop's thread

    def _run(self, coro: Awaitable[T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()  # type: ignore[arg-type]

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(agen.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            self._run(agen.aclose())  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._async, name)
        if inspect.isasyncgenfunction(attr):

            @functools.wraps(attr)
            def stream(*args: Any, **kwargs: Any) -> Iterator[Any]:
                return self._iterate(attr(*args, **kwargs))

            return stream
        if inspect.iscoroutinefunction(attr):

            @functools.wraps(attr)
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._run(attr(*args, **kwargs))

            return call
        return attr

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()

    def __enter__(self) -> SyncBridge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
