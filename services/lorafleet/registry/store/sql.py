"""The metadata store over SQL: SQLite (default) or PostgreSQL.

Concurrency: every state change runs in one transaction that first locks the
adapter's row (``SELECT ... FOR UPDATE`` on PostgreSQL; on SQLite the
transaction is ``BEGIN IMMEDIATE``, which takes the database write lock up front,
so the read-check-write below cannot interleave with another writer, in this
process or another). The (adapter_id, version) primary key backs this up: a
duplicate number can never commit.

Each transaction is a plain function of a ``sqlalchemy.Connection`` that
`lorafleet.core.database.Database` runs in one hop (its docstring says why, and
how SQLite is set up: WAL, ``synchronous=FULL``, a busy timeout).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError, OperationalError

from lorafleet.core.database import Database, Transaction
from lorafleet.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    Unavailable,
)
from lorafleet.core.sql import IdempotencyRecord
from lorafleet.registry.store.schema import adapters, aliases, metadata, versions
from lorafleet.registry.types import (
    LATEST,
    Adapter,
    FileDigest,
    LoraSpec,
    Reservation,
    RetentionOutcome,
    Version,
    VersionState,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")


def _now_us() -> int:
    return int(time.time() * 1_000_000)


def _due_s(ready_time_us: int | None, min_age_s: float) -> float | None:
    """Wall time (s) at which a version ready at ``ready_time_us`` is ``min_age_s`` old."""
    return None if ready_time_us is None else ready_time_us / 1e6 + min_age_s


def _store_record(conn: sa.Connection, record: IdempotencyRecord | None, result: Any) -> None:
    if record is not None:
        record.write(conn, result)


@dataclass(frozen=True)
class AbandonedAttempt:
    adapter_id: str
    version: int
    attempt_id: str


def _spec_to_json(spec: LoraSpec) -> str:
    return json.dumps(
        {
            "rank": spec.rank,
            "alpha": spec.alpha,
            "target_modules": list(spec.target_modules),
            "dropout": spec.dropout,
            "use_rslora": spec.use_rslora,
        },
        sort_keys=True,
    )


def _spec_from_json(text: str) -> LoraSpec:
    data = json.loads(text)
    return LoraSpec(
        rank=data["rank"],
        alpha=data["alpha"],
        target_modules=tuple(data["target_modules"]),
        dropout=data["dropout"],
        use_rslora=data["use_rslora"],
    )


def _files_to_json(files: Iterable[FileDigest]) -> str:
    return json.dumps([[f.name, f.sha256, f.size_bytes] for f in files])


def _files_from_json(text: str) -> tuple[FileDigest, ...]:
    return tuple(FileDigest(name, sha, size) for name, sha, size in json.loads(text))


def _adapter(row: Any) -> Adapter:
    return Adapter(
        adapter_id=row.adapter_id,
        experiment_id=row.experiment_id,
        base_model=row.base_model,
        lora=_spec_from_json(row.lora_json),
        labels=json.loads(row.labels_json),
        latest_version=row.latest_version,
        create_time=row.create_time_us / 1e6,
    )


def _version(row: Any, alias_names: Iterable[str], latest_version: int) -> Version:
    names = sorted(alias_names)
    if row.version == latest_version and row.state == VersionState.READY:
        names = [LATEST, *names]
    return Version(
        adapter_id=row.adapter_id,
        version=row.version,
        parent_version=row.parent_version,
        state=VersionState(row.state),
        training_step=row.training_step,
        metrics=json.loads(row.metrics_json),
        sha256=row.sha256,
        size_bytes=row.size_bytes,
        files=_files_from_json(row.files_json),
        uris=tuple(u for u in (row.source_uri, row.durable_uri) if u),
        durable_uri=row.durable_uri,
        aliases=tuple(names),
        create_time=row.create_time_us / 1e6,
        failure_reason=row.failure_reason,
        attempt_id=row.attempt_id,
    )


class SqlMetadataStore:
    """Adapters, versions and aliases in SQL; see the module docstring for locking.

    Every method is one transaction: a plain function of a connection, run by
    `lorafleet.core.database.Database` in one hop.
    """

    def __init__(self, db: Database) -> None:
        self.db = db

    @classmethod
    async def open(cls, url: str) -> SqlMetadataStore:
        db = Database(url)
        await db.create_all(metadata)
        return cls(db)

    async def close(self) -> None:
        await self.db.dispose()

    async def read(self, transaction: Transaction[T]) -> T:
        return await self.db.read(transaction)

    async def write(self, transaction: Transaction[T]) -> T:
        try:
            return await self.db.write(transaction)
        except OperationalError as exc:
            # SQLite past its busy timeout, PostgreSQL deadlock/serialization
            # failures, a dropped connection: nothing was committed; retry.
            raise Unavailable(
                "the metadata database is busy or unreachable; retry",
                reason="DATABASE_UNAVAILABLE",
            ) from exc

    # -- adapters -------------------------------------------------------------

    async def create_adapter(
        self, adapter: Adapter, record: IdempotencyRecord | None = None
    ) -> Adapter:
        def create(conn: sa.Connection) -> None:
            conn.execute(
                adapters.insert().values(
                    adapter_id=adapter.adapter_id,
                    experiment_id=adapter.experiment_id,
                    base_model=adapter.base_model,
                    lora_json=_spec_to_json(adapter.lora),
                    labels_json=json.dumps(dict(adapter.labels), sort_keys=True),
                    latest_version=0,
                    create_time_us=int(adapter.create_time * 1e6),
                )
            )
            _store_record(conn, record, adapter)

        try:
            await self.write(create)
        except IntegrityError:
            raise AlreadyExists(
                f"adapter {adapter.adapter_id!r} already exists",
                reason="ADAPTER_EXISTS",
                metadata={"adapter_id": adapter.adapter_id},
            ) from None
        return adapter

    async def get_adapter(self, adapter_id: str) -> Adapter:
        return await self.read(lambda conn: _adapter(_adapter_row(conn, adapter_id, lock=False)))

    async def list_adapters(self, experiment_id: str, after: str, limit: int) -> list[Adapter]:
        query = sa.select(adapters).order_by(adapters.c.adapter_id).limit(limit)
        if experiment_id:
            query = query.where(adapters.c.experiment_id == experiment_id)
        if after:
            query = query.where(adapters.c.adapter_id > after)
        rows = await self.read(lambda conn: conn.execute(query).all())
        return [_adapter(row) for row in rows]

    async def delete_adapter(
        self, adapter_id: str, *, force: bool, record: IdempotencyRecord | None = None
    ) -> list[Version]:
        """Delete the adapter, its versions and aliases; return the versions (whose
        blobs the caller removes after the commit)."""

        def delete(conn: sa.Connection) -> list[Version]:
            row = _adapter_row(conn, adapter_id, lock=True)
            user_aliases = (
                conn.execute(sa.select(aliases.c.alias).where(aliases.c.adapter_id == adapter_id))
                .scalars()
                .all()
            )
            if user_aliases and not force:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} has aliases {sorted(user_aliases)}; pass force",
                    reason="ADAPTER_HAS_ALIASES",
                    metadata={"adapter_id": adapter_id},
                )
            pending = (
                conn.execute(
                    sa.select(versions.c.version).where(
                        versions.c.adapter_id == adapter_id,
                        versions.c.state == VersionState.PENDING,
                        versions.c.lease_until_us > _now_us(),
                    )
                )
                .scalars()
                .all()
            )
            if pending:
                raise FailedPrecondition(
                    f"adapter {adapter_id!r} has a publish in progress",
                    reason="PUBLISH_IN_PROGRESS",
                    metadata={"adapter_id": adapter_id, "version": str(pending[0])},
                )
            rows = conn.execute(
                sa.select(versions).where(versions.c.adapter_id == adapter_id)
            ).all()
            gone = [_version(r, (), row.latest_version) for r in rows]
            conn.execute(aliases.delete().where(aliases.c.adapter_id == adapter_id))
            conn.execute(versions.delete().where(versions.c.adapter_id == adapter_id))
            conn.execute(adapters.delete().where(adapters.c.adapter_id == adapter_id))
            _store_record(conn, record, None)
            return gone

        return await self.write(delete)

    # -- publishing -----------------------------------------------------------

    async def reserve_version(
        self,
        adapter_id: str,
        *,
        expected_parent_version: int,
        files: tuple[FileDigest, ...],
        sha256: str,
        size_bytes: int,
        training_step: int,
        metrics: dict[str, float],
        source_uri: str,
        request_id: str,
        attempt_id: str,
        owner: str,
        lease_s: float,
    ) -> tuple[Reservation, list[AbandonedAttempt]]:
        """Take the next version number as PENDING for one publish attempt.

        At most one PENDING version exists per adapter, always the highest
        number, so releasing it on failure never leaves a gap. An earlier attempt
        with the same request_id (a client retry) or an expired lease is taken
        over; its leftovers are returned for the caller to clean up.

        Raises:
            NotFound: ADAPTER_NOT_FOUND.
            Aborted: PUBLISH_IN_PROGRESS (another live publish holds the next
                number), PARENT_VERSION_MISMATCH (expected parent is not the latest).
        """
        now = _now_us()
        new_row = {
            "parent_version": expected_parent_version,
            "state": VersionState.PENDING,
            "training_step": training_step,
            "metrics_json": json.dumps(metrics, sort_keys=True),
            "sha256": sha256,
            "size_bytes": size_bytes,
            "files_json": _files_to_json(files),
            "source_uri": source_uri,
            "durable_uri": "",
            "request_id": request_id,
            "attempt_id": attempt_id,
            "owner": owner,
            "lease_until_us": now + int(lease_s * 1e6),
            "create_time_us": now,
            "ready_time_us": 0,
            "failure_reason": "",
        }

        def reserve(conn: sa.Connection) -> tuple[Reservation, list[AbandonedAttempt]]:
            row = _adapter_row(conn, adapter_id, lock=True)
            abandoned = _take_over_pending(conn, row, request_id=request_id, now=now)
            if expected_parent_version != row.latest_version:
                raise Aborted(
                    f"expected parent version {expected_parent_version} of {adapter_id!r}"
                    f" but the latest is {row.latest_version}",
                    reason="PARENT_VERSION_MISMATCH",
                    metadata={
                        "adapter_id": adapter_id,
                        "latest_version": str(row.latest_version),
                        "expected_parent_version": str(expected_parent_version),
                    },
                )
            highest = conn.execute(
                sa.select(sa.func.max(versions.c.version)).where(
                    versions.c.adapter_id == adapter_id
                )
            ).scalar()
            number = (highest or 0) + 1
            conn.execute(versions.insert().values(adapter_id=adapter_id, version=number, **new_row))
            reservation = Reservation(
                adapter=_adapter(row),
                version=number,
                parent_version=expected_parent_version,
                attempt_id=attempt_id,
            )
            return reservation, abandoned

        try:
            return await self.write(reserve)
        except IntegrityError:
            # Unreachable while the row lock holds; should a database ever let
            # two reservations through, the primary key turns the second into a
            # plain conflict instead of a duplicate number.
            raise Aborted(
                f"another publish took the next version of {adapter_id!r}; retry",
                reason="PUBLISH_IN_PROGRESS",
                metadata={"adapter_id": adapter_id},
            ) from None

    async def renew_lease(self, reservation: Reservation, lease_s: float) -> bool:
        """Extend a PENDING attempt's lease; False when it was taken over."""
        update = (
            versions.update()
            .where(
                versions.c.adapter_id == reservation.adapter.adapter_id,
                versions.c.version == reservation.version,
                versions.c.attempt_id == reservation.attempt_id,
                versions.c.state == VersionState.PENDING,
            )
            .values(lease_until_us=_now_us() + int(lease_s * 1e6))
        )
        return await self.write(lambda conn: conn.execute(update).rowcount == 1)

    async def finalize_version(
        self,
        reservation: Reservation,
        *,
        durable_uri: str,
        idempotency_record: IdempotencyRecord | None,
    ) -> Version:
        """PENDING -> READY, move "latest", and store the request's answer, in one
        transaction.

        Raises:
            Aborted: PUBLISH_SUPERSEDED (the attempt lost its number meanwhile).
        """
        adapter_id = reservation.adapter.adapter_id

        def finalize(conn: sa.Connection) -> Version:
            _adapter_row(conn, adapter_id, lock=True)
            result = conn.execute(
                versions.update()
                .where(
                    versions.c.adapter_id == adapter_id,
                    versions.c.version == reservation.version,
                    versions.c.attempt_id == reservation.attempt_id,
                    versions.c.state == VersionState.PENDING,
                )
                .values(
                    state=VersionState.READY,
                    durable_uri=durable_uri,
                    ready_time_us=_now_us(),
                    lease_until_us=0,
                )
            )
            if result.rowcount != 1:
                raise Aborted(
                    f"the publish of version {reservation.version} of {adapter_id!r} was taken"
                    " over by another request",
                    reason="PUBLISH_SUPERSEDED",
                    metadata={"adapter_id": adapter_id, "version": str(reservation.version)},
                )
            conn.execute(
                adapters.update()
                .where(adapters.c.adapter_id == adapter_id)
                .values(latest_version=reservation.version)
            )
            version = _version_in(conn, adapter_id, reservation.version)
            _store_record(conn, idempotency_record, version)
            return version

        return await self.write(finalize)

    async def release_version(self, reservation: Reservation) -> bool:
        """Drop a failed attempt's PENDING row, freeing its number (it is the
        highest, so no gap opens)."""
        delete = versions.delete().where(
            versions.c.adapter_id == reservation.adapter.adapter_id,
            versions.c.version == reservation.version,
            versions.c.attempt_id == reservation.attempt_id,
            versions.c.state == VersionState.PENDING,
        )
        return await self.write(lambda conn: conn.execute(delete).rowcount == 1)

    async def recover(self, owner: str) -> list[AbandonedAttempt]:
        """At start: drop PENDING rows of this replica's previous life (their
        uploads died with it) and any whose lease expired."""

        def recover(conn: sa.Connection) -> list[AbandonedAttempt]:
            rows = conn.execute(
                sa.select(versions.c.adapter_id, versions.c.version, versions.c.attempt_id).where(
                    versions.c.state == VersionState.PENDING,
                    sa.or_(versions.c.owner == owner, versions.c.lease_until_us <= _now_us()),
                )
            ).all()
            for adapter_id, version, _ in rows:
                conn.execute(
                    versions.delete().where(
                        versions.c.adapter_id == adapter_id,
                        versions.c.version == version,
                        versions.c.state == VersionState.PENDING,
                    )
                )
            return [AbandonedAttempt(*row) for row in rows]

        return await self.write(recover)

    # -- reading --------------------------------------------------------------

    async def get_version(self, adapter_id: str, version: int) -> Version:
        return await self.read(lambda conn: _version_in(conn, adapter_id, version))

    async def list_versions(
        self, adapter_id: str, *, include_inactive: bool, after: int, limit: int
    ) -> list[Version]:
        query = (
            sa.select(versions)
            .where(versions.c.adapter_id == adapter_id, versions.c.version > after)
            .order_by(versions.c.version)
            .limit(limit)
        )
        if not include_inactive:
            query = query.where(versions.c.state == VersionState.READY)

        def list_(conn: sa.Connection) -> list[Version]:
            row = _adapter_row(conn, adapter_id, lock=False)
            rows = conn.execute(query).all()
            alias_map = _alias_map(conn, adapter_id)
            return [_version(r, alias_map.get(r.version, ()), row.latest_version) for r in rows]

        return await self.read(list_)

    async def resolve(self, adapter_id: str, *, version: int, alias: str) -> Version:
        """The READY version a selector names (``version`` wins when non-zero;
        ``alias`` "" or "latest" means the latest READY one).

        Raises:
            NotFound: ADAPTER_NOT_FOUND, NO_READY_VERSION, ALIAS_NOT_FOUND,
                VERSION_NOT_FOUND.
            FailedPrecondition: VERSION_NOT_READY.
        """

        def resolve(conn: sa.Connection) -> Version:
            row = _adapter_row(conn, adapter_id, lock=False)
            if version:
                number = version
            elif alias in ("", LATEST):
                number = row.latest_version
                if number == 0:
                    raise NotFound(
                        f"adapter {adapter_id!r} has no READY version yet",
                        reason="NO_READY_VERSION",
                        metadata={"adapter_id": adapter_id},
                    )
            else:
                number = conn.execute(
                    sa.select(aliases.c.version).where(
                        aliases.c.adapter_id == adapter_id, aliases.c.alias == alias
                    )
                ).scalar()
                if number is None:
                    raise NotFound(
                        f"adapter {adapter_id!r} has no alias {alias!r}",
                        reason="ALIAS_NOT_FOUND",
                        metadata={"adapter_id": adapter_id, "alias": alias},
                    )
            return _version_in(conn, adapter_id, number, adapter_row=row)

        found = await self.read(resolve)
        if found.state != VersionState.READY:
            raise FailedPrecondition(
                f"adapters/{adapter_id}/versions/{found.version} is {found.state}, not READY",
                reason="VERSION_NOT_READY",
                metadata={
                    "adapter_id": adapter_id,
                    "version": str(found.version),
                    "state": found.state,
                },
            )
        return found

    # -- aliases --------------------------------------------------------------

    async def set_alias(
        self,
        adapter_id: str,
        alias: str,
        version: int,
        expected_current: int | None,
        record: IdempotencyRecord | None = None,
    ) -> Version:
        def set_(conn: sa.Connection) -> Version:
            _adapter_row(conn, adapter_id, lock=True)
            target = _version_in(conn, adapter_id, version)
            if target.state != VersionState.READY:
                raise FailedPrecondition(
                    f"adapters/{adapter_id}/versions/{version} is {target.state}, not READY",
                    reason="VERSION_NOT_READY",
                    metadata={"adapter_id": adapter_id, "version": str(version)},
                )
            current = conn.execute(
                sa.select(aliases.c.version).where(
                    aliases.c.adapter_id == adapter_id, aliases.c.alias == alias
                )
            ).scalar()
            if expected_current is not None and (current or 0) != expected_current:
                raise Aborted(
                    f"alias {alias!r} points at {current or 'nothing'}, expected"
                    f" {expected_current or 'nothing'}",
                    reason="ALIAS_CONFLICT",
                    metadata={"alias": alias, "current_version": str(current or 0)},
                )
            values = {"version": version, "update_time_us": _now_us()}
            if current is None:
                conn.execute(aliases.insert().values(adapter_id=adapter_id, alias=alias, **values))
            else:
                conn.execute(
                    aliases.update()
                    .where(aliases.c.adapter_id == adapter_id, aliases.c.alias == alias)
                    .values(**values)
                )
            result = _version_in(conn, adapter_id, version)
            _store_record(conn, record, result)
            return result

        return await self.write(set_)

    async def delete_alias(
        self, adapter_id: str, alias: str, record: IdempotencyRecord | None = None
    ) -> None:
        def delete(conn: sa.Connection) -> None:
            _adapter_row(conn, adapter_id, lock=True)
            result = conn.execute(
                aliases.delete().where(aliases.c.adapter_id == adapter_id, aliases.c.alias == alias)
            )
            if result.rowcount == 0:
                raise NotFound(
                    f"adapter {adapter_id!r} has no alias {alias!r}",
                    reason="ALIAS_NOT_FOUND",
                    metadata={"adapter_id": adapter_id, "alias": alias},
                )
            _store_record(conn, record, None)

        await self.write(delete)

    async def list_aliases(self, adapter_id: str) -> list[tuple[str, int]]:
        def list_(conn: sa.Connection) -> list[tuple[str, int]]:
            row = _adapter_row(conn, adapter_id, lock=False)
            rows = conn.execute(
                sa.select(aliases.c.alias, aliases.c.version)
                .where(aliases.c.adapter_id == adapter_id)
                .order_by(aliases.c.alias)
            ).all()
            out = [(alias, version) for alias, version in rows]
            if row.latest_version:
                out.insert(0, (LATEST, row.latest_version))
            return out

        return await self.read(list_)

    # -- deletion and retention -----------------------------------------------

    async def delete_version(
        self, adapter_id: str, version: int, record: IdempotencyRecord | None = None
    ) -> tuple[Version, Version]:
        """READY -> DELETED unless an alias (``latest`` included) points at it.

        Returns (the version before, the version after); the caller deletes the
        blobs named by the first after the commit.
        """

        def delete(conn: sa.Connection) -> tuple[Version, Version]:
            before = _version_in(conn, adapter_id, version, lock=True)
            if before.aliases:
                raise FailedPrecondition(
                    f"adapters/{adapter_id}/versions/{version} is aliased as"
                    f" {list(before.aliases)}; move the alias first",
                    reason="VERSION_ALIASED",
                    metadata={"adapter_id": adapter_id, "version": str(version)},
                )
            if before.state == VersionState.PENDING:
                raise FailedPrecondition(
                    f"adapters/{adapter_id}/versions/{version} is still being published",
                    reason="VERSION_NOT_READY",
                    metadata={"adapter_id": adapter_id, "version": str(version)},
                )
            if before.state == VersionState.READY:
                _mark_deleted(conn, adapter_id, version)
            after = _version_in(conn, adapter_id, version)
            _store_record(conn, record, after)
            return before, after

        return await self.write(delete)

    async def apply_retention(
        self, adapter_id: str, *, keep_last: int, min_age_s: float
    ) -> RetentionOutcome:
        """Mark DELETED every READY version beyond the newest ``keep_last`` that no
        alias points at and that is older than ``min_age_s``; return them as they
        were (with their URIs) for blob removal, and when the next one comes of age."""
        if keep_last <= 0:
            return RetentionOutcome([], None)
        cutoff = _now_us() - int(min_age_s * 1e6)
        # Most publishes retire nothing: either no version is past the newest
        # keep_last, or those that are are still younger than min_age_s. Find
        # that out without taking the write lock every other publish queues on.
        oldest = await self.read(lambda conn: _oldest_retirable_us(conn, adapter_id, keep_last))
        if oldest is None or oldest > cutoff:
            return RetentionOutcome([], _due_s(oldest, min_age_s))

        def retire(conn: sa.Connection) -> RetentionOutcome:
            row = _adapter_row(conn, adapter_id, lock=True)
            ready = conn.execute(
                sa.select(versions)
                .where(versions.c.adapter_id == adapter_id, versions.c.state == VersionState.READY)
                .order_by(versions.c.version.desc())
            ).all()
            alias_map = _alias_map(conn, adapter_id)
            retirable = [
                r
                for r in ready[keep_last:]
                if r.version not in alias_map and r.version != row.latest_version
            ]
            doomed = [r for r in retirable if r.ready_time_us <= cutoff]
            for r in doomed:
                _mark_deleted(conn, adapter_id, r.version)
            young = [r.ready_time_us for r in retirable if r.ready_time_us > cutoff]
            return RetentionOutcome(
                [_version(r, (), row.latest_version) for r in doomed],
                _due_s(min(young, default=None), min_age_s),
            )

        return await self.write(retire)

    # -- durable copies -------------------------------------------------------

    async def add_durable_uri(
        self, adapter_id: str, version: int, attempt_id: str, uri: str
    ) -> bool:
        """Record a verified durable copy; False if the version is no longer READY
        (deleted meanwhile: the caller removes the copy again)."""
        update = (
            versions.update()
            .where(
                versions.c.adapter_id == adapter_id,
                versions.c.version == version,
                versions.c.attempt_id == attempt_id,
                versions.c.state == VersionState.READY,
            )
            .values(durable_uri=uri)
        )
        return await self.write(lambda conn: conn.execute(update).rowcount == 1)

    async def versions_without_durable_copy(self) -> list[Version]:
        query = (
            sa.select(versions)
            .where(versions.c.state == VersionState.READY, versions.c.durable_uri == "")
            .order_by(versions.c.adapter_id, versions.c.version)
        )
        rows = await self.read(lambda conn: conn.execute(query).all())
        return [_version(r, (), 0) for r in rows]

    # -- watching -------------------------------------------------------------

    async def latest_versions(self, adapter_ids: Iterable[str] | None) -> dict[str, int]:
        query = sa.select(adapters.c.adapter_id, adapters.c.latest_version)
        if adapter_ids is not None:
            query = query.where(adapters.c.adapter_id.in_(list(adapter_ids)))
        rows = await self.read(lambda conn: conn.execute(query).all())
        return {a: v for a, v in rows}

    async def ready_versions_after(
        self, cursors: dict[str, int], adapter_ids: Iterable[str] | None, default_cursor: int
    ) -> tuple[list[Version], dict[str, int]]:
        """READY versions newer than each adapter's cursor, oldest first, plus the
        advanced cursors (one consistent snapshot)."""
        query = sa.select(adapters.c.adapter_id, adapters.c.latest_version)
        if adapter_ids is not None:
            query = query.where(adapters.c.adapter_id.in_(list(adapter_ids)))

        def scan(conn: sa.Connection) -> tuple[list[Version], dict[str, int]]:
            found: list[Version] = []
            advanced = dict(cursors)
            latest = {a: v for a, v in conn.execute(query)}
            for adapter_id, latest_version in sorted(latest.items()):
                cursor = cursors.get(adapter_id, default_cursor)
                if latest_version <= cursor:
                    advanced.setdefault(adapter_id, cursor)
                    continue
                rows = conn.execute(
                    sa.select(versions)
                    .where(
                        versions.c.adapter_id == adapter_id,
                        versions.c.version > cursor,
                        versions.c.version <= latest_version,
                        versions.c.state == VersionState.READY,
                    )
                    .order_by(versions.c.version)
                ).all()
                alias_map = _alias_map(conn, adapter_id) if rows else {}
                found.extend(
                    _version(r, alias_map.get(r.version, ()), latest_version) for r in rows
                )
                advanced[adapter_id] = latest_version
            return found, advanced

        return await self.read(scan)


