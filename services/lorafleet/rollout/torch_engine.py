"""The torch rollout engine: transformers + ``lorafleet.lora`` multi-LoRA layers.

The reference implementation of the :class:`~lorafleet.rollout.engine.Engine`
Protocol, for machines without vLLM and for the co-located single-process node
(:mod:`lorafleet.node`), where it runs on the trainer's own torch module.

Batching. ``generate`` calls that arrive within ``batch_wait_ms`` of each other
(counted from the oldest waiting one) are run as one batch: rows of every request
and every adapter, left-padded to one length, one forward per decode step, each
row routed to its own adapter by the multi-LoRA layers (``Routing``). Requests
that arrive while a batch runs wait for the next one (static batching per batch;
vLLM's continuous batching is the production engine). A batch holds at most
``max_num_seqs`` rows and ``max_loras`` distinct adapters; rows that finish are
dropped from the KV cache, so a batch costs what its live rows cost.

Adapters. An adapter version is attached to the model's ``MultiLoraLinear`` layers
under a key of its own (``r<engine id>``; the trainer's slots are ``s<i>``, so on
a shared model the two never collide) as ``nn.Parameter`` views of the version's
tensors: attaching copies nothing. The tensors come from a PEFT directory
(``load_peft_adapter``: read from disk once) or, for ``mem://`` paths, from a
:class:`MemorySource` (the co-located node's published snapshots: nothing read
from disk at all). A version's tensors must stay unchanged while attached: their
in-place version counters are recorded at attach time and checked before every
batch; a changed version fails its requests with DATA_LOSS instead of serving
weights that are not the version's.

Threads. All torch work (forwards, attaching and detaching adapters) runs in one
worker thread, never on the event loop, and every forward holds ``lock`` with the
routing set: on a shared model that is the trainer's engine lock, so rollout
forwards and training passes interleave (per decode step) without ever seeing
each other's routing.

Sampling matches the vLLM engine's semantics: temperature 0 is greedy (and ``n``
greedy samples are one sample replicated), temperature / top-k / top-p
otherwise, a request seed makes its samples reproducible whatever else is in the
batch; logprobs are of the model's raw distribution (``raw_logprobs``, what a
trainer recomputes) or of the processed one; an end-of-sequence token (the
generation config's, unless ``ignore_eos``) finishes a sample with STOP and is
kept in its tokens but not in its text; a stop string finishes it with STOP and
truncates the text before it; ``max_tokens`` finishes it with LENGTH.

Errors, as the vLLM engine raises them: INVALID_ARGUMENT ``PROMPT_TOO_LONG`` /
``TOKEN_ID_OUT_OF_RANGE``; FAILED_PRECONDITION ``RANK_ABOVE_ENGINE_MAX``,
``ADAPTER_LOAD_FAILED``, ``ADAPTER_WEIGHTS_NOT_FINITE``, ``ADAPTER_NOT_LOADED``;
UNAVAILABLE ``ENGINE_NOT_STARTED`` / ``ENGINE_CLOSED``. A batch that fails is
retried request by request, so only the failing request gets INTERNAL
``GENERATION_FAILED``. There is no engine process to die: ``epoch`` stays 1.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import math
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog

from lorafleet.core.config import ConfigError
from lorafleet.core.errors import (
    DataLoss,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LorafleetError,
    Unavailable,
)
from lorafleet.rollout import metrics
from lorafleet.rollout.types import (
    EngineAdapter,
    EngineStatus,
    FinishReason,
    GenerationRequest,
    PromptSamples,
    Sample,
    SampleDelta,
    SamplingSpec,
    ScoreSequence,
)
from lorafleet.rollout.vllm_engine import rank_above_max

if TYPE_CHECKING:
    import torch
    from torch import nn

    from lorafleet.lora.layers import RoutingState
    from lorafleet.lora.spec import LoraSpec
    from lorafleet.rollout.config import RolloutSettings

log = structlog.get_logger(__name__)

MEMORY_SCHEME = "mem://"
"""Paths with this prefix name in-memory adapter versions (see :class:`MemorySource`)."""
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_BATCH_WAIT_MS = 2.0
_LORA_A = ".lora_A.weight"
_LORA_B = ".lora_B.weight"


@dataclasses.dataclass(frozen=True)
class AdapterWeights:
    """One adapter version's LoRA tensors, ready to attach."""

    spec: LoraSpec
    tensors: Mapping[str, torch.Tensor]
    """``<module path>.lora_A.weight`` ([r, in]) / ``.lora_B.weight`` ([out, r]),
    the names of ``MultiLoraModel.adapter_state_dict`` and ``load_peft_adapter``."""
    source: str
    """"file" (read from a PEFT directory) or "memory" (a published snapshot)."""


class MemorySource(Protocol):
    """Resolves ``mem://`` adapter paths to tensors held in this process."""

    def get(self, uri: str) -> AdapterWeights | None:
        """The version's weights, or None when this process does not hold it."""
        ...


