"""Loss maths on hand-checkable numbers."""

from __future__ import annotations

import math

import torch

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
