"""Registry settings (env prefix ``LORAFLEET_REGISTRY_``).

Every path default is relative to ``data_dir`` so that one setting moves a whole
registry (database, blobs, staging) to another disk.
"""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from lorafleet.core.config import MIB, ServiceSettings
from lorafleet.core.sql import DEFAULT_TTL_S

GIB = 1024 * MIB


class RegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="LORAFLEET_REGISTRY_", extra="forbid")

    data_dir: Path = Field(
        default=Path("var/registry"),
        description="Root of the registry's own state: the SQLite database, the local "
        "blob store and the upload staging area (unless set separately).",
    )
    database_url: str = Field(
        default="",
        description="URL of the metadata store: sqlite:///path or postgresql://user@host/db "
        "(asyncpg; the driver names sqlite+aiosqlite and postgresql+asyncpg are accepted too). "
        "Empty = SQLite at <data_dir>/registry.db.",
    )
    durable_url: str = Field(
        default="",
        description="Where versions are kept durably: file:///abs/dir (local directory) "
        "or s3://bucket/prefix (S3-compatible). Empty = <data_dir>/blobs.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="Endpoint of an S3-compatible store (MinIO, moto, ...); None = AWS. "
        "Credentials come from the usual AWS environment variables or files.",
    )
    s3_region: str = Field(default="us-east-1", description="Region passed to the S3 client.")
    file_roots: dict[str, Path] = Field(
        default_factory=lambda: {"local": Path("var")},
        description="Node id -> node-local adapter cache directory the registry may read "
        "by-reference publishes from (file:// URIs must resolve inside one of them). "
        'As an env var, JSON: {"node-0": "/var/cache/lorafleet"}.',
    )
    keep_last_versions: int = Field(
        default=20,
        ge=0,
        description="Retention: READY versions kept per adapter besides aliased ones; "
        "0 keeps every version.",
    )
    retention_min_age_s: float = Field(
        default=300.0,
        ge=0,
        description="Never delete a version younger than this: a rollout that resolved it "
        "a moment ago may still be loading it.",
    )
    max_version_bytes: int = Field(
        default=4 * GIB,
        gt=0,
        description="Largest total size of one version's files (upload and by reference).",
    )
    max_config_bytes: int = Field(
        default=64 * 1024, gt=0, description="Largest adapter_config.json accepted."
    )
    max_header_bytes: int = Field(
        default=16 * MIB, gt=0, description="Largest safetensors JSON header accepted."
    )
    max_tensors: int = Field(
        default=20_000, gt=0, description="Most tensors one adapter_model.safetensors may hold."
    )
    max_lora_rank: int = Field(default=1024, ge=1, description="Largest LoRA rank accepted.")
    pending_lease_s: float = Field(
        default=120.0,
        gt=0,
        description="A PENDING publish not renewed for this long is abandoned and may be "
        "taken over; live publishes renew it every third of it.",
    )
    upload_idle_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="An upload stream that sends nothing for this long is failed.",
    )
    watch_poll_interval_s: float = Field(
        default=1.0,
        gt=0,
        description="How often WatchAdapters re-reads the database, to see versions "
        "published through other registry replicas (local ones wake it at once).",
    )
    copy_workers: int = Field(
        default=2, ge=1, description="Concurrent background copies to the durable store."
    )
    copy_max_attempts: int = Field(
        default=5, ge=1, description="Tries per durable copy before giving up until restart."
    )
    idempotency_ttl_s: float = Field(
        default=DEFAULT_TTL_S,
        gt=0,
        description="How long request_id answers are kept for replay (swept at start and "
        "then every quarter of this, at most hourly).",
    )
    replica_id: str = Field(
        default="",
        description="Stable id of this registry replica, recorded on its PENDING publishes "
        "so a restart can clean up exactly its own. Empty = hostname + data_dir.",
    )

    @field_validator("file_roots")
    @classmethod
    def _roots_absolute(cls, roots: dict[str, Path]) -> dict[str, Path]:
        return {node: Path(path).expanduser().absolute() for node, path in roots.items()}

    @field_validator("data_dir")
    @classmethod
    def _data_dir_absolute(cls, path: Path) -> Path:
        return Path(path).expanduser().absolute()

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def resolved_durable_url(self) -> str:
        return self.durable_url or (self.data_dir / "blobs").as_uri()

    @property
    def staging_dir(self) -> Path:
        return self.data_dir / "staging"

    @property
    def resolved_replica_id(self) -> str:
        if self.replica_id:
            return self.replica_id
        # Same host + same data dir = the same replica after a restart, which is
        # exactly the scope in which its old PENDING publishes are known dead.
        digest = hashlib.sha256(str(self.data_dir).encode()).hexdigest()[:12]
        return f"{socket.gethostname()}-{digest}"
