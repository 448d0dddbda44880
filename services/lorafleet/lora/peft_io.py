"""Adapters on disk in PEFT's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Every version the trainer writes loads unchanged in ``peft`` (``PeftModel.from_pretrained``)
and in vLLM (``LoRARequest``); adapters ``peft`` wrote load here. Bytes are a
function of the tensors and the spec only (sorted JSON keys, fixed safetensors
metadata, no timestamps), so the same adapter always has the same sha256 and the
registry can deduplicate and verify versions.

The config is the classic LoRA key set (what peft has written since 0.13, with
``lora_bias`` from 0.14): peft reads missing newer keys as their defaults, older
peft releases do not warn about keys they do not know, and vLLM reads the same
fields. ``peft_version`` is left out on purpose: this is not peft writing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from lorafleet.lora.errors import LoraSpecError, invalid
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.tensor_bytes import safetensors_bytes
from lorafleet.lora.types import FileDigest, SavedAdapter

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
PEFT_PREFIX = "base_model.model."
# peft saves without the adapter name ("...lora_A.weight"); state dicts taken from
# a live PeftModel carry it ("...lora_A.default.weight"). Both load.
_KEY_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
# Initialisations that only set the starting LoRA weights; the others (PiSSA, OLoRA,
# LoftQ, CorDA, ...) also rewrite the base weights, which a shared base cannot do.
_PLAIN_INITS = {"gaussian", "eva", "orthogonal", "mica", "lora_ga"}


@dataclass(frozen=True)
class LoadedAdapter:
    spec: LoraSpec
    tensors: dict[str, torch.Tensor]
    """By ``<module path>.lora_A.weight`` / ``.lora_B.weight`` (no PEFT prefix)."""
    base_model: str
    config: dict[str, Any]


def peft_config_dict(spec: LoraSpec, base_model: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` content peft writes for ``spec``."""
    alpha: float | int = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {
        "alpha_pattern": {},
        "auto_mapping": None,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layer_replication": None,
        "layers_pattern": None,
        "layers_to_transform": None,
        "loftq_config": {},
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": spec.dropout,
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": spec.rank,
        "rank_pattern": {},
        "revision": None,
        "target_modules": sorted(spec.target_modules),
        "task_type": "CAUSAL_LM",
        "use_dora": False,
        "use_rslora": spec.use_rslora,
    }


def encode_adapter(tensors: Mapping[str, torch.Tensor], spec: LoraSpec,
                   base_model: str | None) -> dict[str, bytes]:
    """The two files' bytes, deterministic for the same inputs."""
    config = json.dumps(peft_config_dict(spec, base_model), indent=2, sort_keys=True) + "\n"
    payload = {
        PEFT_PREFIX + name: t.detach().to("cpu").contiguous()
        for name, t in sorted(tensors.items())
    }
    # Fixed metadata: peft writes {"format": "pt"}; nothing time- or host-dependent.
    weights = safetensors_bytes(payload, metadata={"format": "pt"})
    return {CONFIG_NAME: config.encode(), WEIGHTS_NAME: weights}


