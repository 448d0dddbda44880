"""Fencing tokens per adapter: stale owners refused, a new owner waits for the
old owner's calls in flight, token 0 unchecked."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.trainer.fencing import AdapterFences, StaleFencingToken


async def test_a_lower_token_is_refused_once_a_higher_one_was_seen():
    fences = AdapterFences()
    async with fences.hold("exp", 5):
        pass
    with pytest.raises(StaleFencingToken) as caught:
        async with fences.hold("exp", 4):
            raise AssertionError("a stale call ran")
    assert caught.value.reason == "STALE_FENCING_TOKEN"
    assert caught.value.metadata == {"adapter_id": "exp", "highest_fencing_token": "5"}
    async with fences.hold("exp", 5):  # the owner itself, again
        pass
    assert fences.highest("exp") == 5


async def test_adapters_are_fenced_separately_and_zero_is_unchecked():
    fences = AdapterFences()
    async with fences.hold("a", 9):
        pass
    async with fences.hold("b", 2):  # another adapter's history does not count
        pass
    async with fences.hold("a", 0):  # a caller that takes no part in fencing
        pass
    assert (fences.highest("a"), fences.highest("b"), fences.highest("c")) == (9, 2, 0)


async def test_a_new_owner_starts_after_the_old_owners_call_in_flight():
    fences = AdapterFences()
    order: list[str] = []
    old_may_finish = asyncio.Event()

    async def old_call():
        async with fences.hold("exp", 1):
            order.append("old started")
            await old_may_finish.wait()
            order.append("old finished")

    async def new_call():
        async with fences.hold("exp", 2):
            order.append("new started")

    old = asyncio.create_task(old_call())
    await asyncio.sleep(0)
    new = asyncio.create_task(new_call())
    await asyncio.sleep(0.05)
    assert order == ["old started"]  # the new owner waits...
    with pytest.raises(StaleFencingToken):  # ...and the old owner's next call is refused
        async with fences.hold("exp", 1):
            pass
    old_may_finish.set()
    await asyncio.gather(old, new)
    assert order == ["old started", "old finished", "new started"]


async def test_a_waiting_owner_replaced_meanwhile_is_refused():
    fences = AdapterFences()
    release = asyncio.Event()

    async def hold_one():
        async with fences.hold("exp", 1):
            await release.wait()

    first = asyncio.create_task(hold_one())
    await asyncio.sleep(0)

    async def owner(token):
        async with fences.hold("exp", token):
            return token

    second = asyncio.create_task(owner(2))
    await asyncio.sleep(0)
    third = asyncio.create_task(owner(3))
    await asyncio.sleep(0)
    release.set()
    await first
    assert await third == 3
    with pytest.raises(StaleFencingToken):
        await second
    assert fences.highest("exp") == 3


async def test_a_failed_call_releases_its_hold():
    fences = AdapterFences()
    with pytest.raises(RuntimeError):
        async with fences.hold("exp", 1):
            raise RuntimeError("the call failed")
    # Nothing of token 1 is in flight any more: token 2 starts at once.
    await asyncio.wait_for(_enter(fences, "exp", 2), timeout=1)


async def _enter(fences: AdapterFences, adapter_id: str, token: int) -> None:
    async with fences.hold(adapter_id, token):
        pass
