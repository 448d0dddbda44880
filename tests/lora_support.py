"""Shared fixtures of the lorafleet.lora tests (their conftest.py files import them):
a small random Llama saved as an HF directory.

Session-scoped: writing the model takes a moment and every test only reads it
(each test loads its own copy, so no test sees another's adapters).
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 64


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = transformers.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=128,
    )
    torch.manual_seed(1234)
    model = transformers.LlamaForCausalLM(cfg)
    path = tmp_path_factory.mktemp("lora_llama")
    model.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """One intra-op thread for these tests: on a shared 2-core machine two OpenMP
    threads that keep losing their core to other processes made steps 10-20x
    slower (barrier waits); one thread is steady. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llama(llama_dir: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir),
                                                             dtype=torch.float32)


def cross_entropy_request(name: str, seed: int, *, n: int, length: int,
                          prompt_length: int):  # -> TrainRequest
    """A request of ``n`` random token sequences for adapter ``name`` (SFT loss)."""
    from lorafleet.lora.types import (
        LossConfig,
        LossKind,
        TokenSequence,
        TrainRequest,
        TrainSample,
    )

    g = torch.Generator().manual_seed(seed)
    samples = tuple(
        TrainSample(TokenSequence(
            tuple(torch.randint(0, VOCAB, (length,), generator=g).tolist()), prompt_length))
        for _ in range(n))
    return TrainRequest(name, samples, LossConfig(kind=LossKind.CROSS_ENTROPY), request_id=name)


def engine_with_adapters(model_dir: Path, names: tuple[str, ...]):  # -> TrainEngine
    """A training engine on ``model_dir`` with one rank-4 adapter per name (seeded 0, 1, ...)."""
    from lorafleet.lora.engine import TrainEngine
    from lorafleet.lora.spec import LoraSpec
    from lorafleet.lora.types import OptimizerConfig

    engine = TrainEngine.from_pretrained(model_dir)
    for i, name in enumerate(names):
        engine.create_adapter(name, LoraSpec(rank=4, alpha=8),
                              OptimizerConfig(learning_rate=1e-2), seed=i)
    return engine


def autograd_token_logprobs(logits, targets):
    """What ``lorafleet.lora.losses.token_logprobs`` computes, left to autograd
    (which keeps an fp32 copy of the logits for backward): the reference its
    values, gradients and memory are checked against."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    lp = x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    with torch.no_grad():
        ent = lse - (torch.softmax(x, dim=-1) * x).sum(-1)
    return lp, ent
