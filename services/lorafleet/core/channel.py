"""Client channels with the mesh's transport defaults, and a readiness probe.

Retries live in the gRPC service config, not in client code: the channel retries
UNAVAILABLE only (the server never started the work, so replaying is safe even
for state-changing calls, which also carry a request_id). Every other code goes
straight back to the caller.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import time

import grpc
import grpc.aio
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lorafleet.core.errors import InvalidArgument, Unavailable
from lorafleet.core.tls import ClientTls, default_client_tls

log = structlog.get_logger(__name__)

# Outbound calls always carry a deadline; this is the one for calls that do not
# know better (control-plane RPCs). Long calls (generation, training) pass their own.
DEFAULT_TIMEOUT_S = 30.0
# Matches ServiceSettings.max_message_bytes: big enough for a batch of token ids
# and logprobs, small enough that adapter tensors go by reference, not inline.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
DEFAULT_KEEPALIVE_TIME_MS = 30_000
DEFAULT_KEEPALIVE_TIMEOUT_MS = 10_000

# make_channel's `tls` when not given: the process's default (lorafleet.core.tls).
PROCESS_DEFAULT = object()

RETRY_POLICY = {
    "maxAttempts": 5,
    "initialBackoff": "0.1s",
    "maxBackoff": "2s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
def service_config(*, retry: bool, health_service: str | None) -> str | None:
    """The channel's service config: the retry policy, and with `health_service`
    gRPC's own client-side health checking: the channel watches every address's
    `grpc.health.v1` status of that service and sends calls only to an address
    where it is SERVING (round robin among them), so a client given every replica
    of a service with one leader talks to the leader, whichever it is."""
    config: dict[str, object] = {}
    if retry:
        config["methodConfig"] = [{"name": [{}], "retryPolicy": RETRY_POLICY}]
    if health_service:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": health_service}
    return json.dumps(config) if config else None


def is_replica_set(target: str) -> bool:
    """True for a target naming several replicas: "host:port,host:port", or a
    gRPC target URI whose resolver may return several ("dns:///name:port")."""
    return "," in target or "://" in target or target.startswith(("ipv4:", "ipv6:"))


def replica_target(target: str) -> str:
    """A gRPC target for `target` as `is_replica_set` reads it: a list of
    "host:port" becomes "ipv4:a:p,b:p" (hostnames resolved now, once; gRPC's own
    resolvers take only addresses in a list), a URI is kept as it is.

    Raises:
        Unavailable: reason ``ADDRESS_UNRESOLVED`` when a host does not resolve.
        InvalidArgument: reason ``ADDRESS_FAMILIES_MIXED`` when some hosts have
            only IPv4 and others only IPv6 addresses.
    """
    if "," not in target:
        return target
    resolved: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    for entry in (e.strip() for e in target.split(",")):
        if not entry:
            continue
        host, _, port = entry.rpartition(":")
        host = host.strip("[]")
        try:
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError) as exc:
            raise Unavailable(
                f"cannot resolve replica address {entry!r}: {exc}",
                reason="ADDRESS_UNRESOLVED",
                metadata={"address": entry},
            ) from exc
        # IPv4 where the host has it ("localhost" may list ::1 first).
        family, *_, sockaddr = ([i for i in infos if i[0] == socket.AF_INET] or infos)[0]
        if family == socket.AF_INET6:
            resolved["ipv6"].append(f"[{sockaddr[0]}]:{port}")
        else:
            resolved["ipv4"].append(f"{sockaddr[0]}:{port}")
    if resolved["ipv4"] and resolved["ipv6"]:
        # One target has one scheme; dropping a replica silently would be worse.
        raise InvalidArgument(
            f"replicas {target!r} resolve to IPv4 and IPv6-only hosts; list one family",
            reason="ADDRESS_FAMILIES_MIXED",
        )
    scheme = "ipv4" if resolved["ipv4"] else "ipv6"
    return f"{scheme}:{','.join(resolved[scheme])}"


def replica_tls(target: str, tls: ClientTls | None) -> ClientTls | None:
    """TLS for a replica list: `replica_target` calls the replicas by address,
    so the name verified in their certificates is the first host listed
    (unless `tls` names one). Replicas listed together share a certificate
    valid for that name, or the client sets ``server_name``."""
    if tls is None or tls.server_name or "," not in target:
        return tls
    first = target.split(",")[0].strip().rpartition(":")[0].strip("[]")
    return dataclasses.replace(tls, server_name=first)


def channel_options(
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS,
    retry: bool = True,
    health_service: str | None = None,
) -> list[tuple[str, int | str]]:
    """The channel arguments ``make_channel`` uses; exposed for custom channels."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        # Idle connections between services must survive NAT/LB idle timeouts too.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.enable_retries", int(retry)),
    ]
    config = service_config(retry=retry, health_service=health_service)
    if config is not None:
        options.append(("grpc.service_config", config))
    return options


