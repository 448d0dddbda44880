"""Prometheus metrics of the co-located node, on the default registry that the
service's metrics endpoint serves.

The node runs the trainer and the rollout service in one process, so it exports
``lorafleet_trainer_*`` and ``lorafleet_rollout_*`` as those services do (its
in-memory adapter loads count in ``lorafleet_rollout_adapter_load_seconds`` with
``source="memory"``). What only the node has is below: the versions handed from
trainer to rollout in memory, and the process's proportional memory (PSS), the
number that shows what sharing one base model saves.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

from prometheus_client import Counter, Gauge

MEMORY_HANDOVERS = Counter(
    "lorafleet_node_memory_handovers_total",
    "Saved versions handed to the rollout side in memory (mem://) instead of by file.",
)
MEMORY_VERSIONS = Gauge(
    "lorafleet_node_memory_versions", "Published versions held in memory for the rollout side."
)
MEMORY_VERSION_BYTES = Gauge(
    "lorafleet_node_memory_version_bytes", "Bytes of the versions held in memory."
)
MEMORY_LOADED_ADAPTERS = Gauge(
    "lorafleet_node_memory_loaded_adapters",
    "Versions attached to the rollout engine from memory now.",
)
PROCESS_PSS_BYTES = Gauge(
    "lorafleet_node_process_pss_bytes",
    "Proportional set size of the node process (shared pages split among their users).",
)


class _Versions(Protocol):
    def __len__(self) -> int: ...

    def nbytes(self) -> int: ...


class _Loaded(Protocol):
    def memory_loaded(self) -> list[tuple[str, int]]: ...


def track(memory: _Versions, adapters: _Loaded, pss: Callable[[], int]) -> None:
    """Make the gauges read the node's objects at scrape time (the process's one
    node; a later call replaces an earlier one). Held weakly, so the gauges never
    keep a stopped node's tensors alive."""
    memory_ref = weakref.ref(memory)
    adapters_ref = weakref.ref(adapters)

    def versions() -> float:
        held = memory_ref()
        return float(len(held)) if held is not None else 0.0

    def version_bytes() -> float:
        held = memory_ref()
        return float(held.nbytes()) if held is not None else 0.0

    def loaded() -> float:
        manager = adapters_ref()
        return float(len(manager.memory_loaded())) if manager is not None else 0.0

    MEMORY_VERSIONS.set_function(versions)
    MEMORY_VERSION_BYTES.set_function(version_bytes)
    MEMORY_LOADED_ADAPTERS.set_function(loaded)
    PROCESS_PSS_BYTES.set_function(lambda: float(pss()))
