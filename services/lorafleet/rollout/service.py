"""The rollout domain: requests checked, admitted, served on the engine with the
right adapter version, and measured. No proto here (that is ``server.py``).

Admission is bounded: at most ``max_pending_sequences`` sequences (prompts x n)
are admitted and unfinished at once; a request beyond that gets
RESOURCE_EXHAUSTED (``QUEUE_FULL``, retry later) instead of queueing without
bound. Every result names the adapter version that actually served it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence

import structlog

from lorafleet.core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from lorafleet.rollout import metrics
from lorafleet.rollout.adapters import AdapterManager
from lorafleet.rollout.engine import Engine
from lorafleet.rollout.types import (
    AdapterRef,
    AdapterSelection,
    EngineAdapter,
    GenerateResult,
    GenerationRequest,
    LoadedVersion,
    SampleDelta,
    SamplingSpec,
    ScoreSequence,
)

log = structlog.get_logger(__name__)


@dataclasses.dataclass(frozen=True)
class GenerateCall:
    """One Generate request, in domain terms."""

    prompts: Sequence[str | Sequence[int]]
    """Text (tokenised with the base model's tokenizer) or token ids."""
    adapter: AdapterSelection | None = None
    """None: the base model."""
    n: int = 1
    sampling: SamplingSpec = SamplingSpec()
    experiment_id: str = ""
    timeout_s: float | None = None


@dataclasses.dataclass(frozen=True)
class RolloutStatus:
    engine: str
    base_model: str
    max_loras: int
    max_cpu_loras: int
    max_lora_rank: int
    max_model_len: int
    running_requests: int
    queued_requests: int
    process_memory_bytes: int
    engine_epoch: int
    engine_healthy: bool


class RolloutService:
    def __init__(
        self,
        engine: Engine,
        adapters: AdapterManager,
        *,
        base_model: str,
        max_pending_sequences: int = 4096,
        max_n: int = 64,
        default_max_tokens: int = 64,
    ) -> None:
        self.engine = engine
        self.adapters = adapters
        self.base_model = base_model
        self._max_pending = max_pending_sequences
        self._max_n = max_n
        self._default_max_tokens = default_max_tokens
        self._pending = 0
        self._waiting_for_adapter = 0

    # -- checks -----------------------------------------------------------------------

    def _sampling(self, spec: SamplingSpec) -> SamplingSpec:
        if spec.max_tokens < 0:
            raise _invalid(
                "max_tokens must be >= 1 (0 = the default)",
                "INVALID_MAX_TOKENS",
                "sampling.max_tokens",
            )
        if spec.max_tokens == 0:
            spec = dataclasses.replace(spec, max_tokens=self._default_max_tokens)
        if spec.temperature < 0:
            raise _invalid(
                "temperature must be >= 0", "INVALID_TEMPERATURE", "sampling.temperature"
            )
        if not 0.0 <= spec.top_p <= 1.0:
            raise _invalid("top_p must be in [0, 1]", "INVALID_TOP_P", "sampling.top_p")
        if spec.top_k < -1:
            raise _invalid("top_k must be >= -1", "INVALID_TOP_K", "sampling.top_k")
        if any(not s for s in spec.stop):
            raise _invalid("stop strings must not be empty", "INVALID_STOP", "sampling.stop")
        return spec

    def _token_ids(self, prompt: str | Sequence[int], index: int) -> tuple[int, ...]:
        if isinstance(prompt, str):
            ids = tuple(self.engine.tokenize(prompt))
        else:
            ids = tuple(int(t) for t in prompt)
            vocab = self.engine.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise _invalid(
                    f"prompt {index} has token id {bad[0]} outside the vocabulary [0, {vocab})",
                    "TOKEN_ID_OUT_OF_RANGE",
                    f"prompts[{index}]",
                )
        if not ids:
            raise _invalid(f"prompt {index} is empty", "EMPTY_PROMPT", f"prompts[{index}]")
        return ids

    def _prepare(self, call: GenerateCall) -> tuple[list[tuple[int, ...]], SamplingSpec, int]:
        if not call.prompts:
            raise _invalid("at least one prompt is required", "NO_PROMPTS", "prompts")
        n = call.n or 1
        if not 1 <= n <= self._max_n:
            raise _invalid(f"n must be in [1, {self._max_n}], got {call.n}", "INVALID_N", "n")
        sampling = self._sampling(call.sampling)
        prompts = [self._token_ids(p, i) for i, p in enumerate(call.prompts)]
        limit = self.engine.max_model_len
        for i, ids in enumerate(prompts):
            if len(ids) + sampling.max_tokens > limit:
                raise InvalidArgument(
                    f"prompt {i} has {len(ids)} tokens; with max_tokens {sampling.max_tokens} "
                    f"that is beyond the model length {limit}",
                    reason="PROMPT_TOO_LONG",
                    metadata={
                        "field": f"prompts[{i}]",
                        "prompt_tokens": str(len(ids)),
                        "max_tokens": str(sampling.max_tokens),
                        "max_model_len": str(limit),
                    },
                )
        return prompts, sampling, n

    @contextlib.contextmanager
    def _admit(self, sequences: int) -> Iterator[None]:
        if sequences > self._max_pending:
            raise ResourceExhausted(
                f"{sequences} sequences in one request; this node admits at most "
                f"{self._max_pending} at once",
                reason="REQUEST_TOO_LARGE",
            )
        if self._pending + sequences > self._max_pending:
            raise ResourceExhausted(
                f"rollout queue is full ({self._pending} of {self._max_pending} sequences "
                "pending); retry later",
                reason="QUEUE_FULL",
                metadata={"pending": str(self._pending), "limit": str(self._max_pending)},
            )
        self._pending += sequences
        metrics.PENDING_SEQUENCES.set(self._pending)
        try:
            yield
        finally:
            self._pending -= sequences
            metrics.PENDING_SEQUENCES.set(self._pending)

    @contextlib.asynccontextmanager
    async def _adapter(
        self, selection: AdapterSelection | None
    ) -> AsyncIterator[EngineAdapter | None]:
        if selection is None:
            yield None
            return
        self._waiting_for_adapter += 1
        waiting = True
        try:
            async with self.adapters.use(selection) as adapter:
                self._waiting_for_adapter -= 1
                waiting = False
                yield adapter
        finally:
            if waiting:
                self._waiting_for_adapter -= 1

    # -- RPCs -------------------------------------------------------------------------

    async def generate(self, call: GenerateCall) -> GenerateResult:
        prompts, sampling, n = self._prepare(call)
        started = time.perf_counter()
        kind = "base" if call.adapter is None else "adapter"
        with self._admit(len(prompts) * n):
            async with _deadline(call.timeout_s), self._adapter(call.adapter) as adapter:
                requests = [GenerationRequest(p, n, sampling, adapter) for p in prompts]
                results = await self.engine.generate(requests)
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = sum(len(s.token_ids_T) for r in results for s in r.samples_N)
        elapsed = time.perf_counter() - started
        metrics.PROMPT_TOKENS.labels(kind).inc(prompt_tokens)
        metrics.COMPLETION_TOKENS.labels(kind).inc(completion_tokens)
        metrics.REQUEST_SECONDS.labels("generate").observe(elapsed)
        log.debug(
            "generated",
            experiment=call.experiment_id,
            adapter=adapter.name if adapter else "",
            prompts=len(prompts),
            n=n,
            completion_tokens=completion_tokens,
            tokens_per_s=round(completion_tokens / elapsed, 1) if elapsed > 0 else 0.0,
        )
        return GenerateResult(
            results_P=tuple(results),
            adapter_version=adapter.version if adapter else 0,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    async def generate_stream(self, call: GenerateCall) -> AsyncIterator[tuple[int, SampleDelta]]:
        """(adapter version, delta) pairs as samples progress."""
        prompts, sampling, n = self._prepare(call)
        kind = "base" if call.adapter is None else "adapter"
        tokens = 0
        started = time.perf_counter()
        with self._admit(len(prompts) * n):
            async with _deadline(call.timeout_s), self._adapter(call.adapter) as adapter:
                version = adapter.version if adapter else 0
                requests = [GenerationRequest(p, n, sampling, adapter) for p in prompts]
                async for delta in self.engine.generate_stream(requests):
                    tokens += len(delta.token_ids)
                    yield version, delta
        metrics.PROMPT_TOKENS.labels(kind).inc(sum(len(p) for p in prompts))
        metrics.COMPLETION_TOKENS.labels(kind).inc(tokens)
        metrics.REQUEST_SECONDS.labels("generate_stream").observe(time.perf_counter() - started)

    async def compute_logprobs(
        self, selection: AdapterSelection | None, sequences: Sequence[ScoreSequence]
    ) -> tuple[int, list[list[float]]]:
        if not sequences:
            raise _invalid("at least one sequence is required", "NO_SEQUENCES", "sequences")
        vocab = self.engine.vocab_size
        for i, seq in enumerate(sequences):
            field = f"sequences[{i}]"
            if not seq.token_ids:
                raise _invalid(f"sequence {i} is empty", "EMPTY_SEQUENCE", field)
            if not 1 <= seq.prompt_length <= len(seq.token_ids):
                raise _invalid(
                    f"sequence {i}: prompt_length must be in [1, {len(seq.token_ids)}], got "
                    f"{seq.prompt_length}",
                    "INVALID_PROMPT_LENGTH",
                    f"{field}.prompt_length",
                )
            if len(seq.token_ids) > self.engine.max_model_len:
                raise InvalidArgument(
                    f"sequence {i} has {len(seq.token_ids)} tokens, beyond the model length "
                    f"{self.engine.max_model_len}",
                    reason="SEQUENCE_TOO_LONG",
                    metadata={"field": field},
                )
            if any(not 0 <= t < vocab for t in seq.token_ids):
                raise _invalid(
                    f"sequence {i} has a token id outside [0, {vocab})",
                    "TOKEN_ID_OUT_OF_RANGE",
                    field,
                )
        started = time.perf_counter()
        with self._admit(len(sequences)):
            async with self._adapter(selection) as adapter:
                logprobs = await self.engine.compute_logprobs(sequences, adapter)
        metrics.REQUEST_SECONDS.labels("compute_logprobs").observe(time.perf_counter() - started)
        return (adapter.version if adapter else 0), logprobs

    async def load_adapter(self, target: AdapterSelection | AdapterRef) -> LoadedVersion:
        return await self.adapters.load(target, trigger="operator")

    async def unload_adapter(self, adapter_id: str, version: int) -> int:
        return await self.adapters.unload(adapter_id, version)

    def list_loaded(self) -> list[LoadedVersion]:
        return self.adapters.list_loaded()

    def status(self) -> RolloutStatus:
        engine = self.engine.status()
        return RolloutStatus(
            engine=engine.engine,
            base_model=self.base_model,
            max_loras=engine.max_loras,
            max_cpu_loras=engine.max_cpu_loras,
            max_lora_rank=engine.max_lora_rank,
            max_model_len=engine.max_model_len,
            running_requests=engine.running_requests,
            queued_requests=self._waiting_for_adapter,
            process_memory_bytes=process_tree_memory(),
            engine_epoch=engine.epoch,
            engine_healthy=engine.healthy,
        )


def _invalid(message: str, reason: str, field: str) -> InvalidArgument:
    return InvalidArgument(message, reason=reason, metadata={"field": field})


@contextlib.asynccontextmanager
async def _deadline(timeout_s: float | None) -> AsyncIterator[None]:
    if not timeout_s:
        yield
        return
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError:
        raise DeadlineExceeded(
            f"the request did not finish within {timeout_s:.3f} s", reason="ROLLOUT_TIMEOUT"
        ) from None


def process_tree_memory() -> int:
    """Proportional set size (PSS) of this process and its children (the engine
    workers), in bytes; RSS where PSS is not available."""
    try:
        import psutil
    except ImportError:  # pragma: no cover
        return 0
    total = 0
    try:
        me = psutil.Process(os.getpid())
        for proc in (me, *me.children(recursive=True)):
            try:
                info = proc.memory_full_info()
                total += getattr(info, "pss", 0) or info.rss
            except psutil.Error:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
    except psutil.Error:  # pragma: no cover
        return total
    return total
