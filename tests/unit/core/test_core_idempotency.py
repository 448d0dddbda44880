from __future__ import annotations

import asyncio

import pytest
from core_echo import EchoRequest
from google.protobuf import wrappers_pb2

from lorafleet.core import errors
from lorafleet.core.idempotency import (
    InMemoryIdempotencyStore,
    StoredResponse,
    fingerprint_of,
    once,
)

I64 = wrappers_pb2.Int64Value
SCOPE = "/lorafleet.testing.v1.EchoService/Remember"


class Counted:
    """An fn for ``once`` that counts runs and can be told to fail or wait."""

    def __init__(self, *, fail_first: int = 0, delay_s: float = 0.0) -> None:
        self.runs = 0
        self.fail_first = fail_first
        self.delay_s = delay_s

    async def __call__(self) -> I64:
        self.runs += 1
        await asyncio.sleep(self.delay_s)
        if self.runs <= self.fail_first:
            raise errors.Unavailable("flaky backend")
        return I64(value=self.runs)


def test_fingerprint_ignores_request_id_only():
    a = EchoRequest(request_id="r1", text="hello", count=2)
    b = EchoRequest(request_id="r2", text="hello", count=2)
    c = EchoRequest(request_id="r1", text="hello", count=3)
    assert fingerprint_of(a) == fingerprint_of(b)
    assert fingerprint_of(a) != fingerprint_of(c)
    assert a.request_id == "r1"  # the caller's message is not modified
    assert len(fingerprint_of(I64(value=1))) == 32  # messages without request_id work too


async def test_replay_returns_first_answer_without_running_again():
    store, fn = InMemoryIdempotencyStore(), Counted()
    first = await once(store, SCOPE, "r1", b"fp", fn, I64)
    second = await once(store, SCOPE, "r1", b"fp", fn, I64)
    assert first == second == I64(value=1)
    assert fn.runs == 1
    # Scopes are separate namespaces.
    assert (await once(store, "/other/Method", "r1", b"fp", fn, I64)).value == 2


async def test_reuse_with_different_request_rejected():
    store, fn = InMemoryIdempotencyStore(), Counted()
    await once(store, SCOPE, "r1", b"fp-a", fn, I64)
    with pytest.raises(errors.InvalidArgument) as info:
        await once(store, SCOPE, "r1", b"fp-b", fn, I64)
    assert info.value.reason == "REQUEST_ID_REUSED"
    assert fn.runs == 1


async def test_empty_request_id_runs_every_time_or_is_required():
    store, fn = InMemoryIdempotencyStore(), Counted()
    await once(store, SCOPE, "", b"fp", fn, I64)
    await once(store, SCOPE, "", b"fp", fn, I64)
    assert fn.runs == 2
    assert len(store) == 0
    with pytest.raises(errors.InvalidArgument) as info:
        await once(store, SCOPE, "", b"fp", fn, I64, required=True)
    assert info.value.reason == "REQUEST_ID_REQUIRED"
    assert fn.runs == 2
    with pytest.raises(errors.InvalidArgument) as info:
        await once(store, SCOPE, "x" * 129, b"fp", fn, I64)
    assert info.value.reason == "INVALID_REQUEST_ID"


async def test_concurrent_duplicates_run_once():
    store, fn = InMemoryIdempotencyStore(), Counted(delay_s=0.05)
    answers = await asyncio.gather(*(once(store, SCOPE, "r1", b"fp", fn, I64) for _ in range(10)))
    assert fn.runs == 1
    assert {a.value for a in answers} == {1}


async def test_different_ids_do_not_serialize():
    store, fn = InMemoryIdempotencyStore(), Counted(delay_s=0.2)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await asyncio.gather(*(once(store, SCOPE, f"r{i}", b"fp", fn, I64) for i in range(5)))
    assert fn.runs == 5
    assert loop.time() - start < 0.6  # 5 x 0.2 s if they had waited on each other


async def test_failure_is_not_stored():
    store, fn = InMemoryIdempotencyStore(), Counted(fail_first=1)
    with pytest.raises(errors.Unavailable):
        await once(store, SCOPE, "r1", b"fp", fn, I64)
    assert await store.get(SCOPE, "r1") is None
    assert (await once(store, SCOPE, "r1", b"fp", fn, I64)).value == 2
    assert (await once(store, SCOPE, "r1", b"fp", fn, I64)).value == 2
    assert fn.runs == 2


async def test_ttl_expiry():
    now = [0.0]
    store = InMemoryIdempotencyStore(ttl_s=10, clock=lambda: now[0])
    await store.put(SCOPE, "r1", StoredResponse(b"fp", b"x"))
    now[0] = 9.9
    assert (await store.get(SCOPE, "r1")).response == b"x"
    now[0] = 10.0
    assert await store.get(SCOPE, "r1") is None
    assert len(store) == 0


async def test_lru_eviction():
    store = InMemoryIdempotencyStore(max_entries=2)
    await store.put(SCOPE, "a", StoredResponse(b"fp", b"a"))
    await store.put(SCOPE, "b", StoredResponse(b"fp", b"b"))
    assert await store.get(SCOPE, "a") is not None  # a is now most recently used
    await store.put(SCOPE, "c", StoredResponse(b"fp", b"c"))
    assert await store.get(SCOPE, "b") is None
    assert await store.get(SCOPE, "a") is not None
    assert await store.get(SCOPE, "c") is not None
    assert len(store) == 2
