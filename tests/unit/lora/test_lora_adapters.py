"""MultiLoraModel: slots, limits, deterministic init, routing context."""

from __future__ import annotations

import pytest
import torch

from lorafleet.core.errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from lorafleet.lora.adapters import MultiLoraModel
from lorafleet.lora.errors import LoraSpecError
from lorafleet.lora.spec import LoraSpec


def test_slots_and_limits(llama):
    lm = MultiLoraModel(llama, max_adapters=2, max_rank=8)
    lm.add_adapter("a", LoraSpec(rank=4, alpha=8))
    with pytest.raises(AlreadyExists) as info:
        lm.add_adapter("a", LoraSpec(rank=4, alpha=8))
    assert info.value.reason == "ADAPTER_EXISTS"
    with pytest.raises(FailedPrecondition) as info:
        lm.add_adapter("big", LoraSpec(rank=16, alpha=8))
    assert info.value.reason == "RANK_ABOVE_NODE_MAX"
    with pytest.raises(LoraSpecError) as info:
        lm.add_adapter("bad", LoraSpec(rank=4, alpha=8, target_modules=("nope",)))
    assert info.value.reason == "UNKNOWN_TARGET_MODULE"
    lm.add_adapter("b", LoraSpec(rank=2, alpha=8, target_modules=("v_proj",)))
    with pytest.raises(ResourceExhausted) as info:
        lm.add_adapter("c", LoraSpec(rank=4, alpha=8))
    assert info.value.reason == "NO_FREE_SLOT"
    lm.remove_adapter("a")
    lm.add_adapter("c", LoraSpec(rank=4, alpha=8))
    assert lm.adapter_names == ["b", "c"]
    with pytest.raises(NotFound) as info:
        lm.remove_adapter("a")
    assert info.value.reason == "ADAPTER_NOT_FOUND"


def test_parameters_names_and_memory(llama):
    lm = MultiLoraModel(llama)
    spec = lm.add_adapter("a", LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "up_proj")))
    names = lm.adapter_parameter_names("a")
    assert names[:2] == ["model.layers.0.self_attn.q_proj.lora_A.weight",
                         "model.layers.0.self_attn.q_proj.lora_B.weight"]
    params = lm.adapter_parameters("a")
    assert [tuple(p.shape) for p in params[:4]] == [(4, 64), (64, 4), (4, 64), (128, 4)]
    # q: 4*64 + 64*4, up: 4*64 + 128*4, per layer, 2 layers, fp32.
    assert lm.parameter_bytes("a") == 2 * (512 + 768) * 4
    assert spec.target_modules == ("q_proj", "up_proj")
    assert all(p.requires_grad for p in params)
    base = [p for n, p in llama.named_parameters() if "lora_" not in n]
    assert base and not any(p.requires_grad for p in base)


def test_same_seed_same_weights_whatever_else_is_loaded(llama_dir):
    from transformers import AutoModelForCausalLM

    def weights(extra: bool) -> list[torch.Tensor]:
        lm = MultiLoraModel(AutoModelForCausalLM.from_pretrained(str(llama_dir)))
        if extra:
            lm.add_adapter("other", LoraSpec(rank=2, alpha=2), seed=9)
        lm.add_adapter("a", LoraSpec(rank=4, alpha=8), seed=7)
        return [p.detach().clone() for p in lm.adapter_parameters("a")]

    for x, y in zip(weights(False), weights(True), strict=True):
        assert torch.equal(x, y)


def test_routing_context_restores_and_rejects_unknown(llama):
    lm = MultiLoraModel(llama)
    lm.add_adapter("a", LoraSpec(rank=4, alpha=8))
    with torch.no_grad():
        for p in lm.adapter_parameters("a"):
            p.normal_(std=0.5)
    ids = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    base = llama(ids).logits
    with lm.routing(["a", None]):
        mixed = llama(ids).logits
    torch.testing.assert_close(mixed[1], base[1])
    assert not torch.allclose(mixed[0], base[0], atol=1e-3)
    assert lm.state.current is None
    with pytest.raises(NotFound), lm.routing(["ghost"]):
        pass
