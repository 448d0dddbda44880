"""safetensors bytes of a dict of tensors, through numpy where the bytes are the same.

The trainer serializes an adapter twice per RL step: its PEFT file for the
registry (SaveVersion) and its weights plus AdamW moments for the step's
checkpoint (SaveState). ``safetensors.torch.save`` spends about 45 us of Python
per tensor (shape products, storage-pointer checks) before the Rust writer
runs; ``safetensors.numpy.save`` of the same tensors' numpy views writes the
same bytes, header included, in a fifth of the time. Measured on a 2-core
machine, 126 float32 tensors of 8 x 256 (1.0 MB): 6.2 -> 1.1 ms; the tiny
model's rank-8 adapter, per call: ``TrainEngine.save_state`` 3.9 -> 2.4 ms,
``save_peft`` 4.1 -> 2.3 ms. A real model's adapter has a few hundred tensors
and its state three times as many.

numpy has no bfloat16 (nor float8): a dict holding such a tensor takes the
torch path.
"""

from __future__ import annotations

from collections.abc import Mapping

import safetensors.numpy
import safetensors.torch
import torch

# dtypes whose numpy view has the same safetensors dtype tag and byte layout.
_NUMPY_DTYPES = frozenset({
    torch.float64, torch.float32, torch.float16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
})


def safetensors_bytes(tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None) -> bytes:
    """What ``safetensors.torch.save(tensors, metadata)`` returns, faster for
    tensors of numpy dtypes. Tensors need not be contiguous nor on the CPU."""
    meta = dict(metadata) if metadata is not None else None
    if all(t.dtype in _NUMPY_DTYPES for t in tensors.values()):
        # to("cpu"): what the torch writer does with device tensors too.
        # contiguous(): numpy.save writes an array's memory as laid out, not in
        # row-major order (a no-op for the contiguous tensors the trainer holds).
        arrays = {
            name: t.detach().to("cpu").contiguous().numpy() for name, t in tensors.items()
        }
        return safetensors.numpy.save(arrays, metadata=meta)
    return safetensors.torch.save(
        {name: t.detach().contiguous() for name, t in tensors.items()}, metadata=meta)
