"""Fencing tokens: a deposed owner of an adapter cannot change it.

The scheduler that drives an experiment sends its leader lease's fencing token
(`lorafleet.core.lease`) with every call that changes the experiment's adapter.
Tokens only grow from one leader to the next. The lease already keeps a
deposed leader's writes out of the scheduler's database, but the trainer is
another process: a leader paused past its lease could wake in the middle of a
step and send its next ForwardBackward or SaveVersion after the new leader has
restored the adapter, mixing two leaders' gradients or publishing a version the
new leader does not know about. Here the trainer keeps, per adapter id, the
highest token seen, and:

- refuses a call whose token is lower (FAILED_PRECONDITION,
  STALE_FENCING_TOKEN): the caller has been replaced;
- lets a call that raises the token start only after every call with a lower
  token still in flight has finished, so the new owner never overlaps the old
  one's last call (as a takeover waits for a fenced database write);
- lets calls with token 0 through unchecked: callers that drive the trainer
  themselves and take no part in fencing.

The highest token outlives the adapter (DropAdapter), so a stale caller cannot
re-create what the new owner dropped, and it outlives the process: each raise is
appended to a journal (:class:`FenceJournal`, next to the state checkpoints)
before the call runs, and a restarted trainer reads it back. Without it, a
deposed leader that reached the restarted trainer before the new leader would
be taken for the owner until the new leader's next call.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from google.protobuf.message import Message

from lorafleet.core.errors import FailedPrecondition

log = structlog.get_logger(__name__)

# In the trainer's state directory; not an adapter id (ids have no dots), so it
# cannot collide with an adapter's checkpoint directory.
FENCE_JOURNAL_NAME = "fencing-tokens.jsonl"


class StaleFencingToken(FailedPrecondition):
    reason = "STALE_FENCING_TOKEN"


def stamp(request: Message, token: int) -> None:
    """Set `token` on a trainer request that changes an adapter (the ones with a
    `fencing_token` field); reads have none and are left as they are."""
    if "fencing_token" in request.DESCRIPTOR.fields_by_name:
        request.fencing_token = token  # type: ignore[attr-defined]


@dataclass
class _Fence:
    highest: int = 0
    recorded: int = 0  # the highest token in the journal (with one)
    recording: asyncio.Lock = field(default_factory=asyncio.Lock)
    in_flight: Counter[int] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class FenceJournal:
    """The highest fencing token per adapter id, on disk: one JSON line per raise.

    Appending costs one small synced write per adapter per change of scheduler
    leader, which is rare. Reading takes the highest token per adapter and
    rewrites the file with one line each; once read, the journal also rewrites
    itself that way whenever its lines exceed twice its adapters plus
    ``compact_slack``, so a long-lived trainer under a flapping leadership
    keeps a bounded file. A torn last line (a crash mid-append) is skipped: its
    call had not started.
    """

    def __init__(self, path: Path, *, compact_slack: int = 64) -> None:
        self.path = path
        self.compact_slack = compact_slack
        self._highest: dict[str, int] | None = None  # known once read
        self._lines = 0
        self._lock = threading.Lock()  # appends run in worker threads

    def read(self) -> dict[str, int]:
        highest: dict[str, int] = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            with self._lock:
                self._highest, self._lines = {}, 0
            return highest
        for number, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
                adapter_id, token = str(entry["adapter_id"]), int(entry["token"])
            except (ValueError, KeyError, TypeError):
                log.warning("fencing_journal_line_skipped", path=str(self.path), line=number)
                continue
            highest[adapter_id] = max(token, highest.get(adapter_id, 0))
        with self._lock:
            self._rewrite(highest)
            self._highest, self._lines = dict(highest), len(highest)
        return highest

    def append(self, adapter_id: str, token: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"adapter_id": adapter_id, "token": token}) + "\n"
        with self._lock:
            with self.path.open("a", encoding="utf-8") as out:
                out.write(line)
                out.flush()
                os.fsync(out.fileno())
            self._lines += 1
            if self._highest is None:
                return  # never read: the file may hold tokens we do not know
            self._highest[adapter_id] = max(token, self._highest.get(adapter_id, 0))
            if self._lines > 2 * len(self._highest) + self.compact_slack:
                try:
                    self._rewrite(self._highest)
                except OSError as exc:
                    # The raise itself is on disk; compacting can wait.
                    log.warning("fencing_journal_compaction_failed", error=str(exc))
                else:
                    self._lines = len(self._highest)

    @property
    def lines(self) -> int:
        """Lines in the file as this journal wrote or read them."""
        return self._lines

    def _rewrite(self, highest: dict[str, int]) -> None:
        staging = self.path.with_name(self.path.name + ".tmp")
        with staging.open("w", encoding="utf-8") as out:
            for adapter_id, token in sorted(highest.items()):
                out.write(json.dumps({"adapter_id": adapter_id, "token": token}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(staging, self.path)


class AdapterFences:
    """The highest fencing token per adapter id, and the calls holding each.

    With a journal, the tokens of an earlier run of the trainer are read back,
    and every raise is on disk before the call that raised it runs.
    """

    def __init__(self, journal: FenceJournal | None = None) -> None:
        self._journal = journal
        self._fences: dict[str, _Fence] = {}
        if journal is not None:
            for adapter_id, token in journal.read().items():
                self._fences[adapter_id] = _Fence(highest=token, recorded=token)

    def highest(self, adapter_id: str) -> int:
        fence = self._fences.get(adapter_id)
        return 0 if fence is None else fence.highest

    @asynccontextmanager
    async def hold(self, adapter_id: str, token: int) -> AsyncIterator[None]:
        """Run the block as a call of `token` on `adapter_id`, or raise
        StaleFencingToken if a newer owner has been seen."""
        if token <= 0:
            yield
            return
        fence = self._fences.setdefault(adapter_id, _Fence())
        self._check(adapter_id, fence, token)
        if token > fence.highest:
            fence.highest = token  # from here on, older owners are refused
        if self._journal is not None and fence.recorded < token:
            await self._record(adapter_id, fence, token)
        if any(t < token for t in fence.in_flight):
            async with fence.changed:
                # Calls of older owners already running finish first; the new
                # ones are refused by the check above from now on.
                await fence.changed.wait_for(lambda: not any(t < token for t in fence.in_flight))
        self._check(adapter_id, fence, token)  # a newer owner came while we waited
        fence.in_flight[token] += 1
        try:
            yield
        finally:
            fence.in_flight[token] -= 1
            if not fence.in_flight[token]:
                del fence.in_flight[token]
            async with fence.changed:
                fence.changed.notify_all()

    async def _record(self, adapter_id: str, fence: _Fence, token: int) -> None:
        """Put `token` in the journal before any call of it runs; concurrent
        calls of the same token wait for the one write (and if it fails, the
        next of them tries again)."""
        assert self._journal is not None
        async with fence.recording:
            if fence.recorded < token:
                await asyncio.to_thread(self._journal.append, adapter_id, token)
                fence.recorded = token

    @staticmethod
    def _check(adapter_id: str, fence: _Fence, token: int) -> None:
        if token < fence.highest:
            raise StaleFencingToken(
                f"fencing token {token} for adapter {adapter_id!r} is stale: the trainer has"
                f" seen {fence.highest} (a newer scheduler leader owns the adapter)",
                metadata={"adapter_id": adapter_id, "highest_fencing_token": str(fence.highest)},
            )
