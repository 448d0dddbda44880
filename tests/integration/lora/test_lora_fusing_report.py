"""FusingQueue's on_batch report: one FusedBatch per engine call with the right
sizes, tokens and failures; a failing observer never fails the requests."""

from __future__ import annotations

import asyncio

import pytest
from lora_support import cross_entropy_request, engine_with_adapters

from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.fusing import FusedBatch, FusingQueue
from lorafleet.lora.types import (
    RequestError,
    TrainRequest,
    TrainStepResult,
)


def _req(name: str, seed: int, n: int = 3, length: int = 8) -> TrainRequest:
    return cross_entropy_request(name, seed, n=n, length=length, prompt_length=2)


@pytest.fixture
def engine(llama_dir) -> TrainEngine:
    return engine_with_adapters(llama_dir, ("a", "b"))


async def test_one_report_per_engine_call(engine):
    reports: list[FusedBatch] = []
    queue = FusingQueue(engine, max_wait_ms=100, on_batch=reports.append)
    results = await asyncio.gather(
        queue.train_step(_req("a", 1)), queue.train_step(_req("b", 2)),
        queue.train_step(_req("ghost", 3)))
    assert isinstance(results[2], RequestError)
    assert len(reports) == 1
    report = reports[0]
    assert report.kind == "train_step"
    assert (report.requests, report.adapters, report.failed) == (3, 3, 1)
    # Only the two requests that trained count: 2 x 3 sequences x 8 tokens.
    assert report.tokens == 2 * 3 * 8
    assert report.seconds > 0
    # The first arrival waited for the others (up to max_wait_ms) before the call.
    assert 0 <= report.wait_s < 5
    await queue.optim_step("a")
    assert reports[-1].kind == "optim_step" and reports[-1].tokens == 0
    await queue.close()


async def test_observer_failure_does_not_fail_requests(engine):
    def broken(_: FusedBatch) -> None:
        raise RuntimeError("observer bug")

    queue = FusingQueue(engine, max_wait_ms=0, on_batch=broken)
    result = await queue.train_step(_req("a", 4))
    assert isinstance(result, TrainStepResult) and result.applied
    await queue.close()
