"""One fused pass over several adapters == each adapter's pass alone.

Three adapters of different ranks, target modules and losses, with sequences of
different lengths, share one forward/backward; each adapter's gradient must equal
what a pass with only its own request gives (fp32, 1e-5). A bad request, or an
adapter whose weights have gone NaN, must fail alone.
"""

from __future__ import annotations

import math

import grpc
import pytest
import torch

from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.types import (
    LossConfig,
    LossKind,
    OptimizerConfig,
    RequestError,
    TokenSequence,
    TrainRequest,
    TrainSample,
)

GRAD_TOL = 1e-5
SPECS = {
    "a": LoraSpec(rank=4, alpha=8),
    "b": LoraSpec(rank=8, alpha=4, target_modules=("q_proj", "v_proj"), use_rslora=True),
    "c": LoraSpec(rank=2, alpha=16, target_modules=("up_proj", "down_proj")),
}


def _request(name: str, seed: int, n: int, lengths: tuple[int, int], loss: LossConfig,
             prompt: int = 3) -> TrainRequest:
    g = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(n):
        length = int(torch.randint(lengths[0], lengths[1] + 1, (1,), generator=g))
        ids = tuple(torch.randint(0, 64, (length,), generator=g).tolist())
        lps = tuple((-4.2 + 0.3 * torch.randn(length - prompt, generator=g)).tolist())
        samples.append(TrainSample(TokenSequence(ids, prompt), lps,
                                   advantage=float(torch.randn(1, generator=g))))
    return TrainRequest(name, tuple(samples), loss, request_id=f"req-{name}-{seed}")


VARIANTS = ["stacked", "grouped", "micro_batched", "batch_invariant"]


def _make_engine(llama_dir, variant: str = "auto") -> TrainEngine:
    # Every way a fused pass can combine adapters must give the same gradients:
    # stacked matmuls, grouped per-adapter matmuls, a pass split into
    # micro-batches that cut through requests (64 tokens: a few rows each), and
    # micro-batches that never mix requests (bit-identical to alone).
    eng = TrainEngine.from_pretrained(
        llama_dir, micro_batch_tokens=64 if variant == "micro_batched" else None,
        batch_invariant=variant == "batch_invariant")
    eng.lora.state.strategy = {"stacked": "stacked", "grouped": "grouped"}.get(variant, "auto")
    g = torch.Generator().manual_seed(7)
    for i, (name, spec) in enumerate(SPECS.items()):
        eng.create_adapter(name, spec, OptimizerConfig(learning_rate=1e-2), seed=i)
        with torch.no_grad():  # nonzero B so A gets gradient too
            for pname, p in zip(eng.lora.adapter_parameter_names(name),
                                eng.lora.adapter_parameters(name), strict=True):
                if "lora_B" in pname:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return eng


@pytest.fixture
def engine(llama_dir) -> TrainEngine:
    return _make_engine(llama_dir)


def _requests() -> list[TrainRequest]:
    return [
        _request("a", 1, 4, (6, 9), LossConfig()),
        _request("b", 2, 3, (12, 20), LossConfig(clip_low=0.1, clip_high=0.3, kl_coef=0.5)),
        _request("c", 3, 5, (4, 5), LossConfig(kind=LossKind.CROSS_ENTROPY)),
    ]


def _grads(engine: TrainEngine, name: str) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else None
            for p in engine.lora.adapter_parameters(name)]


def _zero(engine: TrainEngine) -> None:
    for name in SPECS:
        engine._slots[name].optimizer.zero_grad()


