"""Save an adapter's training state, load it into a fresh engine, train on: the
result equals an uninterrupted run with the same data."""

from __future__ import annotations

import pytest
import torch

from lorafleet.core.errors import FailedPrecondition, InvalidArgument
from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.types import (
    LossConfig,
    OptimizerConfig,
    TokenSequence,
    TrainRequest,
    TrainSample,
)

SPEC = LoraSpec(rank=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))
OPT = OptimizerConfig(learning_rate=5e-3, weight_decay=0.01, max_grad_norm=0.5)


def _step_request(step: int) -> TrainRequest:
    g = torch.Generator().manual_seed(1000 + step)
    samples = []
    for i in range(4):
        ids = tuple(torch.randint(0, 64, (9,), generator=g).tolist())
        lps = tuple((-4.1 + 0.2 * torch.randn(6, generator=g)).tolist())
        samples.append(TrainSample(TokenSequence(ids, 3), lps, advantage=float(i % 2) - 0.5))
    return TrainRequest("exp", tuple(samples), LossConfig(kl_coef=0.1))


def test_resume_equals_uninterrupted(llama_dir):
    k, total = 3, 6
    ref = TrainEngine.from_pretrained(llama_dir)
    ref.create_adapter("exp", SPEC, OPT, seed=5)
    state = None
    for step in range(total):
        if step == k:
            state = ref.save_state("exp")
            assert ref.save_state("exp") == state  # deterministic bytes
        (res,) = ref.train_step([_step_request(step)])
        assert res.applied
    fresh = TrainEngine.from_pretrained(llama_dir)
    info = fresh.load_state("exp", state)
    assert info.step == k and info.spec == SPEC and info.optimizer == OPT
    for step in range(k, total):
        (res,) = fresh.train_step([_step_request(step)])
        assert res.applied and res.step == step + 1
    for a, b in zip(ref.lora.adapter_parameters("exp"), fresh.lora.adapter_parameters("exp"),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    ref_state = ref._slots["exp"].optimizer.state_tensors()
    for key, t in fresh._slots["exp"].optimizer.state_tensors().items():
        torch.testing.assert_close(t, ref_state[key], rtol=0, atol=1e-7)


def test_load_state_checks(llama_dir):
    eng = TrainEngine.from_pretrained(llama_dir)
    eng.create_adapter("exp", SPEC, OPT)
    blob = eng.save_state("exp")
    eng.create_adapter("other", LoraSpec(rank=2, alpha=2))
    with pytest.raises(FailedPrecondition) as info:
        eng.load_state("other", blob)
    assert info.value.reason == "STATE_SPEC_MISMATCH"
    with pytest.raises(InvalidArgument) as info:
        eng.load_state("new", b"not a state")
    assert info.value.reason == "INVALID_STATE"
    assert not eng.has_adapter("new")


def test_saves_do_not_wait_for_a_fused_pass(llama_dir, tmp_path):
    """Publishing an adapter takes only its own lock: while a fused pass (of other
    adapters) holds the engine, its state and PEFT files can still be written,
    and a train step of it waits for the pass."""
    from concurrent.futures import ThreadPoolExecutor

    eng = TrainEngine.from_pretrained(llama_dir)
    eng.create_adapter("exp", SPEC, OPT, seed=5)
    eng.train_step([_step_request(0)])
    with ThreadPoolExecutor(3) as pool:
        with eng._lock:  # what a running fused pass holds
            state = pool.submit(eng.save_state, "exp")
            peft = pool.submit(eng.save_peft, "exp", tmp_path / "v")
            train = pool.submit(eng.train_step, [_step_request(1)])
            assert state.result(timeout=30) and peft.result(timeout=30).sha256
            assert not train.done()
        (trained,) = train.result(timeout=30)
    assert trained.step == 2
    # The blob saved during the pass is the state before the second step.
    fresh = TrainEngine.from_pretrained(llama_dir)
    assert fresh.load_state("exp", state.result()).step == 1
