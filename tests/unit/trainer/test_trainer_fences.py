"""Fencing tokens per adapter: stale owners refused, a new owner waits for the
old owner's calls in flight, token 0 unchecked; with a journal, the tokens
outlive the process."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.trainer.fencing import AdapterFences, FenceJournal, StaleFencingToken


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


async def test_every_call_of_the_new_owner_waits_for_the_old_owners_call_in_flight():
    # Not only the call that raised the token: a second call of the new owner
    # made while the old owner's call still runs waits too.
    fences = AdapterFences()
    order: list[str] = []
    old_may_finish = asyncio.Event()

    async def old_call():
        async with fences.hold("exp", 1):
            await old_may_finish.wait()
            order.append("old finished")

    async def new_call(name):
        async with fences.hold("exp", 2):
            order.append(name)

    old = asyncio.create_task(old_call())
    await asyncio.sleep(0)
    first = asyncio.create_task(new_call("new 1"))
    await asyncio.sleep(0)
    second = asyncio.create_task(new_call("new 2"))
    await asyncio.sleep(0.05)
    assert order == []
    old_may_finish.set()
    await asyncio.gather(old, first, second)
    assert order[0] == "old finished" and sorted(order[1:]) == ["new 1", "new 2"]


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


class CountingJournal(FenceJournal):
    """A journal that counts its appends and can fail the next ones."""

    def __init__(self, path, fail_appends: int = 0) -> None:
        super().__init__(path)
        self.appends = 0
        self.fail_appends = fail_appends

    def append(self, adapter_id: str, token: int) -> None:
        self.appends += 1
        if self.fail_appends:
            self.fail_appends -= 1
            raise OSError("disk full")
        super().append(adapter_id, token)


async def test_tokens_outlive_the_process_through_the_journal(tmp_path):
    path = tmp_path / "state" / "fencing-tokens.jsonl"
    fences = AdapterFences(FenceJournal(path))
    await _enter(fences, "a", 3)
    await _enter(fences, "a", 5)
    await _enter(fences, "b", 2)
    await _enter(fences, "a", 0)  # unfenced: not journaled

    restarted = AdapterFences(FenceJournal(path))  # a new trainer process
    assert (restarted.highest("a"), restarted.highest("b")) == (5, 2)
    with pytest.raises(StaleFencingToken):  # the deposed owner, first to call
        await _enter(restarted, "a", 4)
    await _enter(restarted, "a", 5)
    # Reading compacts the journal to one line per adapter.
    assert path.read_text().splitlines() == [
        '{"adapter_id": "a", "token": 5}',
        '{"adapter_id": "b", "token": 2}',
    ]


async def test_a_torn_last_line_is_skipped(tmp_path):
    path = tmp_path / "fencing-tokens.jsonl"
    path.write_text('{"adapter_id": "a", "token": 4}\n{"adapter_id": "a", "tok')
    fences = AdapterFences(FenceJournal(path))
    assert fences.highest("a") == 4
    assert path.read_text() == '{"adapter_id": "a", "token": 4}\n'


async def test_concurrent_calls_of_a_new_token_share_one_journal_write(tmp_path):
    journal = CountingJournal(tmp_path / "j.jsonl")
    fences = AdapterFences(journal)
    await asyncio.gather(*(_enter(fences, "exp", 7) for _ in range(5)))
    await _enter(fences, "exp", 7)
    assert journal.appends == 1


async def test_a_failed_journal_write_fails_the_call_and_still_refuses_older_owners(tmp_path):
    journal = CountingJournal(tmp_path / "j.jsonl")
    fences = AdapterFences(journal)
    await _enter(fences, "exp", 1)
    journal.fail_appends = 1
    with pytest.raises(OSError):
        await _enter(fences, "exp", 2)  # did not run: its token is not on disk
    with pytest.raises(StaleFencingToken):
        await _enter(fences, "exp", 1)
    await _enter(fences, "exp", 2)  # the owner's retry writes it
    assert journal.appends == 3
    assert AdapterFences(FenceJournal(journal.path)).highest("exp") == 2


async def test_a_long_lived_journal_compacts_itself(tmp_path):
    """A trainer that outlives many changes of leader keeps a bounded journal:
    past twice its adapters plus the slack, it rewrites to one line each."""
    path = tmp_path / "fencing-tokens.jsonl"
    journal = FenceJournal(path, compact_slack=4)
    fences = AdapterFences(journal)
    for token in range(1, 41):  # 40 leaders, 2 adapters
        await _enter(fences, "a", token)
        await _enter(fences, "b", token)
        assert len(path.read_text().splitlines()) == journal.lines <= 2 * 2 + 4 + 1
    restarted = AdapterFences(FenceJournal(path))
    assert (restarted.highest("a"), restarted.highest("b")) == (40, 40)


def test_an_unread_journal_never_compacts_away_what_it_did_not_read(tmp_path):
    path = tmp_path / "fencing-tokens.jsonl"
    path.write_text('{"adapter_id": "old", "token": 9}\n')
    journal = FenceJournal(path, compact_slack=0)
    for token in range(1, 6):
        journal.append("a", token)
    assert FenceJournal(path).read() == {"old": 9, "a": 5}
