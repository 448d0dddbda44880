"""The rollout domain service on a named fake engine: request checks, admission,
timeouts, and that every answer names the version that served it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorafleet.core.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from lorafleet.rollout.adapters import AdapterManager
from lorafleet.rollout.resolvers import InMemoryResolver
from lorafleet.rollout.service import GenerateCall, RolloutService
from lorafleet.rollout.testing import FakeEngine, write_fake_adapter
from lorafleet.rollout.types import AdapterSelection, SamplingSpec, ScoreSequence

sel = AdapterSelection.parse


@pytest.fixture
async def setup(tmp_path: Path):
    engine = FakeEngine(max_model_len=32, step_delay_s=0.0)
    await engine.start()
    resolver = InMemoryResolver()
    cache = tmp_path / "cache"
    for version in (1, 2):
        resolver.publish("exp", write_fake_adapter(cache / "exp" / str(version), seed=version))
    manager = AdapterManager(resolver, engine, cache_dir=cache)
    await manager.start()
    service = RolloutService(
        engine, manager, base_model="fake", max_pending_sequences=8, max_n=4, default_max_tokens=5
    )
    yield service, engine
    await manager.close()


async def test_generate_names_the_version_that_served_it(setup):
    service, engine = setup
    prompt = engine.tokenize("12+3=")
    for selection, version in [(None, 0), (sel("exp"), 2), (sel("exp@1"), 1)]:
        result = await service.generate(
            GenerateCall(prompts=["12+3="], adapter=selection, sampling=SamplingSpec(max_tokens=4))
        )
        assert result.adapter_version == version
        name = f"exp@{version}" if version else ""
        expected = tuple(engine.expected_token(prompt, j, name) for j in range(4))
        assert result.results_P[0].samples_N[0].token_ids_T == expected
        assert result.results_P[0].prompt_token_ids == tuple(prompt)
        assert result.prompt_tokens == len(prompt) and result.completion_tokens == 4


async def test_max_tokens_zero_means_the_default_and_n_zero_means_one(setup):
    service, _ = setup
    result = await service.generate(
        GenerateCall(prompts=[[1, 5, 6]], n=0, sampling=SamplingSpec(max_tokens=0))
    )
    assert len(result.results_P[0].samples_N) == 1
    assert len(result.results_P[0].samples_N[0].token_ids_T) == 5


@pytest.mark.parametrize(
    ("call", "reason"),
    [
        (GenerateCall(prompts=[]), "NO_PROMPTS"),
        (GenerateCall(prompts=[[]]), "EMPTY_PROMPT"),
        (GenerateCall(prompts=[[1, 100]]), "TOKEN_ID_OUT_OF_RANGE"),
        (GenerateCall(prompts=["a"], n=5), "INVALID_N"),
        (GenerateCall(prompts=["a"], sampling=SamplingSpec(max_tokens=-1)), "INVALID_MAX_TOKENS"),
        (GenerateCall(prompts=["a"], sampling=SamplingSpec(temperature=-1)), "INVALID_TEMPERATURE"),
        (GenerateCall(prompts=["a"], sampling=SamplingSpec(top_p=1.5)), "INVALID_TOP_P"),
        (GenerateCall(prompts=["a"], sampling=SamplingSpec(stop=("",))), "INVALID_STOP"),
        # 21 prompt tokens (BOS + 20) + 12 > 32
        (GenerateCall(prompts=["x" * 20], sampling=SamplingSpec(max_tokens=12)), "PROMPT_TOO_LONG"),
    ],
)
async def test_bad_requests_are_invalid_argument_with_a_reason(setup, call, reason):
    service, _ = setup
    with pytest.raises(InvalidArgument) as err:
        await service.generate(call)
    assert err.value.reason == reason


async def test_prompt_exactly_at_the_model_length_is_accepted(setup):
    service, _ = setup
    result = await service.generate(
        GenerateCall(prompts=["x" * 20], sampling=SamplingSpec(max_tokens=11))
    )
    assert len(result.results_P[0].samples_N[0].token_ids_T) == 11


async def test_queue_full_is_resource_exhausted(setup):
    service, engine = setup
    engine.step_delay_s = 0.05
    first = asyncio.create_task(
        service.generate(GenerateCall(prompts=["a", "b"], n=3, sampling=SamplingSpec(max_tokens=4)))
    )
    await asyncio.sleep(0.02)
    with pytest.raises(ResourceExhausted) as err:
        await service.generate(GenerateCall(prompts=["c"], n=3))
    assert err.value.reason == "QUEUE_FULL"
    await first
    # Room again once the first finished.
    await service.generate(GenerateCall(prompts=["c"], n=3, sampling=SamplingSpec(max_tokens=1)))
    with pytest.raises(ResourceExhausted) as err:
        await service.generate(GenerateCall(prompts=["a", "b", "c"], n=3))
    assert err.value.reason == "REQUEST_TOO_LARGE"


async def test_timeout_is_deadline_exceeded_and_frees_the_queue(setup):
    service, engine = setup
    engine.step_delay_s = 0.2
    with pytest.raises(DeadlineExceeded) as err:
        await service.generate(
            GenerateCall(prompts=["a"], n=4, timeout_s=0.05, sampling=SamplingSpec(max_tokens=4))
        )
    assert err.value.reason == "ROLLOUT_TIMEOUT"
    assert service._pending == 0


async def test_compute_logprobs_checks_and_version(setup):
    service, _ = setup
    version, logprobs = await service.compute_logprobs(
        sel("exp@1"), [ScoreSequence((1, 5, 6, 7), 2), ScoreSequence((1, 5), 2)]
    )
    assert version == 1
    assert [len(lp) for lp in logprobs] == [2, 0]
    for seq, reason in [
        (ScoreSequence((1, 5), 0), "INVALID_PROMPT_LENGTH"),
        (ScoreSequence((1, 5), 3), "INVALID_PROMPT_LENGTH"),
        (ScoreSequence(tuple([5] * 33), 1), "SEQUENCE_TOO_LONG"),
        (ScoreSequence((1, 500), 1), "TOKEN_ID_OUT_OF_RANGE"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            await service.compute_logprobs(None, [seq])
        assert err.value.reason == reason


async def test_stream_yields_the_same_tokens_as_generate(setup):
    service, _ = setup
    call = GenerateCall(
        prompts=["ab", "cd"],
        n=2,
        adapter=sel("exp"),
        sampling=SamplingSpec(max_tokens=3, temperature=1.0, seed=3),
    )
    whole = await service.generate(call)
    streamed: dict[tuple[int, int], list[int]] = {}
    versions = set()
    async for version, delta in service.generate_stream(call):
        versions.add(version)
        streamed.setdefault((delta.prompt_index, delta.sample_index), []).extend(delta.token_ids)
    assert versions == {2}
    for p, result in enumerate(whole.results_P):
        for s, sample in enumerate(result.samples_N):
            assert tuple(streamed[(p, s)]) == sample.token_ids_T
