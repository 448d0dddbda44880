"""Domain records of the scheduler (what the store keeps, what the loop reads)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb

ACTIVE_STATES = frozenset(
    {pb.EXPERIMENT_STATE_QUEUED, pb.EXPERIMENT_STATE_RUNNING, pb.EXPERIMENT_STATE_PAUSED}
)
TERMINAL_STATES = frozenset(
    {
        pb.EXPERIMENT_STATE_COMPLETED,
        pb.EXPERIMENT_STATE_FAILED,
        pb.EXPERIMENT_STATE_CANCELLED,
    }
)


@dataclass
class NodeRecord:
    node_id: str
    rollout_address: str
    trainer_address: str
    base_model: str
    slots: int
    max_rank: int
    state: int = pb.NODE_STATE_READY
    last_heartbeat: float = 0.0
    """Wall-clock seconds of the last heartbeat (or successful probe)."""
    static: bool = False
    """From configuration rather than RegisterNode."""


@dataclass
class Checkpoint:
    """Where an experiment's adapter + optimizer state was last saved."""

    uri: str = ""
    sha256: str = ""
    step: int = 0


@dataclass
class ExperimentRecord:
    experiment_id: str
    spec: pb.ExperimentSpec
    state: int = pb.EXPERIMENT_STATE_QUEUED
    state_reason: str = ""
    node_id: str = ""
    current_step: int = 0
    """Last completed step; a step is complete once its version is published and
    its metrics are stored, in one transaction with this counter."""
    adapter_id: str = ""
    latest_version: int = 0
    base_accuracy: float | None = None
    latest_accuracy: float | None = None
    last_reward: float = 0.0
    last_accuracy: float = 0.0
    last_step_ms: float = 0.0
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    create_time: float = 0.0
    start_time: float | None = None
    end_time: float | None = None
    queue_wait_ms: float = 0.0

    @property
    def max_steps(self) -> int:
        return self.spec.algorithm.max_steps
