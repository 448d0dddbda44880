"""Rows that repeat a prompt (a GRPO group) run that prompt once.

The shared pass (prompts once, then every completion against its prompt's cached
keys and values) must give the gradients and metrics of the plain padded pass:
prompts and completions of different lengths in one micro-batch, micro-batches
that cut through groups, fused with a request that shares nothing.
"""

from __future__ import annotations

import math

import pytest
import torch

from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.types import (
    LossConfig,
    LossKind,
    OptimizerConfig,
    TokenSequence,
    TrainRequest,
    TrainSample,
)

GRAD_TOL = 1e-5
SPECS = {"a": LoraSpec(rank=4, alpha=8), "b": LoraSpec(rank=2, alpha=4)}


def _group_request(name: str, seed: int, *, groups: int, group_size: int,
                   loss: LossConfig | None = None) -> TrainRequest:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(groups):
        prompt = torch.randint(0, 64, (int(torch.randint(2, 9, (1,), generator=g)),),
                               generator=g).tolist()
        for _ in range(group_size):
            n = int(torch.randint(1, 7, (1,), generator=g))
            completion = torch.randint(0, 64, (n,), generator=g).tolist()
            samples.append(TrainSample(
                TokenSequence(tuple(prompt + completion), len(prompt)),
                tuple((-4.0 + 0.3 * torch.randn(n, generator=g)).tolist()),
                advantage=float(torch.randn(1, generator=g))))
    return TrainRequest(name, tuple(samples), loss or LossConfig(), request_id=f"{name}-{seed}")


def _distinct_prompts(name: str, seed: int) -> TrainRequest:
    """A supervised request: every row has its own prompt."""
    g = torch.Generator().manual_seed(seed)
    samples = [TrainSample(TokenSequence(tuple(torch.randint(0, 64, (9,), generator=g).tolist()),
                                         4))
               for _ in range(5)]
    return TrainRequest(name, tuple(samples), LossConfig(kind=LossKind.CROSS_ENTROPY),
                        request_id=f"{name}-{seed}")


def _engine(llama_dir, *, share: bool, micro_batch_tokens: int | None,
            batch_invariant: bool) -> TrainEngine:
    eng = TrainEngine.from_pretrained(llama_dir, micro_batch_tokens=micro_batch_tokens,
                                      batch_invariant=batch_invariant, share_prompts=share)
    g = torch.Generator().manual_seed(11)
    for i, (name, spec) in enumerate(SPECS.items()):
        eng.create_adapter(name, spec, OptimizerConfig(learning_rate=1e-2), seed=i)
        with torch.no_grad():  # nonzero B, so that A gets a gradient too
            for pname, p in zip(eng.lora.adapter_parameter_names(name),
                                eng.lora.adapter_parameters(name), strict=True):
                if "lora_B" in pname:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return eng


def _counting_shared_passes(engine: TrainEngine, monkeypatch) -> list[int]:
    calls = [0]
    original = engine._shared_prompt_logprobs

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_shared_prompt_logprobs", counted)
    return calls


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory):
    """The family of the documented GPU config (Qwen2.5), tiny, with q/k/v biases."""
    import transformers

    cfg = transformers.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=64, max_position_embeddings=128,
    )
    torch.manual_seed(4321)
    path = tmp_path_factory.mktemp("lora_qwen2")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    ("model", "micro_batch_tokens", "batch_invariant"),
    [
        ("llama", None, True),
        ("llama", None, False),
        ("llama", 24, True),  # 24 tokens: micro-batches cut through groups
        ("qwen2", None, True),
    ],
)
def test_shared_prompts_give_the_full_pass_gradients(request, monkeypatch, model,
                                                     micro_batch_tokens, batch_invariant):
    model_dir = request.getfixturevalue(f"{model}_dir")
    requests = [_group_request("a", 1, groups=4, group_size=4), _distinct_prompts("b", 2)]
    results, grads = {}, {}
    for share in (True, False):
        engine = _engine(model_dir, share=share, micro_batch_tokens=micro_batch_tokens,
                         batch_invariant=batch_invariant)
        calls = _counting_shared_passes(engine, monkeypatch)
        results[share] = engine.forward_backward(requests)
        grads[share] = {n: [p.grad.clone() for p in engine.lora.adapter_parameters(n)]
                        for n in SPECS}
        assert (calls[0] > 0) == share
    for name in SPECS:
        for shared, full in zip(grads[True][name], grads[False][name], strict=True):
            assert full.abs().max() > 0
            assert (shared - full).abs().max().item() < GRAD_TOL
    for shared, full in zip(results[True], results[False], strict=True):
        for field in ("loss", "clip_fraction", "entropy", "grad_norm"):
            assert math.isclose(getattr(shared.metrics, field), getattr(full.metrics, field),
                                rel_tol=1e-4, abs_tol=1e-6), field
        # A request whose samples carry no sampling logprobs measures no gap.
        gaps = (shared.metrics.logprob_gap, full.metrics.logprob_gap)
        assert gaps == (None, None) or math.isclose(*gaps, rel_tol=1e-4, abs_tol=1e-6), gaps
        assert shared.metrics.num_loss_tokens == full.metrics.num_loss_tokens


def test_passes_needing_the_base_model_do_not_share(llama_dir, monkeypatch):
    """A KL term scores the rows with the adapter off as well: such passes run the
    plain way (and still train)."""
    engine = _engine(llama_dir, share=True, micro_batch_tokens=None, batch_invariant=True)
    calls = _counting_shared_passes(engine, monkeypatch)
    (result,) = engine.forward_backward(
        [_group_request("a", 3, groups=2, group_size=4, loss=LossConfig(kl_coef=0.1))])
    assert calls[0] == 0
    assert result.metrics.kl > 0
    engine.forward_backward([_group_request("a", 4, groups=2, group_size=4)])
    assert calls[0] > 0


def test_a_sliding_window_cache_runs_the_plain_pass(tmp_path, monkeypatch):
    import transformers

    cfg = transformers.Qwen2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=64, use_sliding_window=True, sliding_window=4,
    )
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    engine = _engine(tmp_path, share=True, micro_batch_tokens=None, batch_invariant=True)
    calls = _counting_shared_passes(engine, monkeypatch)
    engine.forward_backward([_group_request("a", 5, groups=2, group_size=4)])
    assert calls[0] == 0
