"""PEFT-layout adapters of any size without torch, for tests and benchmarks.

Tensor names and shapes are exactly what ``peft`` writes for a Llama model
(``base_model.model.model.layers.<i>.self_attn.q_proj.lora_A.weight`` is
[rank, hidden], ``...lora_B.weight`` is [out, rank]), so the registry's checks
see the same thing they see from the trainer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from lorafleet.registry.types import CONFIG_FILE, WEIGHTS_FILE

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def llama_module_dims(
    hidden: int, intermediate: int, kv_hidden: int | None = None
) -> dict[str, tuple[int, int]]:
    """module name -> (in_features, out_features) of a Llama decoder layer."""
    kv = kv_hidden or hidden
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (hidden, hidden),
        "gate_proj": (hidden, intermediate),
        "up_proj": (hidden, intermediate),
        "down_proj": (intermediate, hidden),
    }


def adapter_config(
    *, rank: int, alpha: float, target_modules: Sequence[str], base_model: str = ""
) -> dict:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted(target_modules),
        "use_rslora": False,
        "use_dora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "modules_to_save": None,
        "base_model_name_or_path": base_model or None,
    }


def lora_tensors(
    *,
    rank: int,
    target_modules: Sequence[str],
    layers: int,
    hidden: int,
    intermediate: int,
    seed: int = 0,
    dtype: type = np.float32,
) -> dict[str, np.ndarray]:
    dims = llama_module_dims(hidden, intermediate)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer in range(layers):
        for module in target_modules:
            block = "self_attn" if module in ATTENTION else "mlp"
            fan_in, fan_out = dims[module]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = rng.standard_normal((rank, fan_in)).astype(dtype)
            tensors[f"{prefix}.lora_B.weight"] = rng.standard_normal((fan_out, rank)).astype(dtype)
    return tensors


def write_adapter(
    directory: Path,
    *,
    rank: int = 4,
    alpha: float = 8.0,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    layers: int = 1,
    hidden: int = 32,
    intermediate: int = 64,
    seed: int = 0,
    base_model: str = "",
) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` into
    ``directory`` (created) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = lora_tensors(
        rank=rank,
        target_modules=target_modules,
        layers=layers,
        hidden=hidden,
        intermediate=intermediate,
        seed=seed,
    )
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = adapter_config(
        rank=rank, alpha=alpha, target_modules=target_modules, base_model=base_model
    )
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory


def layers_for_bytes(
    target_bytes: int,
    *,
    rank: int,
    target_modules: Sequence[str],
    hidden: int,
    intermediate: int,
    itemsize: int = 4,
) -> int:
    """How many layers make an fp32 adapter of about ``target_bytes``."""
    dims = llama_module_dims(hidden, intermediate)
    per_layer = sum(rank * (dims[m][0] + dims[m][1]) for m in target_modules) * itemsize
    return max(1, round(target_bytes / per_layer))
