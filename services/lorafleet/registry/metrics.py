"""Prometheus metrics of the registry, on the default registry that the
service's metrics endpoint serves.

Counted in the domain (``AdapterRegistry``), not the servicer: an idempotent
replay answered from the idempotency store is not a second publish. Outcomes are
gRPC code names (``OK``, ``ABORTED``, ``DATA_LOSS``, ...), the same values
``grpc_server_handled_total`` uses, so the two can be read side by side. No
adapter ids in labels: one registry holds every experiment's adapters.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from prometheus_client import Counter, Gauge, Histogram

from lorafleet.core.metrics import code_name

_PUBLISH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

PUBLISHES = Counter(
    "lorafleet_registry_publishes_total",
    "Publish attempts by mode (reference: files verified in place; upload: bytes "
    "streamed to the registry) and outcome (gRPC code name).",
    ["mode", "code"],
)
PUBLISH_SECONDS = Histogram(
    "lorafleet_registry_publish_seconds",
    "Time of a successful publish (reserve, verify digests, store, finalize).",
    ["mode"],
    buckets=_PUBLISH_BUCKETS,
)
PUBLISHED_BYTES = Counter(
    "lorafleet_registry_published_bytes_total",
    "Bytes of the versions published (reference: verified at their node-local "
    "location; upload: written to the blob store).",
    ["mode"],
)
DURABLE_COPIES = Counter(
    "lorafleet_registry_durable_copies_total",
    "Background copies of by-reference versions to the durable store, by outcome "
    "(ok, retry, failed).",
    ["outcome"],
)
DURABLE_COPY_BYTES = Counter(
    "lorafleet_registry_durable_copy_bytes_total",
    "Bytes written to the durable store by the background copier.",
)
DURABLE_COPY_SECONDS = Histogram(
    "lorafleet_registry_durable_copy_seconds",
    "Time of one successful durable copy (write + read-back verification).",
    buckets=_PUBLISH_BUCKETS,
)
RESOLVES = Counter(
    "lorafleet_registry_resolves_total",
    "Version resolutions by selector kind (version, latest, alias) and outcome.",
    ["by", "code"],
)
WATCH_STREAMS = Gauge(
    "lorafleet_registry_watch_streams", "WatchAdapters streams open now (rollout preloaders)."
)
VERSIONS_RETIRED = Counter(
    "lorafleet_registry_versions_retired_total", "Versions deleted by the retention policy."
)


class PublishAttempt:
    """What a publish reports while it runs: the size of what it stored."""

    size_bytes = 0

    def stored(self, size_bytes: int) -> None:
        self.size_bytes = size_bytes


@contextlib.contextmanager
def publish_attempt(mode: str) -> Iterator[PublishAttempt]:
    """Count one publish of ``mode`` by outcome; time and size the ones that succeed."""
    attempt = PublishAttempt()
    started = time.perf_counter()
    try:
        yield attempt
    except BaseException as exc:
        PUBLISHES.labels(mode, code_name(exc)).inc()
        raise
    PUBLISHES.labels(mode, "OK").inc()
    PUBLISH_SECONDS.labels(mode).observe(time.perf_counter() - started)
    PUBLISHED_BYTES.labels(mode).inc(attempt.size_bytes)


def selector_kind(version: int, alias: str) -> str:
    if version:
        return "version"
    # "latest" is the implicit alias; user aliases are free-form and stay one value.
    return "latest" if alias in ("", "latest") else "alias"


@contextlib.contextmanager
def resolving(version: int, alias: str) -> Iterator[None]:
    by = selector_kind(version, alias)
    try:
        yield
    except BaseException as exc:
        RESOLVES.labels(by, code_name(exc)).inc()
        raise
    RESOLVES.labels(by, "OK").inc()