@dataclasses.dataclass
class _Attached:
    adapter: EngineAdapter
    key: str
    modules: tuple[str, ...]
    tensors: tuple[torch.Tensor, ...]
    versions: tuple[int, ...]
    """In-place version counters at attach time (immutability check)."""
    source: str

    def modified(self) -> bool:
        return tuple(t._version for t in self.tensors) != self.versions


@dataclasses.dataclass(eq=False)
class _Item:
    """One GenerationRequest waiting for (or in) a batch."""

    request: GenerationRequest
    runs: int
    """Rows it needs: 1 for greedy (replicated to n), n otherwise."""
    future: asyncio.Future[list[Sample]]
    on_delta: Callable[[int, SampleDelta], None] | None = None
    """Called from the worker thread with (row index, delta) as tokens come."""
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False


@dataclasses.dataclass(eq=False)
class _Row:
    item: _Item
    index: int
    prompt: list[int]
    spec: SamplingSpec
    key: str | None
    generator: torch.Generator | None
    max_stop: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str = ""
    emitted_tokens: int = 0
    emitted_chars: int = 0
    finish: FinishReason | None = None


class TorchEngine:
    """An :class:`~lorafleet.rollout.engine.Engine` on a transformers causal LM."""

    kind = "torch"

    def __init__(
        self,
        *,
        model_path: str,
        max_loras: int = 8,
        max_cpu_loras: int = 32,
        max_lora_rank: int = 16,
        max_model_len: int = 128,
        dtype: str = "float32",
        device: str = "cpu",
        seed: int = 0,
        max_num_seqs: int | None = None,
        batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS,
        logprobs_mode: str = "raw_logprobs",
        model: nn.Module | None = None,
        routing_state: RoutingState | None = None,
        lock: threading.RLock | None = None,
        memory: MemorySource | None = None,
    ) -> None:
        """``model`` / ``routing_state`` / ``lock``: run on an already loaded model
        (the co-located node passes the trainer's; adapters then live in the same
        layers as the trainer's under their own keys). Otherwise ``start`` loads
        ``model_path``. ``memory`` resolves ``mem://`` adapter paths."""
        if (model is None) != (routing_state is None):
            raise ValueError("model and routing_state are given together")
        if logprobs_mode not in ("raw_logprobs", "processed_logprobs"):
            raise ConfigError(f"unknown logprobs_mode {logprobs_mode!r}")
        self.model_path = model_path
        self._max_loras = max_loras
        self._max_cpu_loras = max(max_cpu_loras, max_loras)
        self._max_lora_rank = max_lora_rank
        self._max_model_len = max_model_len
        self._dtype = dtype
        self._device_name = device
        self._seed = seed
        self._max_num_seqs = max_num_seqs or DEFAULT_MAX_NUM_SEQS
        self._batch_wait_s = batch_wait_ms / 1000.0
        self._processed_logprobs = logprobs_mode == "processed_logprobs"
        self._model = model
        self._state = routing_state
        self._shared = model is not None
        self.lock = lock or threading.RLock()
        """Held around every forward and every change to the layers."""
        self._memory = memory
        self._tokenizer: Any = None
        self._eos: frozenset[int] = frozenset()
        self._pad_id = 0
        self._vocab_size = 0
        self._device: Any = None
        self._generator: Any = None
        self._epoch = 0
        self._started_at = 0.0
        self._closed = False
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="torch-engine"
        )
        self._attached: dict[int, _Attached] = {}
        self._pending: list[_Item] = []
        self._running = 0
        self._wakeup: asyncio.Event | None = None
        self._batcher: asyncio.Task[None] | None = None
        self.load_counts: Counter[str] = Counter()
        """Adapter versions attached, by source ("file" / "memory")."""
        self.batch_log: list[tuple[int, int]] = []
        """(rows, distinct adapters incl. base) of the last batches run."""

    @classmethod
    def from_settings(cls, settings: RolloutSettings, model_path: str) -> TorchEngine:
        """The engine ``lorafleet serve rollout`` builds for ``engine: torch``."""
        import torch

        return cls(
            model_path=model_path,
            max_loras=settings.max_loras,
            max_cpu_loras=settings.max_cpu_loras,
            max_lora_rank=settings.max_lora_rank,
            max_model_len=settings.max_model_len,
            dtype=settings.dtype,
            # RolloutSettings has no device field: the accelerator when there is one.
            device="cuda" if torch.cuda.is_available() else "cpu",
            seed=settings.seed,
            max_num_seqs=settings.max_num_seqs,
            logprobs_mode=settings.logprobs_mode,
        )

    # -- properties -------------------------------------------------------------------

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def max_lora_rank(self) -> int:
        return self._max_lora_rank

    @property
    def max_loras(self) -> int:
        return self._max_loras

    @property
    def max_cpu_loras(self) -> int:
        return self._max_cpu_loras

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def model(self) -> nn.Module:
        if self._model is None:
            raise Unavailable("the rollout engine is not started", reason="ENGINE_NOT_STARTED")
        return self._model

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if self._epoch:
            return
        started = time.perf_counter()
        await self._in_worker(self._load)
        self._epoch = 1
        self._started_at = time.time()
        await self._warmup()
        start_s = time.perf_counter() - started
        metrics.ENGINE_START_SECONDS.observe(start_s)
        log.info(
            "engine_started",
            engine=self.kind,
            model=self.model_path,
            shared_model=self._shared,
            device=str(self._device),
            start_s=round(start_s, 2),
        )

    def _load(self) -> None:
        import torch
        from transformers import AutoTokenizer

        from lorafleet.lora.layers import RoutingState

        if self._model is None:
            from transformers import AutoModelForCausalLM

            dtype = "auto" if self._dtype == "auto" else getattr(torch, self._dtype)
            model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            model.to(self._device_name)
            model.requires_grad_(False)
            model.eval()
            self._model = model
            self._state = RoutingState()
        model = self._model
        self._device = next(model.parameters()).device
        config = model.config
        positions = int(getattr(config, "max_position_embeddings", 0) or 0)
        if positions and self._max_model_len > positions:
            raise ConfigError(
                f"max_model_len {self._max_model_len} is above the model's "
                f"max_position_embeddings {positions}",
                reason="MAX_MODEL_LEN_TOO_LARGE",
            )
        self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self._vocab_size = int(config.vocab_size)
        eos: set[int] = set()
        generation = getattr(model, "generation_config", None)
        for source in (getattr(generation, "eos_token_id", None), config.eos_token_id):
            if isinstance(source, int):
                eos.add(source)
            elif source:
                eos.update(int(t) for t in source)
        self._eos = frozenset(eos)
        pad = getattr(generation, "pad_token_id", None)
        self._pad_id = int(pad if pad is not None else (config.pad_token_id or 0))
        self._generator = torch.Generator(device=self._device).manual_seed(self._seed)

    async def _warmup(self) -> None:
        """One tiny request, so the first real one does not pay lazy setup."""
        ids = self.tokenize("a") or [0]
        await self.generate(
            [GenerationRequest(tuple(ids[:1]), 1, SamplingSpec(max_tokens=1, logprobs=False))]
        )

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._batcher
        for item in self._pending:
            item.cancelled = True
            if not item.future.done():
                item.future.set_exception(_closed())
        self._pending.clear()
        if self._model is not None:
            # On a shared model the layers outlive this engine: leave them as found.
            with contextlib.suppress(Exception):
                await asyncio.get_running_loop().run_in_executor(
                    self._executor, self._detach_all
                )
        self._executor.shutdown(wait=False, cancel_futures=True)
        if not self._shared:
            self._model = None
        log.info("engine_stopped", engine=self.kind, epoch=self._epoch)

    def _detach_all(self) -> None:
        for attached in list(self._attached.values()):
            self._detach(attached)

    async def _in_worker(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise _closed()
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _live(self) -> None:
        if self._closed:
            raise _closed()
        if not self._epoch:
            raise Unavailable("the rollout engine is not started", reason="ENGINE_NOT_STARTED")

    # -- tokens -----------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            raise Unavailable("the rollout engine is not started", reason="ENGINE_NOT_STARTED")
        return list(self._tokenizer.encode(text))

    def _decode(self, tokens: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(tokens), skip_special_tokens=True))

    # -- generation -------------------------------------------------------------------

    def _check(self, request: GenerationRequest, index: int) -> None:
        ids = request.prompt_token_ids
        if not ids:
            raise InvalidArgument(
                f"prompt {index} is empty",
                reason="EMPTY_PROMPT",
                metadata={"field": f"prompts[{index}]"},
            )
        if len(ids) + request.sampling.max_tokens > self._max_model_len:
            raise InvalidArgument(
                f"prompt {index} has {len(ids)} tokens; with max_tokens "
                f"{request.sampling.max_tokens} that is beyond the model length "
                f"{self._max_model_len}",
                reason="PROMPT_TOO_LONG",
                metadata={
                    "field": f"prompts[{index}]",
                    "prompt_tokens": str(len(ids)),
                    "max_tokens": str(request.sampling.max_tokens),
                    "max_model_len": str(self._max_model_len),
                },
            )
        if any(not 0 <= t < self._vocab_size for t in ids):
            raise InvalidArgument(
                f"prompt {index} has a token id outside [0, {self._vocab_size})",
                reason="TOKEN_ID_OUT_OF_RANGE",
                metadata={"field": f"prompts[{index}]"},
            )
        if request.adapter is not None:
            self._attached_for(request.adapter)

    def _attached_for(self, adapter: EngineAdapter) -> _Attached:
        attached = self._attached.get(adapter.engine_id)
        if attached is None:
            raise FailedPrecondition(
                f"{adapter.name} is not loaded in the engine",
                reason="ADAPTER_NOT_LOADED",
                metadata={"adapter": adapter.name},
            )
        return attached

    def _submit(
        self,
        requests: Sequence[GenerationRequest],
        on_delta: Callable[[int, int, SampleDelta], None] | None = None,
    ) -> list[_Item]:
        self._live()
        for i, request in enumerate(requests):
            self._check(request, i)
        loop = asyncio.get_running_loop()
        items = []
        for p, request in enumerate(requests):
            runs = 1 if request.sampling.greedy else request.n
            callback = None
            if on_delta is not None:
                callback = _bind_prompt(on_delta, p)
            items.append(_Item(request, runs, loop.create_future(), callback))
        self._pending.extend(items)
        if self._batcher is None or self._batcher.done():
            self._wakeup = asyncio.Event()
            self._batcher = loop.create_task(self._batch_loop(), name="torch-engine-batcher")
        assert self._wakeup is not None
        self._wakeup.set()
        return items

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[PromptSamples]:
        items = self._submit(requests)
        try:
            results = await asyncio.gather(*(it.future for it in items))
        except BaseException:
            for it in items:
                it.cancelled = True
                if not it.future.done():
                    it.future.cancel()
            raise
        out = []
        for item, samples in zip(items, results, strict=True):
            if item.runs == 1 and item.request.n > 1:
                samples = samples * item.request.n
            out.append(PromptSamples(tuple(item.request.prompt_token_ids), tuple(samples)))
        return out

    async def generate_stream(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncIterator[SampleDelta]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[SampleDelta] = asyncio.Queue()
        copies = {}

        def on_delta(prompt: int, row: int, delta: SampleDelta) -> None:
            for copy in range(copies[prompt]):
                index = row if copies[prompt] == 1 else copy
                loop.call_soon_threadsafe(
                    queue.put_nowait, dataclasses.replace(delta, sample_index=index)
                )

        for p, request in enumerate(requests):
            copies[p] = request.n if request.sampling.greedy else 1
        items = self._submit(requests, on_delta)
        done = asyncio.gather(*(it.future for it in items))
        getter: asyncio.Future[SampleDelta] | None = None
        try:
            while True:
                getter = asyncio.ensure_future(queue.get())
                finished, _ = await asyncio.wait(
                    {getter, done}, return_when=asyncio.FIRST_COMPLETED
                )
                if getter in finished:
                    yield getter.result()
                    continue
                done.result()  # raises the first failure
                # Every delta was queued (call_soon_threadsafe) before the batch returned.
                while not queue.empty():
                    yield queue.get_nowait()
                return
        finally:
            if getter is not None and not getter.done():
                getter.cancel()
            for it in items:
                it.cancelled = True
                if not it.future.done():
                    it.future.cancel()
            if not done.done():
                done.cancel()
            with contextlib.suppress(BaseException):
                await done

    async def _batch_loop(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            self._pending = [it for it in self._pending if not it.future.done()]
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            deadline = self._pending[0].arrived + self._batch_wait_s
            while sum(it.runs for it in self._pending) < self._max_num_seqs:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
            batch = self._take()
            if not batch:
                continue
            self._running += len(batch)
            try:
                results = await loop.run_in_executor(self._executor, self._run_items, batch)
            except BaseException as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(
                            exc if isinstance(exc, LorafleetError) else _closed()
                        )
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            finally:
                self._running -= len(batch)
            for item, result in zip(batch, results, strict=True):
                if item.future.done():
                    continue
                if isinstance(result, BaseException):
                    item.future.set_exception(result)
                else:
                    item.future.set_result(result)

    def _take(self) -> list[_Item]:
        """The next batch in arrival order, within the row and adapter budgets."""
        batch: list[_Item] = []
        adapters: set[int] = set()
        rows = 0
        for item in list(self._pending):
            if item.future.done():
                continue
            adapter = item.request.adapter
            new_adapter = adapter is not None and adapter.engine_id not in adapters
            if batch and (
                rows + item.runs > self._max_num_seqs
                or (new_adapter and len(adapters) >= self._max_loras)
            ):
                continue
            batch.append(item)
            rows += item.runs
            if adapter is not None:
                adapters.add(adapter.engine_id)
        taken = {id(it) for it in batch}
        self._pending = [it for it in self._pending if id(it) not in taken]
        return batch

    # -- worker thread: generation ----------------------------------------------------

    def _run_items(self, items: list[_Item]) -> list[list[Sample] | BaseException]:
        """Run ``items`` as one batch; a failing batch is retried item by item so
        only the culprit fails."""
        out: list[list[Sample] | BaseException | None] = [None] * len(items)
        live: list[int] = []
        for i, item in enumerate(items):
            try:
                self._check_adapter_intact(item.request.adapter)
                live.append(i)
            except LorafleetError as exc:
                out[i] = exc
        if not live:
            return out  # type: ignore[return-value]
        try:
            results = self._generate_batch([items[i] for i in live])
            for i, result in zip(live, results, strict=True):
                out[i] = result
        except Exception as exc:
            if len(live) == 1:
                log.exception("generation_failed", requests=1)
                out[live[0]] = _generation_failed(exc)
            else:
                log.warning("batch_failed_retrying_alone", error=repr(exc), requests=len(live))
                for i in live:
                    try:
                        out[i] = self._generate_batch([items[i]])[0]
                    except Exception as exc1:
                        log.exception("generation_failed", requests=1)
                        out[i] = _generation_failed(exc1)
        return out  # type: ignore[return-value]

    def _check_adapter_intact(self, adapter: EngineAdapter | None) -> None:
        if adapter is None:
            return
        attached = self._attached_for(adapter)
        if attached.modified():
            raise DataLoss(
                f"the weights of {adapter.name} changed after they were loaded",
                reason="ADAPTER_WEIGHTS_MODIFIED",
                metadata={"adapter": adapter.name},
            )

    def _rows(self, items: list[_Item]) -> list[_Row]:
        import torch

        rows = []
        for item in items:
            request = item.request
            key = None
            if request.adapter is not None:
                key = self._attached[request.adapter.engine_id].key
            for index in range(item.runs):
                generator = None
                if request.sampling.seed is not None and not request.sampling.greedy:
                    generator = torch.Generator(device=self._device).manual_seed(
                        _row_seed(request.sampling.seed, index)
                    )
                rows.append(
                    _Row(
                        item=item,
                        index=index,
                        prompt=list(request.prompt_token_ids),
                        spec=request.sampling,
                        key=key,
                        generator=generator,
                        max_stop=max((len(s) for s in request.sampling.stop), default=0),
                    )
                )
        # Rows of one adapter contiguous: the layers then slice (views) per adapter.
        order = {k: i for i, k in enumerate(dict.fromkeys(r.key for r in rows))}
        rows.sort(key=lambda r: order[r.key])
        return rows

    def _generate_batch(self, items: list[_Item]) -> list[list[Sample]]:
        import torch

        from lorafleet.lora.layers import Routing

        rows = self._rows(items)
        self.batch_log.append((len(rows), len({r.key for r in rows})))
        del self.batch_log[:-64]
        width = max(len(r.prompt) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id, dtype=torch.long)
        attn = torch.zeros((len(rows), width), dtype=torch.long)
        for n, row in enumerate(rows):
            ids[n, width - len(row.prompt) :] = torch.tensor(row.prompt, dtype=torch.long)
            attn[n, width - len(row.prompt) :] = 1
        ids, attn = ids.to(self._device), attn.to(self._device)
        position = (attn.cumsum(-1) - 1).clamp(min=0)
        active = list(range(len(rows)))
        routing = Routing([r.key for r in rows], device=self._device)
        past = None
        steps = max(r.spec.max_tokens for r in rows)
        with torch.inference_mode():
            for step in range(steps):
                if self._closed:
                    raise _closed()
                with self._routed(routing):
                    out = self.model(
                        input_ids=ids,
                        attention_mask=attn,
                        position_ids=position,
                        past_key_values=past,
                        use_cache=True,
                        logits_to_keep=1,
                    )
                past = out.past_key_values
                live_rows = [rows[i] for i in active]
                tokens, logprobs = self._choose(out.logits[:, -1].float(), live_rows)
                for row, token, logprob in zip(live_rows, tokens, logprobs, strict=True):
                    self._advance(row, token, logprob)
                keep = [
                    j
                    for j, row in enumerate(live_rows)
                    if row.finish is None and not row.item.cancelled
                ]
                for row in live_rows:
                    if row.finish is None and row.item.cancelled:
                        row.finish = FinishReason.ABORTED
                if not keep or step == steps - 1:
                    break
                next_ids = torch.tensor(tokens, dtype=torch.long, device=self._device)
                if len(keep) < len(live_rows):
                    index = torch.tensor(keep, dtype=torch.long, device=self._device)
                    past.batch_select_indices(index)
                    attn, position, next_ids = attn[index], position[:, -1:][index], next_ids[index]
                    active = [active[j] for j in keep]
                    routing = Routing([rows[i].key for i in active], device=self._device)
                ids = next_ids[:, None]
                attn = torch.cat([attn, attn.new_ones((attn.shape[0], 1))], dim=1)
                position = position[:, -1:] + 1
        by_item: dict[int, list[Sample]] = {id(it): [None] * it.runs for it in items}  # type: ignore[misc]
        for row in rows:
            if row.finish is None:  # pragma: no cover - every row ends inside the loop
                row.finish = FinishReason.LENGTH
                row.text = self._decode(row.tokens)
            by_item[id(row.item)][row.index] = Sample(
                token_ids_T=tuple(row.tokens),
                text=row.text,
                logprobs_T=tuple(row.logprobs) if row.spec.logprobs else (),
                finish_reason=row.finish,
            )
        return [by_item[id(it)] for it in items]

    @contextlib.contextmanager
    def _routed(self, routing: Any) -> Iterator[None]:
        assert self._state is not None
        with self.lock:
            previous = self._state.current
            self._state.current = routing
            try:
                yield
            finally:
                self._state.current = previous

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> tuple[list[int], list[float]]:
        """Next token and its logprob for each row (per-row sampling parameters)."""
        import torch

        raw = torch.log_softmax(logits, dim=-1)
        chosen = logits.argmax(dim=-1)
        logprob_source = raw
        sampled = [j for j, r in enumerate(rows) if not r.spec.greedy]
        if sampled:
            index = torch.tensor(sampled, dtype=torch.long, device=logits.device)
            specs = [rows[j].spec for j in sampled]
            scaled = logits[index] / torch.tensor(
                [s.temperature for s in specs], device=logits.device
            ).unsqueeze(-1)
            scaled = _top_k_top_p(scaled, specs)
            probs = torch.softmax(scaled, dim=-1)
            picks = torch.empty(len(sampled), dtype=torch.long, device=logits.device)
            shared = [k for k, j in enumerate(sampled) if rows[j].generator is None]
            if shared:
                at = torch.tensor(shared, dtype=torch.long, device=logits.device)
                picks[at] = torch.multinomial(probs[at], 1, generator=self._generator)[:, 0]
            for k, j in enumerate(sampled):
                generator = rows[j].generator
                if generator is not None:
                    picks[k] = torch.multinomial(probs[k], 1, generator=generator)[0]
            chosen = chosen.clone()
            chosen[index] = picks
            if self._processed_logprobs:
                logprob_source = raw.clone()
                logprob_source[index] = torch.log_softmax(scaled, dim=-1)
        picked = logprob_source.gather(-1, chosen.unsqueeze(-1))[:, 0]
        return chosen.tolist(), picked.tolist()

    def _advance(self, row: _Row, token: int, logprob: float) -> None:
        row.tokens.append(token)
        row.logprobs.append(logprob)
        spec = row.spec
        stop_token = token in self._eos and not spec.ignore_eos
        if stop_token:
            row.finish = FinishReason.STOP
        elif len(row.tokens) >= spec.max_tokens:
            row.finish = FinishReason.LENGTH
        needs_text = row.finish is not None or spec.stop or row.item.on_delta is not None
        if needs_text:
            # The stop token's own text is left out (as vLLM does); special tokens too.
            row.text = self._decode(row.tokens[:-1] if stop_token else row.tokens)
        if spec.stop and not stop_token:
            cut = _find_stop(row.text, spec.stop)
            if cut is not None:
                row.text = row.text[:cut]
                row.finish = FinishReason.STOP
        if row.item.on_delta is not None:
            self._emit(row)

    def _emit(self, row: _Row) -> None:
        # Text that could still turn out to begin a stop string is held back.
        hold = 0 if row.finish is not None else max(row.max_stop - 1, 0)
        upto = max(len(row.text) - hold, row.emitted_chars)
        delta = SampleDelta(
            prompt_index=0,
            sample_index=row.index,
            token_ids=tuple(row.tokens[row.emitted_tokens :]),
            text=row.text[row.emitted_chars : upto],
            logprobs=tuple(row.logprobs[row.emitted_tokens :]) if row.spec.logprobs else (),
            finish_reason=row.finish,
        )
        row.emitted_tokens = len(row.tokens)
        row.emitted_chars = upto
        assert row.item.on_delta is not None
        row.item.on_delta(row.index, delta)

    # -- scoring ----------------------------------------------------------------------

    async def compute_logprobs(
        self, sequences: Sequence[ScoreSequence], adapter: EngineAdapter | None
    ) -> list[list[float]]:
        self._live()
        if adapter is not None:
            self._attached_for(adapter)
        for i, seq in enumerate(sequences):
            if len(seq.token_ids) > self._max_model_len:
                raise InvalidArgument(
                    f"sequence {i} has {len(seq.token_ids)} tokens, beyond the model length "
                    f"{self._max_model_len}",
                    reason="SEQUENCE_TOO_LONG",
                    metadata={"field": f"sequences[{i}]"},
                )
            if any(not 0 <= t < self._vocab_size for t in seq.token_ids):
                raise InvalidArgument(
                    f"sequence {i} has a token id outside [0, {self._vocab_size})",
                    reason="TOKEN_ID_OUT_OF_RANGE",
                    metadata={"field": f"sequences[{i}]"},
                )
        self._running += 1
        try:
            return await self._in_worker(self._score, list(sequences), adapter)  # type: ignore[no-any-return]
        finally:
            self._running -= 1

    def _score(
        self, sequences: list[ScoreSequence], adapter: EngineAdapter | None
    ) -> list[list[float]]:
        import torch

        from lorafleet.lora.layers import Routing

        self._check_adapter_intact(adapter)
        key = None if adapter is None else self._attached[adapter.engine_id].key
        out: list[list[float]] = []
        with torch.inference_mode():
            for lo in range(0, len(sequences), self._max_num_seqs):
                chunk = sequences[lo : lo + self._max_num_seqs]
                width = max(len(s.token_ids) for s in chunk)
                if width < 2:
                    out += [[] for _ in chunk]
                    continue
                # Right padding needs no mask: a causal model's real positions never
                # see the pads after them.
                ids = torch.full((len(chunk), width), self._pad_id, dtype=torch.long)
                for n, seq in enumerate(chunk):
                    ids[n, : len(seq.token_ids)] = torch.tensor(seq.token_ids, dtype=torch.long)
                ids = ids.to(self._device)
                with self._routed(Routing([key] * len(chunk), device=self._device)):
                    logits = self.model(input_ids=ids, use_cache=False).logits[:, :-1]
                lp = torch.log_softmax(logits.float(), dim=-1)
                lp = lp.gather(-1, ids[:, 1:].unsqueeze(-1))[..., 0].cpu()
                for n, seq in enumerate(chunk):
                    start = max(seq.prompt_length, 1)
                    out.append(lp[n, start - 1 : len(seq.token_ids) - 1].tolist())
        return out

    # -- adapters ---------------------------------------------------------------------

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        self._live()
        if adapter.rank > self._max_lora_rank:
            raise rank_above_max(adapter.rank, self._max_lora_rank, adapter.name)
        if adapter.engine_id in self._attached:
            return
        started = time.perf_counter()
        if adapter.path.startswith(MEMORY_SCHEME):
            weights = self._memory.get(adapter.path) if self._memory is not None else None
            if weights is None:
                raise FailedPrecondition(
                    f"{adapter.name}: {adapter.path} is not held in this process",
                    reason="ADAPTER_LOAD_FAILED",
                    metadata={"adapter": adapter.name, "path": adapter.path},
                )
        else:
            weights = await asyncio.to_thread(_read_peft, adapter)
        await self._in_worker(self._attach, adapter, weights)
        self.load_counts[weights.source] += 1
        log.info(
            "engine_adapter_added",
            engine=self.kind,
            adapter=adapter.name,
            engine_id=adapter.engine_id,
            rank=weights.spec.rank,
            source=weights.source,
            path=adapter.path,
            attach_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    def _attach(self, adapter: EngineAdapter, weights: AdapterWeights) -> None:
        import torch
        from torch import nn

        from lorafleet.lora.layers import MultiLoraLinear, inject_multi_lora, linear_shapes

        if adapter.engine_id in self._attached:
            return
        spec = weights.spec
        if spec.rank > self._max_lora_rank:
            raise rank_above_max(spec.rank, self._max_lora_rank, adapter.name)
        tensors = weights.tensors
        modules = sorted({name.rsplit(".lora_", 1)[0] for name in tensors})
        shapes = linear_shapes(self.model)
        order = {path: i for i, path in enumerate(shapes)}
        for path in modules:
            a, b = tensors.get(path + _LORA_A), tensors.get(path + _LORA_B)
            if path not in shapes or a is None or b is None:
                raise _load_failed(adapter, f"module {path} is not a linear layer of the model "
                                   "or lacks its lora_A / lora_B")
            fan_in, fan_out = shapes[path]
            if tuple(a.shape) != (spec.rank, fan_in) or tuple(b.shape) != (fan_out, spec.rank):
                raise _load_failed(
                    adapter,
                    f"module {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not "
                    f"fit rank {spec.rank} on a {fan_in}->{fan_out} layer",
                )
        modules.sort(key=order.__getitem__)
        dtype = next(self.model.parameters()).dtype
        params = {name: t.to(device=self._device, dtype=_adapter_dtype(dtype))
                  for name, t in tensors.items()}
        finite = all(bool(torch.isfinite(t).all()) for t in params.values())
        if not finite:
            raise FailedPrecondition(
                f"{adapter.name} has non-finite weights",
                reason="ADAPTER_WEIGHTS_NOT_FINITE",
                metadata={"adapter": adapter.name},
            )
        key = f"r{adapter.engine_id}"
        assert self._state is not None
        with self.lock:
            layers = inject_multi_lora(self.model, modules, self._state)
            attached_tensors: list[torch.Tensor] = []
            for path in modules:
                layer = layers[path]
                assert isinstance(layer, MultiLoraLinear)
                a, b = params[path + _LORA_A], params[path + _LORA_B]
                # Parameters that are views of the version's tensors: no copy.
                layer.lora_A[key] = nn.Parameter(a, requires_grad=False)
                layer.lora_B[key] = nn.Parameter(b, requires_grad=False)
                layer.scaling[key] = spec.scaling
                layer.dropout[key] = 0.0
                attached_tensors += [a, b]
            self._attached[adapter.engine_id] = _Attached(
                adapter=adapter,
                key=key,
                modules=tuple(modules),
                tensors=tuple(attached_tensors),
                versions=tuple(t._version for t in attached_tensors),
                source=weights.source,
            )

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        if self._closed or adapter.engine_id not in self._attached:
            return
        with contextlib.suppress(Unavailable):
            await self._in_worker(self._detach_id, adapter.engine_id)

    def _detach_id(self, engine_id: int) -> None:
        attached = self._attached.get(engine_id)
        if attached is not None:
            self._detach(attached)

    def _detach(self, attached: _Attached) -> None:
        with self.lock:
            for path in attached.modules:
                self.model.get_submodule(path).remove_adapter(attached.key)  # type: ignore[operator]
            self._attached.pop(attached.adapter.engine_id, None)

    def attached_source(self, adapter: EngineAdapter) -> str | None:
        """Where an attached version's weights came from ("file"/"memory"), or None."""
        attached = self._attached.get(adapter.engine_id)
        return attached.source if attached else None

    def attached_tensors(self, adapter: EngineAdapter) -> tuple[torch.Tensor, ...]:
        """The tensors the layers use for ``adapter`` (for sharing checks)."""
        return self._attached_for(adapter).tensors

    # -- status -----------------------------------------------------------------------

    def status(self) -> EngineStatus:
        return EngineStatus(
            engine=self.kind,
            base_model=self.model_path,
            max_loras=self._max_loras,
            max_cpu_loras=self._max_cpu_loras,
            max_lora_rank=self._max_lora_rank,
            max_model_len=self._max_model_len,
            running_requests=self._running + len(self._pending),
            healthy=bool(self._epoch) and not self._closed,
            epoch=self._epoch,
            started_at=self._started_at,
        )


# -- helpers ------------------------------------------------------------------------------


def _closed() -> Unavailable:
    return Unavailable("the rollout engine is shut down", reason="ENGINE_CLOSED")


def _generation_failed(exc: BaseException) -> LorafleetError:
    if isinstance(exc, LorafleetError):
        return exc
    return Internal(f"generation failed: {exc!r}", reason="GENERATION_FAILED")


def _load_failed(adapter: EngineAdapter, why: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"the engine could not load {adapter.name}: {why}",
        reason="ADAPTER_LOAD_FAILED",
        metadata={"adapter": adapter.name},
    )


def _read_peft(adapter: EngineAdapter) -> AdapterWeights:
    from lorafleet.lora.peft_io import load_peft_adapter

    try:
        loaded = load_peft_adapter(adapter.path)
    except LorafleetError as exc:
        raise FailedPrecondition(
            f"the engine could not load {adapter.name}: {exc}",
            reason="ADAPTER_LOAD_FAILED",
            metadata={"adapter": adapter.name, "cause": exc.reason},
        ) from None
    except Exception as exc:  # unreadable safetensors, I/O errors
        raise _load_failed(adapter, repr(exc)) from None
    return AdapterWeights(spec=loaded.spec, tensors=loaded.tensors, source="file")


def _adapter_dtype(base_dtype: Any) -> Any:
    import torch

    # Adapters stay fp32 over a half-precision base (the layers cast inputs), as
    # the trainer keeps them.
    return torch.float32 if base_dtype in (torch.float16, torch.bfloat16) else base_dtype


def _row_seed(seed: int, index: int) -> int:
    """Independent, reproducible streams for the samples of one seeded request."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


def _bind_prompt(
    fn: Callable[[int, int, SampleDelta], None], prompt: int
) -> Callable[[int, SampleDelta], None]:
    def bound(row: int, delta: SampleDelta) -> None:
        fn(prompt, row, dataclasses.replace(delta, prompt_index=prompt))

    return bound


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the earliest-completing stop string starts in ``text`` (vLLM's rule)."""
    best: tuple[int, int] | None = None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and (best is None or at + len(stop) < best[0]):
            best = (at + len(stop), at)
    return None if best is None else best[1]


def _top_k_top_p(scaled: torch.Tensor, specs: Sequence[SamplingSpec]) -> torch.Tensor:
    """Mask (to -inf) what top-k and top-p leave out, per row; the most likely
    token always stays."""
    import torch

    vocab = scaled.shape[-1]
    ks = [s.top_k if 0 < s.top_k < vocab else vocab for s in specs]
    ps = [s.top_p if 0.0 < s.top_p < 1.0 else 1.0 for s in specs]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in ps):
        return scaled
    ordered, order = scaled.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=scaled.device).unsqueeze(0)
    drop = rank >= torch.tensor(ks, device=scaled.device).unsqueeze(-1)
    ordered = ordered.masked_fill(drop, -math.inf)
    if any(p < 1.0 for p in ps):
        probs = torch.softmax(ordered, dim=-1)
        before = probs.cumsum(dim=-1) - probs
        drop = before > torch.tensor(ps, device=scaled.device).unsqueeze(-1)
        drop[:, 0] = False
        ordered = ordered.masked_fill(drop, -math.inf)
    return torch.full_like(scaled, -math.inf).scatter(-1, order, ordered)
