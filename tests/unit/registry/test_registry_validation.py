"""Safetensors header parsing and LoRA/config checks on crafted bytes."""

from __future__ import annotations

import io
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save

from lorafleet.core.errors import InvalidArgument, ResourceExhausted
from lorafleet.registry.testing import adapter_config, lora_tensors
from lorafleet.registry.types import LoraSpec
from lorafleet.registry.validation import (
    Limits,
    check_adapter_config,
    check_lora_tensors,
    read_safetensors_header,
)

LIMITS = Limits(max_header_bytes=1 << 16, max_tensors=64, max_config_bytes=1 << 16)
SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


def parse(blob: bytes, limits: Limits = LIMITS):
    return read_safetensors_header(io.BytesIO(blob), len(blob), limits)


def crafted(header: dict | bytes, data: bytes = b"", claimed: int | None = None) -> bytes:
    body = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(body) if claimed is None else claimed) + body + data


def valid_file(**kw) -> bytes:
    args = {
        "rank": 4,
        "target_modules": ("q_proj", "v_proj"),
        "layers": 2,
        "hidden": 16,
        "intermediate": 24,
    }
    return save(lora_tensors(**{**args, **kw}))


def test_valid_adapter_passes_and_matches_library():
    blob = valid_file()
    tensors = parse(blob)
    assert len(tensors) == 8
    check_lora_tensors(tensors, SPEC)
    name = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert tensors[name].shape == (16, 4) and tensors[name].dtype == "F32"


def test_padded_header_and_metadata_are_accepted():
    header = {
        "__metadata__": {"format": "pt"},
        "t": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]},
    }
    body = json.dumps(header).encode() + b"   "  # safetensors pads headers with spaces
    assert parse(crafted(body, b"\0" * 4))["t"].shape == (2,)


@pytest.mark.parametrize(
    "blob, error, reason",
    [
        (b"\x80\x04\x95", InvalidArgument, "PICKLE_REFUSED"),
        (b"PK\x03\x04rest-of-zip", InvalidArgument, "PICKLE_REFUSED"),
        (b"\x01\x00", InvalidArgument, "SAFETENSORS_TRUNCATED"),
        (crafted(b"{}", claimed=1 << 20), ResourceExhausted, "SAFETENSORS_HEADER_TOO_LARGE"),
        (crafted(b"{}", claimed=100), InvalidArgument, "SAFETENSORS_TRUNCATED"),
        (crafted(b"\xff\xfe{}"), InvalidArgument, "SAFETENSORS_BAD_HEADER"),
        (crafted(b"[1, 2]"), InvalidArgument, "SAFETENSORS_BAD_HEADER"),
        (crafted(b"{}"), InvalidArgument, "SAFETENSORS_BAD_HEADER"),
        (crafted({"__metadata__": {"a": 1}}), InvalidArgument, "SAFETENSORS_BAD_HEADER"),
        (crafted({"t": {"dtype": "F32", "shape": [1]}}), InvalidArgument, "SAFETENSORS_BAD_TENSOR"),
        (
            crafted({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            InvalidArgument,
            "SAFETENSORS_BAD_TENSOR",
        ),
        (
            crafted({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4),
            InvalidArgument,
            "SAFETENSORS_BAD_TENSOR",
        ),
        (
            crafted({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, b"\0" * 4),
            InvalidArgument,
            "SAFETENSORS_BAD_TENSOR",
        ),
        (
            crafted({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
            InvalidArgument,
            "SAFETENSORS_BAD_OFFSETS",
        ),
        (
            crafted({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4),
            InvalidArgument,
            "SAFETENSORS_BAD_OFFSETS",
        ),
        (
            crafted({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8),
            InvalidArgument,
            "SAFETENSORS_BAD_OFFSETS",
        ),
        (
            crafted({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8),
            InvalidArgument,
            "SAFETENSORS_BAD_OFFSETS",
        ),
        (
            crafted(
                {
                    "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                    "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
                },
                b"\0" * 12,
            ),
            InvalidArgument,
            "SAFETENSORS_BAD_OFFSETS",
        ),
        (
            crafted(
                {"t": {"dtype": "F32", "shape": [1 << 40, 1 << 40], "data_offsets": [0, 4]}},
                b"\0" * 4,
            ),
            InvalidArgument,
            "SAFETENSORS_BAD_TENSOR",
        ),
        (
            crafted(
                b'{"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "t": 1}', b"\0" * 4
            ),
            InvalidArgument,
            "SAFETENSORS_BAD_HEADER",
        ),
    ],
)
def test_hostile_headers(blob, error, reason):
    with pytest.raises(error) as exc:
        parse(blob)
    assert exc.value.reason == reason


def test_tensor_count_is_bounded():
    with pytest.raises(ResourceExhausted) as exc:
        parse(valid_file(layers=20), Limits(1 << 16, 64, 1 << 16))  # 80 tensors
    assert exc.value.reason == "TOO_MANY_TENSORS"


def _tensors(mutate):
    tensors = lora_tensors(
        rank=4, target_modules=("q_proj", "v_proj"), layers=2, hidden=16, intermediate=24
    )
    mutate(tensors)
    return parse(save(tensors))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (
            lambda t: t.update({"base_model.model.lm_head.weight": np.zeros((4, 4), np.float32)}),
            "UNEXPECTED_TENSOR",
        ),
        (
            lambda t: t.update(
                {"model.layers.0.q_proj.lora_A.weight": np.zeros((4, 16), np.float32)}
            ),
            "UNEXPECTED_TENSOR",
        ),
        (
            lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"),
            "LORA_PAIR_INCOMPLETE",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros(
                        (8, 16), np.float32
                    )
                }
            ),
            "SHAPE_MISMATCH",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight": np.zeros(
                        (20, 4), np.float32
                    )
                }
            ),
            "SHAPE_MISMATCH",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros(
                        (4, 16, 1), np.float32
                    )
                }
            ),
            "SHAPE_MISMATCH",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros(
                        (4, 16), np.int32
                    )
                }
            ),
            "SAFETENSORS_BAD_DTYPE",
        ),
        (
            lambda t: [t.pop(k) for k in list(t) if "v_proj" in k],
            "TARGET_MODULE_MISSING",
        ),
        (
            lambda t: t.update(
                {
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight": np.zeros(
                        (4, 16), np.float32
                    ),
                    "base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight": np.zeros(
                        (16, 4), np.float32
                    ),
                }
            ),
            "UNTARGETED_MODULE",
        ),
    ],
)
def test_lora_tensors_must_match_spec(mutate, reason):
    with pytest.raises(InvalidArgument) as exc:
        check_lora_tensors(_tensors(mutate), SPEC)
    assert exc.value.reason == reason


