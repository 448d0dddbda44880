"""Prometheus metrics of the trainer (and of the co-located node's trainer side),
on the default registry that the service's metrics endpoint serves.

The fusing queue reports every engine call (:func:`observe_fused_batch`, wired
as its ``on_batch``); slot gauges read the engine at scrape time
(:func:`track_engine`), so they can never drift from the engine's own count.
Labels stay low-cardinality: ``kind`` is one of four engine operations and
``op`` one of three checkpoint operations; no adapter ids.
"""

from __future__ import annotations

import weakref
from typing import Protocol

from prometheus_client import Counter, Gauge, Histogram

from lorafleet.lora.fusing import FusedBatch

# One fused pass on 2 CPU cores with the tiny model takes tens of milliseconds;
# a GPU pass of a real model with many adapters can take many seconds.
_PASS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_WAIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
# Adapters per pass: a node has at most a few dozen slots.
_ADAPTER_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
_CHECKPOINT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

FUSED_BATCH_ADAPTERS = Histogram(
    "lorafleet_trainer_fused_batch_adapters",
    "Adapters sharing one fused engine call, by kind (forward_backward, train_step, "
    "logprobs, optim_step).",
    ["kind"],
    buckets=_ADAPTER_BUCKETS,
)
PASS_SECONDS = Histogram(
    "lorafleet_trainer_pass_seconds",
    "Wall time of one fused engine call (kind=train_step: forward, backward and every "
    "adapter's optimizer step).",
    ["kind"],
    buckets=_PASS_BUCKETS,
)
QUEUE_WAIT_SECONDS = Histogram(
    "lorafleet_trainer_queue_wait_seconds",
    "How long the oldest request of a fused call waited in the fusing queue.",
    ["kind"],
    buckets=_WAIT_BUCKETS,
)
TOKENS = Counter(
    "lorafleet_trainer_tokens_total",
    "Tokens (prompt + completion) of requests the engine processed successfully.",
    ["kind"],
)
REQUESTS = Counter(
    "lorafleet_trainer_requests_total",
    "Requests through the fusing queue, by kind and outcome (ok, error).",
    ["kind", "outcome"],
)
SLOTS_USED = Gauge("lorafleet_trainer_adapter_slots_used", "Adapter slots holding an adapter.")
SLOTS_TOTAL = Gauge("lorafleet_trainer_adapter_slots_total", "Adapter slots of the trainer.")
CHECKPOINT_SECONDS = Histogram(
    "lorafleet_trainer_checkpoint_seconds",
    "Time of a successful save_version (write PEFT files + publish by reference), "
    "save_state or load_state (optimizer checkpoint).",
    ["op"],
    buckets=_CHECKPOINT_BUCKETS,
)
CHECKPOINT_BYTES = Counter(
    "lorafleet_trainer_checkpoint_bytes_total",
    "Bytes written by successful save_version and save_state calls.",
    ["op"],
)


def observe_fused_batch(batch: FusedBatch) -> None:
    """The fusing queue's ``on_batch`` observer."""
    FUSED_BATCH_ADAPTERS.labels(batch.kind).observe(batch.adapters)
    PASS_SECONDS.labels(batch.kind).observe(batch.seconds)
    QUEUE_WAIT_SECONDS.labels(batch.kind).observe(batch.wait_s)
    if batch.tokens:
        TOKENS.labels(batch.kind).inc(batch.tokens)
    if batch.requests > batch.failed:
        REQUESTS.labels(batch.kind, "ok").inc(batch.requests - batch.failed)
    if batch.failed:
        REQUESTS.labels(batch.kind, "error").inc(batch.failed)


def observe_checkpoint(op: str, seconds: float, size_bytes: int = 0) -> None:
    CHECKPOINT_SECONDS.labels(op).observe(seconds)
    if size_bytes:
        CHECKPOINT_BYTES.labels(op).inc(size_bytes)


class _Slots(Protocol):
    @property
    def slots_used(self) -> int: ...

    @property
    def slots_total(self) -> int: ...


def track_engine(engine: _Slots) -> None:
    """Make the slot gauges read ``engine`` at scrape time (the process's one
    trainer engine; a later call replaces an earlier one). Held weakly, so a
    dropped engine (tests build several) is not kept alive by the gauges."""
    ref = weakref.ref(engine)

    def read(attribute: str) -> float:
        current = ref()
        return float(getattr(current, attribute)) if current is not None else 0.0

    SLOTS_USED.set_function(lambda: read("slots_used"))
    SLOTS_TOTAL.set_function(lambda: read("slots_total"))
