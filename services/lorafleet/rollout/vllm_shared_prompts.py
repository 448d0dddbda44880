"""Each prompt's rows computed once per model step, not once per sample (vLLM on CPU).

vLLM runs a request with ``n`` samples as ``n`` requests, and each one prefills
its prompt. Its prefix cache shares only whole KV blocks, and the CPU attention
kernel's blocks are multiples of 32 tokens (128 by default), so a short prompt
is never shared: in a GRPO step of 16 prompts x 8 samples every prompt is
computed eight times. Measured on 2 cores, 8 experiments of 40 steps at once:
79% of the tokens the engine computed were prompts (15 tokens each), and the
model steps that held them took two thirds of the engine's model time.

Two requests that start from their first token in the same step, with the same
adapter and the same rows entering the first LoRA linear (the normalized token
embeddings: a function of the token and the adapter alone), have identical rows
in every layer after it: the same inputs, the same positions, the same weights,
and attention over their own, identical keys and values. So every LoRA linear
(which wraps all the model's linears: the base GEMM and the LoRA delta, most of
the model's time) computes the first request's rows only and copies them to the
others. Everything else (norms, rotary, attention and its KV cache writes) still
runs on every row, so each sample's cache holds its own copy of the prompt's
keys and values, and decoding is unchanged.

The grouping is found once per model step, at the first LoRA linear, from the
step's attention metadata (which rows belong to which request) and the LoRA
mapping (vLLM updates it once per step, which drops the previous grouping).
Against the plain engine (tests/integration/rollout/
test_rollout_vllm_shared_prompts.py) the sampled tokens are the same, and the
logprobs were the same bit for bit on the machine it was written on; in general
they agree to float rounding, since torch's grouped LoRA matmul may round a row
differently when fewer rows share its adapter slot.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

log = logging.getLogger(__name__)

_UNSET = object()

SHARE_ENV = "LORAFLEET_VLLM_SHARE_PROMPT_ROWS"
"""Set by the rollout service (``RolloutSettings.share_prompt_rows``) before it
starts the engine, whose processes inherit it; unset means on."""


def enabled() -> bool:
    return os.environ.get(SHARE_ENV, "1") != "0"


FOLDED = {"steps": 0, "rows": 0}
"""Model steps of this engine process that folded rows, and the rows they did
not compute (read through the worker extension, for tests and probes)."""


@dataclasses.dataclass(frozen=True)
class SharedRows:
    """One model step's token rows with duplicate prompt rows folded together:
    compute ``x[unique]`` and expand the result with ``[inverse]``."""

    tokens: int
    unique: torch.Tensor
    """Row indices to compute, ascending."""
    inverse: torch.Tensor
    """For every row of the step, its position in ``unique``."""

    def slot_groups(self, token_lora_indices: torch.Tensor, slots: int) -> Any:
        """The unique rows grouped by adapter slot (built once per step)."""
        groups = self.__dict__.get("_groups")
        if groups is None or groups.slots != slots:
            from lorafleet.rollout.vllm_patches import SlotGroups

            groups = SlotGroups(token_lora_indices.index_select(0, self.unique), slots)
            object.__setattr__(self, "_groups", groups)
        return groups


def find_shared_rows(
    x: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    lora_indices: torch.Tensor,
) -> SharedRows | None:
    """Fold the rows of requests that start from their first token in this step
    with the same adapter and the same input rows; None when no two do.

    ``x`` is the input of the step's first LoRA linear (one row per token),
    ``query_start_loc`` [requests + 1] and ``seq_lens`` [requests] are the
    attention metadata's, ``lora_indices`` the adapter slot of every token.
    """
    tokens = int(x.shape[0])
    if tokens != int(lora_indices.shape[0]) or int(query_start_loc[-1]) != tokens:
        return None
    query_lens = query_start_loc[1:] - query_start_loc[:-1]
    fresh = ((query_lens == seq_lens) & (query_lens > 0)).nonzero().flatten().tolist()
    if len(fresh) < 2:
        return None
    starts = query_start_loc.tolist()
    as_bytes = x.contiguous().view(torch.uint8)
    first_of: dict[tuple[int, int, bytes], int] = {}
    canonical: torch.Tensor | None = None
    for request in fresh:
        lo, hi = starts[request], starts[request + 1]
        key = (int(lora_indices[lo]), hi - lo, as_bytes[lo:hi].numpy().tobytes())
        first = first_of.setdefault(key, lo)
        if first == lo:
            continue
        if canonical is None:
            canonical = torch.arange(tokens)
        canonical[lo:hi] = torch.arange(first, first + (hi - lo))
    if canonical is None:
        return None
    unique, inverse = torch.unique(canonical, sorted=True, return_inverse=True)
    return SharedRows(tokens, unique, inverse)


def _step_metadata() -> Any:
    """The attention metadata of the model step being run (any layer's: one KV
    cache group shares it), or None outside a model step."""
    from vllm.forward_context import get_forward_context, is_forward_context_available

    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if isinstance(metadata, list):  # micro-batched steps: not folded
        return None
    if not isinstance(metadata, dict):
        return None
    for value in metadata.values():
        if hasattr(value, "query_start_loc") and hasattr(value, "seq_lens"):
            return value
    return None


def shared_rows_of_step(punica: Any, x: torch.Tensor) -> SharedRows | None:
    """This step's folded rows, found at its first LoRA linear and kept on the
    punica wrapper for the step's other linears. Keyed by the step's attention
    metadata (built anew every step) as well as cleared when vLLM updates the
    LoRA mapping, so a grouping never outlives its step."""
    metadata = _step_metadata()
    key = (id(metadata), int(x.shape[0]))
    cached = getattr(punica, "_lorafleet_rows", _UNSET)
    if cached is not _UNSET and cached[0] == key:
        return cached[1]  # type: ignore[no-any-return]
    rows = None
    if metadata is not None and x.dim() == 2:
        rows = find_shared_rows(
            x, metadata.query_start_loc, metadata.seq_lens, punica.token_lora_indices
        )
    if rows is not None:
        FOLDED["steps"] += 1
        FOLDED["rows"] += rows.tokens - int(rows.unique.numel())
    punica._lorafleet_rows = (key, rows)
    return rows


def forget_step_rows(punica: Any) -> None:
    """Called when vLLM updates the LoRA mapping: a new step begins."""
    punica._lorafleet_rows = _UNSET


def install_shared_prompt_rows() -> bool:
    """Make vLLM's LoRA linears compute each shared prompt's rows once; False
    when already installed or when this vLLM lacks the hooks."""
    try:
        from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA
    except ImportError:  # pragma: no cover - other vLLM layouts
        return False
    from lorafleet.rollout.vllm_patches import _grouped_mm_aligned

    original = BaseLinearLayerWithLoRA._apply_sync
    if getattr(original, "_lorafleet_fix", False):
        return False

    def _apply_sync(self: Any, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        punica = self.punica_wrapper
        rank = self.lora_a_stacked[0].shape[2]
        if x.dim() != 2 or not _grouped_mm_aligned(x.shape[1], rank, *self.output_slices):
            return original(self, x, bias)
        rows = shared_rows_of_step(punica, x)
        if rows is None:  # keyed by x's row count, so the grouping fits x
            return original(self, x, bias)
        x_unique = x.index_select(0, rows.unique)
        output = self._get_quant_method().apply(self.base_layer, x_unique, bias)
        groups = rows.slot_groups(punica.token_lora_indices, self.lora_a_stacked[0].shape[0])
        groups.apply(output, x_unique, self.lora_a_stacked, self.lora_b_stacked, 1.0,
                     self.output_slices)
        return output.index_select(0, rows.inverse)

    _apply_sync._lorafleet_fix = True  # type: ignore[attr-defined]
    BaseLinearLayerWithLoRA._apply_sync = _apply_sync  # type: ignore[method-assign]
    log.info("lorafleet: vLLM CPU LoRA linears compute each shared prompt once per step")
    return True
