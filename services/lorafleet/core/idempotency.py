"""``request_id`` replay: a retried state-changing call returns the first answer.

Clients put a fresh ``request_id`` (a UUID) on every state-changing request and
reuse it only when retrying that same request. The server remembers the serialized
response per ``(scope, request_id)`` together with a fingerprint of the request,
so a replay gets the byte-identical first answer and a different request that
reuses the id is refused instead of being silently answered with stale data.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
import weakref
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

import structlog
from google.protobuf.message import Message

from lorafleet.core.errors import InvalidArgument

log = structlog.get_logger(__name__)

Msg = TypeVar("Msg", bound=Message)

# Long enough for any UUID/ULID spelling with a client prefix; bounded so a
# client cannot make the store hold arbitrary blobs as keys.
MAX_REQUEST_ID_LENGTH = 128


@dataclasses.dataclass(frozen=True)
class StoredResponse:
    """What a store keeps for one ``(scope, request_id)``."""

    fingerprint: bytes
    """sha256 of the request (request_id cleared), see ``fingerprint_of``."""
    response: bytes
    """The serialized response message."""
    created_at: float = dataclasses.field(default_factory=time.time)
    """Wall-clock seconds when stored (for durable stores' expiry sweeps)."""


class IdempotencyStore(Protocol):
    """Where first answers live. In memory for stateless services; durable services
    implement it over their SQL database so replays survive restarts."""

    async def get(self, scope: str, request_id: str) -> StoredResponse | None: ...

    async def put(self, scope: str, request_id: str, stored: StoredResponse) -> None: ...


class InMemoryIdempotencyStore:
    """LRU- and TTL-bounded store for services without durable state.

    ``clock`` is monotonic seconds; injectable so expiry is testable without sleeping.
    """

    def __init__(
        self,
        max_entries: int = 10_000,
        ttl_s: float = 3600.0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries <= 0 or ttl_s <= 0:
            raise ValueError("max_entries and ttl_s must be positive")
        self._max_entries = max_entries
        self._ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, StoredResponse]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, scope: str, request_id: str) -> StoredResponse | None:
        key = (scope, request_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        stored_at, stored = entry
        if self._clock() - stored_at >= self._ttl_s:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return stored

    async def put(self, scope: str, request_id: str, stored: StoredResponse) -> None:
        key = (scope, request_id)
        self._entries[key] = (self._clock(), stored)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)


class _KeyLocks:
    """One asyncio.Lock per key while anyone holds or waits for it, then dropped,
    so the table stays as small as the number of in-flight request ids."""

    def __init__(self) -> None:
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}

    def acquire_slot(self, key: tuple[str, str]) -> asyncio.Lock:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        return lock

    def release_slot(self, key: tuple[str, str]) -> None:
        lock, users = self._locks[key]
        if users == 1:
            del self._locks[key]
        else:
            self._locks[key] = (lock, users - 1)


# Locks belong to a store instance (two stores never share request ids) and die
# with it; keyed weakly so tests and short-lived stores do not leak.
_locks_by_store: weakref.WeakKeyDictionary[object, _KeyLocks] = weakref.WeakKeyDictionary()


def fingerprint_of(msg: Message) -> bytes:
    """sha256 of ``msg``'s deterministic serialization with ``request_id`` cleared."""
    if "request_id" in msg.DESCRIPTOR.fields_by_name:
        copy = type(msg)()
        copy.CopyFrom(msg)
        copy.ClearField("request_id")
        msg = copy
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).digest()


async def once(
    store: IdempotencyStore,
    scope: str,
    request_id: str,
    fingerprint: bytes,
    fn: Callable[[], Awaitable[Msg]],
    response_type: type[Msg],
    *,
    required: bool = False,
) -> Msg:
    """Run ``fn`` at most once per ``(scope, request_id)``; replays get its answer.

    ``scope`` is usually the full RPC method name, so ids never collide across RPCs.
    Concurrent duplicates wait for the first and then replay its answer. A failed
    ``fn`` stores nothing: the client's retry runs it again.

    Raises:
        InvalidArgument: ``REQUEST_ID_REQUIRED`` (empty id and ``required``),
            ``INVALID_REQUEST_ID`` (longer than ``MAX_REQUEST_ID_LENGTH``),
            ``REQUEST_ID_REUSED`` (same id, different request).
    """
    if not request_id:
        if required:
            raise InvalidArgument(
                "request_id is required for this call", reason="REQUEST_ID_REQUIRED"
            )
        return await fn()
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidArgument(
            f"request_id is longer than {MAX_REQUEST_ID_LENGTH} characters",
            reason="INVALID_REQUEST_ID",
        )

    locks = _locks_by_store.setdefault(store, _KeyLocks())
    key = (scope, request_id)
    lock = locks.acquire_slot(key)
    try:
        async with lock:
            stored = await store.get(scope, request_id)
            if stored is not None:
                if stored.fingerprint != fingerprint:
                    raise InvalidArgument(
                        "request_id was already used for a different request",
                        reason="REQUEST_ID_REUSED",
                        metadata={"request_id": request_id},
                    )
                log.debug("request_replayed", scope=scope, request_id=request_id)
                return response_type.FromString(stored.response)
            response = await fn()
            await store.put(
                scope,
                request_id,
                StoredResponse(fingerprint=fingerprint, response=response.SerializeToString()),
            )
            return response
    finally:
        locks.release_slot(key)
