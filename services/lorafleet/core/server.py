"""gRPC server assembly and the process lifecycle every service shares.

``create_server`` builds a fully wired, bound, not yet started server (tests use
it directly on port 0); ``serve`` runs one until SIGTERM/SIGINT and shuts it down
in the order that loses no work:

1. health -> NOT_SERVING for every service, so balancers and ``wait_for_serving``
   stop sending new work here;
2. ``server.stop(grace)``: no new RPCs, in-flight ones get ``grace_period_s``;
3. ``on_shutdown``: close what the servicers used (DB pools, engines) only once
   no handler can touch them any more;
4. the Prometheus endpoint (when ``metrics_port`` is set) last, so the drain
   itself can still be scraped.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from lorafleet.core.config import ServiceSettings
from lorafleet.core.interceptor import ErrorInterceptor
from lorafleet.core.metrics import start_metrics_endpoint

log = structlog.get_logger(__name__)

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Clients ping every keepalive_time_ms (30 s by default); accepting pings down to
# this interval leaves room for clients configured tighter without the server
# answering GOAWAY "too_many_pings".
MIN_CLIENT_PING_INTERVAL_MS = 5_000


@dataclass(frozen=True)
class ServiceBinding:
    """One gRPC service to expose: its full proto name (for health and
    reflection) and how to add its servicer to a server."""

    name: str
    """Full proto service name, e.g. ``lorafleet.registry.v1.AdapterRegistryService``."""
    register: Callable[[grpc.aio.Server], None]
    """Usually ``lambda s: add_XServicer_to_server(servicer, s)``."""
    serving_at_start: bool = True
    """False: the service reports NOT_SERVING once started until the app sets it
    SERVING itself (a standby replica; see ``ServiceApp.on_started``)."""


def server_options(settings: ServiceSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_CLIENT_PING_INTERVAL_MS),
        ("grpc.http2.max_pings_without_data", 0),
        # Without this, Linux lets a second server bind the same fixed port and
        # silently splits traffic; a clash must fail loudly at start.
        ("grpc.so_reuseport", 0),
    ]


async def create_server(
    address: str,
    services: Sequence[ServiceBinding],
    *,
    settings: ServiceSettings,
) -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
    """Build and bind (but do not start) a server for ``services`` on ``address``.

    Async only because grpc.aio binds a server to the event loop running when it
    is created; one made outside a running loop fails at ``start()``.

    Returns:
        The server, the bound port (the real one when ``address`` ends in ``:0``)
        and its health servicer. Start it with ``start_server``.
    """
    server = grpc.aio.server(
        interceptors=[ErrorInterceptor()],
        options=server_options(settings),
    )
    for binding in services:
        binding.register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*(b.name for b in services), HEALTH_SERVICE_NAME, reflection.SERVICE_NAME],
        server,
    )
    tls = settings.server_tls()
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, tls.credentials())
    except RuntimeError:
        # grpc's own message points at GRPC_VERBOSITY; say which address clashed.
        log.error("server_bind_failed", address=address)
        raise
    return server, port, health


async def start_server(
    server: grpc.aio.Server, health: health_aio.HealthServicer, services: Sequence[ServiceBinding]
) -> None:
    """Start ``server`` and only then report "" and every service SERVING (those
    bound with ``serving_at_start=False`` NOT_SERVING)."""
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    for binding in services:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if binding.serving_at_start
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await health.set(binding.name, status)


async def serve(
    services: Sequence[ServiceBinding],
    settings: ServiceSettings,
    *,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    ready: Callable[[int], None] | None = None,
    on_started: Callable[[health_aio.HealthServicer, int], Awaitable[None]] | None = None,
) -> int:
    """Run a server for ``services`` until SIGTERM or SIGINT; return the exit code.

    Logs ``server_started`` with ``host`` and the bound ``port`` (launchers and
    tests read the port from that line when ``settings.port`` is 0), then calls
    ``ready(port)``. With ``settings.metrics_port`` set, the Prometheus endpoint
    starts before the server and logs ``metrics_started`` with its own bound
    ``port``. ``on_started(health, port)`` runs once the server is started, for
    a service whose health follows its own state. A second signal during shutdown
    is logged and otherwise ignored: the grace period already bounds how long
    stopping takes.
    """
    loop = asyncio.get_running_loop()
    server, port, health = await create_server(settings.address, services, settings=settings)
    try:
        metrics = start_metrics_endpoint(settings)
    except OSError:
        await server.stop(grace=None)
        raise
    stop_requested = asyncio.Event()
    signals_seen: list[str] = []

    def on_signal(signum: signal.Signals) -> None:
        signals_seen.append(signum.name)
        if stop_requested.is_set():
            log.warning("shutdown_already_in_progress", signal=signum.name)
        stop_requested.set()

    stopped = False
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    try:
        await start_server(server, health, services)
        if on_started is not None:
            await on_started(health, port)
        log.info(
            "server_started",
            host=settings.host,
            port=port,
            services=[b.name for b in services],
        )
        if ready is not None:
            ready(port)
        await stop_requested.wait()
        log.info(
            "shutdown_requested",
            signal=signals_seen[0],
            grace_period_s=settings.grace_period_s,
        )
        await health.enter_graceful_shutdown()
        await server.stop(grace=settings.grace_period_s)
        stopped = True
        if on_shutdown is not None:
            await on_shutdown()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
            if stop_requested.is_set():
                # Removing the loop's handler restores the default action, which
                # for SIGTERM kills the process; the process is not gone yet
                # (asyncio.run still joins executor threads), and a repeated
                # signal there must stay as harmless as during the drain.
                signal.signal(signum, _log_repeated_signal)
        if not stopped:
            # Cancelled or failed before a graceful stop: do not leave the port
            # bound and handlers running behind the caller's back.
            await server.stop(grace=None)
        if metrics is not None:
            metrics.close()
    log.info("server_stopped", port=port)
    return 0


def _log_repeated_signal(signum: int, _frame: object) -> None:
    log.warning("shutdown_already_in_progress", signal=signal.Signals(signum).name)


def run_service(main: Coroutine[Any, Any, int | None]) -> NoReturn:
    """Entry point for ``__main__``: run ``main`` (usually ``serve(...)``) and exit
    with its return code (None counts as 0; 1 after an unhandled exception, 130
    after Ctrl-C before the signal handlers were installed)."""
    try:
        code = asyncio.run(main)
    except KeyboardInterrupt:
        # Ctrl-C before serve() installed its handlers.
        code = 130
    except Exception:
        # One structured record (JSON in containers) instead of a bare traceback.
        log.exception("service_failed")
        code = 1
    sys.exit(code or 0)