def _max_diff(x: list[torch.Tensor], y: list[torch.Tensor]) -> float:
    return max((a - b).abs().max().item() for a, b in zip(x, y, strict=True))


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_gradients_equal_separate(llama_dir, variant):
    engine = _make_engine(llama_dir, variant)
    reqs = _requests()
    fused = engine.forward_backward(reqs)
    assert [r.metrics.fused_batch_adapters for r in fused] == [3, 3, 3]
    fused_grads = {n: _grads(engine, n) for n in SPECS}
    for req, fused_res in zip(reqs, fused, strict=True):
        _zero(engine)
        (alone,) = engine.forward_backward([req])
        grads = _grads(engine, req.adapter)
        assert all(g is not None and g.abs().max() > 0 for g in grads)
        assert _max_diff(fused_grads[req.adapter], grads) < GRAD_TOL
        if variant == "batch_invariant":
            assert all(torch.equal(f, a) for f, a in zip(fused_grads[req.adapter], grads,
                                                          strict=True))
        for field in ("loss", "kl", "clip_fraction", "entropy", "logprob_gap", "grad_norm"):
            assert math.isclose(getattr(fused_res.metrics, field), getattr(alone.metrics, field),
                                rel_tol=1e-4, abs_tol=1e-6), field
        assert fused_res.metrics.num_loss_tokens == alone.metrics.num_loss_tokens
    m = {r.adapter: r.metrics for r in fused}
    assert m["b"].kl > 0 and m["a"].kl == 0
    assert m["a"].clip_fraction > 0 and m["c"].clip_fraction == 0


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (TrainRequest("ghost", _requests()[0].samples), "ADAPTER_NOT_FOUND"),
        (TrainRequest("a", (TrainSample(TokenSequence((1, 2, 3, 4), 2), (-1.0,)),)),
         "LOGPROBS_LENGTH_MISMATCH"),
        (TrainRequest("a", (TrainSample(TokenSequence((1, 2, 99), 1), (-1.0, -1.0)),)),
         "TOKEN_OUT_OF_RANGE"),
        (TrainRequest("a", (TrainSample(TokenSequence((1, 2), 2), ()),)),
         "INVALID_PROMPT_LENGTH"),
        (TrainRequest("a", ()), "EMPTY_REQUEST"),
        (TrainRequest("a", _requests()[0].samples, weight=0.0), "INVALID_WEIGHT"),
    ],
)
def test_bad_request_fails_alone(engine, bad, reason):
    reqs = _requests()
    expected = {}
    for req in reqs:
        _zero(engine)
        engine.forward_backward([req])
        expected[req.adapter] = _grads(engine, req.adapter)
    _zero(engine)
    results = engine.forward_backward([reqs[0], bad, reqs[1], reqs[2]])
    assert isinstance(results[1], RequestError) and results[1].reason == reason
    assert [type(r).__name__ for r in results] == [
        "ForwardBackwardResult", "RequestError", "ForwardBackwardResult", "ForwardBackwardResult"]
    for req in reqs:
        assert _max_diff(expected[req.adapter], _grads(engine, req.adapter)) < GRAD_TOL


def test_out_of_device_memory_fails_its_request_with_the_setting_to_change(engine, monkeypatch):
    """A pass that runs out of device memory (a GPU's OutOfMemoryError, raised
    here whenever adapter b is in a micro-batch) fails b's request with
    RESOURCE_EXHAUSTED naming the setting; the others are retried alone and step."""
    real = engine._micro_batch_stats

    def stats(batch):
        if "b" in batch.adapters_N:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 304.00 MiB")
        return real(batch)

    monkeypatch.setattr(engine, "_micro_batch_stats", stats)
    b_before = [p.detach().clone() for p in engine.lora.adapter_parameters("b")]
    results = engine.train_step(_requests())
    assert [type(r).__name__ for r in results] == [
        "TrainStepResult", "RequestError", "TrainStepResult"]
    err = results[1].error
    assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.reason == "TRAIN_PASS_OUT_OF_MEMORY"
    assert "micro_batch_tokens" in str(err) and "1024 padded tokens" in str(err)
    assert err.metadata["micro_batch_tokens"] == str(engine.micro_batch_tokens) == "1024"
    assert results[0].applied and results[2].applied
    assert all(torch.equal(x, p) for x, p in zip(b_before, engine.lora.adapter_parameters("b"),
                                                  strict=True))
    assert engine.adapter_info("b").step == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_nan_adapter_skips_its_step_and_leaves_the_others_alone(llama_dir, variant):
    engine = _make_engine(llama_dir, variant)
    reqs = _requests()
    # Reference: what a and c get without b in the pass.
    ref = {}
    for req in (reqs[0], reqs[2]):
        _zero(engine)
        engine.forward_backward([req])
        ref[req.adapter] = _grads(engine, req.adapter)
    _zero(engine)
    with torch.no_grad():
        engine.lora.adapter_parameters("b")[0].fill_(float("nan"))
    b_before = [p.detach().clone() for p in engine.lora.adapter_parameters("b")]
    a_state_before = engine._slots["a"].optimizer.state_tensors()
    results = engine.train_step(reqs)
    assert [r.applied for r in results] == [True, False, True]
    assert math.isnan(results[1].metrics.loss) or not math.isfinite(results[1].metrics.grad_norm)
    assert results[1].step == 0 and results[0].step == 1
    # b unchanged (NaN where it was NaN, identical elsewhere), and no optimizer state.
    for x, p in zip(b_before, engine.lora.adapter_parameters("b"), strict=True):
        assert torch.equal(torch.nan_to_num(x, nan=123.0), torch.nan_to_num(p.detach(), nan=123.0))
    assert engine._slots["b"].optimizer.state_tensors() == {}
    assert a_state_before == {}
    # a and c stepped with exactly the gradients they get alone: replay alone and compare.
    for name in ("a", "c"):
        assert all(torch.isfinite(p).all() for p in engine.lora.adapter_parameters(name))
        assert results[[r.adapter for r in reqs].index(name)].metrics.grad_norm == pytest.approx(
            torch.sqrt(sum((g ** 2).sum() for g in ref[name])).item(), rel=1e-5)


