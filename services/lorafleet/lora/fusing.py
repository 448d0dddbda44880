"""Async front of the training engine: fuse requests that arrive close together.

Train requests of different experiments reach the trainer as separate RPCs. The
:class:`FusingQueue` holds each arrival for at most ``max_wait_ms`` (counted from
the oldest waiting request) so that requests landing in that window share one
fused forward/backward; a batch closes early when it reaches ``max_batch_tokens``
(padded tokens, the unit of activation memory). Torch work runs in a worker
thread (``asyncio.to_thread``), so the event loop keeps serving RPCs meanwhile;
requests arriving during a pass wait for the next one, which is where most fusing
happens under load.

Order per adapter is kept: a request is never overtaken by a later request of
the same adapter. TrainStep and OptimStep requests of one adapter never share a
batch (the second must see the first's update); ForwardBackward requests of one
adapter may (gradients accumulate either way).

Across adapters, an optional ``priority`` (lowest first; the trainer passes each
adapter's optimizer step count) decides which waiting request goes next, so an
experiment that has fallen behind catches up instead of queueing behind the
others. It is divided by the weight of the adapter's newest waiting train
request (``TrainRequest.weight``, the experiment's fair-share weight; an
adapter's logprob and optimizer-step requests carry none), so an
experiment of weight 2 is served as if it had taken half its steps: it may run
up to twice as many steps as one of weight 1 when the trainer is the bottleneck.
With ``fuse=False`` every request runs in a pass of its own and returns as soon
as that pass ends: where fusing saves nothing (CPU passes that keep
requests in separate micro-batches cost what the requests cost one by one), a
fused pass only makes every request wait for the last one.

Each engine call is reported to an optional ``on_batch`` observer as a
:class:`FusedBatch` (the trainer turns it into Prometheus metrics); the queue
itself knows nothing of metrics, so the torch reference engine and tests use it
bare.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import structlog

from lorafleet.core.errors import Unavailable
from lorafleet.lora.types import (
    ForwardBackwardResult,
    LogprobRequest,
    LogprobResult,
    OptimStepResult,
    RequestError,
    TrainRequest,
    TrainStepResult,
)

log = structlog.get_logger(__name__)


class FusableEngine(Protocol):
    """What the queue needs from an engine (``TrainEngine`` implements it)."""

    def forward_backward(self, requests: Sequence[TrainRequest]
                         ) -> list[ForwardBackwardResult | RequestError]: ...

    def train_step(self, requests: Sequence[TrainRequest]
                   ) -> list[TrainStepResult | RequestError]: ...

    def compute_logprobs_batch(self, requests: Sequence[LogprobRequest]
                               ) -> list[LogprobResult | RequestError]: ...

    def optim_step(self, name: str, learning_rate: float | None = None) -> OptimStepResult: ...


_FB, _TS, _LP, _OS = "forward_backward", "train_step", "logprobs", "optim_step"
# Kinds whose requests change parameters at the end of the batch: one per adapter.
_ONE_PER_ADAPTER = {_TS, _OS}


@dataclass
class _Item:
    kind: str
    adapter: str | None
    tokens: int
    payload: Any
    future: asyncio.Future[Any]
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class FusedBatch:
    """What one engine call of the queue did, as reported to ``on_batch``."""

    kind: str
    """forward_backward, train_step, logprobs or optim_step."""
    requests: int
    adapters: int
    """Distinct adapters in the call (None, the base model, counts as one)."""
    tokens: int
    """Tokens (prompt + completion) of the requests that succeeded."""
    failed: int
    """Requests that got an error (their own, or the whole call's)."""
    wait_s: float
    """How long the oldest request waited in the queue before the call began."""
    seconds: float
    """Wall time of the engine call."""


class FusingQueue:
    """Batches concurrent engine calls into fused passes; one worker, FIFO per adapter."""

    def __init__(self, engine: FusableEngine, *, max_wait_ms: float = 5.0,
                 max_batch_tokens: int = 65536,
                 on_batch: Callable[[FusedBatch], None] | None = None,
                 fuse: bool = True,
                 priority: Callable[[str | None], float] | None = None) -> None:
        if max_wait_ms < 0 or max_batch_tokens < 1:
            raise ValueError("max_wait_ms must be >= 0 and max_batch_tokens >= 1")
        self.engine = engine
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_batch_tokens = max_batch_tokens
        self._pending: list[_Item] = []
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self.batches_run = 0
        """Engine calls made so far (for tests and metrics)."""
        self.last_batch_sizes: list[int] = []
        self.on_batch = on_batch
        self.fuse = fuse
        self.priority = priority

    # --- public API ---------------------------------------------------------------

    async def forward_backward(self, request: TrainRequest
                               ) -> ForwardBackwardResult | RequestError:
        return await self._submit(_FB, request.adapter, _padded_tokens_train(request), request)

    async def train_step(self, request: TrainRequest) -> TrainStepResult | RequestError:
        return await self._submit(_TS, request.adapter, _padded_tokens_train(request), request)

    async def compute_logprobs(self, request: LogprobRequest) -> LogprobResult | RequestError:
        lens = [len(s.token_ids) for s in request.sequences] or [0]
        return await self._submit(_LP, request.adapter, len(lens) * max(lens), request)

    async def optim_step(self, adapter: str, learning_rate: float | None = None
                         ) -> OptimStepResult:
        return await self._submit(_OS, adapter, 0, (adapter, learning_rate))

    async def close(self) -> None:
        """Stop taking requests; waiting ones fail with UNAVAILABLE (retryable)."""
        self._closed = True
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        for item in self._pending:
            if not item.future.done():
                item.future.set_exception(
                    Unavailable("trainer is shutting down", reason="TRAINER_SHUTTING_DOWN"))
        self._pending.clear()

    # --- internals ----------------------------------------------------------------

    async def _submit(self, kind: str, adapter: str | None, tokens: int, payload: Any) -> Any:
        if self._closed:
            raise Unavailable("trainer is shutting down", reason="TRAINER_SHUTTING_DOWN")
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done():
            self._wakeup = asyncio.Event()
            self._worker = loop.create_task(self._run(), name="lorafleet-fusing-queue")
        item = _Item(kind, adapter, tokens, payload, loop.create_future())
        self._pending.append(item)
        assert self._wakeup is not None
        self._wakeup.set()
        return await item.future

    async def _run(self) -> None:
        assert self._wakeup is not None
        while True:
            self._pending = [it for it in self._pending if not it.future.done()]
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._pending[0].arrived + self.max_wait_s
            while not self._select()[1]:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch, _ = self._select()
            taken = {id(it) for it in batch}
            self._pending = [it for it in self._pending if id(it) not in taken]
            if batch:
                await self._execute(batch)

    def _select(self) -> tuple[list[_Item], bool]:
        """The next batch, and whether it is full (the token budget stopped it)."""
        live = [it for it in self._pending if not it.future.done()]
        if not live:
            return [], False
        if self.priority is not None:
            # Stable, and one key per adapter: an adapter's requests keep their order.
            weights = {it.adapter: _weight(it.payload) for it in live
                       if isinstance(it.payload, TrainRequest)}
            keys = {it.adapter: self.priority(it.adapter) / weights.get(it.adapter, 1.0)
                    for it in live}
            live.sort(key=lambda it: keys[it.adapter])
        if not self.fuse:
            return live[:1], True
        kind = live[0].kind
        batch: list[_Item] = []
        in_batch: set[str | None] = set()
        blocked: set[str | None] = set()
        tokens = 0
        full = False
        for it in live:
            ordered_after = it.adapter in blocked
            same_adapter = kind in _ONE_PER_ADAPTER and it.adapter in in_batch
            if it.kind != kind or ordered_after or same_adapter:
                blocked.add(it.adapter)
                continue
            if batch and tokens + it.tokens > self.max_batch_tokens:
                full = True
                blocked.add(it.adapter)
                continue
            batch.append(it)
            in_batch.add(it.adapter)
            tokens += it.tokens
        return batch, full or tokens >= self.max_batch_tokens

    async def _execute(self, batch: list[_Item]) -> None:
        kind = batch[0].kind
        payloads = [it.payload for it in batch]
        self.batches_run += 1
        self.last_batch_sizes.append(len(batch))
        del self.last_batch_sizes[:-64]
        started = time.monotonic()
        try:
            if kind == _FB:
                results = await asyncio.to_thread(self.engine.forward_backward, payloads)
            elif kind == _TS:
                results = await asyncio.to_thread(self.engine.train_step, payloads)
            elif kind == _LP:
                results = await asyncio.to_thread(self.engine.compute_logprobs_batch, payloads)
            else:
                results = await asyncio.to_thread(_optim_steps, self.engine, payloads)
        except BaseException as e:  # delivered to every caller of this batch
            for it in batch:
                if not it.future.done():
                    it.future.set_exception(e)
            self._report(batch, started, [e] * len(batch))
            if isinstance(e, asyncio.CancelledError):
                raise
            return
        for it, res in zip(batch, results, strict=True):
            if it.future.done():
                continue
            if isinstance(res, BaseException):
                it.future.set_exception(res)
            else:
                it.future.set_result(res)
        self._report(batch, started, results)

    def _report(self, batch: list[_Item], started: float, results: Sequence[Any]) -> None:
        if self.on_batch is None:
            return
        failed = [isinstance(r, RequestError | BaseException) for r in results]
        report = FusedBatch(
            kind=batch[0].kind,
            requests=len(batch),
            adapters=len({it.adapter for it in batch}),
            tokens=sum(getattr(it.payload, "num_tokens", 0)
                       for it, bad in zip(batch, failed, strict=True) if not bad),
            failed=sum(failed),
            wait_s=started - min(it.arrived for it in batch),
            seconds=time.monotonic() - started,
        )
        try:
            self.on_batch(report)
        except Exception:  # noqa: BLE001 - an observer's bug must not fail training
            log.exception("fused_batch_observer_failed", kind=report.kind)


def _optim_steps(engine: FusableEngine, payloads: list[tuple[str, float | None]]
                 ) -> list[OptimStepResult | BaseException]:
    out: list[OptimStepResult | BaseException] = []
    for adapter, lr in payloads:
        try:
            out.append(engine.optim_step(adapter, lr))
        except Exception as e:  # noqa: BLE001 - one adapter's failure is its own
            out.append(e)
    return out


def _weight(request: TrainRequest) -> float:
    """A train request's fair-share weight; 1 unless finite and > 0 (the engine
    fails such a request with INVALID_WEIGHT when it runs)."""
    return request.weight if 0 < request.weight < math.inf else 1.0


def _padded_tokens_train(request: TrainRequest) -> int:
    lens = [len(s.sequence.token_ids) for s in request.samples] or [0]
    return len(lens) * max(lens)
