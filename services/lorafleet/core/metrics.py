"""The Prometheus endpoint every lorafleet service serves, and the gRPC server
metrics every service shares.

Metrics live on prometheus_client's default registry: each service defines its
own in ``lorafleet.<service>.metrics`` (imported by the code that updates them),
and :func:`start_metrics_endpoint` serves whatever the process registered, plus
the client library's process and Python collectors. ``serve()`` starts it when
``metrics_port`` is set (0 picks a free port, logged as ``metrics_started`` the
way the gRPC port is logged as ``server_started``), so no service needs code of
its own for it.

The endpoint is prometheus_client's own HTTP server in a daemon thread: a scrape
never waits on the event loop (a busy loop is exactly when metrics matter), and
collectors that read live objects from that thread only do reads the GIL makes
atomic (``len``, ``dict.copy``).

gRPC metrics use the names and labels of go-grpc-prometheus
(``grpc_server_handled_total{grpc_type, grpc_service, grpc_method, grpc_code}``),
so existing gRPC dashboards and alerts work unchanged. Label values are bounded:
methods come from the protos, codes from ``grpc.StatusCode``; no peer, request
or adapter ids.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

import grpc
import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server

from lorafleet.core.config import ServiceSettings
from lorafleet.core.errors import LorafleetError

log = structlog.get_logger(__name__)

# Server-side RPC latency: from sub-millisecond reads to multi-second train steps
# and uploads (streams are timed end to end, which is why grpc_type is a label).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

GRPC_STARTED = Counter(
    "grpc_server_started_total",
    "RPCs started on the server.",
    ["grpc_type", "grpc_service", "grpc_method"],
)
GRPC_HANDLED = Counter(
    "grpc_server_handled_total",
    "RPCs completed on the server, by status code.",
    ["grpc_type", "grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time from the start of an RPC to its status (whole stream for streaming RPCs).",
    ["grpc_type", "grpc_service", "grpc_method"],
    buckets=RPC_BUCKETS,
)


def code_name(error: BaseException) -> str:
    """The gRPC status code name a caller sees for ``error``: a lorafleet error's
    own code, CANCELLED for a cancellation, INTERNAL for anything else (what the
    interceptor turns it into)."""
    if isinstance(error, LorafleetError):
        return error.code.name
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    return grpc.StatusCode.INTERNAL.name


class RpcObservation:
    """One server RPC being timed: ``GRPC_STARTED`` on creation, ``GRPC_HANDLED``
    and ``GRPC_HANDLING_SECONDS`` once, in :meth:`done`."""

    __slots__ = ("_labels", "_started")

    def __init__(self, rpc_type: str, full_method: str) -> None:
        # "/package.Service/Method"; anything else (never seen from grpc) keeps
        # the whole string as the method so nothing is dropped silently.
        service, _, method = full_method.lstrip("/").rpartition("/")
        self._labels = (rpc_type, service or "unknown", method)
        self._started = time.perf_counter()
        GRPC_STARTED.labels(*self._labels).inc()

    def done(self, code: str) -> None:
        GRPC_HANDLED.labels(*self._labels, code).inc()
        GRPC_HANDLING_SECONDS.labels(*self._labels).observe(time.perf_counter() - self._started)


@dataclass
class MetricsEndpoint:
    """A running ``/metrics`` HTTP endpoint; :meth:`close` stops it."""

    server: WSGIServer
    thread: Thread
    host: str
    port: int

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        log.info("metrics_stopped", port=self.port)


def start_metrics_endpoint(
    settings: ServiceSettings, registry: CollectorRegistry = REGISTRY
) -> MetricsEndpoint | None:
    """Serve ``registry`` at ``http://<host>:<metrics_port>/metrics`` (any path
    answers; ``/metrics`` is the convention) when ``settings.metrics_port`` is
    set; None when it is not.

    Logs ``metrics_started`` with the bound ``port`` (the real one when
    ``metrics_port`` is 0). Raises ``OSError`` when the port is taken: a
    misconfigured endpoint must stop the service at start, like a gRPC port clash.
    """
    if settings.metrics_port is None:
        return None
    try:
        server, thread = start_http_server(
            settings.metrics_port, addr=settings.host, registry=registry
        )
    except OSError:
        log.error("metrics_bind_failed", host=settings.host, port=settings.metrics_port)
        raise
    port = int(server.server_port)
    log.info("metrics_started", host=settings.host, port=port, path="/metrics")
    return MetricsEndpoint(server, thread, settings.host, port)
