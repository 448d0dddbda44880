"""Token-level losses over a padded, fused batch.

Everything here is per token on ``[N, L]`` tensors (N rows of the fused batch, L
next-token positions) with per-row loss settings, so one call serves a batch in
which every request has its own loss kind, clip range and KL weight; the engine
then normalises each request by its own token count (see :func:`request_weights`).

Conventions:
- policy gradient: ratio = exp(logp - sampling_logp) (sampling_logp = logp,
  detached, for on-policy rows); per-token loss
  max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high)) (PPO / GRPO,
  token-level as in DAPO's token-mean). No extra clamp on the ratio: a runaway
  ratio gives a non-finite gradient, and the adapter's optimizer then skips the
  step instead of training on garbage.
- KL to the base: the k3 estimator (Schulman's; GRPO's choice)
  exp(b - p) - (b - p) - 1 with p the policy logprob and b the base logprob of the
  sampled token; unbiased for KL(policy || base) under policy samples, >= 0 and
  low-variance. Its gradient flows through p only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenStats:
    """Per-token quantities of one fused pass; ``[N, L]`` each, zero off ``mask``."""

    loss: torch.Tensor
    """Differentiable per-token loss (before request normalisation)."""
    kl: torch.Tensor
    clipped: torch.Tensor
    """1.0 where the clipped objective was the active one."""
    entropy: torch.Tensor
    logprob_gap: torch.Tensor
    """|sampling_logp - logp| where a sampling logprob was given."""


LOGIT_CHUNK_ELEMENTS = 1 << 25
"""Logits handled at once in fp32 by :func:`token_logprobs` (128 MiB of fp32)."""


def token_logprobs(logits_N_L_V: torch.Tensor, targets_N_L: torch.Tensor,
                   *, with_entropy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p(target) per position (differentiable) and the policy entropy (no grad).

    Works in fp32 whatever the model dtype: the ratio exp(logp - sampling_logp) is
    sensitive to rounding of logp. Memory: only the model's own logits are kept
    for backward; the fp32 work (log-sum-exp, softmax, the gradient) runs over
    row chunks of ``LOGIT_CHUNK_ELEMENTS``. Autograd through ``logits.float()``
    would keep an fp32 copy of every logit and make several more for the entropy
    and the gradient: on an H200, bf16 logits of a 152k vocabulary (Qwen2.5's)
    took 10x their own size on top of themselves that way, 2x this way (the
    gradient, and autograd's copy of it into a leaf's ``.grad``); a train pass
    of 32768 tokens on a Qwen2.5-0.5B-shaped model went from out of memory
    (139 GiB) to a peak of 82 GiB (benchmarks/README.md, GPU checks). Each
    row's values are computed exactly as autograd computes them, whatever the
    chunking (row-wise ops only).
    """
    lp, ent = _TargetLogprobs.apply(logits_N_L_V, targets_N_L, with_entropy)
    return lp, (ent if with_entropy else None)


class _TargetLogprobs(torch.autograd.Function):
    """``log_softmax(logits.float())`` at the targets, over chunks of rows (the
    first dimension: slices of it are views, whatever the logits' strides); see
    :func:`token_logprobs`. The gradient is autograd's for ``gather - logsumexp``:
    ``g * (onehot(target) - softmax(logits))``, cast to the logits' dtype."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        lse = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        lp = torch.empty_like(lse)
        ent = torch.zeros_like(lse)
        for lo, hi in _row_chunks(logits):
            x = logits[lo:hi].float()
            lse[lo:hi] = torch.logsumexp(x, dim=-1)
            lp[lo:hi] = x.gather(-1, targets[lo:hi].unsqueeze(-1)).squeeze(-1) - lse[lo:hi]
            if with_entropy:
                ent[lo:hi] = lse[lo:hi] - (torch.softmax(x, dim=-1) * x).sum(-1)
        ctx.save_for_backward(logits, targets, lse)
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp: torch.Tensor, _grad_ent: torch.Tensor
                 ) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        g = grad_lp.float().unsqueeze(-1)
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        for lo, hi in _row_chunks(logits):
            x = logits[lo:hi].float()
            chunk = -g[lo:hi] * torch.exp(x - lse[lo:hi].unsqueeze(-1))
            grad[lo:hi] = chunk.scatter_add_(-1, targets[lo:hi].unsqueeze(-1), g[lo:hi])
        return grad, None, None


def _row_chunks(logits: torch.Tensor) -> list[tuple[int, int]]:
    per_row = max(1, logits[:1].numel())
    step = max(1, LOGIT_CHUNK_ELEMENTS // per_row)
    return [(lo, min(lo + step, logits.shape[0])) for lo in range(0, logits.shape[0], step)]


def kl_k3(logprobs: torch.Tensor, base_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 estimate of KL(policy || base) per sampled token."""
    d = base_logprobs - logprobs
    return torch.exp(d) - d - 1.0


