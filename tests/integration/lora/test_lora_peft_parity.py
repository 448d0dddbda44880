"""lorafleet adapters and peft adapters are the same thing, in both directions.

peft is the reference: the same adapter, loaded on the same fp32 base, must give
the same logits (within 1e-4) whether lorafleet or peft runs it, for adapters of
different ranks, alphas, scalings and target modules, and also when lorafleet runs
them all at once in one mixed batch.
"""

from __future__ import annotations

import pytest
import torch

from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.types import LossConfig, LossKind, OptimizerConfig, TokenSequence, TrainRequest
from lorafleet.lora.types import TrainSample as Sample

peft = pytest.importorskip("peft")
from transformers import AutoModelForCausalLM  # noqa: E402

TOL = 1e-4
SPECS = {
    "all_r4": LoraSpec(rank=4, alpha=8),
    "qv_r8_rslora": LoraSpec(rank=8, alpha=4, target_modules=("q_proj", "v_proj"),
                             use_rslora=True),
    "mlp_r2": LoraSpec(rank=2, alpha=16, target_modules=("up_proj", "down_proj", "o_proj")),
}


def _ids(seed: int, n: int = 3, length: int = 12) -> torch.Tensor:
    return torch.randint(0, 64, (n, length), generator=torch.Generator().manual_seed(seed))


def _peft_logits(llama_dir, adapter_dir, ids) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def _engine_logits(engine: TrainEngine, names: list[str | None], ids) -> torch.Tensor:
    with torch.no_grad(), engine.lora.routing(names):
        return engine.model(input_ids=ids).logits


def test_trained_lorafleet_adapters_load_in_peft(llama_dir, tmp_path):
    engine = TrainEngine.from_pretrained(llama_dir)
    g = torch.Generator().manual_seed(0)
    for i, (name, spec) in enumerate(SPECS.items()):
        engine.create_adapter(name, spec, OptimizerConfig(learning_rate=2e-2), seed=i)
    # A few SFT steps so every B is far from zero (a zero B would hide A entirely).
    for _ in range(3):
        reqs = []
        for name in SPECS:
            samples = tuple(Sample(TokenSequence(tuple(torch.randint(0, 64, (10,), generator=g)
                                                       .tolist()), 4)) for _ in range(4))
            reqs.append(TrainRequest(name, samples, LossConfig(kind=LossKind.CROSS_ENTROPY)))
        assert all(r.applied for r in engine.train_step(reqs))
    ids = _ids(1)
    base_logits = _engine_logits(engine, [None] * 3, ids)
    mixed_names = list(SPECS)  # one row per adapter, all in one batch
    mixed = _engine_logits(engine, mixed_names, ids)
    for row, name in enumerate(SPECS):
        assert max(p.abs().max().item() for n, p in
                   zip(engine.lora.adapter_parameter_names(name),
                       engine.lora.adapter_parameters(name), strict=True)
                   if "lora_B" in n) > 1e-3
        saved = engine.save_peft(name, tmp_path / name)
        ours = _engine_logits(engine, [name] * 3, ids)
        theirs = _peft_logits(llama_dir, saved.directory, ids)
        assert (ours - base_logits).abs().max() > 1e-2  # the adapter does something
        torch.testing.assert_close(ours, theirs, rtol=0, atol=TOL)
        torch.testing.assert_close(mixed[row], theirs[row], rtol=0, atol=TOL)


def test_peft_initialised_adapters_load_in_lorafleet(llama_dir, tmp_path):
    engine = TrainEngine.from_pretrained(llama_dir)
    ids = _ids(2)
    for i, (name, spec) in enumerate(SPECS.items()):
        base = AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32)
        cfg = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha,
                              target_modules=list(spec.target_modules) or "all-linear",
                              use_rslora=spec.use_rslora, task_type="CAUSAL_LM")
        model = peft.get_peft_model(base, cfg)
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        model.save_pretrained(str(tmp_path / name))
        model.eval()
        with torch.no_grad():
            theirs = model(input_ids=ids).logits
        engine.load_peft(name, tmp_path / name)
        torch.testing.assert_close(_engine_logits(engine, [name] * 3, ids), theirs,
                                   rtol=0, atol=TOL)
    # Loaded spec resolves to the same modules peft wrapped ("all-linear" included).
    assert len(engine.lora.adapter_modules("all_r4")) == 2 * 7
