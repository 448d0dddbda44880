"""The vLLM rollout engine: one always-hot ``AsyncLLM`` with LoRA enabled.

vLLM's v1 engine runs its scheduler and model in subprocesses (spawned on CPU),
so every program that starts one needs the ``if __name__ == "__main__":`` guard.
Requests of every experiment go to the same ``AsyncLLM``; concurrent calls meet
in one continuous batch, mixing adapters (up to ``max_loras`` distinct adapters
per step, vLLM's own LRU over ``max_cpu_loras`` loaded ones).

What this module adds on top of vLLM:

- adapters are ``add_lora``-ed (validated) before any request names them: vLLM
  loads an unknown ``LoRARequest`` inside the engine step, where a bad adapter
  (rank too large, missing file) kills the engine for every experiment;
- greedy requests with ``n > 1`` run once and are replicated (vLLM refuses
  ``n > 1`` with greedy sampling, and the samples would be identical anyway);
- ``compute_logprobs`` scores a full sequence with ``prompt_logprobs`` over all
  but its last token, plus the last token as a forced one-token sample
  (``allowed_token_ids``): the raw logprob of the forced token is exactly its
  logprob, and the request fits in ``max_model_len`` even when the sequence is
  ``max_model_len`` long (which a plain prompt-logprobs request would not);
- on CPU, the engine's scheduler and model in one process
  (:mod:`lorafleet.rollout.engine_process`), not two that meet over shared memory
  at every decode step;
- on CPU, fixes for vLLM's torch LoRA path (:mod:`lorafleet.rollout.vllm_patches`):
  base-model rows of mixed batches got the last adapter slot's delta, and a
  prompt-logprobs request batched with any other request killed the engine;
- on CPU, each prompt computed once per model step in the linear layers however
  many samples start from it (:mod:`lorafleet.rollout.vllm_shared_prompts`);
- engine death (``EngineDeadError``, or ``errored`` seen by the monitor) answers
  UNAVAILABLE and restarts the engine in the background; ``epoch`` tells the
  adapter manager that its loaded set is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from lorafleet.core.errors import (
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from lorafleet.rollout import metrics
from lorafleet.rollout.allocator import preload_tcmalloc
from lorafleet.rollout.engine_process import engine_threads, use_one_process, worker_threads
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
from lorafleet.rollout.vllm_plugin import SPIN_ENV
from lorafleet.rollout.vllm_shared_prompts import SHARE_ENV

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.async_llm import AsyncLLM

log = structlog.get_logger(__name__)

# vLLM sizes its LoRA kernels for one of these ranks; a node maximum in between
# runs on the next one up (our own rank check still enforces the node maximum).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
CPU_DEFAULT_KV_CACHE_GIB = 0.5
"""KV cache on CPU when no size is configured."""
CPU_DEFAULT_SPIN_MS = 5.0
"""How long engine processes spin after a message on CPU (see
lorafleet.rollout.vllm_plugin); vLLM's own one second holds a core per process."""
GIB = 1024**3

UNSUPPORTED_TARGETS = frozenset({"lm_head", "embed_tokens"})
CPU_LORA_FIX = "lorafleet.rollout.vllm_patches.LoraNoLoraRowsFix"

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORTED}


def vllm_rank(max_rank: int) -> int:
    for rank in VLLM_LORA_RANKS:
        if rank >= max_rank:
            return rank
    raise FailedPrecondition(
        f"max_lora_rank {max_rank} is above vLLM's largest ({VLLM_LORA_RANKS[-1]})",
        reason="RANK_ABOVE_ENGINE_MAX",
    )