# -- statements shared by the transactions above ---------------------------------


def _adapter_row(conn: sa.Connection, adapter_id: str, *, lock: bool) -> Any:
    query = sa.select(adapters).where(adapters.c.adapter_id == adapter_id)
    if lock:
        query = query.with_for_update()
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(
            f"adapter {adapter_id!r} does not exist",
            reason="ADAPTER_NOT_FOUND",
            metadata={"adapter_id": adapter_id},
        )
    return row


def _alias_map(conn: sa.Connection, adapter_id: str) -> dict[int, list[str]]:
    rows = conn.execute(
        sa.select(aliases.c.alias, aliases.c.version).where(aliases.c.adapter_id == adapter_id)
    )
    out: dict[int, list[str]] = {}
    for alias, version in rows:
        out.setdefault(version, []).append(alias)
    return out


def _version_in(
    conn: sa.Connection,
    adapter_id: str,
    version: int,
    *,
    lock: bool = False,
    adapter_row: Any = None,
) -> Version:
    """One version with its aliases (``adapter_row``: the adapter's row when the
    transaction has already read it)."""
    if adapter_row is None:
        adapter_row = _adapter_row(conn, adapter_id, lock=lock)
    row = conn.execute(
        sa.select(versions).where(
            versions.c.adapter_id == adapter_id, versions.c.version == version
        )
    ).first()
    if row is None:
        raise NotFound(
            f"adapters/{adapter_id}/versions/{version} does not exist",
            reason="VERSION_NOT_FOUND",
            metadata={"adapter_id": adapter_id, "version": str(version)},
        )
    alias_map = _alias_map(conn, adapter_id)
    return _version(row, alias_map.get(version, ()), adapter_row.latest_version)