def save_peft_adapter(directory: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor],
                      spec: LoraSpec, base_model: str | None) -> SavedAdapter:
    """Write the adapter into ``directory`` (created if needed), each file
    atomically (temp file + rename), and return the digests."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    files = encode_adapter(tensors, spec, base_model)
    for name, data in files.items():
        _atomic_write(out / name, data)
    digests = tuple(_digest(name, data) for name, data in sorted(files.items()))
    return SavedAdapter(
        directory=str(out.resolve()),
        files=digests,
        sha256=manifest_sha256(digests),
        size_bytes=sum(d.size_bytes for d in digests),
        spec=spec,
        base_model=base_model or "",
    )


def load_peft_adapter(directory: str | os.PathLike[str]) -> LoadedAdapter:
    """Read an adapter peft (or lorafleet) wrote. Rejects, with reason
    UNSUPPORTED_PEFT_FEATURE, anything a plain per-module ``B @ A`` update over a
    shared frozen base cannot represent (DoRA, biases, modules_to_save, rank or
    alpha patterns, base-rewriting inits, ...)."""
    src = Path(directory)
    for name in ADAPTER_FILES:
        if not (src / name).is_file():
            raise invalid(f"{src} has no {name}", "ADAPTER_FILES_MISSING", directory=src)
    try:
        config = json.loads((src / CONFIG_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise invalid(f"unreadable {CONFIG_NAME}: {e}", "INVALID_ADAPTER_CONFIG") from e
    _check_supported(config)
    raw = load_file(str(src / WEIGHTS_NAME))
    tensors: dict[str, torch.Tensor] = {}
    for key, t in raw.items():
        stripped = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _KEY_RE.match(stripped)
        if m is None:
            raise invalid(f"tensor {key!r} is not a LoRA A/B weight", "UNSUPPORTED_PEFT_FEATURE",
                          key=key)
        name = f"{m['path']}.lora_{m['ab']}.weight"
        if name in tensors:
            raise invalid(f"tensor {name!r} appears twice (several adapters in one file?)",
                          "UNSUPPORTED_PEFT_FEATURE", key=key)
        tensors[name] = t
    paths = sorted({n.rsplit(".lora_", 1)[0] for n in tensors})
    targets_raw = config.get("target_modules")
    if isinstance(targets_raw, list) and targets_raw:
        targets = tuple(str(t) for t in targets_raw)
    else:
        # A regex (or missing) target: name the wrapped modules by full path, which
        # PEFT's list rule matches exactly; re-saving keeps the same modules.
        targets = tuple(paths)
    try:
        spec = LoraSpec(
            rank=int(config["r"]),
            alpha=float(config["lora_alpha"]),
            target_modules=targets,
            dropout=float(config.get("lora_dropout") or 0.0),
            use_rslora=bool(config.get("use_rslora", False)),
        )
    except KeyError as e:
        raise invalid(f"{CONFIG_NAME} lacks {e}", "INVALID_ADAPTER_CONFIG") from e
    for path in paths:
        a = tensors.get(f"{path}.lora_A.weight")
        b = tensors.get(f"{path}.lora_B.weight")
        if a is None or b is None:
            raise invalid(f"module {path} lacks its lora_A or lora_B", "ADAPTER_KEYS_MISMATCH")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != spec.rank or b.shape[1] != spec.rank:
            raise invalid(
                f"module {path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} "
                f"do not have rank {spec.rank}",
                "ADAPTER_SHAPE_MISMATCH",
            )
    return LoadedAdapter(spec=spec, tensors=tensors,
                         base_model=str(config.get("base_model_name_or_path") or ""),
                         config=config)


def file_digests(directory: str | os.PathLike[str],
                 names: Iterable[str] = ADAPTER_FILES) -> tuple[FileDigest, ...]:
    """sha256 and size of each named file, sorted by name."""
    out = []
    for name in sorted(names):
        h = hashlib.sha256()
        size = 0
        with open(Path(directory) / name, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                size += len(chunk)
        out.append(FileDigest(name=name, sha256=h.hexdigest(), size_bytes=size))
    return tuple(out)


def manifest_sha256(files: Iterable[FileDigest]) -> str:
    """The registry's ``AdapterRef.sha256``: sha256 of "<name>\\t<sha256>\\t<size>\\n"
    lines sorted by name."""
    lines = "".join(f"{f.name}\t{f.sha256}\t{f.size_bytes}\n"
                    for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


def _check_supported(config: Mapping[str, Any]) -> None:
    def unsupported(what: str) -> LoraSpecError:
        return LoraSpecError(f"adapter uses {what}, which lorafleet cannot load",
                             reason="UNSUPPORTED_PEFT_FEATURE", metadata={"feature": what})

    if config.get("peft_type", "LORA") != "LORA":
        raise unsupported(f"peft_type {config.get('peft_type')!r}")
    checks = {
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "layer_replication": bool(config.get("layer_replication")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "target_parameters": bool(config.get("target_parameters")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
        "use_qalora": bool(config.get("use_qalora")),
        "alora_invocation_tokens": bool(config.get("alora_invocation_tokens")),
        "use_bdlora": bool(config.get("use_bdlora")),
    }
    for feature, used in checks.items():
        if used:
            raise unsupported(feature)
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in _PLAIN_INITS:
        raise unsupported(f"init_lora_weights={init!r}")


def _digest(name: str, data: bytes) -> FileDigest:
    return FileDigest(name=name, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data))


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

