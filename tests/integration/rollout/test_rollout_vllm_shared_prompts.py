"""The real vLLM(-CPU) engine with shared prompt rows on gives what it gives with
them off: the same sampled tokens, and the same logprobs up to float rounding
(identical bit for bit where this was written), for seeded GRPO-style requests
(n samples per prompt, prompts repeated across requests and adapters), while
the engine did fold rows (its worker's count).

Two engines, one after the other, in this process (each starts in ~20 s)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lorafleet.rollout.testing import write_peft_adapter  # noqa: E402
from lorafleet.rollout.types import EngineAdapter, GenerationRequest, SamplingSpec  # noqa: E402
from lorafleet.rollout.vllm_shared_prompts import SHARE_ENV  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["12+3=", "reverse abc:", "copy hello:", "sort 3 1 2:"]


async def _generate(model_dir: Path, adapters: list[EngineAdapter], share: bool):
    from lorafleet.rollout.vllm_engine import VllmEngine

    engine = VllmEngine(model_path=str(model_dir), max_model_len=64, share_prompt_rows=share)
    await engine.start()
    try:
        for adapter in adapters:
            await engine.add_adapter(adapter)

        def requests(adapter: EngineAdapter | None, seed: int) -> list[GenerationRequest]:
            return [
                GenerationRequest(
                    tuple(engine.tokenize(text)),
                    8,
                    SamplingSpec(temperature=1.0, max_tokens=10, seed=seed + i, logprobs=True),
                    adapter,
                )
                for i, text in enumerate(PROMPTS)
            ]

        # Several requests at once, as concurrent experiments send them: the
        # same prompts under two adapters and the base, and twice under one.
        batches = await asyncio.gather(
            engine.generate(requests(adapters[0], 100)),
            engine.generate(requests(adapters[1], 200)),
            engine.generate(requests(None, 300)),
            engine.generate(requests(adapters[0], 400)),
        )
        folded = (await engine._live().collective_rpc("lorafleet_shared_prompt_rows"))[0]
    finally:
        await engine.close()
    samples = [
        [(s.token_ids_T, s.logprobs_T) for s in prompt.samples_N]
        for batch in batches
        for prompt in batch
    ]
    return samples, folded


def test_shared_prompt_rows_change_nothing(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.delenv(SHARE_ENV, raising=False)  # the engine sets it for its process
    adapters = [
        EngineAdapter(
            f"e{seed}", 1, seed + 1,
            str(write_peft_adapter(tiny_model_dir, tmp_path / f"e{seed}", seed=seed, b_std=0.3)),
            8,
        )
        for seed in range(2)
    ]
    plain, plain_folded = asyncio.run(_generate(tiny_model_dir, adapters, share=False))
    shared, shared_folded = asyncio.run(_generate(tiny_model_dir, adapters, share=True))

    assert plain_folded == {"steps": 0, "rows": 0}
    # Each prompt's 8 samples fold onto one (7 of 8 prompt rows not computed,
    # a prompt being at least one token per character); half of that, for
    # requests that land in different steps.
    assert shared_folded["steps"] >= 1
    assert shared_folded["rows"] >= 7 * 4 * sum(len(p) for p in PROMPTS) // 2
    # A meaningful comparison: the samples of one prompt differ from each other.
    assert len({tokens for tokens, _ in plain[0]}) > 1
    assert [[t for t, _ in p] for p in shared] == [[t for t, _ in p] for p in plain]
    for shared_prompt, plain_prompt in zip(shared, plain, strict=True):
        for (_, shared_logprobs), (_, plain_logprobs) in zip(shared_prompt, plain_prompt,
                                                             strict=True):
            assert len(shared_logprobs) == len(plain_logprobs) > 0
            torch.testing.assert_close(torch.tensor(shared_logprobs),
                                       torch.tensor(plain_logprobs), rtol=0, atol=1e-5)
