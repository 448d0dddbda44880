"""Leader election over the service's own SQL database, with fenced writes.

Replicas of a service that must act alone (the scheduler drives each running
experiment from exactly one process) share one row per lease. The replica whose
`token` is in the row leads; the others wait as standbys and take over when the
row stops changing.

Why the rules are what they are:

- **Expiry is judged on the candidate's own clock.** A standby notes when it last
  saw the row change (`renewals` moves on every renewal) and takes over only
  after `duration_s` of its own monotonic time without a change, so clocks that
  disagree between machines cannot shorten a lease.
- **Every change to the row is a compare-and-swap** on (`token`, `renewals`):
  of two standbys that both saw the lease expire, one wins.
- **The leader gives up before anyone may take over.** It counts itself leader
  only while its last successful renewal *started* less than
  `renew_deadline_s` (< `duration_s`) ago, on its own clock.
- **Writes are fenced in the database.** `fence(conn)` runs inside the
  caller's write transaction and fails it unless this process still holds the
  row (PostgreSQL: the row is read FOR SHARE, so a takeover waits for the write
  to commit; SQLite: write transactions are serialised). A leader that was
  paused past its lease cannot write a single row after the takeover, whatever
  it believed when it woke up.
- **Each holding has a fencing token that only grows**: `renewals` after the
  acquiring write, plus one (the row's `renewals` never goes back, and every
  write to it adds one). Other services that the leader drives can refuse a
  call whose token is below the highest they have seen, which the database's
  fence cannot do for them.
- **A replica restarted under the same `holder` name takes its lease back at
  once**, instead of waiting out its own dead predecessor's lease. Two live
  processes given the same name would take it from each other (and step down
  each time), never lead together; names must be unique per replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import sqlalchemy as sa
import structlog
from sqlalchemy.exc import IntegrityError

from lorafleet.core.database import Database
from lorafleet.core.errors import Unavailable

log = structlog.get_logger(__name__)


def lease_table(name: str, metadata: sa.MetaData) -> sa.Table:
    """One row per lease, named by the service that owns it."""
    return sa.Table(
        name,
        metadata,
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.String(255), nullable=False),
        sa.Column("holder_address", sa.String(255), nullable=False),
        sa.Column("token", sa.String(64), nullable=False),
        sa.Column("renewals", sa.BigInteger, nullable=False),
        # Wall-clock times for people reading the table; no decision uses them.
        sa.Column("acquired_at", sa.Float, nullable=False),
        sa.Column("renewed_at", sa.Float, nullable=False),
    )


class NotLeader(Unavailable):
    """This replica does not hold the lease (a standby, or a leader that lost it).

    UNAVAILABLE, so clients retry; behind a balancer that follows health, the
    retry reaches the leader."""

    reason = "NOT_LEADER"


@dataclass(frozen=True)
class LeaseHolder:
    holder: str
    address: str


@dataclass(frozen=True)
class _Seen:
    token: str
    renewals: int
    at: float  # monotonic time at which this replica first saw (token, renewals)


class LeaderLease:
    """One replica's side of the lease `name` in `table`."""

    def __init__(
        self,
        db: Database,
        table: sa.Table,
        name: str,
        *,
        holder: str,
        address: str = "",
        duration_s: float = 15.0,
        renew_deadline_s: float = 10.0,
        retry_period_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < retry_period_s < renew_deadline_s < duration_s:
            raise ValueError(
                "lease timings must satisfy 0 < retry_period_s < renew_deadline_s < duration_s"
                f" (got {retry_period_s}, {renew_deadline_s}, {duration_s})"
            )
        self.db = db
        self.table = table
        self.name = name
        self.holder = holder
        self.address = address
        self.duration_s = duration_s
        self.renew_deadline_s = renew_deadline_s
        self.retry_period_s = retry_period_s
        self._clock = clock
        self.token = uuid.uuid4().hex
        self._renewed_at: float | None = None  # start of the last successful renewal
        self._seen: _Seen | None = None
        self._lost = False
        self.fencing_token = 0  # set on acquiring the lease; 0 while never held
        # Built once: the fence runs in every fenced write transaction.
        self._fence_query = (
            sa.select(table.c.token).where(table.c.name == name).with_for_update(read=True)
        )

    # -- state ------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        """True while this replica holds the lease by its own clock."""
        return (
            not self._lost
            and self._renewed_at is not None
            and self._clock() - self._renewed_at < self.renew_deadline_s
        )

    def fence(self, conn: sa.Connection) -> None:
        """Fail the caller's write transaction unless this process holds the lease.

        Run it first in every transaction that only the leader may commit."""
        if conn.execute(self._fence_query).scalar() != self.token:
            raise NotLeader(
                f"replica {self.holder!r} no longer holds the {self.name!r} lease",
            )

    async def current(self) -> LeaseHolder | None:
        """Who holds the lease now, as the row says (None: nobody yet or released)."""
        query = sa.select(self.table).where(self.table.c.name == self.name)
        row = await self.db.read(lambda conn: conn.execute(query).first())
        if row is None or not row.token:
            return None
        return LeaseHolder(row.holder, row.holder_address)

    # -- one round ----------------------------------------------------------------------

    async def try_acquire_or_renew(self) -> bool:
        """Renew the lease if this replica holds it, else take it if it is free,
        expired or held under this replica's own name; True if held afterwards."""
        started = self._clock()
        try:
            held = await self.db.write(lambda conn: self._round(conn, started))
        except IntegrityError:
            held = False  # another replica created the row first
        if held:
            self._renewed_at = started
        elif self._renewed_at is not None:
            self._lost = True  # someone else holds it now: never lead again
        return held

    def _round(self, conn: sa.Connection, now: float) -> bool:
        t = self.table
        row = conn.execute(sa.select(t).where(t.c.name == self.name)).first()
        wall = time.time()
        if row is None:
            conn.execute(
                sa.insert(t).values(
                    name=self.name,
                    holder=self.holder,
                    holder_address=self.address,
                    token=self.token,
                    renewals=0,
                    acquired_at=wall,
                    renewed_at=wall,
                )
            )
            self.fencing_token = 1
            log.info("lease_acquired", lease=self.name, holder=self.holder, previous="")
            return True
        if row.token == self.token:
            if self._lost:
                return False
            return self._swap(conn, row, renewed_at=wall)
        if self._renewed_at is not None or self._lost:
            return False  # it was ours and someone took it over
        seen = self._seen
        if seen is None or (seen.token, seen.renewals) != (row.token, row.renewals):
            self._seen = seen = _Seen(row.token, row.renewals, now)
        free = not row.token
        restarted = row.holder == self.holder
        expired = now - seen.at >= self.duration_s
        if not (free or restarted or expired):
            return False
        if self._swap(conn, row, renewed_at=wall, acquired_at=wall):
            self.fencing_token = row.renewals + 2  # above every earlier holder's
            log.info(
                "lease_acquired",
                lease=self.name,
                holder=self.holder,
                previous=row.holder,
                why="free" if free else "same holder restarted" if restarted else "expired",
            )
            return True
        return False

    def _swap(self, conn: sa.Connection, row: sa.Row, **times: float) -> bool:
        t = self.table
        update = (
            sa.update(t)
            .where(t.c.name == self.name, t.c.token == row.token, t.c.renewals == row.renewals)
            .values(
                holder=self.holder,
                holder_address=self.address,
                token=self.token,
                renewals=row.renewals + 1,
                **times,
            )
        )
        return conn.execute(update).rowcount == 1

    async def release(self) -> None:
        """Give the lease up now (a clean stop), so a standby need not wait it out."""
        if self._renewed_at is None or self._lost:
            return
        self._lost = True
        t = self.table
        update = (
            sa.update(t)
            .where(t.c.name == self.name, t.c.token == self.token)
            .values(holder="", holder_address="", token="", renewals=t.c.renewals + 1)
        )
        try:
            await self.db.write(lambda conn: conn.execute(update))
        except Exception as exc:  # the standbys will wait it out instead
            log.warning("lease_release_failed", lease=self.name, error=str(exc))
            return
        log.info("lease_released", lease=self.name, holder=self.holder)

    # -- the loop -----------------------------------------------------------------------

    async def run(
        self,
        on_elected: Callable[[], Awaitable[None]],
        on_lost: Callable[[str], Awaitable[None]],
    ) -> None:
        """Campaign until elected, call `on_elected`, then renew until the lease is
        lost and call `on_lost(reason)` (once; this replica never leads again)."""
        while not await self._attempt():
            await asyncio.sleep(self.retry_period_s)
        try:
            await on_elected()
        except Exception as exc:
            # Holding a lease it cannot act on would keep every standby out.
            log.exception("lease_takeover_failed", lease=self.name)
            await self.release()
            await on_lost(f"could not take over: {exc}")
            return
        while True:
            await asyncio.sleep(self.retry_period_s)
            if await self._attempt():
                continue
            if self._lost:
                await on_lost("another replica holds the lease")
                return
            if not self.leading:
                self._lost = True
                await on_lost(f"could not renew the lease within {self.renew_deadline_s:g} s")
                return

    async def _attempt(self) -> bool:
        try:
            return await self.try_acquire_or_renew()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the database is unreachable: try again next period
            log.warning("lease_round_failed", lease=self.name, error=str(exc))
            return False
