"""PEFT-format files: deterministic bytes, digests, key variants, rejected features."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorafleet.core.errors import InvalidArgument
from lorafleet.lora.peft_io import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    file_digests,
    load_peft_adapter,
    manifest_sha256,
    peft_config_dict,
    save_peft_adapter,
)
from lorafleet.lora.spec import LoraSpec

SPEC = LoraSpec(rank=2, alpha=4, target_modules=("v_proj", "q_proj"))


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for m in ("q_proj", "v_proj"):
        p = f"model.layers.0.self_attn.{m}"
        out[p + ".lora_A.weight"] = torch.randn(2, 8, generator=g)
        out[p + ".lora_B.weight"] = torch.randn(8, 2, generator=g)
    return out


def test_bytes_are_deterministic_and_digests_match(tmp_path):
    a = save_peft_adapter(tmp_path / "a", _tensors(), SPEC, "base")
    # Same tensors given in another order, another time, another directory.
    b = save_peft_adapter(tmp_path / "b", dict(reversed(_tensors().items())), SPEC, "base")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert a.sha256 == b.sha256 and a.files == file_digests(tmp_path / "a")
    lines = ""
    for name in sorted([CONFIG_NAME, WEIGHTS_NAME]):
        data = (tmp_path / "a" / name).read_bytes()
        lines += f"{name}\t{hashlib.sha256(data).hexdigest()}\t{len(data)}\n"
    assert a.sha256 == hashlib.sha256(lines.encode()).hexdigest() == manifest_sha256(a.files)
    assert a.size_bytes == sum(f.size_bytes for f in a.files)
    c = save_peft_adapter(tmp_path / "c", _tensors(seed=1), SPEC, "base")
    assert c.sha256 != a.sha256


def test_files_use_peft_names(tmp_path):
    save_peft_adapter(tmp_path, _tensors(), SPEC, "some/base")
    keys = sorted(load_file(str(tmp_path / WEIGHTS_NAME)))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 4
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "some/base" and cfg["bias"] == "none"


def test_config_keys_are_ones_peft_writes_with_peft_values(tmp_path):
    peft = pytest.importorskip("peft")
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                          task_type="CAUSAL_LM", base_model_name_or_path="some/base")
    cfg.save_pretrained(str(tmp_path))
    theirs = json.loads((tmp_path / CONFIG_NAME).read_text())
    ours = peft_config_dict(SPEC, "some/base")
    assert set(ours) <= set(theirs)
    theirs["target_modules"] = sorted(theirs["target_modules"])
    theirs["inference_mode"] = True  # peft flips it on when saving a model
    assert {k: theirs[k] for k in ours} == ours
    # And peft reads ours back into the same config.
    (tmp_path / CONFIG_NAME).write_text(json.dumps(ours))
    back = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert (back.r, back.lora_alpha, set(back.target_modules)) == (2, 4, {"q_proj", "v_proj"})


def test_load_accepts_adapter_name_in_keys(tmp_path):
    save_peft_adapter(tmp_path, _tensors(), SPEC, "base")
    raw = load_file(str(tmp_path / WEIGHTS_NAME))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in raw.items()},
              str(tmp_path / WEIGHTS_NAME))
    loaded = load_peft_adapter(tmp_path)
    assert loaded.spec == LoraSpec(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj"))
    for k, v in _tensors().items():
        assert torch.equal(loaded.tensors[k], v)


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"use_dora": True}, "UNSUPPORTED_PEFT_FEATURE"),
        ({"bias": "all"}, "UNSUPPORTED_PEFT_FEATURE"),
        ({"modules_to_save": ["lm_head"]}, "UNSUPPORTED_PEFT_FEATURE"),
        ({"rank_pattern": {"q_proj": 4}}, "UNSUPPORTED_PEFT_FEATURE"),
        ({"init_lora_weights": "pissa"}, "UNSUPPORTED_PEFT_FEATURE"),
        ({"peft_type": "IA3"}, "UNSUPPORTED_PEFT_FEATURE"),
        ({"r": 3}, "ADAPTER_SHAPE_MISMATCH"),
    ],
)
def test_load_rejects_what_it_cannot_represent(tmp_path, patch, reason):
    save_peft_adapter(tmp_path, _tensors(), SPEC, "base")
    cfg = json.loads((tmp_path / CONFIG_NAME).read_text())
    cfg.update(patch)
    (tmp_path / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(InvalidArgument) as info:
        load_peft_adapter(tmp_path)
    assert info.value.reason == reason


def test_missing_files(tmp_path):
    with pytest.raises(InvalidArgument) as info:
        load_peft_adapter(tmp_path)
    assert info.value.reason == "ADAPTER_FILES_MISSING"