def policy_gradient_token_loss(
    logprobs_N_L: torch.Tensor,
    sampling_logprobs_N_L: torch.Tensor,
    advantages_N: torch.Tensor,
    clip_low_N: torch.Tensor,
    clip_high_N: torch.Tensor,
    mask_N_L: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped importance-weighted policy-gradient loss per token, and where it clipped."""
    # Masked positions get log-ratio 0 before exp, so padding never makes inf * 0 = nan.
    log_ratio = torch.where(mask_N_L, logprobs_N_L - sampling_logprobs_N_L, 0.0)
    ratio = torch.exp(log_ratio)
    adv = advantages_N.unsqueeze(-1)
    low = (1.0 - clip_low_N).unsqueeze(-1)
    high = (1.0 + clip_high_N).unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, low, high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).to(logprobs_N_L.dtype).detach()
    return loss, was_clipped


def cross_entropy_token_loss(logprobs_N_L: torch.Tensor) -> torch.Tensor:
    return -logprobs_N_L


def fused_token_stats(
    *,
    logprobs: torch.Tensor,
    entropy: torch.Tensor | None,
    mask: torch.Tensor,
    is_policy_gradient_N: torch.Tensor,
    sampling_logprobs: torch.Tensor,
    has_sampling_logprobs_N: torch.Tensor,
    advantages_N: torch.Tensor,
    clip_low_N: torch.Tensor,
    clip_high_N: torch.Tensor,
    kl_coef_N: torch.Tensor,
    base_logprobs: torch.Tensor | None,
    on_policy_N: torch.Tensor | None = None,
) -> TokenStats:
    """Per-token loss and metrics for rows that each carry their own loss settings.

    Rows marked ``on_policy_N`` take the behaviour policy of the importance ratio
    from ``logprobs`` itself (detached): ratio exactly 1, gradient -A * grad logp,
    whatever the engine's sampling logprobs say. Those still feed ``logprob_gap``.
    """
    zero = torch.zeros_like(logprobs)
    behaviour = sampling_logprobs
    if on_policy_N is not None:
        behaviour = torch.where(on_policy_N.unsqueeze(-1), logprobs.detach(), sampling_logprobs)
    pg, clipped = policy_gradient_token_loss(
        logprobs, behaviour, advantages_N, clip_low_N, clip_high_N, mask
    )
    ce = cross_entropy_token_loss(logprobs)
    is_pg = is_policy_gradient_N.unsqueeze(-1)
    loss = torch.where(is_pg, pg, ce)
    clipped = torch.where(is_pg & mask, clipped, zero.detach())
    if base_logprobs is not None:
        kl = torch.where(mask, kl_k3(logprobs, torch.where(mask, base_logprobs, logprobs)), 0.0)
        loss = loss + kl_coef_N.unsqueeze(-1) * kl
        kl = kl.detach()
    else:
        kl = zero.detach()
    loss = torch.where(mask, loss, 0.0)
    gap_mask = mask & has_sampling_logprobs_N.unsqueeze(-1)
    gap = torch.where(gap_mask, (sampling_logprobs - logprobs.detach()).abs(), 0.0)
    ent = torch.where(mask, entropy, 0.0) if entropy is not None else zero.detach()
    return TokenStats(loss=loss, kl=kl, clipped=clipped, entropy=ent, logprob_gap=gap)


def request_weights(row_request_N: torch.Tensor, tokens_per_request_R: torch.Tensor
                    ) -> torch.Tensor:
    """1 / (loss tokens of the row's request), per row: each request's loss is its own
    token mean, and the fused loss is the sum over requests. Adapters' parameters
    are disjoint, so the gradient of that sum w.r.t. one adapter is exactly the
    gradient of its own request's loss."""
    return 1.0 / tokens_per_request_R.clamp(min=1).to(torch.float32)[row_request_N]


def segment_sum(values_N_L: torch.Tensor, row_request_N: torch.Tensor, num_requests: int
                ) -> torch.Tensor:
    """Sum of each request's rows: ``[R]``."""
    per_row = values_N_L.detach().sum(-1).to(torch.float64)
    out = torch.zeros(num_requests, dtype=torch.float64, device=per_row.device)
    return out.index_add_(0, row_request_N, per_row)
