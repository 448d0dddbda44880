"""Loss maths on hand-checkable numbers."""

from __future__ import annotations

import math

import pytest
import torch
from lora_support import autograd_token_logprobs

from lorafleet.lora import losses
from lorafleet.lora.losses import kl_k3, policy_gradient_token_loss, token_logprobs


def _pg(logp: float, samp: float, adv: float, clip: float = 0.2):
    lp = torch.tensor([[logp]], requires_grad=True)
    loss, clipped = policy_gradient_token_loss(
        lp, torch.tensor([[samp]]), torch.tensor([adv]), torch.tensor([clip]),
        torch.tensor([clip]), torch.tensor([[True]]))
    loss.sum().backward()
    return loss.item(), clipped.item(), lp.grad.item()


def test_on_policy_ratio_one_gives_reinforce_gradient():
    loss, clipped, grad = _pg(-1.0, -1.0, adv=2.0)
    assert loss == -2.0 and clipped == 0.0 and math.isclose(grad, -2.0)


def test_clipping_stops_gradient_outside_trust_region():
    # Positive advantage, ratio 1.5 > 1.2: clipped objective active, zero gradient.
    loss, clipped, grad = _pg(math.log(1.5), 0.0, adv=1.0)
    assert clipped == 1.0 and grad == 0.0 and math.isclose(loss, -1.2, rel_tol=1e-6)
    # Negative advantage, ratio 1.5: the unclipped (pessimistic) term stays active.
    loss, clipped, grad = _pg(math.log(1.5), 0.0, adv=-1.0)
    assert clipped == 0.0 and math.isclose(grad, 1.5, rel_tol=1e-6)
    # Negative advantage, ratio 0.5 < 0.8: clipped.
    loss, clipped, grad = _pg(math.log(0.5), 0.0, adv=-1.0)
    assert clipped == 1.0 and grad == 0.0


def test_masked_positions_never_produce_nan():
    lp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    samp = torch.tensor([[-1.0, -500.0]])  # garbage where masked
    loss, _ = policy_gradient_token_loss(lp, samp, torch.tensor([1.0]), torch.tensor([0.2]),
                                         torch.tensor([0.2]), torch.tensor([[True, False]]))
    assert torch.isfinite(loss).all()


def test_k3_is_nonnegative_and_zero_on_policy():
    p = torch.tensor([-1.0, -2.0, -0.5])
    assert torch.equal(kl_k3(p, p), torch.zeros(3))
    assert (kl_k3(p, p + torch.tensor([0.3, -0.7, 1.1])) > 0).all()


def test_token_logprobs_and_entropy():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25]]]))
    lp, ent = token_logprobs(logits, torch.tensor([[1]]))
    assert math.isclose(lp.item(), math.log(0.25), rel_tol=1e-6)
    assert math.isclose(ent.item(), -(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_elements", [1 << 25, 50, 7])
def test_token_logprobs_equal_autograd_bit_for_bit_in_any_chunking(monkeypatch, dtype,
                                                                   chunk_elements):
    # 50 and 7 logits per chunk: several rows, then less than one row (one row a chunk).
    monkeypatch.setattr(losses, "LOGIT_CHUNK_ELEMENTS", chunk_elements)
    g = torch.Generator().manual_seed(0)
    base = (3 * torch.randn(5, 9, 13, generator=g)).to(dtype)
    targets = torch.randint(0, 13, (5, 8), generator=g)
    weights = torch.randn(5, 8, generator=g)
    ours_in, ref_in = base.clone().requires_grad_(), base.clone().requires_grad_()
    lp, ent = token_logprobs(ours_in[:, :-1], targets)  # a strided view, as the engine passes
    ref_lp, ref_ent = autograd_token_logprobs(ref_in[:, :-1], targets)
    (lp * weights).sum().backward()
    (ref_lp * weights).sum().backward()
    assert torch.equal(lp, ref_lp) and torch.equal(ent, ref_ent)
    assert ours_in.grad.dtype == dtype and torch.equal(ours_in.grad, ref_in.grad)
    assert token_logprobs(base, torch.zeros(5, 9, dtype=torch.long), with_entropy=False)[1] is None


def test_token_logprobs_keep_no_fp32_copy_of_the_logits():
    """What backward keeps of bf16 logits: the logits themselves and per-token
    values, not the 2x larger fp32 copy that autograd through .float() keeps."""
    logits = torch.randn(4, 16, 1000).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 1000, (4, 16))

    def saved_bytes(fn) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            seen[id(t)] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(logits, targets)
        return sum(seen.values())

    logit_bytes = logits.numel() * logits.element_size()
    per_token = 4 * 16 * (8 + 4)  # int64 targets + fp32 log-sum-exp
    assert saved_bytes(token_logprobs) <= logit_bytes + per_token
    assert saved_bytes(autograd_token_logprobs) >= 2 * logit_bytes  # the fp32 copy
