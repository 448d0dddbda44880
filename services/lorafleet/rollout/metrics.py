"""Prometheus metrics of the rollout service (on the default registry, which the
mesh's metrics endpoint serves).

Throughput is a counter, not a gauge: tokens/s is ``rate(..._tokens_total[1m])``
in PromQL, exact over any window, and survives scrapes that miss a request.
Labels stay low-cardinality (no adapter ids: a node serves many experiments).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

PROMPT_TOKENS = Counter(
    "lorafleet_rollout_prompt_tokens_total", "Prompt tokens processed.", ["kind"]
)
COMPLETION_TOKENS = Counter(
    "lorafleet_rollout_completion_tokens_total",
    "Tokens generated (kind: base or adapter).",
    ["kind"],
)
REQUESTS = Counter(
    "lorafleet_rollout_requests_total", "Rollout requests by operation and outcome.", ["op", "code"]
)
REQUEST_SECONDS = Histogram(
    "lorafleet_rollout_request_seconds",
    "Wall time of Generate / ComputeLogprobs requests.",
    ["op"],
    buckets=_LATENCY_BUCKETS,
)
PENDING_SEQUENCES = Gauge(
    "lorafleet_rollout_pending_sequences", "Sequences admitted and not yet finished."
)
ADAPTER_LOAD_SECONDS = Histogram(
    "lorafleet_rollout_adapter_load_seconds",
    "Time to make an adapter version servable (materialise + engine load), by source "
    "(local: file:// in place; download: fetched from the registry) and trigger "
    "(request, preload, operator).",
    ["source", "trigger"],
    buckets=_LATENCY_BUCKETS,
)
ADAPTER_EVICTIONS = Counter(
    "lorafleet_rollout_adapter_evictions_total", "Adapter versions evicted to make room."
)
ADAPTER_PRELOADS = Counter(
    "lorafleet_rollout_adapter_preloads_total",
    "New versions loaded ahead of their first request (from the watch stream).",
    ["outcome"],
)
LOADED_ADAPTERS = Gauge("lorafleet_rollout_loaded_adapters", "Adapter versions loaded now.")
RESOLVE_CACHE = Counter(
    "lorafleet_rollout_resolve_total",
    "Adapter resolutions, by where the answer came from.",
    ["source"],
)
ENGINE_RESTARTS = Counter(
    "lorafleet_rollout_engine_restarts_total", "Engine restarts after a failure."
)
ENGINE_START_SECONDS = Histogram(
    "lorafleet_rollout_engine_start_seconds",
    "Time to start the engine (cold start).",
    buckets=(1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
