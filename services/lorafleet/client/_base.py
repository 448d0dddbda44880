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
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, ClassVar, TypeVar

import grpc
import grpc.aio
import structlog
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
from lorafleet.core.tls import ClientCertificateWatch, ClientTls

T = TypeVar("T")
log = structlog.get_logger(__name__)

CERTIFICATE_CHECK_INTERVAL_S = 1.0
"""How often a client with a certificate looks at its files (a stat each)."""
RETIRED_CHANNEL_GRACE_S = 30.0
"""How long calls in flight on a channel replaced after a renewal may run on."""


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
    STUB: ClassVar[Callable[[grpc.aio.Channel], Any] | None] = None
    """The service's generated stub class; ``self.stub`` is one on the current channel."""

    def __init__(
        self,
        target: str | grpc.aio.Channel,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        tls: ClientTls | None | object = PROCESS_DEFAULT,
    ) -> None:
        """`tls`: a `ClientTls` to call over TLS, None for plaintext; by default
        as the process does (``LORAFLEET_TLS_*``, see ``lorafleet.core.tls``).

        With a client certificate (mutual TLS), a renewal of its files reaches
        the client's next calls: the client makes a new channel once they
        changed (see ``ClientCertificateWatch``); calls in flight finish on the
        old one, which closes after ``RETIRED_CHANNEL_GRACE_S``."""
        self._owns_channel = isinstance(target, str)
        self.follows_replicas = bool(
            isinstance(target, str) and self.REPLICA_HEALTH_SERVICE and is_replica_set(target)
        )
        self._make_channel: Callable[[], grpc.aio.Channel] | None = None
        self._watch: ClientCertificateWatch | None = None
        if not isinstance(target, str):
            self._channel: grpc.aio.Channel = target
        else:
            if self.follows_replicas:
                used = replica_tls(target, resolve_client_tls(tls))
                self._make_channel = functools.partial(
                    make_channel,
                    replica_target(target),
                    health_service=self.REPLICA_HEALTH_SERVICE,
                    tls=used,
                )
            else:
                used = resolve_client_tls(tls)
                self._make_channel = functools.partial(make_channel, target, tls=used)
            self._channel = self._make_channel()
            if used is not None and used.cert_file is not None:
                self._watch = ClientCertificateWatch(used)
        self.timeout_s = timeout_s
        self._next_check = 0.0
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        self._stubs: dict[Callable[[grpc.aio.Channel], Any], tuple[grpc.aio.Channel, Any]] = {}

    @property
    def channel(self) -> grpc.aio.Channel:
        """The channel calls go on now (a new one after a client certificate renewal)."""
        self._follow_certificate_renewal()
        return self._channel

    def stub_for(self, stub_class: Callable[[grpc.aio.Channel], T]) -> T:
        """A `stub_class` stub on the current channel (made once per channel).
        Hold on to the client, not to a stub: a stub stays on its channel."""
        channel = self.channel
        held = self._stubs.get(stub_class)
        if held is None or held[0] is not channel:
            held = (channel, stub_class(channel))
            self._stubs[stub_class] = held
        return held[1]  # type: ignore[no-any-return]

    @property
    def stub(self) -> Any:
        assert self.STUB is not None, f"{type(self).__name__} names no STUB"
        return self.stub_for(self.STUB)

    @property
    def _health(self) -> health_pb2_grpc.HealthStub:
        return self.stub_for(health_pb2_grpc.HealthStub)

    def _follow_certificate_renewal(self) -> None:
        if self._watch is None or self._make_channel is None:
            return
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + CERTIFICATE_CHECK_INTERVAL_S
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # channels live on the client's loop: look again there
            return
        if not self._watch.changed():
            return
        old, self._channel = self._channel, self._make_channel()
        retire = loop.create_task(old.close(grace=RETIRED_CHANNEL_GRACE_S))
        self._retiring[old] = retire
        retire.add_done_callback(lambda _: self._retiring.pop(old, None))
        log.info("tls_client_certificate_reloaded", channels_retiring=len(self._retiring))

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
            await self._channel.close()
            for old, retire in list(self._retiring.items()):
                retire.cancel()
                await old.close()

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
