"""Placement: which node takes a queued experiment.

Best fit: among READY nodes serving the experiment's base model with a free
slot and a large enough max rank, take the one with the fewest free slots left
(ties by node id). Packing nodes full keeps whole nodes free for big
experiments and lets idle nodes be drained.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb


@dataclass(frozen=True)
class NodeCapacity:
    node_id: str
    base_model: str
    max_rank: int
    free_slots: int
    ready: bool = True


def choose_node(spec: pb.ExperimentSpec, nodes: Sequence[NodeCapacity]) -> str | None:
    candidates = [
        n
        for n in nodes
        if n.ready
        and n.free_slots > 0
        and n.base_model == spec.base_model
        and n.max_rank >= spec.lora.rank
    ]
    if not candidates:
        return None
    return min(candidates, key=lambda n: (n.free_slots, n.node_id)).node_id
