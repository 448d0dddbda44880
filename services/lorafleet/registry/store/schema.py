"""Tables of the registry's metadata store (SQLAlchemy Core, SQLite and PostgreSQL).

Times are integer microseconds since the epoch: exact, sortable and identical on
both databases (SQLite has no real timestamp type).
"""

from __future__ import annotations

import sqlalchemy as sa

from lorafleet.core.sql import idempotency_table

metadata = sa.MetaData()

adapters = sa.Table(
    "registry_adapters",
    metadata,
    sa.Column("adapter_id", sa.String(63), primary_key=True),
    sa.Column("experiment_id", sa.String(128), nullable=False, index=True),
    sa.Column("base_model", sa.String(1024), nullable=False),
    sa.Column("lora_json", sa.Text, nullable=False),
    sa.Column("labels_json", sa.Text, nullable=False),
    # The latest READY version; the row is also the per-adapter lock every
    # publish takes (SELECT ... FOR UPDATE on PostgreSQL).
    sa.Column("latest_version", sa.BigInteger, nullable=False, default=0),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
)

versions = sa.Table(
    "registry_versions",
    metadata,
    sa.Column(
        "adapter_id",
        sa.String(63),
        sa.ForeignKey("registry_adapters.adapter_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    # (adapter_id, version) is the primary key: two publishes can never both
    # commit the same number, whatever the isolation level.
    sa.Column("version", sa.BigInteger, primary_key=True),
    sa.Column("parent_version", sa.BigInteger, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("training_step", sa.BigInteger, nullable=False, default=0),
    sa.Column("metrics_json", sa.Text, nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("files_json", sa.Text, nullable=False),
    # Where it was published from (by reference), "" for uploads.
    sa.Column("source_uri", sa.Text, nullable=False, default=""),
    # The registry's own copy, "" until verified.
    sa.Column("durable_uri", sa.Text, nullable=False, default=""),
    sa.Column("request_id", sa.String(128), nullable=False, default=""),
    sa.Column("attempt_id", sa.String(32), nullable=False),
    # Which replica runs the PENDING attempt and until when it is known alive.
    sa.Column("owner", sa.String(255), nullable=False, default=""),
    sa.Column("lease_until_us", sa.BigInteger, nullable=False, default=0),
    sa.Column("create_time_us", sa.BigInteger, nullable=False),
    sa.Column("ready_time_us", sa.BigInteger, nullable=False, default=0),
    sa.Column("failure_reason", sa.Text, nullable=False, default=""),
    sa.Index("ix_registry_versions_state", "state"),
)

aliases = sa.Table(
    "registry_aliases",
    metadata,
    sa.Column(
        "adapter_id",
        sa.String(63),
        sa.ForeignKey("registry_adapters.adapter_id", ondelete="CASCADE"),
        primary_key=True,
    ),
    sa.Column("alias", sa.String(63), primary_key=True),
    sa.Column("version", sa.BigInteger, nullable=False),
    sa.Column("update_time_us", sa.BigInteger, nullable=False),
)

# request_id -> first answer (`lorafleet.core.sql`); the changes write theirs in
# their own transactions.
idempotency = idempotency_table("registry_idempotency", metadata)