class VllmEngine:
    """An :class:`~lorafleet.rollout.engine.Engine` on vLLM's ``AsyncLLM``."""

    kind = "vllm"

    def __init__(
        self,
        *,
        model_path: str,
        max_loras: int = 8,
        max_cpu_loras: int = 32,
        max_lora_rank: int = 16,
        max_model_len: int = 128,
        gpu_memory_utilization: float = 0.05,
        kv_cache_gib: float | None = None,
        dtype: str = "float32",
        seed: int = 0,
        enforce_eager: bool = True,
        max_num_seqs: int | None = None,
        logprobs_mode: str = "raw_logprobs",
        health_check_interval_s: float = 5.0,
        spin_ms: float | None = None,
        preload_tcmalloc: bool = True,
        cpu_one_process: bool = True,
        share_prompt_rows: bool = True,
    ) -> None:
        self.model_path = model_path
        self._max_loras = max_loras
        # vLLM requires the CPU cache to hold at least the active slots.
        self._max_cpu_loras = max(max_cpu_loras, max_loras)
        self._max_lora_rank = max_lora_rank
        self._max_model_len = max_model_len
        self._gpu_memory_utilization = gpu_memory_utilization
        self._kv_cache_gib = kv_cache_gib
        self._dtype = dtype
        self._seed = seed
        self._enforce_eager = enforce_eager
        self._max_num_seqs = max_num_seqs
        self._logprobs_mode = logprobs_mode
        self._health_check_interval_s = health_check_interval_s
        self._spin_ms = spin_ms
        self._preload_tcmalloc = preload_tcmalloc
        self._cpu_one_process = cpu_one_process
        self._share_prompt_rows = share_prompt_rows
        self._llm: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._vocab_size = 0
        self._epoch = 0
        self._started_at = 0.0
        self._restart_lock = asyncio.Lock()
        self._restart_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._closed = False

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

    # -- lifecycle --------------------------------------------------------------------

    def _engine_args(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs

        kwargs: dict[str, Any] = {}
        kv_cache_gib = self._kv_cache_gib
        if kv_cache_gib is None and _on_cpu():
            # vLLM-CPU sizes the cache as gpu_memory_utilization x the NUMA node's
            # memory minus the worker's own footprint, which goes negative on small
            # nodes (seen: 0.05 x 9.09 GiB - 0.62 GiB) and kills the start. A fixed
            # size is predictable; the tiny model needs ~3 KiB per token.
            kv_cache_gib = CPU_DEFAULT_KV_CACHE_GIB
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * GIB)
        if self._max_num_seqs is not None:
            kwargs["max_num_seqs"] = self._max_num_seqs
        if _on_cpu():
            # Fixes base-model rows getting an adapter's delta in mixed batches
            # on CPU (see lorafleet.rollout.vllm_patches); imported by vLLM in
            # each worker process.
            kwargs["worker_extension_cls"] = CPU_LORA_FIX
            # A prompt prefilled in chunks has its first sampled token discarded,
            # and vLLM then rewinds that request's seeded generator with
            # set_offset(), which CPU generators do not support ("CPU Generator
            # does not use offset"): the engine dies. Whole-prompt prefill never
            # discards; with small max_model_len it costs nothing.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(self._max_model_len, 8192)
        return AsyncEngineArgs(
            model=self.model_path,
            enable_lora=True,
            max_loras=self._max_loras,
            max_cpu_loras=self._max_cpu_loras,
            max_lora_rank=vllm_rank(self._max_lora_rank),
            dtype=self._dtype,
            max_model_len=self._max_model_len,
            gpu_memory_utilization=self._gpu_memory_utilization,
            seed=self._seed,
            enforce_eager=self._enforce_eager,
            logprobs_mode=self._logprobs_mode,
            disable_log_stats=True,
            **kwargs,
        )

    def _vllm_config(self) -> tuple[Any, int | None]:
        """vLLM's config, and the OpenMP threads its engine process needs when
        it runs the model itself (lorafleet.rollout.engine_process); None: leave
        the engine's threads to vLLM."""
        config = self._engine_args().create_engine_config()
        if self._cpu_one_process and _on_cpu():
            threads = worker_threads(config)
            if use_one_process(config):
                return config, threads
        return config, None

    def _build(self) -> AsyncLLM:
        from vllm.v1.engine.async_llm import AsyncLLM

        config, threads = self._vllm_config()
        with engine_threads(threads):
            return AsyncLLM.from_vllm_config(config, disable_log_stats=True)

    async def _create(self) -> AsyncLLM:
        spin_ms = self._spin_ms
        if spin_ms is None and _on_cpu():
            spin_ms = CPU_DEFAULT_SPIN_MS
        if spin_ms is not None:
            # Read by lorafleet.rollout.vllm_plugin in the engine processes, which
            # inherit this process's environment when they start.
            os.environ[SPIN_ENV] = f"{spin_ms:g}"
        # Read by lorafleet.rollout.vllm_patches in the engine process, like SPIN_ENV.
        os.environ[SHARE_ENV] = "1" if self._share_prompt_rows else "0"
        if self._preload_tcmalloc and _on_cpu():
            preload_tcmalloc(os.environ)  # lorafleet.rollout.allocator
        started = time.perf_counter()
        # Built in a worker thread: the constructor blocks for the whole model load
        # (~20 s on 2 CPU cores), and the event loop must keep answering health
        # checks and status calls meanwhile (during a restart). The output handler
        # task then starts on the loop at the first request.
        llm = await asyncio.to_thread(self._build)
        self._tokenizer = llm.get_tokenizer()
        self._vocab_size = int(llm.model_config.get_vocab_size())
        self._epoch += 1
        self._started_at = time.time()
        start_s = time.perf_counter() - started
        metrics.ENGINE_START_SECONDS.observe(start_s)
        log.info(
            "engine_started",
            engine=self.kind,
            model=self.model_path,
            epoch=self._epoch,
            start_s=round(start_s, 2),
        )
        return llm

    async def start(self) -> None:
        if self._llm is not None:
            return
        self._llm = await self._create()
        await self._warmup()
        if self._monitor_task is None:
            self._monitor_task = asyncio.create_task(self._monitor(), name="vllm-engine-monitor")

    async def _warmup(self) -> None:
        """One tiny request, so the first real one does not pay lazy setup."""
        request = GenerationRequest(
            prompt_token_ids=(self._first_token(),), n=1, sampling=SamplingSpec(max_tokens=1)
        )
        await self.generate([request])

    def _first_token(self) -> int:
        ids = self.tokenize("a")
        return ids[0] if ids else 0

    async def close(self) -> None:
        self._closed = True
        for task in (self._monitor_task, self._restart_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)
            _disarm(llm)
            log.info("engine_stopped", engine=self.kind, epoch=self._epoch)

    async def _monitor(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._health_check_interval_s)
            llm = self._llm
            if llm is not None and llm.errored:
                self._schedule_restart("monitor_saw_errored_engine")

    def _schedule_restart(self, cause: str) -> None:
        if self._closed or (self._restart_task is not None and not self._restart_task.done()):
            return
        self._restart_task = asyncio.create_task(self._restart(cause), name="vllm-engine-restart")

    async def _restart(self, cause: str) -> None:
        async with self._restart_lock:
            old, self._llm = self._llm, None
            metrics.ENGINE_RESTARTS.inc()
            log.warning("engine_restarting", engine=self.kind, cause=cause, epoch=self._epoch)
            if old is not None:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(old.shutdown)
                _disarm(old)
            backoff_s = 1.0
            while not self._closed:
                try:
                    self._llm = await self._create()
                    return
                except Exception:
                    log.exception("engine_restart_failed", engine=self.kind)
                    await asyncio.sleep(backoff_s)
                    backoff_s = min(backoff_s * 2, 30.0)

    def _live(self) -> AsyncLLM:
        llm = self._llm
        if llm is None or llm.errored:
            if llm is not None:
                self._schedule_restart("errored_engine_seen_by_request")
            raise Unavailable(
                "the rollout engine is restarting; retry shortly", reason="ENGINE_RESTARTING"
            )
        return llm

    # -- requests ---------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        if self._tokenizer is None:
            raise Unavailable("the rollout engine is not started", reason="ENGINE_NOT_STARTED")
        return list(self._tokenizer.encode(text))

    @staticmethod
    def _lora_request(adapter: EngineAdapter | None) -> LoRARequest | None:
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        return LoRARequest(
            lora_name=adapter.name, lora_int_id=adapter.engine_id, lora_path=adapter.path
        )

    @staticmethod
    def _sampling_params(spec: SamplingSpec, n: int, *, delta: bool) -> SamplingParams:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        return SamplingParams(
            n=n,
            temperature=spec.temperature,
            top_p=spec.top_p if 0.0 < spec.top_p <= 1.0 else 1.0,
            top_k=spec.top_k if spec.top_k > 0 else 0,
            max_tokens=spec.max_tokens,
            stop=list(spec.stop) or None,
            seed=spec.seed,
            logprobs=0 if spec.logprobs else None,
            ignore_eos=spec.ignore_eos,
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
        )

    async def _outputs(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, adapter: EngineAdapter | None
    ) -> AsyncIterator[RequestOutput]:
        """vLLM outputs of one request, with its errors mapped to ours."""
        from vllm import TokensPrompt
        from vllm.exceptions import VLLMNotFoundError, VLLMValidationError
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        llm = self._live()
        request_id = uuid.uuid4().hex
        try:
            async for output in llm.generate(
                TokensPrompt(prompt_token_ids=list(prompt_token_ids)),
                params,
                request_id,
                lora_request=self._lora_request(adapter),
            ):
                yield output
        except EngineDeadError:
            self._schedule_restart("engine_dead_during_request")
            raise Unavailable(
                "the rollout engine died; it is restarting, retry shortly", reason="ENGINE_DEAD"
            ) from None
        except VLLMNotFoundError as exc:
            raise NotFound(str(exc), reason="ADAPTER_FILES_MISSING") from None
        except VLLMValidationError as exc:
            raise InvalidArgument(str(exc), reason="ENGINE_REJECTED_REQUEST") from None
        except EngineGenerateError as exc:
            if llm.errored:
                self._schedule_restart("engine_errored_during_request")
                raise Unavailable("the rollout engine failed", reason="ENGINE_DEAD") from None
            raise Internal(
                f"generation failed: {exc.__cause__!r}", reason="GENERATION_FAILED"
            ) from None

    async def _final(
        self, prompt_token_ids: Sequence[int], params: SamplingParams, adapter: EngineAdapter | None
    ) -> RequestOutput:
        final = None
        async for output in self._outputs(prompt_token_ids, params, adapter):
            final = output
        if final is None:  # pragma: no cover - vLLM always yields a final output
            raise Internal("the engine returned no output", reason="NO_OUTPUT")
        return final

    async def _generate_one(self, request: GenerationRequest) -> PromptSamples:
        # Greedy samples are identical: generate one and replicate it.
        runs = 1 if request.sampling.greedy else request.n
        params = self._sampling_params(request.sampling, runs, delta=False)
        output = await self._final(request.prompt_token_ids, params, request.adapter)
        samples = [_sample(c, request.sampling.logprobs) for c in _by_index(output.outputs)]
        if runs == 1 and request.n > 1:
            samples = samples * request.n
        return PromptSamples(tuple(request.prompt_token_ids), tuple(samples))

    async def generate(self, requests: Sequence[GenerationRequest]) -> list[PromptSamples]:
        return list(await _gather_or_cancel(self._generate_one(r) for r in requests))

    async def generate_stream(
        self, requests: Sequence[GenerationRequest]
    ) -> AsyncIterator[SampleDelta]:
        queue: asyncio.Queue[SampleDelta | BaseException | None] = asyncio.Queue()

        async def pump(prompt_index: int, request: GenerationRequest) -> None:
            runs = 1 if request.sampling.greedy else request.n
            copies = request.n if runs == 1 else 1
            params = self._sampling_params(request.sampling, runs, delta=True)
            async for output in self._outputs(request.prompt_token_ids, params, request.adapter):
                for c in output.outputs:
                    delta = _delta(c, request.sampling.logprobs)
                    for copy in range(copies):
                        index = c.index if copies == 1 else copy
                        await queue.put(
                            SampleDelta(
                                prompt_index=prompt_index,
                                sample_index=index,
                                token_ids=delta[0],
                                text=c.text,
                                logprobs=delta[1],
                                finish_reason=delta[2],
                            )
                        )

        async def run_all() -> None:
            try:
                await _gather_or_cancel(pump(i, r) for i, r in enumerate(requests))
                await queue.put(None)
            except BaseException as exc:  # handed to the consumer, which re-raises
                await queue.put(exc)

        runner = asyncio.create_task(run_all())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            if not runner.done():
                runner.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await runner

    async def _score_one(self, seq: ScoreSequence, adapter: EngineAdapter | None) -> list[float]:
        from vllm import SamplingParams

        ids = list(seq.token_ids)
        start = max(seq.prompt_length, 1)
        if start >= len(ids):
            return []
        last = ids[-1]
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            # Positions start..len-2 come from the prompt logprobs of ids[:-1];
            # only needed when there is more than the last token to score.
            prompt_logprobs=0 if start < len(ids) - 1 else None,
            logprobs=0,
            allowed_token_ids=[last],
            detokenize=False,
        )
        output = await self._final(ids[:-1], params, adapter)
        scored: list[float] = []
        if start < len(ids) - 1:
            prompt_lps = output.prompt_logprobs
            assert prompt_lps is not None
            scored = [prompt_lps[i][ids[i]].logprob for i in range(start, len(ids) - 1)]
        final = output.outputs[0]
        assert final.logprobs is not None and final.token_ids[0] == last
        scored.append(final.logprobs[0][last].logprob)
        return scored

    async def compute_logprobs(
        self, sequences: Sequence[ScoreSequence], adapter: EngineAdapter | None
    ) -> list[list[float]]:
        return list(await _gather_or_cancel(self._score_one(s, adapter) for s in sequences))

    # -- adapters ---------------------------------------------------------------------

    async def add_adapter(self, adapter: EngineAdapter) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        if adapter.rank > self._max_lora_rank:
            raise rank_above_max(adapter.rank, self._max_lora_rank, adapter.name)
        unsupported = sorted(set(_target_modules(adapter.path)) & UNSUPPORTED_TARGETS)
        if unsupported:
            # vLLM-CPU's LoRA logits path is only exact without them (see
            # vllm_patches), and embedding LoRA is not what RL adapters train.
            raise FailedPrecondition(
                f"{adapter.name} targets {', '.join(unsupported)}, which this engine does not "
                "serve",
                reason="UNSUPPORTED_TARGET_MODULE",
                metadata={"adapter": adapter.name, "modules": ",".join(unsupported)},
            )
        llm = self._live()
        lora_request = self._lora_request(adapter)
        assert lora_request is not None
        try:
            await llm.add_lora(lora_request)
        except EngineDeadError:
            self._schedule_restart("engine_dead_during_add_lora")
            raise Unavailable("the rollout engine died", reason="ENGINE_DEAD") from None
        except Exception as exc:
            # A failed load leaves the engine healthy (it never reached a batch).
            message = str(exc)
            if "max_lora_rank" in message:
                raise rank_above_max(adapter.rank, self._max_lora_rank, adapter.name) from None
            raise FailedPrecondition(
                f"the engine could not load {adapter.name}: {message}",
                reason="ADAPTER_LOAD_FAILED",
                metadata={"adapter": adapter.name},
            ) from None

    async def remove_adapter(self, adapter: EngineAdapter) -> None:
        llm = self._llm
        if llm is None or llm.errored:
            return
        with contextlib.suppress(Exception):
            await llm.remove_lora(adapter.engine_id)

    async def loaded_engine_ids(self) -> set[int]:
        return set(await self._live().list_loras())

    # -- status -----------------------------------------------------------------------

    def status(self) -> EngineStatus:
        llm = self._llm
        healthy = llm is not None and not llm.errored
        return EngineStatus(
            engine=self.kind,
            base_model=self.model_path,
            max_loras=self._max_loras,
            max_cpu_loras=self._max_cpu_loras,
            max_lora_rank=self._max_lora_rank,
            max_model_len=self._max_model_len,
            running_requests=llm.get_num_unfinished_requests() if healthy and llm else 0,
            healthy=healthy,
            epoch=self._epoch,
            started_at=self._started_at,
            engine_pids=_child_pids(),
        )


