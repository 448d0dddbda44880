"""Weighted fair admission of work to a shared engine (start-time fair queuing).

Each node has one gate for rollout work and one for training work. A request
declares its cost (tokens) and its experiment's weight; it is admitted while the
tokens in flight stay under the budget. When requests wait, the one with the
smallest virtual start tag goes first, where an experiment's tag advances by
cost / weight each time it is served. An experiment with long generations or
huge batches therefore pays for them in its own virtual time and cannot push
the others out: their small requests keep getting turns.

A request bigger than the whole budget is admitted alone when nothing is in
flight, so it is delayed, never starved.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(order=True)
class _Waiter:
    tag: float
    seq: int
    cost: int = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairShareGate:
    def __init__(self, budget_tokens: int) -> None:
        if budget_tokens < 1:
            raise ValueError("budget_tokens must be >= 1")
        self.budget = budget_tokens
        self.in_flight = 0
        self._virtual_time = 0.0
        self._finish: dict[str, float] = {}
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()
        self.wait_ms_total: dict[str, float] = {}

    def _tag(self, experiment_id: str, cost: int, weight: float) -> float:
        start = max(self._virtual_time, self._finish.get(experiment_id, 0.0))
        self._finish[experiment_id] = start + cost / max(weight, 1e-9)
        return start

    def _fits(self, cost: int) -> bool:
        return self.in_flight + cost <= self.budget or self.in_flight == 0

    def _dispatch(self) -> None:
        while self._waiting and self._fits(self._waiting[0].cost):
            waiter = heapq.heappop(self._waiting)
            if waiter.future.cancelled():
                continue
            self._virtual_time = max(self._virtual_time, waiter.tag)
            self.in_flight += waiter.cost
            waiter.future.set_result(None)

    @asynccontextmanager
    async def admit(self, experiment_id: str, cost: int, weight: float) -> AsyncIterator[float]:
        """Hold `cost` tokens of the budget for the duration of the block.

        Yields the milliseconds spent waiting for admission.
        """
        cost = max(int(cost), 1)
        started = time.monotonic()
        tag = self._tag(experiment_id, cost, weight)
        if not self._waiting and self._fits(cost):
            self._virtual_time = max(self._virtual_time, tag)
            self.in_flight += cost
        else:
            waiter = _Waiter(tag, next(self._seq), cost, asyncio.get_running_loop().create_future())
            heapq.heappush(self._waiting, waiter)
            try:
                await waiter.future
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    self.in_flight -= cost  # admitted just as we were cancelled
                    self._dispatch()
                raise
        waited_ms = (time.monotonic() - started) * 1000
        self.wait_ms_total[experiment_id] = self.wait_ms_total.get(experiment_id, 0.0) + waited_ms
        try:
            yield waited_ms
        finally:
            self.in_flight -= cost
            self._dispatch()

    def forget(self, experiment_id: str) -> None:
        self._finish.pop(experiment_id, None)
