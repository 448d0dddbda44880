"""What a service package hands to the shared runtime, and how it is run.

Every service package (`lorafleet.registry`, `lorafleet.scheduler`, ...) has:

- `config.py`: a `ServiceSettings` subclass with its own env prefix;
- `app.py`: `async def build_app(settings) -> ServiceApp` that wires the domain
  objects and backends from settings (config becomes constructor arguments here,
  once, at the edge) and returns the gRPC bindings;
- `__main__.py`: `python -m lorafleet.<service>`, the same entry point as
  `lorafleet serve <service>`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc.aio
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1.health import aio as health_aio

from lorafleet.core.config import ServiceSettings
from lorafleet.core.errors import unimplemented
from lorafleet.core.server import ServiceBinding, serve
from lorafleet.core.tls import configure_client_tls

S = TypeVar("S", bound=ServiceSettings)


@dataclass
class ServiceApp:
    """A service ready to be served: its gRPC bindings and its cleanup."""

    bindings: list[ServiceBinding]
    on_shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    """Called in order after the server stopped taking and finishing RPCs."""
    on_started: Callable[[health_aio.HealthServicer, int], Awaitable[None]] | None = None
    """Called once the server is started, with its health servicer and bound port."""
    exit_code: int = 0
    """What the process exits with after a stop the app itself asked for (the
    app sets it, then signals the process; 0 for a stop by signal)."""

    async def shutdown(self) -> None:
        for close in self.on_shutdown:
            await close()


async def serve_app(build_app: Callable[[S], Awaitable[ServiceApp]], settings: S) -> int:
    # The service's own settings decide how its outbound calls go (TLS or not),
    # for every client it builds, whatever LORAFLEET_TLS_* says.
    configure_client_tls(settings.client_tls())
    app = await build_app(settings)
    code = await serve(
        app.bindings, settings, on_shutdown=app.shutdown, on_started=app.on_started
    )
    return app.exit_code or code


def unimplemented_methods(
    servicer: Any, service: ServiceDescriptor, *, issue: str, keep: set[str] | None = None
) -> Any:
    """Make every RPC of `service` on `servicer` that is not in `keep` answer
    UNIMPLEMENTED with reason NOT_IMPLEMENTED_YET and the issue that brings it.

    Why: a service can be started and probed (health, reflection) before all of
    its RPCs exist, and a caller gets an honest answer, never a fake success.
    """
    keep = keep or set()
    for method in service.methods:
        if method.name in keep:
            continue
        setattr(
            servicer,
            method.name,
            _raiser(service.full_name, method.name, issue, method.server_streaming),
        )
    return servicer


def _raiser(service: str, method: str, issue: str, streams_out: bool) -> Callable[..., Any]:
    feature = f"{service}.{method}"

    if streams_out:

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
            raise unimplemented(feature, issue)
            yield  # pragma: no cover - makes this an async generator

        return stream

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        raise unimplemented(feature, issue)

    return unary