def test_same_adapter_twice_in_train_step_runs_in_order(engine):
    r1 = _request("a", 11, 2, (5, 6), LossConfig(kind=LossKind.CROSS_ENTROPY))
    r2 = _request("a", 12, 2, (5, 6), LossConfig(kind=LossKind.CROSS_ENTROPY))
    results = engine.train_step([r1, _requests()[1], r2])
    assert [r.step for r in results] == [1, 1, 2]
    assert results[0].metrics.fused_batch_adapters == 2
    assert results[2].metrics.fused_batch_adapters == 1


def test_compute_logprobs_fused_matches_alone(engine):
    seqs = [TokenSequence(tuple(range(1, 9)), 3), TokenSequence(tuple(range(5, 20)), 10)]
    from lorafleet.lora.types import LogprobRequest

    batch = engine.compute_logprobs_batch([LogprobRequest("a", (seqs[0],)),
                                           LogprobRequest(None, tuple(seqs)),
                                           LogprobRequest("ghost", (seqs[0],))])
    assert isinstance(batch[2], RequestError) and batch[2].reason == "ADAPTER_NOT_FOUND"
    alone_a = engine.compute_logprobs("a", [seqs[0]])
    alone_base = engine.compute_logprobs(None, seqs)
    assert len(batch[0].logprobs_B_C[0]) == 5 and len(batch[1].logprobs_B_C[1]) == 5
    torch.testing.assert_close(torch.tensor(batch[0].logprobs_B_C), torch.tensor(alone_a),
                               rtol=0, atol=1e-5)
    for x, y in zip(batch[1].logprobs_B_C, alone_base, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), rtol=0, atol=1e-5)
    # The training pass scores the same tokens the same way (logprob_gap == 0 on-policy).
    lp = engine.compute_logprobs("a", [seqs[0]])[0]
    req = TrainRequest("a", (TrainSample(seqs[0], lp, advantage=1.0),))
    (res,) = engine.forward_backward([req])
    assert res.metrics.logprob_gap < 1e-5 and res.metrics.clip_fraction == 0


@pytest.mark.parametrize("variant", ["stacked", "grouped"])
def test_two_requests_of_one_adapter_accumulate(llama_dir, variant):
    # Rows of one adapter that are not contiguous (a, b, a) take the gather/scatter or
    # stacked path; gradients must be the sum of each request's own gradient.
    engine = _make_engine(llama_dir, variant)
    r1 = _request("a", 21, 2, (5, 7), LossConfig())
    r2 = _request("a", 22, 3, (6, 9), LossConfig(kind=LossKind.CROSS_ENTROPY))
    rb = _request("b", 23, 2, (5, 6), LossConfig())
    expected = None
    for r in (r1, r2):
        _zero(engine)
        engine.forward_backward([r])
        g = _grads(engine, "a")
        expected = g if expected is None else [x + y for x, y in zip(expected, g, strict=True)]
    _zero(engine)
    engine.forward_backward([rb])
    expected_b = _grads(engine, "b")
    _zero(engine)
    results = engine.forward_backward([r1, rb, r2])
    assert all(not isinstance(r, RequestError) for r in results)
    assert _max_diff(expected, _grads(engine, "a")) < GRAD_TOL
    assert _max_diff(expected_b, _grads(engine, "b")) < GRAD_TOL
