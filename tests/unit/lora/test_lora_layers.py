"""MultiLoraLinear: per-row routing, heterogeneous ranks, frozen base."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lorafleet.lora.layers import MultiLoraLinear, Routing, RoutingState, inject_multi_lora


def _layer() -> tuple[MultiLoraLinear, RoutingState]:
    torch.manual_seed(0)
    state = RoutingState()
    layer = MultiLoraLinear(nn.Linear(6, 5), state)
    gen = torch.Generator().manual_seed(0)
    layer.add_adapter("a", rank=2, scaling=2.0, generator=gen)
    layer.add_adapter("b", rank=3, scaling=0.5, generator=gen)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
        layer.lora_B["b"].normal_()
    return layer, state


def _expected(layer: MultiLoraLinear, x: torch.Tensor, keys: list[str | None]) -> torch.Tensor:
    rows = []
    for i, key in enumerate(keys):
        y = layer.base_layer(x[i])
        if key is not None:
            a, b = layer.lora_A[key], layer.lora_B[key]
            y = y + (x[i] @ a.T @ b.T) * layer.scaling[key]
        rows.append(y)
    return torch.stack(rows)


def test_rows_get_their_own_adapter_or_base():
    layer, state = _layer()
    x = torch.randn(5, 3, 6)
    for keys in (["a", "a", None, "b", "b"],      # contiguous runs: slice path
                 ["b", "a", "b", None, "a"]):     # interleaved: index path
        state.current = Routing(keys)
        assert state.current.contiguous == (keys[0] == "a")
        torch.testing.assert_close(layer(x), _expected(layer, x, keys), rtol=0, atol=1e-6)
    state.current = None
    torch.testing.assert_close(layer(x), layer.base_layer(x))


def _assert_matches_reference(layer: MultiLoraLinear, keys: list[str | None],
                              routing: Routing, graded: list[str], atol: float,
                              untouched: tuple[str, ...] = ()) -> None:
    """The layer under ``routing`` against :func:`_expected`: outputs, and the
    gradients of the input and of the named ``"<A|B>:<key>"`` parameters; the
    ``untouched`` ones and the base weight get none."""
    def param(name: str) -> torch.Tensor:
        kind, key = name.split(":")
        return (layer.lora_A if kind == "A" else layer.lora_B)[key]

    x = torch.randn(len(keys), 3, 6, requires_grad=True)
    layer._routing_state.current = routing
    y = layer(x)
    torch.testing.assert_close(y, _expected(layer, x, keys), rtol=0, atol=atol)
    y.square().sum().backward()
    grads = [param(n).grad for n in graded] + [x.grad]
    assert layer.base_layer.weight.grad is None
    assert all(param(n).grad is None for n in untouched)
    ref_x = x.detach().clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    _expected(layer, ref_x, keys).square().sum().backward()
    for g, ref in zip(grads, [param(n).grad for n in graded] + [ref_x.grad], strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["stacked", "grouped"])
def test_strategies_agree_on_outputs_and_gradients(strategy):
    layer, state = _layer()
    state.strategy = strategy
    keys = ["a", "a", None, "b", "b"]
    _assert_matches_reference(layer, keys, Routing(keys), ["A:a", "B:b"], atol=1e-6)


@pytest.mark.parametrize("merge", ["always", "never"])
def test_one_adapter_batch_merged_or_not_agrees_on_outputs_and_gradients(merge):
    layer, state = _layer()
    state.merge = merge
    keys = ["b"] * 4
    _assert_matches_reference(layer, keys, Routing(keys, train=True), ["A:b", "B:b"],
                              atol=1e-5, untouched=("A:a", "B:a"))


def test_auto_merges_only_where_the_low_rank_matmuls_weigh():
    state = RoutingState()
    state.current = Routing(["a"], train=True)
    small = MultiLoraLinear(nn.Linear(128, 384), state)   # the tiny model's MLP, rank 8
    big = MultiLoraLinear(nn.Linear(1024, 1024), state)   # a real model's, rank 8
    for layer in (small, big):
        layer.add_adapter("a", rank=8, scaling=1.0)
    assert small._merge_pays("a", train=True, rows=1024)
    assert not big._merge_pays("a", train=True, rows=1024)
    # A decode step of a few sequences: the merge would cost more than it saves.
    assert not small._merge_pays("a", train=False, rows=4)
    small.add_adapter("drop", rank=8, scaling=1.0, dropout=0.1)
    # Dropout applies to the LoRA input only: a merged weight cannot express it.
    assert not small._merge_pays("drop", train=True, rows=1024)
    assert small._merge_pays("drop", train=False, rows=1024)
    state.merge = "never"
    assert not small._merge_pays("a", train=True, rows=1024)


def test_a_nan_adapter_cannot_reach_other_rows():
    layer, state = _layer()
    state.strategy = "stacked"
    with torch.no_grad():
        layer.lora_A["b"].fill_(float("nan"))
    x = torch.randn(4, 2, 6)
    # The owner marks routings with a non-finite adapter; layers then avoid stacking.
    state.current = Routing(["a", "a", "b", "b"], allow_stacked=False)
    y = layer(x)
    assert torch.isfinite(y[:2]).all() and torch.isnan(y[2:]).all()


def test_gradients_reach_only_routed_adapters_and_never_the_base():
    layer, state = _layer()
    state.current = Routing(["a", "a", None])
    layer(torch.randn(3, 4, 6)).sum().backward()
    assert layer.lora_A["a"].grad is not None and layer.lora_B["a"].grad is not None
    assert layer.lora_A["b"].grad is None and layer.lora_B["b"].grad is None
    assert not layer.base_layer.weight.requires_grad and layer.base_layer.weight.grad is None


def test_init_matches_peft_default():
    # init_lora_weights=True: A ~ kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)),
    # B = 0, so a fresh adapter is the identity update.
    layer = MultiLoraLinear(nn.Linear(400, 3), RoutingState())
    layer.add_adapter("a", rank=64, scaling=1.0, generator=torch.Generator().manual_seed(1))
    a = layer.lora_A["a"].detach()
    bound = 1 / 400 ** 0.5
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound
    assert abs(a.std().item() - bound / 3 ** 0.5) < 0.05 * bound
    assert torch.count_nonzero(layer.lora_B["a"]) == 0


def test_inject_keeps_module_paths(llama):
    state = RoutingState()
    layers = inject_multi_lora(llama, ["q_proj", "down_proj"], state)
    assert sorted(layers) == sorted(
        [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
        + [f"model.layers.{i}.mlp.down_proj" for i in range(2)])
    assert isinstance(llama.get_submodule("model.layers.0.self_attn.q_proj"), MultiLoraLinear)
    assert isinstance(llama.get_submodule("model.layers.0.self_attn.k_proj"), nn.Linear)
    # Injecting again returns the same layers and wraps nothing twice.
    again = inject_multi_lora(llama, ["q_proj"], state)
    assert again["model.layers.0.self_attn.q_proj"] is layers["model.layers.0.self_attn.q_proj"]
