"""Scheduler settings (env prefix ``LORAFLEET_SCHEDULER_``)."""

from __future__ import annotations

import os
import socket

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import ServiceSettings
from lorafleet.core.sql import DEFAULT_TTL_S


class StaticNode(BaseModel):
    """A node given by configuration instead of registering itself."""

    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(description="Unique node id, [a-z0-9][a-z0-9-]{0,62}.")
    rollout_address: str = Field(description="host:port of the node's RolloutService.")
    trainer_address: str = Field(description="host:port of the node's TrainerService.")
    base_model: str = Field(default="tiny", description="Base model the node serves.")
    slots: int = Field(default=8, ge=1, description="Concurrent experiments (adapter slots).")
    max_rank: int = Field(default=16, ge=1, description="Largest LoRA rank the node takes.")


class SchedulerSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_SCHEDULER_", extra="forbid")

    database_url: str = Field(
        default="sqlite:///var/scheduler/scheduler.db",
        description="URL of the experiment store: sqlite:///path or postgresql://user@host/db "
        "(asyncpg; the driver names sqlite+aiosqlite and postgresql+asyncpg are accepted too).",
    )
    registry_address: str = Field(
        default="127.0.0.1:50051", description="host:port of the AdapterRegistryService."
    )
    nodes: list[StaticNode] = Field(
        default_factory=list,
        description="Nodes known from configuration (the local cluster); others register "
        'over RegisterNode. As an env var, JSON: [{"node_id": "node-0", ...}].',
    )
    heartbeat_interval_s: float = Field(
        default=2.0, gt=0, description="How often registered nodes must send a heartbeat."
    )
    node_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="A node silent (and unreachable) this long is LOST; its experiments move.",
    )
    rollout_timeout_s: float = Field(
        default=300.0, gt=0, description="Deadline of one Generate call."
    )
    train_timeout_s: float = Field(default=300.0, gt=0, description="Deadline of one TrainStep.")
    checkpoint_every_steps: int = Field(
        default=1,
        ge=1,
        description="Save adapter + optimizer state every this many steps (what a move to "
        "another node resumes from).",
    )
    max_inflight_tokens_per_node: int = Field(
        default=65536,
        ge=1,
        description="Fair-share budget: rollout tokens (prompts x samples x max_tokens) "
        "admitted to one node at a time; beyond it experiments wait their weighted turn.",
    )
    idempotency_ttl_s: float = Field(
        default=DEFAULT_TTL_S,
        gt=0,
        description="How long request_id answers are kept for replay (swept at start and "
        "then every quarter of this, at most hourly).",
    )
    replica_id: str = Field(
        default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}",
        min_length=1,
        max_length=255,
        description="This replica's name in the leader lease; unique per replica. Replicas "
        "share the database: one leads (drives experiments, answers RPCs), the others stand "
        "by with health NOT_SERVING. A replica restarted under the same name takes the lease "
        "back at once; under a new name it waits lease_duration_s. Default: hostname-pid.",
    )
    advertise_address: str = Field(
        default="",
        description="host:port at which clients reach this replica; a standby's NOT_LEADER "
        "answer names the leader's (default: hostname:port).",
    )
    lease_duration_s: float = Field(
        default=15.0,
        gt=0,
        description="A standby takes over after seeing the leader's lease unchanged this long.",
    )
    lease_renew_deadline_s: float = Field(
        default=10.0,
        gt=0,
        description="A leader that has not renewed its lease for this long stops and exits "
        "(must be below lease_duration_s).",
    )
    lease_retry_period_s: float = Field(
        default=2.0,
        gt=0,
        description="How often the leader renews and standbys check the lease "
        "(must be below lease_renew_deadline_s).",
    )

    @model_validator(mode="after")
    def _lease_timings_in_order(self) -> SchedulerSettings:
        if not (self.lease_retry_period_s < self.lease_renew_deadline_s < self.lease_duration_s):
            raise ValueError(
                "lease timings must satisfy lease_retry_period_s < lease_renew_deadline_s"
                f" < lease_duration_s (got {self.lease_retry_period_s:g},"
                f" {self.lease_renew_deadline_s:g}, {self.lease_duration_s:g})"
            )
        return self

    def advertised(self, bound_port: int | None = None) -> str:
        """advertise_address, else this host with the port bound (or configured)."""
        return self.advertise_address or f"{socket.gethostname()}:{bound_port or self.port}"