def test_empty_target_modules_accepts_any_module():
    tensors = _tensors(lambda t: None)
    check_lora_tensors(tensors, LoraSpec(rank=4, alpha=8.0))


def _config(**changes) -> bytes:
    config = adapter_config(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))
    config.update(changes)
    return json.dumps(config).encode()


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b"not json", "ADAPTER_CONFIG_INVALID"),
        (b"[]", "ADAPTER_CONFIG_INVALID"),
        (_config(peft_type="PREFIX_TUNING"), "ADAPTER_CONFIG_UNSUPPORTED"),
        (_config(use_dora=True), "ADAPTER_CONFIG_UNSUPPORTED"),
        (_config(modules_to_save=["lm_head"]), "ADAPTER_CONFIG_UNSUPPORTED"),
        (_config(rank_pattern={"q_proj": 8}), "ADAPTER_CONFIG_UNSUPPORTED"),
        (_config(r=8), "ADAPTER_CONFIG_MISMATCH"),
        (_config(lora_alpha=16), "ADAPTER_CONFIG_MISMATCH"),
        (_config(lora_alpha="8"), "ADAPTER_CONFIG_MISMATCH"),
        (_config(use_rslora=True), "ADAPTER_CONFIG_MISMATCH"),
        (_config(target_modules=["q_proj"]), "ADAPTER_CONFIG_MISMATCH"),
        (_config(target_modules="q_proj|v_proj"), "ADAPTER_CONFIG_MISMATCH"),
    ],
)
def test_adapter_config_checks(raw, reason):
    with pytest.raises(InvalidArgument) as exc:
        check_adapter_config(raw, SPEC)
    assert exc.value.reason == reason


def test_adapter_config_accepts_peft_output_with_float_alpha():
    check_adapter_config(_config(lora_alpha=8), SPEC)
    check_adapter_config(_config(target_modules=["v_proj", "q_proj"]), SPEC)
