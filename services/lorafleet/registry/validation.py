"""Checks a version's bytes against the adapter's LoRA spec before it may be READY.

The safetensors header is parsed here, by hand, with strict bounds: this is input
validation of untrusted bytes (sizes, offsets, counts), done before any library
would allocate from them. Nothing here imports torch or peft.

Format (https://github.com/huggingface/safetensors): 8-byte little-endian header
length N, N bytes of UTF-8 JSON ``{name: {dtype, shape, data_offsets}, "__metadata__":
{str: str}}``, then the byte buffer; ``data_offsets`` are relative to the buffer,
and the tensors must tile it exactly (no holes, no overlaps, nothing after).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import struct
from typing import Any, BinaryIO

from lorafleet.core.errors import InvalidArgument, ResourceExhausted
from lorafleet.registry.types import CONFIG_FILE, WEIGHTS_FILE, LoraSpec

DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
LORA_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})
# PEFT's on-disk naming (adapter name stripped), which vLLM reads too:
# base_model.model.<module path>.lora_A.weight / .lora_B.weight
_LORA_TENSOR = re.compile(
    r"base_model\.model\.((?:[A-Za-z0-9_]+\.)*([A-Za-z_][A-Za-z0-9_]*))\.lora_(A|B)\.weight"
)
# Largest dimension accepted: far above any real model, far below overflow.
_MAX_DIM = 1 << 32
# Pickle protocol >= 2 starts with 0x80; torch.save's zip container with "PK".
_PICKLE_MAGICS = (b"\x80", b"PK\x03\x04")


@dataclasses.dataclass(frozen=True)
class Limits:
    max_header_bytes: int
    max_tensors: int
    max_config_bytes: int


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _bad(message: str, reason: str, **metadata: object) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason=reason,
        metadata={"file": WEIGHTS_FILE, **{k: str(v) for k, v in metadata.items()}},
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_safetensors_header(f: BinaryIO, file_size: int, limits: Limits) -> dict[str, TensorInfo]:
    """Parse and bound-check the header of the safetensors file open as ``f``.

    Raises:
        InvalidArgument: PICKLE_REFUSED, SAFETENSORS_TRUNCATED, SAFETENSORS_BAD_HEADER,
            SAFETENSORS_BAD_TENSOR, SAFETENSORS_BAD_OFFSETS.
        ResourceExhausted: SAFETENSORS_HEADER_TOO_LARGE, TOO_MANY_TENSORS.
    """
    f.seek(0)
    prefix = f.read(8)
    if prefix.startswith(_PICKLE_MAGICS):
        raise _bad(f"{WEIGHTS_FILE} is a pickle, not safetensors", "PICKLE_REFUSED")
    if len(prefix) < 8 or file_size < 8:
        raise _bad(
            f"{WEIGHTS_FILE} is shorter than its 8-byte header length", "SAFETENSORS_TRUNCATED"
        )
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > limits.max_header_bytes:
        raise ResourceExhausted(
            f"safetensors header of {header_len} bytes exceeds {limits.max_header_bytes}",
            reason="SAFETENSORS_HEADER_TOO_LARGE",
            metadata={"file": WEIGHTS_FILE, "header_bytes": str(header_len)},
        )
    if header_len < 2 or 8 + header_len > file_size:
        raise _bad(
            f"safetensors header length {header_len} does not fit a {file_size}-byte file",
            "SAFETENSORS_TRUNCATED",
        )
    raw = f.read(header_len)
    if len(raw) != header_len:
        raise _bad("safetensors header is truncated", "SAFETENSORS_TRUNCATED")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(
            f"safetensors header is not valid JSON: {exc}", "SAFETENSORS_BAD_HEADER"
        ) from None
    if not isinstance(header, dict):
        raise _bad("safetensors header is not a JSON object", "SAFETENSORS_BAD_HEADER")

    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise _bad("__metadata__ must map strings to strings", "SAFETENSORS_BAD_HEADER")
    if len(header) > limits.max_tensors:
        raise ResourceExhausted(
            f"{len(header)} tensors exceed the limit of {limits.max_tensors}",
            reason="TOO_MANY_TENSORS",
            metadata={"file": WEIGHTS_FILE, "tensors": str(len(header))},
        )
    if not header:
        raise _bad("safetensors file holds no tensors", "SAFETENSORS_BAD_HEADER")

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        tensors[name] = _tensor_info(name, entry)

    buffer_len = file_size - 8 - header_len
    position = 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if info.begin != position:
            raise _bad(
                f"tensor {name!r} starts at {info.begin}, expected {position}"
                " (tensors must tile the data buffer without holes or overlaps)",
                "SAFETENSORS_BAD_OFFSETS",
                tensor=name,
            )
        position = info.end
    if position != buffer_len:
        raise _bad(
            f"tensors cover {position} bytes but the data buffer is {buffer_len}",
            "SAFETENSORS_BAD_OFFSETS",
        )
    return tensors


def _tensor_info(name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad(
            f"tensor {name!r} must have exactly dtype, shape and data_offsets",
            "SAFETENSORS_BAD_TENSOR",
            tensor=name,
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise _bad(
            f"tensor {name!r} has unknown dtype {dtype!r}", "SAFETENSORS_BAD_TENSOR", tensor=name
        )
    if (
        not isinstance(shape, list)
        or len(shape) > 8
        or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)
    ):
        raise _bad(f"tensor {name!r} has an invalid shape", "SAFETENSORS_BAD_TENSOR", tensor=name)
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int and o >= 0 for o in offsets)
        and offsets[0] <= offsets[1]
    ):
        raise _bad(
            f"tensor {name!r} has invalid data_offsets", "SAFETENSORS_BAD_OFFSETS", tensor=name
        )
    nbytes = math.prod(shape) * DTYPE_BYTES[dtype]
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(
            f"tensor {name!r}: data_offsets span {offsets[1] - offsets[0]} bytes,"
            f" dtype and shape need {nbytes}",
            "SAFETENSORS_BAD_OFFSETS",
            tensor=name,
        )
    return TensorInfo(dtype=dtype, shape=tuple(shape), begin=offsets[0], end=offsets[1])


def check_lora_tensors(tensors: dict[str, TensorInfo], spec: LoraSpec) -> None:
    """Names and shapes must be exactly a LoRA adapter of ``spec``.

    lora_A is [rank, in_features], lora_B is [out_features, rank]; every module has
    both; a module name means the same in/out sizes in every layer; with a
    non-empty ``spec.target_modules`` every tensor wraps one of them and each of
    them is wrapped somewhere.

    Raises:
        InvalidArgument: UNEXPECTED_TENSOR, SAFETENSORS_BAD_DTYPE, SHAPE_MISMATCH,
            UNTARGETED_MODULE, TARGET_MODULE_MISSING, LORA_PAIR_INCOMPLETE.
    """
    targets = set(spec.target_modules)
    pairs: dict[str, dict[str, TensorInfo]] = {}
    module_of: dict[str, str] = {}
    for name, info in tensors.items():
        match = _LORA_TENSOR.fullmatch(name)
        if match is None:
            raise _bad(
                f"tensor {name!r} is not a LoRA weight"
                " (expected base_model.model.<module>.lora_A|lora_B.weight)",
                "UNEXPECTED_TENSOR",
                tensor=name,
            )
        path, module, which = match.groups()
        if info.dtype not in LORA_DTYPES:
            raise _bad(
                f"tensor {name!r} has dtype {info.dtype}; LoRA weights are floating point",
                "SAFETENSORS_BAD_DTYPE",
                tensor=name,
            )
        if targets and module not in targets:
            raise _bad(
                f"tensor {name!r} wraps {module!r}, which is not a target module of the spec",
                "UNTARGETED_MODULE",
                tensor=name,
            )
        if len(info.shape) != 2 or 0 in info.shape:
            raise _bad(f"tensor {name!r} must be a non-empty matrix", "SHAPE_MISMATCH", tensor=name)
        rank = info.shape[0] if which == "A" else info.shape[1]
        if rank != spec.rank:
            raise _bad(
                f"tensor {name!r} has shape {list(info.shape)}: rank {rank}, spec says {spec.rank}",
                "SHAPE_MISMATCH",
                tensor=name,
            )
        pairs.setdefault(path, {})[which] = info
        module_of[path] = module

    dims: dict[str, tuple[int, int]] = {}
    for path, pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise _bad(
                f"module {path!r} lacks lora_A or lora_B", "LORA_PAIR_INCOMPLETE", module=path
            )
        in_out = (pair["A"].shape[1], pair["B"].shape[0])
        module = module_of[path]
        if dims.setdefault(module, in_out) != in_out:
            raise _bad(
                f"module {path!r} is {in_out[0]}->{in_out[1]} but other {module!r} modules are"
                f" {dims[module][0]}->{dims[module][1]}",
                "SHAPE_MISMATCH",
                module=path,
            )
    missing = targets - set(dims)
    if missing:
        raise _bad(
            f"target module(s) {sorted(missing)} of the spec have no LoRA weights",
            "TARGET_MODULE_MISSING",
        )


def check_adapter_config(raw: bytes, spec: LoraSpec) -> dict[str, Any]:
    """``adapter_config.json`` must be a plain LoRA config agreeing with ``spec``.

    Raises:
        InvalidArgument: ADAPTER_CONFIG_INVALID, ADAPTER_CONFIG_UNSUPPORTED,
            ADAPTER_CONFIG_MISMATCH.
    """

    def bad(message: str, reason: str) -> InvalidArgument:
        return InvalidArgument(message, reason=reason, metadata={"file": CONFIG_FILE})

    try:
        config = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"{CONFIG_FILE} is not valid JSON: {exc}", "ADAPTER_CONFIG_INVALID") from None
    if not isinstance(config, dict):
        raise bad(f"{CONFIG_FILE} is not a JSON object", "ADAPTER_CONFIG_INVALID")
    if config.get("peft_type") != "LORA":
        raise bad(
            f"peft_type must be LORA, got {config.get('peft_type')!r}", "ADAPTER_CONFIG_UNSUPPORTED"
        )
    # Variants whose weights are more than plain A/B pairs (DoRA magnitudes,
    # full modules to save, biases) or whose ranks differ per module.
    for key in ("use_dora", "modules_to_save", "lora_bias", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise bad(f"{key} is not supported", "ADAPTER_CONFIG_UNSUPPORTED")
    if config.get("r") != spec.rank:
        raise bad(f"r is {config.get('r')!r}, spec says {spec.rank}", "ADAPTER_CONFIG_MISMATCH")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, int | float) or not math.isclose(alpha, spec.alpha, rel_tol=1e-6):
        raise bad(f"lora_alpha is {alpha!r}, spec says {spec.alpha}", "ADAPTER_CONFIG_MISMATCH")
    if bool(config.get("use_rslora", False)) != spec.use_rslora:
        raise bad("use_rslora disagrees with the spec", "ADAPTER_CONFIG_MISMATCH")
    targets = config.get("target_modules")
    if spec.target_modules:
        if not isinstance(targets, list) or set(targets) != set(spec.target_modules):
            raise bad(
                f"target_modules is {targets!r}, spec says {sorted(spec.target_modules)}",
                "ADAPTER_CONFIG_MISMATCH",
            )
    elif not (targets is None or isinstance(targets, str | list)):
        raise bad("target_modules must be a list or a string", "ADAPTER_CONFIG_INVALID")
    return config
