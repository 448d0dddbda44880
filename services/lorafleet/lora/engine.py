"""The training engine under the TrainerService: one hot base, many adapters, fused steps.

:class:`TrainEngine` loads the base model once and trains every adapter placed on
it. ``forward_backward`` fuses requests of several adapters into one padded batch
and one forward/backward pass (each row routed to its adapter), then splits the
metrics per request. Each request's loss is its own token mean and the fused loss
is their sum; adapters' parameters are disjoint and rows never interact, so every
adapter receives exactly the gradient it would get alone.

Errors are values: a malformed request (unknown adapter, bad shapes, token out of
range) comes back as a :class:`RequestError` and the rest of the batch runs.

Thread-safety: public methods take one engine lock (torch work on one model is
serial; the routing state is per model). Saving an adapter takes only that
adapter's own lock, which every change of its weights or optimizer state also
takes: a fused pass of other adapters (which may hold the engine lock for a
second) never delays a publish. Callers on an event loop use
:class:`lorafleet.lora.fusing.FusingQueue`, which runs this in a worker thread.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import structlog
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from torch import nn

from lorafleet.core.errors import FailedPrecondition, Internal, LorafleetError
from lorafleet.lora.adapters import MultiLoraModel
from lorafleet.lora.errors import adapter_not_found, invalid, pass_out_of_memory
from lorafleet.lora.losses import (
    TokenStats,
    fused_token_stats,
    request_weights,
    segment_sum,
    token_logprobs,
)
from lorafleet.lora.optim import AdapterOptimizer, validate_optimizer_config
from lorafleet.lora.peft_io import load_peft_adapter, save_peft_adapter
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.tensor_bytes import safetensors_bytes
from lorafleet.lora.types import (
    AdapterInfo,
    ForwardBackwardResult,
    LogprobRequest,
    LogprobResult,
    LossKind,
    OptimizerConfig,
    OptimStepResult,
    RequestError,
    SavedAdapter,
    TokenSequence,
    TrainMetrics,
    TrainRequest,
    TrainSample,
    TrainStepResult,
)

log = structlog.get_logger(__name__)

STATE_FORMAT = "lorafleet-trainer-state/1"
_STATE_META_KEY = "lorafleet_trainer_state"
# A fused pass runs in micro-batches of at most this many padded tokens. On CPU
# the cost per token rises once a pass's activations outgrow the caches (measured
# with the tiny model: linear up to ~1k tokens of 16x32-token steps, 25-30% worse
# per token at 2-4k), so fusing more than that buys nothing. On GPUs the bound is
# activation memory: measured on an H200 (Qwen2.5-0.5B architecture, bf16, 4
# adapters x 32 x 512 tokens, scripts/gpu_check.sh), 4096 / 8192 / 16384 / 32768
# tokens took 2966 / 1695 / 1348 / 1325 ms at peaks of 12.5 / 22.3 / 41.9 / 81.8
# GiB. 16384 is within 2% of the fastest at half its memory, which leaves room
# for a rollout engine on the same GPU; larger models need less (the setting
# micro_batch_tokens), and a pass that runs out says so.
CPU_MICRO_BATCH_TOKENS = 1024
GPU_MICRO_BATCH_TOKENS = 16384
PROMPT_SHARING_MODEL_TYPES = frozenset({"llama", "qwen2"})


@dataclass(frozen=True)
class SampledCompletion:
    """One sampled completion: its tokens and their logprobs under the model
    (temperature 1, i.e. the policy the trainer optimises)."""

    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]
    logprobs_C: tuple[float, ...]

    @property
    def sequence(self) -> TokenSequence:
        return TokenSequence(self.prompt_ids + self.completion_ids, len(self.prompt_ids))


@dataclass
class _Slot:
    name: str
    spec: LoraSpec
    optimizer: AdapterOptimizer
    lock: threading.Lock = field(default_factory=threading.Lock)
    """Held while the adapter's weights or optimizer state change or are read for
    a save (inside the engine lock when both are held)."""


@dataclass
class _HostBatch:
    """A fused batch as host arrays; rows of one request are contiguous."""

    tokens: np.ndarray  # [N, T] int64, right-padded
    lengths: np.ndarray  # [N]
    mask: np.ndarray  # [N, T-1] bool: position j predicts token j+1, a completion token
    sampling_logprobs: np.ndarray  # [N, T-1]
    has_sampling: np.ndarray  # [N] bool
    advantages: np.ndarray  # [N]
    row_request: np.ndarray  # [N] request index of each row
    adapters: list[str]  # [N]
    prompt_lengths: np.ndarray  # [N]
    prompt_group: np.ndarray | None = None
    """[N] id of each row's (request, prompt) when the pass shares prompts (see
    :class:`_SharedPrompts`), else None. Rows of a group are contiguous."""


@dataclass
class _SharedPrompts:
    """A micro-batch whose rows share prompts (a GRPO group: one prompt, several
    sampled completions), run as two passes: every distinct prompt once, then
    every row's completion attending to its prompt's cached keys and values.

    Same math as the padded full-sequence pass (autograd carries each row's
    gradient into its prompt's shared activations), on far fewer tokens: a group
    of 8 samples of a 16-token prompt runs 16 prompt tokens instead of 128. The
    prompt pass stops one token short; that last prompt token opens the
    completion pass, so every logit comes from the model's own forward."""

    prompt_ids_G_Q: torch.Tensor  # prompts minus their last token, right-padded
    adapters_G: list[str]
    group_N: torch.Tensor  # [N] row -> prompt
    inputs_N_X: torch.Tensor  # last prompt token + completion minus its last token
    targets_N_X: torch.Tensor  # the completion tokens
    positions_N_X: torch.Tensor
    attention_N_1_X_QX: torch.Tensor  # bool: own prompt's real tokens + causal completion
    scatter_N_X: torch.Tensor  # column of each completion token in the [N, T-1] layout


@dataclass
class _Batch:
    """One micro-batch on the model's device, padded to its own longest row."""

    tokens_N_T: torch.Tensor
    adapters_N: list[str]
    row_request_N: torch.Tensor
    mask_N_L: torch.Tensor
    sampling_logprobs_N_L: torch.Tensor
    has_sampling_N: torch.Tensor
    advantages_N: torch.Tensor
    is_pg_N: torch.Tensor
    clip_low_N: torch.Tensor
    clip_high_N: torch.Tensor
    kl_coef_N: torch.Tensor
    on_policy_N: torch.Tensor
    shared: _SharedPrompts | None = None


class TrainEngine:
    """Trains many LoRA adapters over one frozen base model."""

    def __init__(self, model: nn.Module, *, base_model: str = "", max_adapters: int = 8,
                 max_rank: int = 64, default_targets: Sequence[str] | None = None,
                 micro_batch_tokens: int | None = None,
                 batch_invariant: bool | None = None, share_prompts: bool = True) -> None:
        self.lora = MultiLoraModel(model, max_adapters=max_adapters, max_rank=max_rank,
                                   default_targets=default_targets)
        self.model = model
        self.base_model = base_model or str(getattr(model.config, "_name_or_path", ""))
        self.vocab_size = int(model.config.vocab_size)
        self.max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
        self.device = next(model.parameters()).device
        self.micro_batch_tokens = micro_batch_tokens or (
            CPU_MICRO_BATCH_TOKENS if self.device.type == "cpu" else GPU_MICRO_BATCH_TOKENS)
        """Padded tokens per forward/backward inside one fused pass."""
        self.batch_invariant = (self.device.type == "cpu" if batch_invariant is None
                                else batch_invariant)
        """Micro-batches never mix requests: each request's forward/backward runs on
        exactly the rows, padding and kernel shapes it would get alone, so its update
        is bit-identical to training it alone, whoever it shares the pass with. On
        CPU that costs nothing (a pass's cost per token does not depend on how many
        adapters share a micro-batch: 10.4k tokens/s for 1 and for 3 adapters, tiny
        model, one thread); on GPUs mixed micro-batches fill the device, so it is off
        there by default."""
        self.share_prompts = share_prompts
        """Rows of a request that repeat a prompt (GRPO groups) run that prompt once
        (:class:`_SharedPrompts`); passes with a KL term or LoRA dropout do not."""
        config = model.config
        self._prompt_sharing_model = (
            getattr(config, "model_type", "") in PROMPT_SHARING_MODEL_TYPES
            and getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")
            and not getattr(config, "use_sliding_window", False))
        """The shared pass hands the model an explicit 4D mask, position ids and a
        per-row cache: tested with these HF families, their default attention and
        full (not sliding-window) caches; other models run the plain pass."""
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu", **kwargs: object) -> TrainEngine:
        """Load any HF causal LM directory once (fp32 by default: the ratio and the
        parity tests need it)."""
        from transformers import AutoModelForCausalLM

        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        model.to(device)
        engine = cls(model, base_model=str(path), **kwargs)  # type: ignore[arg-type]
        log.info("base_model_loaded", path=str(path), dtype=str(dtype), device=str(device),
                 load_ms=round((time.perf_counter() - t0) * 1000, 1))
        return engine

    # --- adapters ---------------------------------------------------------------

    @property
    def slots_total(self) -> int:
        return self.lora.max_adapters

    @property
    def slots_used(self) -> int:
        return self.lora.slots_used

    @property
    def max_rank(self) -> int:
        return self.lora.max_rank

    def has_adapter(self, name: str) -> bool:
        return name in self._slots

    def create_adapter(self, name: str, spec: LoraSpec,
                       optimizer: OptimizerConfig | None = None, *, seed: int = 0) -> AdapterInfo:
        """Fresh adapter (PEFT's default init from ``seed``) with its own AdamW."""
        optimizer = optimizer or OptimizerConfig()
        with self._lock:
            validate_optimizer_config(optimizer)
            resolved = self.lora.add_adapter(name, spec, seed=seed)
            self._slots[name] = _Slot(
                name, resolved, AdapterOptimizer(self.lora.adapter_parameters(name), optimizer)
            )
            log.info("adapter_created", adapter=name, rank=resolved.rank,
                     targets=list(resolved.target_modules), slots_used=self.slots_used)
            return self._info(name)

    def drop_adapter(self, name: str) -> None:
        with self._lock, self._slot(name).lock:
            self.lora.remove_adapter(name)
            del self._slots[name]
            log.info("adapter_dropped", adapter=name, slots_used=self.slots_used)

    def adapter_info(self, name: str) -> AdapterInfo:
        with self._lock:
            return self._info(name)

    def steps_taken(self, name: str | None) -> int:
        """Optimizer steps adapter ``name`` has taken (0 when unknown). Read without
        the engine's lock: a scheduling hint, never used for a decision about state."""
        slot = self._slots.get(name) if name is not None else None
        return slot.optimizer.step_count if slot is not None else 0

    def adapters(self) -> list[AdapterInfo]:
        with self._lock:
            return [self._info(n) for n in self._slots]

    def base_model_bytes(self) -> int:
        return self.lora.base_parameter_bytes()

    def adapter_memory_bytes(self, name: str) -> int:
        """Parameters + optimizer moments + gradients currently held."""
        return self.adapter_info(name).total_bytes

    # --- training ---------------------------------------------------------------

    def forward_backward(self, requests: Sequence[TrainRequest]
                         ) -> list[ForwardBackwardResult | RequestError]:
        """Accumulate each request's gradient into its adapter, all in one fused pass."""
        with self._lock:
            return self._forward_backward(list(requests))

    def optim_step(self, name: str, learning_rate: float | None = None) -> OptimStepResult:
        with self._lock:
            slot = self._slot(name)
            with slot.lock:
                res = slot.optimizer.step(learning_rate)
            return replace(res, adapter=name)

    def train_step(self, requests: Sequence[TrainRequest]
                   ) -> list[TrainStepResult | RequestError]:
        """Fused forward/backward, then each adapter's own optimizer step.

        Two requests for the same adapter cannot share a pass (the second must see
        the first's update), so they run in successive rounds, in order.
        """
        with self._lock:
            results: list[TrainStepResult | RequestError | None] = [None] * len(requests)
            pending = list(enumerate(requests))
            while pending:
                round_, rest, seen = [], [], set()
                for i, r in pending:
                    (rest if r.adapter in seen else round_).append((i, r))
                    seen.add(r.adapter)
                pending = rest
                fb = self._forward_backward([r for _, r in round_])
                for (i, req), res in zip(round_, fb, strict=True):
                    if isinstance(res, RequestError):
                        results[i] = res
                        continue
                    try:
                        slot = self._slot(req.adapter)
                        with slot.lock:
                            step = slot.optimizer.step(req.learning_rate)
                    except LorafleetError as e:
                        results[i] = RequestError(req.request_id, req.adapter, e)
                        continue
                    metrics = replace(res.metrics, grad_norm=step.grad_norm)
                    results[i] = TrainStepResult(req.request_id, req.adapter, metrics,
                                                 step.step, step.applied)
            return results  # type: ignore[return-value]

    # --- scoring and sampling ----------------------------------------------------

    def compute_logprobs_batch(self, requests: Sequence[LogprobRequest]
                               ) -> list[LogprobResult | RequestError]:
        """Completion-token logprobs of several requests (adapters or base) in one pass."""
        with self._lock:
            out: list[LogprobResult | RequestError | None] = [None] * len(requests)
            valid: list[tuple[int, LogprobRequest]] = []
            for i, req in enumerate(requests):
                err = self._validate_logprob_request(req)
                if err is not None:
                    out[i] = RequestError(req.request_id, req.adapter, err)
                else:
                    valid.append((i, req))
            if valid:
                seqs = [s for _, r in valid for s in r.sequences]
                names = [r.adapter for _, r in valid for _ in r.sequences]
                lps = self._score(seqs, names)
                pos = 0
                for i, req in valid:
                    n = len(req.sequences)
                    out[i] = LogprobResult(req.request_id, req.adapter, tuple(lps[pos:pos + n]))
                    pos += n
            return out  # type: ignore[return-value]

    def compute_logprobs(self, adapter: str | None, sequences: Sequence[TokenSequence]
                         ) -> list[tuple[float, ...]]:
        """Completion-token logprobs of ``sequences``; raises the request's error."""
        res = self.compute_logprobs_batch([LogprobRequest(adapter, tuple(sequences))])[0]
        if isinstance(res, RequestError):
            raise res.error
        return list(res.logprobs_B_C)

    @torch.no_grad()
    def sample(self, adapter: str | None, prompts: Sequence[Sequence[int]], *,
               max_new_tokens: int, temperature: float = 1.0,
               generator: torch.Generator | None = None,
               stop_token_ids: Sequence[int] = ()) -> list[SampledCompletion]:
        """Sample completions from the engine's own model (KV cache, per-row routing).

        A reference sampler for tests and trainer-only loops, not a serving engine.
        Prompts of equal length share a batch; a completion ends after a stop token.
        """
        with self._lock:
            if adapter is not None:
                self._slot(adapter)
            out: list[SampledCompletion | None] = [None] * len(prompts)
            by_len: dict[int, list[int]] = {}
            for i, p in enumerate(prompts):
                by_len.setdefault(len(p), []).append(i)
            stops = set(stop_token_ids)
            for idxs in by_len.values():
                ids = torch.tensor([list(prompts[i]) for i in idxs], device=self.device)
                toks, lps = self._sample_group(adapter, ids, max_new_tokens, temperature,
                                               generator)
                for row, i in enumerate(idxs):
                    comp, lp = toks[row].tolist(), lps[row].tolist()
                    for j, t in enumerate(comp):
                        if t in stops:
                            comp, lp = comp[: j + 1], lp[: j + 1]
                            break
                    out[i] = SampledCompletion(tuple(int(t) for t in prompts[i]), tuple(comp),
                                               tuple(lp))
            return out  # type: ignore[return-value]

    # --- persistence -----------------------------------------------------------

    def save_peft(self, name: str, directory: str | os.PathLike[str]) -> SavedAdapter:
        """Write the adapter in PEFT's layout; returns digests for the registry."""
        with self._saving(name) as slot:
            tensors = self.lora.adapter_state_dict(name)
        return save_peft_adapter(directory, tensors, slot.spec, self.base_model)

    def load_peft(self, name: str, directory: str | os.PathLike[str],
                  optimizer: OptimizerConfig | None = None) -> AdapterInfo:
        """Create adapter ``name`` from a PEFT adapter directory (fresh optimizer)."""
        loaded = load_peft_adapter(directory)
        with self._lock:
            self.create_adapter(name, loaded.spec, optimizer)
            try:
                with self._slots[name].lock:
                    self.lora.load_adapter_state_dict(name, loaded.tensors)
            except BaseException:
                self.drop_adapter(name)
                raise
            return self._info(name)

    def save_state(self, name: str) -> bytes:
        """Adapter weights + AdamW moments + step count as one safetensors blob
        (no pickle; deterministic bytes for the same state)."""
        with self._saving(name) as slot:
            tensors = {f"adapter.{k}": v for k, v in self.lora.adapter_state_dict(name).items()}
            tensors.update({f"optim.{k}": v for k, v in slot.optimizer.state_tensors().items()})
            meta = {
                "format": STATE_FORMAT,
                "spec": slot.spec.to_dict(),
                "optimizer": slot.optimizer.config.to_dict(),
                "step": slot.optimizer.step_count,
                "base_model": self.base_model,
            }
        # One metadata key holding sorted JSON: safetensors writes its metadata map
        # in hash order, so several keys would make the bytes vary run to run.
        return safetensors_bytes(
            tensors, metadata={_STATE_META_KEY: json.dumps(meta, sort_keys=True)})

    def load_state(self, name: str, data: bytes,
                   optimizer: OptimizerConfig | None = None) -> AdapterInfo:
        """Restore a :meth:`save_state` blob into adapter ``name`` (created if absent;
        an existing adapter must have the same spec). ``optimizer`` overrides the
        saved hyper-parameters (the moments are kept)."""
        tensors, meta = _parse_state(data)
        spec = LoraSpec.from_dict(meta["spec"])
        opt_cfg = optimizer or OptimizerConfig.from_dict(meta["optimizer"])
        adapter_t = {k[len("adapter."):]: v for k, v in tensors.items() if k.startswith("adapter.")}
        optim_t = {k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")}
        with self._lock:
            created = False
            if name in self._slots:
                if self._slots[name].spec != self.lora.resolve_spec(spec)[0]:
                    raise FailedPrecondition(
                        f"state of a different adapter shape cannot load into {name!r}",
                        reason="STATE_SPEC_MISMATCH",
                    )
                if optimizer is not None:
                    validate_optimizer_config(optimizer)
            else:
                self.create_adapter(name, spec, opt_cfg)
                created = True
            slot = self._slots[name]
            try:
                with slot.lock:
                    if optimizer is not None and not created:
                        slot.optimizer = AdapterOptimizer(slot.optimizer.params, optimizer)
                    self.lora.load_adapter_state_dict(name, adapter_t)
                    slot.optimizer.zero_grad()
                    slot.optimizer.load_state_tensors(optim_t, int(meta["step"]))
            except BaseException:
                if created:
                    self.drop_adapter(name)
                raise
            return self._info(name)

    # --- internals: training -----------------------------------------------------

    def _forward_backward(self, requests: list[TrainRequest]
                          ) -> list[ForwardBackwardResult | RequestError]:
        results: list[ForwardBackwardResult | RequestError | None] = [None] * len(requests)
        valid: list[int] = []
        for i, req in enumerate(requests):
            err = self._validate_train_request(req)
            if err is not None:
                results[i] = RequestError(req.request_id, req.adapter, err)
            else:
                valid.append(i)
        if not valid:
            return results  # type: ignore[return-value]
        reqs = [requests[i] for i in valid]
        try:
            metrics = self._fused_pass(reqs)
        except Exception as e:  # noqa: BLE001 - isolate the failure to its request
            if len(reqs) == 1:
                log.exception("forward_backward_failed", adapter=reqs[0].adapter)
                return self._fill(results, valid, [self._pass_failed(reqs[0], e)])
            # Something in the fused pass failed (e.g. out of memory): clear what the
            # partial backward may have accumulated, and run each request alone so
            # only the culprit fails.
            log.warning("fused_pass_failed_retrying_alone", error=repr(e), requests=len(reqs))
            for r in reqs:
                self._slots[r.adapter].optimizer.zero_grad()
            alone: list[ForwardBackwardResult | RequestError] = []
            for r in reqs:
                try:
                    alone.append(ForwardBackwardResult(r.request_id, r.adapter,
                                                       self._fused_pass([r])[0]))
                except Exception as e2:  # noqa: BLE001
                    log.exception("forward_backward_failed", adapter=r.adapter)
                    self._slots[r.adapter].optimizer.zero_grad()
                    alone.append(self._pass_failed(r, e2))
            return self._fill(results, valid, alone)
        return self._fill(results, valid, [
            ForwardBackwardResult(r.request_id, r.adapter, m)
            for r, m in zip(reqs, metrics, strict=True)
        ])

    def _pass_failed(self, req: TrainRequest, e: BaseException) -> RequestError:
        """The error a request gets when its pass (alone) raised: out of device
        memory is the user's setting to change, anything else is ours."""
        if isinstance(e, torch.OutOfMemoryError):
            return RequestError(req.request_id, req.adapter,
                                pass_out_of_memory(self.micro_batch_tokens, str(self.device)))
        return RequestError(req.request_id, req.adapter,
                            Internal(f"forward/backward failed: {e!r}",
                                     reason="TRAIN_PASS_FAILED"))

    @staticmethod
    def _fill(results: list, idxs: list[int], values: list) -> list:
        for i, v in zip(idxs, values, strict=True):
            results[i] = v
        return results

    def _fused_pass(self, reqs: list[TrainRequest]) -> list[TrainMetrics]:
        """One fused forward/backward over every request, in micro-batches of at most
        ``micro_batch_tokens`` padded tokens (gradients accumulate across them, so the
        split changes nothing but memory and speed)."""
        host = self._build_host_batch(reqs)
        R = len(reqs)
        dev = self.device
        tokens_R = torch.tensor([sum(s.sequence.completion_length for s in r.samples)
                                 for r in reqs], dtype=torch.long)
        # Per-request loss settings, gathered per row inside each micro-batch.
        req_is_pg = torch.tensor([r.loss.kind == LossKind.POLICY_GRADIENT for r in reqs])
        req_clip_low = torch.tensor([r.loss.clip_low for r in reqs], dtype=torch.float32)
        req_clip_high = torch.tensor([r.loss.clip_high for r in reqs], dtype=torch.float32)
        req_kl = torch.tensor([r.loss.kl_coef for r in reqs], dtype=torch.float32)
        req_on_policy = torch.tensor([r.loss.on_policy for r in reqs])
        tokens_R_dev = tokens_R.to(dev)
        sums = {k: torch.zeros(R, dtype=torch.float64, device=dev)
                for k in ("loss", "kl", "clip", "ent", "gap", "gap_tok")}
        for lo, hi in self._pass_micro_batches(host):
            b = self._device_batch(host, lo, hi, req_is_pg, req_clip_low, req_clip_high,
                                   req_kl, req_on_policy)
            stats = self._micro_batch_stats(b)
            # Each request's loss is its own token mean; the fused loss sums them.
            weighted = stats.loss * request_weights(b.row_request_N, tokens_R_dev).unsqueeze(-1)
            weighted.sum().backward()
            rr = b.row_request_N
            sums["loss"] += segment_sum(weighted, rr, R)
            sums["kl"] += segment_sum(stats.kl, rr, R)
            sums["clip"] += segment_sum(stats.clipped, rr, R)
            sums["ent"] += segment_sum(stats.entropy, rr, R)
            sums["gap"] += segment_sum(stats.logprob_gap, rr, R)
            sums["gap_tok"] += segment_sum((b.mask_N_L & b.has_sampling_N[:, None]).float(),
                                           rr, R)
        n_tok = tokens_R.to(dev, torch.float64).clamp(min=1)
        out = {k: v.cpu() for k, v in sums.items()}
        n_tok = n_tok.cpu()
        adapters = list(dict.fromkeys(r.adapter for r in reqs))
        norms = {a: self._slots[a].optimizer.grad_norm() for a in adapters}
        return [
            TrainMetrics(
                loss=float(out["loss"][i]),
                kl=float(out["kl"][i] / n_tok[i]),
                clip_fraction=float(out["clip"][i] / n_tok[i]),
                grad_norm=norms[r.adapter],
                entropy=float(out["ent"][i] / n_tok[i]),
                logprob_gap=(float(out["gap"][i] / out["gap_tok"][i])
                             if float(out["gap_tok"][i]) > 0 else None),
                num_sequences=len(r.samples),
                num_loss_tokens=int(tokens_R[i]),
                fused_batch_adapters=len(adapters),
            )
            for i, r in enumerate(reqs)
        ]

    def _micro_batch_stats(self, b: _Batch) -> TokenStats:
        targets = b.tokens_N_T[:, 1:]
        if b.shared is not None:
            lp, ent = self._shared_prompt_logprobs(b.shared, b.adapters_N, targets.shape)
        else:
            with self.lora.routing(b.adapters_N, train=True):
                logits = self.model(input_ids=b.tokens_N_T, use_cache=False).logits[:, :-1]
            lp, ent = token_logprobs(logits, targets)
        base_lp = None
        kl_rows = torch.nonzero(b.kl_coef_N > 0).flatten()
        if kl_rows.numel() > 0:
            # The same model with the adapter off is the reference: no second copy.
            base_lp = lp.detach().clone()
            with torch.no_grad(), self.lora.routing([None] * int(kl_rows.numel())):
                base_logits = self.model(input_ids=b.tokens_N_T[kl_rows],
                                         use_cache=False).logits[:, :-1]
                base_lp[kl_rows] = token_logprobs(base_logits, targets[kl_rows],
                                                  with_entropy=False)[0]
        return fused_token_stats(
            logprobs=lp, entropy=ent, mask=b.mask_N_L, is_policy_gradient_N=b.is_pg_N,
            sampling_logprobs=b.sampling_logprobs_N_L, has_sampling_logprobs_N=b.has_sampling_N,
            advantages_N=b.advantages_N, clip_low_N=b.clip_low_N, clip_high_N=b.clip_high_N,
            kl_coef_N=b.kl_coef_N, base_logprobs=base_lp, on_policy_N=b.on_policy_N,
        )

    def _shared_prompt_logprobs(self, sp: _SharedPrompts, adapters_N: list[str],
                                shape: torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
        """Completion-token logprobs and entropies in the [N, T-1] layout of the
        full-sequence pass (zero elsewhere), from the two passes of `sp`."""
        with self.lora.routing(sp.adapters_G, train=True):
            cache = self.model.get_decoder()(input_ids=sp.prompt_ids_G_Q,
                                              use_cache=True).past_key_values
        for layer in cache.layers:  # each row attends to its own prompt's keys/values
            layer.batch_select_indices(sp.group_N)
        with self.lora.routing(adapters_N, train=True):
            logits = self.model(input_ids=sp.inputs_N_X, attention_mask=sp.attention_N_1_X_QX,
                                position_ids=sp.positions_N_X, past_key_values=cache,
                                use_cache=True).logits
        lp_x, ent_x = token_logprobs(logits, sp.targets_N_X)
        assert ent_x is not None
        # One spare column takes the padding positions; it is cut off after.
        n, t = shape
        lp = lp_x.new_zeros(n, t + 1).scatter(1, sp.scatter_N_X, lp_x)[:, :t]
        ent = ent_x.new_zeros(n, t + 1).scatter(1, sp.scatter_N_X, ent_x)[:, :t]
        return lp, ent

    def _pass_micro_batches(self, host: _HostBatch) -> list[tuple[int, int]]:
        """The row ranges of a fused pass: per request when ``batch_invariant``
        (a request's rows are contiguous), else over the whole batch."""
        if not self.batch_invariant:
            return self._micro_batches(host, 0, len(host.row_request))
        out: list[tuple[int, int]] = []
        starts = np.flatnonzero(np.diff(host.row_request, prepend=-1)).tolist()
        for lo, hi in zip(starts, [*starts[1:], len(host.row_request)], strict=True):
            out += self._micro_batches(host, lo, hi)
        return out

    def _micro_batches(self, host: _HostBatch, lo: int, hi: int) -> list[tuple[int, int]]:
        """Consecutive ranges of rows lo..hi whose padded tokens stay within
        ``micro_batch_tokens``; a single longer row still gets its own range.

        Padded tokens: rows x longest row, or with shared prompts, distinct prompts
        x longest prompt plus rows x longest completion."""
        groups = host.prompt_group
        out: list[tuple[int, int]] = []
        start, longest, prompts, prompt_len = lo, 0, 0, 0
        for i in range(lo, hi):
            n, p = int(host.lengths[i]), int(host.prompt_lengths[i])
            # What row i adds: its padded row, and with shared prompts its prompt.
            if groups is None:
                row, prompt, new_prompt = n, 0, 0
            else:
                row, prompt = n - p, p - 1
                new_prompt = int(i == start or groups[i] != groups[i - 1])
            grown = (max(longest, row), prompts + new_prompt, max(prompt_len, prompt))
            if i > start and (i - start + 1) * grown[0] + grown[1] * grown[2] > (
                    self.micro_batch_tokens):
                out.append((start, i))
                start = i
                grown = (row, int(groups is not None), prompt)
            longest, prompts, prompt_len = grown
        out.append((start, hi))
        return out

    def _shares_prompts(self, reqs: list[TrainRequest]) -> bool:
        """Whether the pass runs repeated prompts once (:class:`_SharedPrompts`):
        the model is one whose cache and masks this was tested with, some request
        repeats a prompt, no row needs the base model's logprobs (a
        KL term), no adapter has LoRA dropout (its masks would be shared by the
        rows of a prompt), and every prompt has a token before its last."""
        if not self.share_prompts or not self._prompt_sharing_model:
            return False
        if any(r.loss.kind == LossKind.POLICY_GRADIENT and r.loss.kl_coef > 0 for r in reqs):
            return False
        if any(self._slots[r.adapter].spec.dropout > 0 for r in reqs):
            return False
        if any(s.sequence.prompt_length < 2 for r in reqs for s in r.samples):
            return False
        return any(
            len({s.sequence.token_ids[: s.sequence.prompt_length] for s in r.samples})
            < len(r.samples)
            for r in reqs
        )

    def _build_host_batch(self, reqs: list[TrainRequest]) -> _HostBatch:
        # Each request's rows shortest first: micro-batches are padded to their own
        # longest row, so neighbours of similar length waste little padding. With
        # shared prompts, rows of a prompt are kept together (by prompt length,
        # then prompt, then length). A request's gradient is a sum over its rows;
        # their order is free.
        share = self._shares_prompts(reqs)

        def order(s: TrainSample) -> tuple:
            ids, p = s.sequence.token_ids, s.sequence.prompt_length
            return (p, tuple(ids[:p]), len(ids)) if share else (len(ids),)

        rows = [(ri, s) for ri, r in enumerate(reqs) for s in sorted(r.samples, key=order)]
        N = len(rows)
        T = max(len(s.sequence.token_ids) for _, s in rows)
        # Built in numpy (one tensor per field at the end, not small ops per row).
        tokens = np.zeros((N, T), dtype=np.int64)
        lengths = np.zeros(N, dtype=np.int64)
        mask = np.zeros((N, T - 1), dtype=np.bool_)
        samp = np.zeros((N, T - 1), dtype=np.float32)
        has_samp = np.zeros(N, dtype=np.bool_)
        adv = np.zeros(N, dtype=np.float32)
        row_req = np.zeros(N, dtype=np.int64)
        prompt_lengths = np.zeros(N, dtype=np.int64)
        groups: dict[tuple, int] = {}
        prompt_group = np.zeros(N, dtype=np.int64)
        for n, (ri, s) in enumerate(rows):
            ids, p = s.sequence.token_ids, s.sequence.prompt_length
            tokens[n, : len(ids)] = ids
            lengths[n] = len(ids)
            prompt_lengths[n] = p
            if share:
                prompt_group[n] = groups.setdefault((ri, tuple(ids[:p])), len(groups))
            # Position j predicts token j + 1: completion tokens p..len-1 live at p-1..len-2.
            mask[n, p - 1: len(ids) - 1] = True
            if s.sampling_logprobs_C:
                samp[n, p - 1: len(ids) - 1] = s.sampling_logprobs_C
                has_samp[n] = True
            adv[n] = s.advantage
            row_req[n] = ri
        return _HostBatch(tokens, lengths, mask, samp, has_samp, adv, row_req,
                          [reqs[ri].adapter for ri, _ in rows], prompt_lengths,
                          prompt_group if share else None)

    def _device_batch(self, h: _HostBatch, lo: int, hi: int, is_pg: torch.Tensor,
                      clip_low: torch.Tensor, clip_high: torch.Tensor, kl: torch.Tensor,
                      on_policy: torch.Tensor) -> _Batch:
        T = int(h.lengths[lo:hi].max())
        dev = self.device
        rr = torch.from_numpy(h.row_request[lo:hi])
        t = self._to_device
        shared = None if h.prompt_group is None else self._shared_prompts(h, lo, hi, T)
        return _Batch(
            shared=shared,
            tokens_N_T=t(h.tokens[lo:hi, :T]),
            adapters_N=h.adapters[lo:hi],
            row_request_N=rr.to(dev),
            mask_N_L=t(h.mask[lo:hi, : T - 1]),
            sampling_logprobs_N_L=t(h.sampling_logprobs[lo:hi, : T - 1]),
            has_sampling_N=t(h.has_sampling[lo:hi]),
            advantages_N=t(h.advantages[lo:hi]),
            is_pg_N=is_pg[rr].to(dev),
            clip_low_N=clip_low[rr].to(dev),
            clip_high_N=clip_high[rr].to(dev),
            kl_coef_N=kl[rr].to(dev),
            on_policy_N=on_policy[rr].to(dev),
        )

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        """A host array as a tensor on the model's device."""
        return torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def _shared_prompts(self, h: _HostBatch, lo: int, hi: int, T: int) -> _SharedPrompts:
        """The two-pass layout of rows lo..hi (see :class:`_SharedPrompts`); T is
        the micro-batch's padded length."""
        p_N = h.prompt_lengths[lo:hi]
        c_N = h.lengths[lo:hi] - p_N
        group_N = np.unique(h.prompt_group[lo:hi], return_inverse=True)[1]
        first = np.flatnonzero(np.diff(group_N, prepend=-1))  # a row of each prompt
        G, N = len(first), hi - lo
        Q, X = int(p_N.max()) - 1, int(c_N.max())
        prompts = np.zeros((G, Q), dtype=np.int64)
        for g, row in enumerate(first.tolist()):
            prompts[g, : p_N[row] - 1] = h.tokens[lo + row, : p_N[row] - 1]
        k_X = np.arange(X)
        real_N_X = k_X[None, :] < c_N[:, None]
        # Input k is the token at position p - 1 + k, and it predicts token p + k.
        at_N_X = np.minimum(p_N[:, None] - 1 + k_X[None, :], T - 1)
        inputs = np.where(real_N_X, np.take_along_axis(h.tokens[lo:hi], at_N_X, 1), 0)
        next_N_X = np.minimum(at_N_X + 1, T - 1)
        targets = np.where(real_N_X, np.take_along_axis(h.tokens[lo:hi], next_N_X, 1), 0)
        attention = np.zeros((N, 1, X, Q + X), dtype=np.bool_)
        attention[:, 0, :, :Q] = (np.arange(Q)[None, :] < (p_N - 1)[:, None])[:, None, :]
        attention[:, 0, :, Q:] = np.tril(np.ones((X, X), dtype=np.bool_))
        t = self._to_device
        return _SharedPrompts(
            prompt_ids_G_Q=t(prompts),
            adapters_G=[h.adapters[lo + row] for row in first.tolist()],
            group_N=t(group_N),
            inputs_N_X=t(inputs),
            targets_N_X=t(targets),
            # Padding sits at its row's last prompt position: never past the model's
            # positions, and no real token attends to it.
            positions_N_X=t(np.where(real_N_X, at_N_X, p_N[:, None] - 1)),
            attention_N_1_X_QX=t(attention),
            # Padding goes to column T - 1, one past the [N, T-1] layout.
            scatter_N_X=t(np.where(real_N_X, at_N_X, T - 1)),
        )

    def _validate_train_request(self, req: TrainRequest) -> LorafleetError | None:
        if req.adapter not in self._slots:
            return adapter_not_found(req.adapter)
        if not req.samples:
            return invalid("a train request needs at least one sample", "EMPTY_REQUEST")
        loss = req.loss
        try:
            kind = LossKind(loss.kind)
        except ValueError:
            return invalid(f"unknown loss kind {loss.kind!r}", "INVALID_LOSS_CONFIG")
        if not (0.0 <= loss.clip_low < 1.0 and loss.clip_high >= 0.0
                and math.isfinite(loss.clip_high)):
            return invalid("clip_low must be in [0, 1) and clip_high >= 0",
                           "INVALID_LOSS_CONFIG")
        if not (loss.kl_coef >= 0 and math.isfinite(loss.kl_coef)):
            return invalid("kl_coef must be a finite number >= 0", "INVALID_LOSS_CONFIG")
        if req.learning_rate is not None and not (req.learning_rate > 0
                                                  and math.isfinite(req.learning_rate)):
            return invalid("learning_rate must be > 0", "INVALID_OPTIMIZER_CONFIG")
        if not (req.weight > 0 and math.isfinite(req.weight)):
            return invalid("weight must be a finite number > 0", "INVALID_WEIGHT")
        for i, s in enumerate(req.samples):
            err = self._validate_sequence(s.sequence, i, need_completion=True)
            if err is not None:
                return err
            n_c = s.sequence.completion_length
            n_lp = len(s.sampling_logprobs_C)
            # On-policy samples take the ratio's behaviour policy from the trainer's
            # own logprobs, so their sampling logprobs are optional (diagnostics).
            if kind == LossKind.POLICY_GRADIENT and n_lp != n_c and not (
                loss.on_policy and n_lp == 0
            ):
                return invalid(
                    f"sample {i}: {n_lp} sampling logprobs for {n_c} completion tokens",
                    "LOGPROBS_LENGTH_MISMATCH", sample=i)
            if kind == LossKind.CROSS_ENTROPY and n_lp not in (0, n_c):
                return invalid(
                    f"sample {i}: {n_lp} sampling logprobs for {n_c} completion tokens",
                    "LOGPROBS_LENGTH_MISMATCH", sample=i)
            if not all(math.isfinite(x) for x in s.sampling_logprobs_C):
                return invalid(f"sample {i}: non-finite sampling logprob", "NON_FINITE_INPUT",
                               sample=i)
            if not math.isfinite(s.advantage):
                return invalid(f"sample {i}: non-finite advantage", "NON_FINITE_INPUT",
                               sample=i)
        return None

    def _validate_sequence(self, seq: TokenSequence, i: int, *, need_completion: bool
                           ) -> LorafleetError | None:
        n = len(seq.token_ids)
        upper = n - 1 if need_completion else n
        if not 1 <= seq.prompt_length <= upper:
            return invalid(
                f"sequence {i}: prompt_length {seq.prompt_length} must be in [1, {upper}] "
                f"for {n} tokens", "INVALID_PROMPT_LENGTH", sample=i)
        if self.max_positions and n > self.max_positions:
            return invalid(f"sequence {i}: {n} tokens exceed the model's {self.max_positions}",
                           "SEQUENCE_TOO_LONG", sample=i)
        if any(not 0 <= t < self.vocab_size for t in seq.token_ids):
            return invalid(f"sequence {i}: token id outside [0, {self.vocab_size})",
                           "TOKEN_OUT_OF_RANGE", sample=i)
        return None

    def _validate_logprob_request(self, req: LogprobRequest) -> LorafleetError | None:
        if req.adapter is not None and req.adapter not in self._slots:
            return adapter_not_found(req.adapter)
        if not req.sequences:
            return invalid("a logprob request needs at least one sequence", "EMPTY_REQUEST")
        for i, s in enumerate(req.sequences):
            err = self._validate_sequence(s, i, need_completion=False)
            if err is not None:
                return err
        return None

    @torch.no_grad()
    def _score(self, seqs: list[TokenSequence], names: list[str | None]
               ) -> list[tuple[float, ...]]:
        N, T = len(seqs), max(len(s.token_ids) for s in seqs)
        if T < 2:
            return [() for _ in seqs]
        tokens = torch.zeros(N, T, dtype=torch.long)
        for n, s in enumerate(seqs):
            tokens[n, : len(s.token_ids)] = torch.tensor(s.token_ids, dtype=torch.long)
        tokens = tokens.to(self.device)
        with self.lora.routing(names):
            logits = self.model(input_ids=tokens, use_cache=False).logits[:, :-1]
        lp = token_logprobs(logits, tokens[:, 1:], with_entropy=False)[0].cpu()
        return [tuple(lp[n, s.prompt_length - 1: len(s.token_ids) - 1].tolist())
                for n, s in enumerate(seqs)]

    def _sample_group(self, adapter: str | None, ids: torch.Tensor, max_new_tokens: int,
                      temperature: float, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        B = ids.shape[0]
        toks, lps = [], []
        past = None
        inp = ids
        with self.lora.routing([adapter] * B):
            for _ in range(max_new_tokens):
                out = self.model(input_ids=inp, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1].float()
                logp = torch.log_softmax(logits, dim=-1)
                if temperature <= 0:
                    nxt = logits.argmax(-1)
                else:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                toks.append(nxt)
                lps.append(logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1))
                inp = nxt.unsqueeze(-1)
        return torch.stack(toks, 1).cpu(), torch.stack(lps, 1).cpu()

    # --- internals: bookkeeping --------------------------------------------------

    @contextmanager
    def _saving(self, name: str) -> Iterator[_Slot]:
        """Hold adapter ``name``'s own lock (not the engine's) to read it for a save."""
        slot = self._slots.get(name)
        if slot is None:
            raise adapter_not_found(name)
        with slot.lock:
            if self._slots.get(name) is not slot:  # dropped while we waited
                raise adapter_not_found(name)
            yield slot

    def _slot(self, name: str) -> _Slot:
        try:
            return self._slots[name]
        except KeyError:
            raise adapter_not_found(name) from None

    def _info(self, name: str) -> AdapterInfo:
        slot = self._slot(name)
        return AdapterInfo(
            name=name,
            spec=slot.spec,
            optimizer=slot.optimizer.config,
            step=slot.optimizer.step_count,
            parameter_count=self.lora.parameter_count(name),
            parameter_bytes=self.lora.parameter_bytes(name),
            optimizer_state_bytes=slot.optimizer.state_bytes(),
            gradient_bytes=self.lora.gradient_bytes(name),
        )


def _parse_state(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        tensors = load_safetensors_bytes(data)
        meta = json.loads(_safetensors_metadata(data).get(_STATE_META_KEY, "{}"))
    except (SafetensorError, ValueError) as e:
        raise invalid(f"not a trainer state blob: {e}", "INVALID_STATE") from e
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        raise invalid("not a lorafleet trainer state blob", "INVALID_STATE")
    return tensors, meta


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    # The header is an 8-byte little-endian length followed by JSON; reading it
    # directly avoids a temp file just to call safe_open.
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    return dict(header.get("__metadata__", {}))