def rank_above_max(rank: int, max_rank: int, name: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"{name} has LoRA rank {rank}, above this engine's maximum {max_rank}",
        reason="RANK_ABOVE_ENGINE_MAX",
        metadata={"adapter": name, "rank": str(rank), "max_rank": str(max_rank)},
    )


def _by_index(outputs: Sequence[Any]) -> list[Any]:
    return sorted(outputs, key=lambda c: c.index)


def _token_logprobs(c: Any, want: bool) -> tuple[float, ...]:
    if not want or not c.logprobs:
        return ()
    return tuple(float(c.logprobs[i][tok].logprob) for i, tok in enumerate(c.token_ids))


def _finish(c: Any) -> FinishReason | None:
    if c.finish_reason is None:
        return None
    return _FINISH.get(c.finish_reason, FinishReason.ABORTED)


def _sample(c: Any, want_logprobs: bool) -> Sample:
    return Sample(
        token_ids_T=tuple(c.token_ids),
        text=c.text,
        logprobs_T=_token_logprobs(c, want_logprobs),
        finish_reason=_finish(c) or FinishReason.ABORTED,
    )


def _delta(c: Any, want_logprobs: bool) -> tuple[tuple[int, ...], tuple[float, ...], Any]:
    return tuple(c.token_ids), _token_logprobs(c, want_logprobs), _finish(c)


async def _gather_or_cancel(coros: Any) -> list[Any]:
    """``asyncio.gather`` that cancels the siblings of the first failure (so their
    engine requests are aborted instead of running on for nobody)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _target_modules(path: str) -> list[str]:
    """Module names an adapter_config.json targets (a regex string counts by the
    names it mentions), plus modules_to_save."""
    try:
        config = json.loads((Path(path) / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return []
    targets = config.get("target_modules") or []
    names = [targets] if isinstance(targets, str) else list(targets)
    names += list(config.get("modules_to_save") or [])
    found = []
    for name in names:
        found += [t for t in UNSUPPORTED_TARGETS if t in str(name)]
        found.append(str(name).rsplit(".", 1)[-1])
    return found


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _disarm(llm: Any) -> None:
    """``AsyncLLM.__del__`` shuts down again; after our explicit shutdown that second
    call can run during interpreter teardown and print a TypeError. Make it a no-op."""
    with contextlib.suppress(Exception):
        llm.shutdown = lambda *args, **kwargs: None


def _child_pids() -> tuple[int, ...]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil comes with vLLM
        return ()
    try:
        children = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:  # pragma: no cover
        return ()
    return tuple(sorted(p.pid for p in children))
