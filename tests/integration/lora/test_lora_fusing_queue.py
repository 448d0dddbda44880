"""FusingQueue: concurrent requests share one fused pass; order per adapter holds;
the event loop stays responsive while torch runs."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
from lora_support import cross_entropy_request, engine_with_adapters

from lorafleet.core.errors import Unavailable
from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.fusing import FusingQueue
from lorafleet.lora.types import (
    LogprobRequest,
    RequestError,
    TokenSequence,
    TrainRequest,
    TrainStepResult,
)


def _req(name: str, seed: int, n: int = 4, length: int = 10) -> TrainRequest:
    return cross_entropy_request(name, seed, n=n, length=length, prompt_length=3)


@pytest.fixture
def engine(llama_dir) -> TrainEngine:
    return engine_with_adapters(llama_dir, ("a", "b", "c"))


async def test_concurrent_train_steps_fuse(engine):
    queue = FusingQueue(engine, max_wait_ms=50)
    results = await asyncio.gather(*(queue.train_step(_req(n, i)) for i, n in
                                     enumerate(("a", "b", "c", "ghost"))))
    assert queue.batches_run == 1
    assert [r.metrics.fused_batch_adapters for r in results[:3]] == [3, 3, 3]
    assert all(isinstance(r, TrainStepResult) and r.applied and r.step == 1 for r in results[:3])
    assert isinstance(results[3], RequestError) and results[3].reason == "ADAPTER_NOT_FOUND"
    await queue.close()


async def test_same_adapter_order_and_token_budget(engine):
    # Budget fits two 4x10 requests: the third waits for the next pass.
    queue = FusingQueue(engine, max_wait_ms=50, max_batch_tokens=80)
    reqs = [_req("a", 1), _req("b", 2), _req("c", 3)]
    await asyncio.gather(*(queue.train_step(r) for r in reqs))
    assert queue.last_batch_sizes == [2, 1]
    # Two steps of one adapter never share a pass, and keep their order.
    queue2 = FusingQueue(engine, max_wait_ms=50)
    r1, r2, r3 = await asyncio.gather(queue2.train_step(_req("a", 4)),
                                      queue2.train_step(_req("a", 5)),
                                      queue2.train_step(_req("b", 6)))
    assert (r1.step, r2.step, r3.step) == (2, 3, 2)
    assert queue2.last_batch_sizes == [2, 1]
    # forward_backward + optim_step of one adapter: optim waits for its forward_backward.
    fb, opt, lp = await asyncio.gather(
        queue2.forward_backward(_req("c", 7)), queue2.optim_step("c"),
        queue2.compute_logprobs(LogprobRequest("c", (TokenSequence((1, 2, 3), 1),))))
    assert fb.metrics.grad_norm > 0 and opt.applied and opt.step == 2
    assert len(lp.logprobs_B_C[0]) == 2
    await queue.close()
    await queue2.close()
    with pytest.raises(Unavailable):
        await queue2.train_step(_req("a", 8))


async def test_event_loop_stays_free_during_a_pass(engine):
    queue = FusingQueue(engine, max_wait_ms=0)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.002)
            ticks += 1

    task = asyncio.create_task(ticker())
    t0 = time.perf_counter()
    await queue.train_step(_req("a", 9, n=32, length=48))
    elapsed = time.perf_counter() - t0
    task.cancel()
    # The loop ran its ticker throughout the pass instead of blocking on torch.
    assert ticks >= max(2, int(elapsed / 0.002 * 0.2)), (ticks, elapsed)
    await queue.close()


class _RecordingEngine:
    """The engine, with the adapters of every train_step call in call order."""

    def __init__(self, engine: TrainEngine) -> None:
        self.engine = engine
        self.calls: list[list[str]] = []

    def train_step(self, requests):
        self.calls.append([r.adapter for r in requests])
        return self.engine.train_step(requests)

    def __getattr__(self, name):
        return getattr(self.engine, name)


async def test_unfused_fewest_steps_first(engine):
    # Steps taken before: a 2, c 1, b 0.
    warmup = FusingQueue(engine, max_wait_ms=0)
    for seed, name in enumerate(("a", "a", "c")):
        await warmup.train_step(_req(name, seed))
    await warmup.close()
    assert [engine.steps_taken(n) for n in ("a", "b", "c", "ghost")] == [2, 0, 1, 0]

    recorder = _RecordingEngine(engine)
    queue = FusingQueue(recorder, max_wait_ms=50, fuse=False, priority=engine.steps_taken)
    # Arrival order a, a, c, b: the adapter with the fewest steps goes first, and
    # a's two requests keep their order (its second sees its first's update).
    results = await asyncio.gather(*(queue.train_step(_req(name, 10 + i)) for i, name in
                                     enumerate(("a", "a", "c", "b"))))
    assert recorder.calls == [["b"], ["c"], ["a"], ["a"]]
    assert queue.batches_run == 4
    assert [r.step for r in results] == [3, 4, 2, 1]
    assert all(r.metrics.fused_batch_adapters == 1 for r in results)
    await queue.close()

    # Steps count per unit of fair-share weight. Steps now: a 4, b 1, c 2. At
    # weight 8, a (4 / 8) goes before b (1 / 1) and c (2 / 1), and stays ahead
    # after its first step (5 / 8); at weight 1 it would go last.
    recorder.calls.clear()
    queue = FusingQueue(recorder, max_wait_ms=50, fuse=False, priority=engine.steps_taken)
    reqs = [dataclasses.replace(_req(name, 30 + i), weight=weight)
            for i, (name, weight) in enumerate((("c", 1.0), ("a", 8.0), ("a", 8.0), ("b", 1.0)))]
    await asyncio.gather(*(queue.train_step(r) for r in reqs))
    assert recorder.calls == [["a"], ["a"], ["b"], ["c"]]
    assert [engine.steps_taken(n) for n in ("a", "b", "c")] == [6, 2, 3]
    await queue.close()

    # Without a priority, unfused requests run in arrival order.
    recorder.calls.clear()
    queue = FusingQueue(recorder, max_wait_ms=50, fuse=False)
    await asyncio.gather(*(queue.train_step(_req(name, 20 + i)) for i, name in
                           enumerate(("a", "c", "b"))))
    assert recorder.calls == [["a"], ["c"], ["b"]]
    await queue.close()
