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
re-create what the new owner dropped. It is kept in memory: a restarted trainer
has no adapters either, and the new owner's next call sets the token again.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from google.protobuf.message import Message

from lorafleet.core.errors import FailedPrecondition


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
    in_flight: Counter[int] = field(default_factory=Counter)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)


class AdapterFences:
    """The highest fencing token per adapter id, and the calls holding each."""

    def __init__(self) -> None:
        self._fences: dict[str, _Fence] = {}

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
            fence.highest = token
            async with fence.changed:
                # Calls of older owners already running finish first; the new
                # ones are refused by the check above from now on.
                await fence.changed.wait_for(
                    lambda: not any(n for t, n in fence.in_flight.items() if t < token)
                )
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

    @staticmethod
    def _check(adapter_id: str, fence: _Fence, token: int) -> None:
        if token < fence.highest:
            raise StaleFencingToken(
                f"fencing token {token} for adapter {adapter_id!r} is stale: the trainer has"
                f" seen {fence.highest} (a newer scheduler leader owns the adapter)",
                metadata={"adapter_id": adapter_id, "highest_fencing_token": str(fence.highest)},
            )
