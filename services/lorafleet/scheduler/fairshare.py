"""Weighted fair admission of work to a shared engine (start-time fair queuing).

Each node has one gate for rollout work and one for training work. A request
declares its cost (tokens) and its experiment's weight; it is admitted while the
tokens in flight stay under the budget. When requests wait, the one with the
smallest virtual start tag goes first, where an experiment's tag advances by
cost / weight each time it is served. An experiment with long generations or
huge batches therefore pays for them in its own virtual time and cannot push
the others out: their small requests keep getting turns.

Admitted work is capped too: while several experiments are active (holding or
waiting for budget), each may hold at most its weighted share of the budget, so
a hog cannot fill the engine's batch with its own chunks and make every light
request run in a batch many times its size. Its first request is always allowed,
and when it is alone it may use the whole budget (the gate stays
work-conserving for a single experiment).

A request bigger than the whole budget is admitted alone when nothing is in
flight, so it is delayed, never starved.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field


@dataclass(order=True)
class _Waiter:
    tag: float
    seq: int
    experiment_id: str = field(compare=False)
    cost: int = field(compare=False)
    future: asyncio.Future[None] = field(compare=False)


class FairShareGate:
    def __init__(self, budget_tokens: int) -> None:
        if budget_tokens < 1:
            raise ValueError("budget_tokens must be >= 1")
        self.budget = budget_tokens
        self.in_flight = 0
        self.in_flight_by: Counter[str] = Counter()
        self._weights: dict[str, float] = {}
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

    def _over_share(self, experiment_id: str, cost: int) -> bool:
        mine = self.in_flight_by[experiment_id]
        if mine == 0:
            return False
        active = {e for e, n in self.in_flight_by.items() if n > 0}
        active.update(w.experiment_id for w in self._waiting)
        active.add(experiment_id)
        if len(active) == 1:
            return False
        weight = self._weights.get
        share = weight(experiment_id, 1.0) / sum(weight(e, 1.0) for e in active)
        return mine + cost > self.budget * share

    def _take(self, experiment_id: str, cost: int, tag: float) -> None:
        self._virtual_time = max(self._virtual_time, tag)
        self.in_flight += cost
        self.in_flight_by[experiment_id] += cost

    def _dispatch(self) -> None:
        for waiter in sorted(self._waiting):
            if waiter.future.cancelled():
                self._waiting.remove(waiter)
                continue
            if self._over_share(waiter.experiment_id, waiter.cost):
                continue  # its own cap: the next experiment in line may go
            if not self._fits(waiter.cost):
                break  # the budget: nobody jumps the queue
            self._waiting.remove(waiter)
            self._take(waiter.experiment_id, waiter.cost, waiter.tag)
            waiter.future.set_result(None)

    @asynccontextmanager
    async def admit(self, experiment_id: str, cost: int, weight: float) -> AsyncIterator[float]:
        """Hold `cost` tokens of the budget for the duration of the block.

        Yields the milliseconds spent waiting for admission.
        """
        cost = max(int(cost), 1)
        started = time.monotonic()
        self._weights[experiment_id] = max(weight, 1e-9)
        tag = self._tag(experiment_id, cost, weight)
        if not self._waiting and self._fits(cost) and not self._over_share(experiment_id, cost):
            self._take(experiment_id, cost, tag)
        else:
            future = asyncio.get_running_loop().create_future()
            waiter = _Waiter(tag, next(self._seq), experiment_id, cost, future)
            self._waiting.append(waiter)
            try:
                await waiter.future
            except asyncio.CancelledError:
                if waiter.future.done() and not waiter.future.cancelled():
                    self._release(experiment_id, cost)  # admitted just as we were cancelled
                elif waiter in self._waiting:
                    self._waiting.remove(waiter)
                    self._dispatch()  # its absence may lift another's share cap
                raise
        waited_ms = (time.monotonic() - started) * 1000
        self.wait_ms_total[experiment_id] = self.wait_ms_total.get(experiment_id, 0.0) + waited_ms
        try:
            yield waited_ms
        finally:
            self._release(experiment_id, cost)

    def _release(self, experiment_id: str, cost: int) -> None:
        self.in_flight -= cost
        self.in_flight_by[experiment_id] -= cost
        if self.in_flight_by[experiment_id] <= 0:
            del self.in_flight_by[experiment_id]
        self._dispatch()

    def forget(self, experiment_id: str) -> None:
        self._finish.pop(experiment_id, None)
        self._weights.pop(experiment_id, None)