def make_channel(
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS,
    retry: bool = True,
    interceptors: list[grpc.aio.ClientInterceptor] | None = None,
    health_service: str | None = None,
    tls: ClientTls | None | object = PROCESS_DEFAULT,
) -> grpc.aio.Channel:
    """An asyncio channel to ``address`` (``host:port``, or any gRPC target);
    with ``health_service``, calls go only to addresses where that service's
    health is SERVING (see ``service_config``). TLS as ``tls`` says, by default
    as the process does (``lorafleet.core.tls``)."""
    options = channel_options(
        max_message_bytes=max_message_bytes,
        keepalive_time_ms=keepalive_time_ms,
        keepalive_timeout_ms=keepalive_timeout_ms,
        retry=retry,
        health_service=health_service,
    )
    credentials, options = _with_tls(options, tls)
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


def make_sync_channel(
    address: str,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    keepalive_time_ms: int = DEFAULT_KEEPALIVE_TIME_MS,
    keepalive_timeout_ms: int = DEFAULT_KEEPALIVE_TIMEOUT_MS,
    retry: bool = True,
    tls: ClientTls | None | object = PROCESS_DEFAULT,
) -> grpc.Channel:
    """A blocking channel (CLI, scripts, benchmarks) with the same defaults."""
    options = channel_options(
        max_message_bytes=max_message_bytes,
        keepalive_time_ms=keepalive_time_ms,
        keepalive_timeout_ms=keepalive_timeout_ms,
        retry=retry,
    )
    credentials, options = _with_tls(options, tls)
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def _with_tls(
    options: list[tuple[str, int | str]], tls: ClientTls | None | object
) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, int | str]]]:
    """A channel's credentials (None: plaintext) and its options with TLS's own."""
    security = resolve_client_tls(tls)
    if security is None:
        return None, options
    return security.credentials(), [*options, *security.channel_options()]


def resolve_client_tls(tls: ClientTls | None | object) -> ClientTls | None:
    """`tls` as given, or the process's default for PROCESS_DEFAULT."""
    if tls is PROCESS_DEFAULT:
        return default_client_tls()
    return tls  # type: ignore[return-value]


# One health check's own timeout inside `wait_for_serving`'s polling.
CHECK_TIMEOUT_S = 1.0
NO_ANSWER = "no answer"


async def wait_for_serving(
    address: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S
) -> None:
    """Poll ``grpc.health.v1.Health/Check`` until ``service`` is SERVING.

    Raises:
        Unavailable: reason ``NOT_SERVING`` when it is not SERVING within
            ``timeout_s`` (the last status or error seen is in the message).
    """
    deadline = time.monotonic() + timeout_s
    last = NO_ANSWER
    # Retries off: this loop is the retry policy, and a fresh answer per poll
    # matters more than riding out one UNAVAILABLE.
    async with make_channel(address, retry=False) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            call_timeout_s = min(remaining, CHECK_TIMEOUT_S)
            try:
                response = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=call_timeout_s
                )
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.aio.AioRpcError as exc:
                # A poll cut short by this wait's own deadline says nothing about
                # the server: keep what an earlier poll saw (NOT_SERVING, say).
                cut_short = (exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                             and call_timeout_s < CHECK_TIMEOUT_S)
                if not (cut_short and last != NO_ANSWER):
                    last = exc.code().name
            await asyncio.sleep(min(0.05, max(deadline - time.monotonic(), 0)))
    log.warning("service_not_serving", address=address, service=service, last=last)
    raise Unavailable(
        f"{address} did not report {service or '<server>'} SERVING within {timeout_s}s"
        f" (last: {last})",
        reason="NOT_SERVING",
        metadata={"address": address, "service": service, "last": last},
    )
