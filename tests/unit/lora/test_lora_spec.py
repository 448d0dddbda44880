"""LoraSpec validation, scaling and target-module resolution."""

from __future__ import annotations

import math

import pytest

from lorafleet.core.errors import InvalidArgument
from lorafleet.lora.errors import LoraSpecError
from lorafleet.lora.spec import LoraSpec, default_target_modules, resolve_targets


def test_scaling_plain_and_rslora():
    assert LoraSpec(rank=8, alpha=16).scaling == 2.0
    assert math.isclose(LoraSpec(rank=16, alpha=8, use_rslora=True).scaling, 2.0)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"rank": 0, "alpha": 1}, "RANK_TOO_SMALL"),
        ({"rank": 2.5, "alpha": 1}, "INVALID_RANK"),
        ({"rank": 4, "alpha": 0}, "INVALID_ALPHA"),
        ({"rank": 4, "alpha": float("nan")}, "INVALID_ALPHA"),
        ({"rank": 4, "alpha": 8, "dropout": 1.0}, "INVALID_DROPOUT"),
        ({"rank": 4, "alpha": 8, "target_modules": ("q_proj", "q_proj")},
         "DUPLICATE_TARGET_MODULE"),
        ({"rank": 4, "alpha": 8, "target_modules": ("q proj",)}, "INVALID_TARGET_MODULE"),
    ],
)
def test_invalid_specs_carry_reasons(kwargs, reason):
    with pytest.raises(LoraSpecError) as info:
        LoraSpec(**kwargs)
    assert info.value.reason == reason
    # One error root: the servicer maps it to INVALID_ARGUMENT; still a ValueError.
    assert isinstance(info.value, InvalidArgument)
    assert isinstance(info.value, ValueError)


def test_list_target_modules_become_a_tuple_and_round_trip():
    spec = LoraSpec(rank=4, alpha=8, target_modules=["q_proj", "v_proj"])  # type: ignore[arg-type]
    assert spec.target_modules == ("q_proj", "v_proj")
    assert LoraSpec.from_dict(spec.to_dict()) == spec


def test_default_targets_of_llama_are_all_block_linears(llama):
    assert default_target_modules(llama) == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_resolve_targets_unknown_module_and_rank_too_large():
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.mlp.up_proj": (64, 8),
              "lm_head": (64, 100)}
    spec = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "up_proj"))
    assert resolve_targets(spec, shapes) == ["model.layers.0.self_attn.q_proj",
                                             "model.layers.0.mlp.up_proj"]
    # PEFT's list rule: a dotted suffix, never a substring.
    with pytest.raises(LoraSpecError) as info:
        resolve_targets(LoraSpec(rank=4, alpha=8, target_modules=("proj",)), shapes)
    assert info.value.reason == "UNKNOWN_TARGET_MODULE"
    with pytest.raises(LoraSpecError) as info:
        resolve_targets(LoraSpec(rank=16, alpha=8, target_modules=("up_proj",)), shapes)
    assert info.value.reason == "RANK_TOO_LARGE"
