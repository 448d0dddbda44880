"""safetensors_bytes writes exactly what safetensors.torch.save writes, for every dtype."""

from __future__ import annotations

import pytest
import safetensors.torch
import torch

from lorafleet.lora.tensor_bytes import safetensors_bytes


def _mixed(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "b.lora_B.weight": (base * 10).to(dtype),
        "a.lora_A.weight": (base.t() * 10).to(dtype),  # a non-contiguous view
        "scalar": torch.tensor(3.0).to(dtype),
        "empty": torch.zeros(0, 4).to(dtype),
    }


@pytest.mark.parametrize(
    "dtype",
    [torch.float32, torch.float16, torch.float64, torch.int64, torch.int8, torch.uint8,
     torch.bool, torch.bfloat16],
)
def test_same_bytes_as_safetensors_torch(dtype):
    tensors = _mixed(dtype)
    # safetensors.torch.save wants contiguous tensors; the result must not depend on it.
    expected = safetensors.torch.save(
        {k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"}
    )
    assert safetensors_bytes(tensors, metadata={"format": "pt"}) == expected


def test_parameters_with_grad_and_no_metadata():
    weight = torch.nn.Parameter(torch.randn(3, 4))
    data = safetensors_bytes({"w": weight})
    assert data == safetensors.torch.save({"w": weight.detach()})
    assert torch.equal(safetensors.torch.load(data)["w"], weight.detach())


def test_bfloat16_round_trips_through_the_torch_path():
    tensors = {"w": torch.randn(4, 4).to(torch.bfloat16)}
    loaded = safetensors.torch.load(safetensors_bytes(tensors))
    assert loaded["w"].dtype == torch.bfloat16
    assert torch.equal(loaded["w"], tensors["w"])