def _take_over_pending(
    conn: sa.Connection, adapter_row: Any, *, request_id: str, now: int
) -> list[AbandonedAttempt]:
    """Delete the adapter's PENDING attempt when it is this request's earlier
    try or its lease ran out, and return it; raise when a live one holds it."""
    adapter_id = adapter_row.adapter_id
    pending = conn.execute(
        sa.select(versions).where(
            versions.c.adapter_id == adapter_id, versions.c.state == VersionState.PENDING
        )
    ).all()
    abandoned: list[AbandonedAttempt] = []
    for p in pending:
        if (request_id and p.request_id == request_id) or p.lease_until_us <= now:
            conn.execute(
                versions.delete().where(
                    versions.c.adapter_id == adapter_id, versions.c.version == p.version
                )
            )
            abandoned.append(AbandonedAttempt(adapter_id, p.version, p.attempt_id))
            continue
        raise Aborted(
            f"version {p.version} of {adapter_id!r} is being published by another"
            " request; re-read the latest version and retry",
            reason="PUBLISH_IN_PROGRESS",
            metadata={
                "adapter_id": adapter_id,
                "latest_version": str(adapter_row.latest_version),
                "pending_version": str(p.version),
            },
        )
    return abandoned


def _mark_deleted(conn: sa.Connection, adapter_id: str, version: int) -> None:
    conn.execute(
        versions.update()
        .where(versions.c.adapter_id == adapter_id, versions.c.version == version)
        .values(state=VersionState.DELETED, source_uri="", durable_uri="")
    )


def _oldest_retirable_us(conn: sa.Connection, adapter_id: str, keep_last: int) -> int | None:
    """Ready time of the oldest READY version past the newest ``keep_last`` that
    no alias holds (None: there is none)."""
    past_kept = (
        sa.select(versions.c.version, versions.c.ready_time_us)
        .where(versions.c.adapter_id == adapter_id, versions.c.state == VersionState.READY)
        .order_by(versions.c.version.desc())
        .offset(keep_last)
        .subquery()
    )
    aliased = sa.select(aliases.c.version).where(aliases.c.adapter_id == adapter_id)
    return conn.execute(
        sa.select(sa.func.min(past_kept.c.ready_time_us)).where(past_kept.c.version.not_in(aliased))
    ).scalar()
