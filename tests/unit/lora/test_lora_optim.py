"""Per-adapter AdamW: skip on non-finite gradients, clipping, pickle-free state."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lorafleet.core.errors import InvalidArgument
from lorafleet.lora.optim import AdapterOptimizer
from lorafleet.lora.types import OptimizerConfig


def _params(seed: int) -> list[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(3, 4, generator=g)), nn.Parameter(torch.randn(5, generator=g))]


def _set_grads(params, value=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) if value is None else torch.full_like(p, value)


def test_non_finite_gradient_skips_the_step_and_leaves_state_alone():
    params = _params(0)
    opt = AdapterOptimizer(params, OptimizerConfig(learning_rate=0.1))
    _set_grads(params)
    assert opt.step().applied
    before = [p.detach().clone() for p in params]
    state_before = {k: v.clone() for k, v in opt.state_tensors().items()}
    _set_grads(params, float("nan"))
    res = opt.step()
    assert not res.applied and math.isnan(res.grad_norm) and res.step == 1
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    assert all(torch.equal(state_before[k], v) for k, v in opt.state_tensors().items())
    assert all(p.grad is None for p in params)  # the bad gradient is dropped, not kept


def test_clipping_bounds_an_exploding_gradient():
    params = _params(1)
    opt = AdapterOptimizer(params, OptimizerConfig(learning_rate=0.1, max_grad_norm=1.0))
    before = [p.detach().clone() for p in params]
    _set_grads(params, 1e15)
    res = opt.step()
    assert res.applied and res.grad_norm > 1e15
    # Clipped to norm 1 then Adam-normalised: each element moves by about lr.
    for b, p in zip(before, params, strict=True):
        assert torch.allclose((p - b).abs(), torch.full_like(p, 0.1), rtol=1e-3)
    # A norm beyond fp32 range (inf) is treated as non-finite: skipped.
    _set_grads(params, 1e30)
    assert not opt.step().applied
    # Adam's update is at most ~lr per element whatever the gradient's scale.
    assert all(torch.isfinite(p).all() for p in params)


def test_no_gradient_means_no_step():
    opt = AdapterOptimizer(_params(2), OptimizerConfig())
    res = opt.step()
    assert not res.applied and res.step == 0


def test_state_round_trip_continues_identically():
    cfg = OptimizerConfig(learning_rate=0.05, weight_decay=0.01)
    a, b = _params(3), _params(3)
    opt_a = AdapterOptimizer(a, cfg)
    for s in range(3):
        _set_grads(a, seed=s)
        opt_a.step()
    opt_b = AdapterOptimizer(b, cfg)
    with torch.no_grad():
        for x, y in zip(a, b, strict=True):
            y.copy_(x)
    opt_b.load_state_tensors(opt_a.state_tensors(), opt_a.step_count)
    for s in range(3, 5):
        _set_grads(a, seed=s)
        _set_grads(b, seed=s)
        opt_a.step()
        opt_b.step()
    assert opt_b.step_count == 5
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_learning_rate_override_is_for_one_step_only():
    params = _params(4)
    opt = AdapterOptimizer(params, OptimizerConfig(learning_rate=0.1))
    _set_grads(params)
    opt.step(learning_rate=0.5)
    assert opt._opt.param_groups[0]["lr"] == 0.1
    _set_grads(params)
    with pytest.raises(InvalidArgument):
        opt.step(learning_rate=-1.0)
