"""Multi-LoRA training core: layers, PEFT-format IO, losses, optimizers, fused engine.

Shared by the trainer service and the torch reference rollout engine. Submodules
are small and single-purpose; import them directly
(``from lorafleet.lora.engine import TrainEngine``). The names below are also
reachable from the package, lazily, so ``from lorafleet.lora import LoraSpec``
does not import torch.

- :mod:`~lorafleet.lora.spec`      ``LoraSpec`` and target-module rules (torch-free)
- :mod:`~lorafleet.lora.types`     request / result dataclasses (torch-free)
- :mod:`~lorafleet.lora.layers`    ``MultiLoraLinear``, per-row ``Routing``
- :mod:`~lorafleet.lora.adapters`  ``MultiLoraModel``: slots, init, routing context
- :mod:`~lorafleet.lora.peft_io`   PEFT ``adapter_config.json`` + safetensors, digests
- :mod:`~lorafleet.lora.losses`    GRPO/PPO clipped PG, cross-entropy, k3 KL
- :mod:`~lorafleet.lora.optim`     ``AdapterOptimizer``: one AdamW per adapter
- :mod:`~lorafleet.lora.engine`    ``TrainEngine``: fused mixed-adapter steps
- :mod:`~lorafleet.lora.fusing`    ``FusingQueue``: async batching front
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoraSpec": "lorafleet.lora.spec",
    "default_target_modules": "lorafleet.lora.spec",
    "LoraSpecError": "lorafleet.lora.errors",
    "MultiLoraLinear": "lorafleet.lora.layers",
    "inject_multi_lora": "lorafleet.lora.layers",
    "MultiLoraModel": "lorafleet.lora.adapters",
    "save_peft_adapter": "lorafleet.lora.peft_io",
    "load_peft_adapter": "lorafleet.lora.peft_io",
    "AdapterOptimizer": "lorafleet.lora.optim",
    "TrainEngine": "lorafleet.lora.engine",
    "FusingQueue": "lorafleet.lora.fusing",
    "configure_cpu_allocator": "lorafleet.lora.runtime",
}
_TYPES = (
    "AdapterInfo", "FileDigest", "ForwardBackwardResult", "LogprobRequest", "LogprobResult",
    "LossConfig", "LossKind", "OptimStepResult", "OptimizerConfig", "RequestError",
    "SavedAdapter", "TokenSequence", "TrainMetrics", "TrainRequest", "TrainSample",
    "TrainStepResult",
)
_EXPORTS.update({name: "lorafleet.lora.types" for name in _TYPES})

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lorafleet.lora' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
