"""The torch rollout engine on the tiny model: mixed-adapter batches give each
adapter exactly what it gives alone, sampled-token logprobs match transformers +
peft, sampling parameters behave as vLLM's do, errors carry their reasons, and
in-memory adapters are attached without a copy and checked for immutability.

One engine for the module (module-scoped, on one event loop): starting it loads
the model and transformers (~3-7 s on 2 shared cores).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from lorafleet.core.errors import (  # noqa: E402
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from lorafleet.lora.peft_io import load_peft_adapter  # noqa: E402
from lorafleet.rollout.adapters import AdapterManager  # noqa: E402
from lorafleet.rollout.resolvers import InMemoryResolver  # noqa: E402
from lorafleet.rollout.service import GenerateCall, RolloutService  # noqa: E402
from lorafleet.rollout.testing import write_peft_adapter  # noqa: E402
from lorafleet.rollout.torch_engine import AdapterWeights, TorchEngine  # noqa: E402
from lorafleet.rollout.types import (  # noqa: E402
    AdapterSelection,
    EngineAdapter,
    FinishReason,
    GenerationRequest,
    SamplingSpec,
    ScoreSequence,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

PROMPTS = ["12+3=", "reverse abc:", "copy hello:", "sort 3 1 2:"]
ADAPTERS = ["e0", "e1", "e2"]
MAX_TOKENS = 12
MAX_RANK = 8


class DictMemory:
    """A named fake ``MemorySource``: mem:// URI -> weights."""

    def __init__(self) -> None:
        self.versions: dict[str, AdapterWeights] = {}

    def get(self, uri: str) -> AdapterWeights | None:
        return self.versions.get(uri)


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict:
    root = tmp_path_factory.mktemp("torch-engine-adapters")
    dirs = {
        name: write_peft_adapter(tiny_model_dir, root / name, rank=8, seed=seed, b_std=0.3)
        for seed, name in enumerate(ADAPTERS)
    }
    dirs["wide"] = write_peft_adapter(tiny_model_dir, root / "wide", rank=16, seed=9)
    return dirs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tiny_model_dir: Path, adapter_dirs: dict):
    torch.set_num_threads(1)
    memory = DictMemory()
    engine = TorchEngine(
        model_path=str(tiny_model_dir), max_lora_rank=MAX_RANK, max_model_len=64, memory=memory
    )
    await engine.start()
    for name in ADAPTERS:
        await engine.add_adapter(
            EngineAdapter(name, 1, engine_id(name), str(adapter_dirs[name]), 8)
        )
    try:
        yield engine
    finally:
        await engine.close()


def engine_id(name: str) -> int:
    # Far from the ids an AdapterManager hands out (from 1) in the service test.
    return 1000 + ADAPTERS.index(name)


def adapter(name: str | None) -> EngineAdapter | None:
    return None if name is None else EngineAdapter(name, 1, engine_id(name), "", 8)


def requests(engine: TorchEngine, name: str | None, *, n: int = 1,
             **sampling) -> list[GenerationRequest]:
    spec = SamplingSpec(max_tokens=sampling.pop("max_tokens", MAX_TOKENS), **sampling)
    return [
        GenerationRequest(tuple(engine.tokenize(p)), n, spec, adapter(name)) for p in PROMPTS
    ]


def tokens(results) -> list[list[int]]:
    return [list(r.samples_N[0].token_ids_T) for r in results]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def solo(engine: TorchEngine) -> dict:
    """Greedy tokens of every prompt under each adapter (and the base), one
    adapter per call, calls one after another."""
    return {name: tokens(await engine.generate(requests(engine, name))) for name in
            [None, *ADAPTERS]}


async def test_adapters_change_the_output(solo):
    # Precondition of the batch test: otherwise "same tokens" proves nothing.
    outputs = [tuple(map(tuple, t)) for t in solo.values()]
    assert len(set(outputs)) == len(outputs), "adapters must produce distinct outputs"


async def test_mixed_adapter_batch_matches_each_adapter_alone(engine, solo):
    """Concurrent calls of several adapters (and the base) meet in one batch, one
    forward per step with per-row routing; each gets exactly its adapter's tokens."""
    order = [None, *ADAPTERS] * 3
    before = len(engine.batch_log)
    results = await asyncio.gather(*(engine.generate(requests(engine, a)) for a in order))
    for name, result in zip(order, results, strict=True):
        assert tokens(result) == solo[name], f"adapter {name} differs when batched"
    batches = engine.batch_log[before:]
    # 12 calls x 4 prompts in (about) one batch that mixes all 3 adapters and the base.
    assert max(keys for _, keys in batches) == 4, batches
    assert len(batches) < len(order), batches


def _peft_logprobs(model_dir: Path, adapter_dir: Path, seqs) -> list[list[float]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    out = []
    with torch.no_grad():
        for ids, prompt_length in seqs:
            logits = model(torch.tensor([ids])).logits[0].float()
            lp = torch.log_softmax(logits[:-1], dim=-1)
            lp = lp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
            out.append(lp[prompt_length - 1 :].tolist())
    return out


async def test_sampled_logprobs_agree_with_peft(engine, tiny_model_dir, adapter_dirs):
    """Logprobs of sampled tokens (and ComputeLogprobs of the same tokens) against
    transformers + peft for the same adapter, in fp32."""
    batch = requests(engine, "e1", n=4, temperature=1.0, seed=1234, max_tokens=16)
    results = await engine.generate(batch)
    seqs, sampled = [], []
    for result in results:
        assert len(result.samples_N) == 4
        for s in result.samples_N:
            assert len(s.logprobs_T) == len(s.token_ids_T) > 0
            seqs.append((list(result.prompt_token_ids) + list(s.token_ids_T),
                         len(result.prompt_token_ids)))
            sampled.append(list(s.logprobs_T))
    reference = await asyncio.to_thread(_peft_logprobs, tiny_model_dir, adapter_dirs["e1"], seqs)
    diffs = [abs(a - b) for s, r in zip(sampled, reference, strict=True)
             for a, b in zip(s, r, strict=True)]
    mean = sum(diffs) / len(diffs)
    print(f"sampled logprobs vs peft: mean |diff| {mean:.2e}, max {max(diffs):.2e}")
    assert mean < 1e-4
    scored = await engine.compute_logprobs([ScoreSequence(tuple(i), p) for i, p in seqs],
                                           adapter("e1"))
    diffs = [abs(a - b) for s, r in zip(scored, reference, strict=True)
             for a, b in zip(s, r, strict=True)]
    assert sum(diffs) / len(diffs) < 1e-4
    # A different adapter's weights would not agree: the comparison can fail.
    other = await engine.compute_logprobs([ScoreSequence(tuple(i), p) for i, p in seqs],
                                          adapter("e2"))
    gap = [abs(a - b) for s, r in zip(other, reference, strict=True)
           for a, b in zip(s, r, strict=True)]
    assert sum(gap) / len(gap) > 1e-2


async def test_seeded_samples_are_reproducible_in_any_batch(engine):
    seeded = requests(engine, "e0", temperature=1.0, seed=7, n=3)
    alone = await engine.generate(seeded)
    noise = [engine.generate(requests(engine, a, temperature=0.8)) for a in ADAPTERS]
    together, *_ = await asyncio.gather(engine.generate(seeded), *noise)
    assert [[s.token_ids_T for s in r.samples_N] for r in together] == [
        [s.token_ids_T for s in r.samples_N] for r in alone
    ]
    # The n samples of one prompt are independent draws, not copies.
    assert any(len({s.token_ids_T for s in r.samples_N}) > 1 for r in alone)


async def test_sampling_parameters(engine, solo):
    # top-k 1 at any temperature is greedy.
    top1 = await engine.generate(requests(engine, "e2", temperature=1.5, top_k=1, seed=3))
    assert tokens(top1) == solo["e2"]
    # A tiny top-p keeps only the most likely token: greedy too.
    nucleus = await engine.generate(requests(engine, "e2", temperature=1.0, top_p=1e-6))
    assert tokens(nucleus) == solo["e2"]
    # Greedy n > 1: identical samples.
    greedy_n = await engine.generate([GenerationRequest(tuple(engine.tokenize(PROMPTS[0])), 3,
                                                        SamplingSpec(max_tokens=MAX_TOKENS))])
    assert len({s.token_ids_T for s in greedy_n[0].samples_N}) == 1
    assert len(greedy_n[0].samples_N) == 3
    # ignore_eos: exactly max_tokens, finish LENGTH.
    exact = await engine.generate(requests(engine, None, max_tokens=20, ignore_eos=True,
                                           temperature=1.0, seed=1))
    for r in exact:
        assert len(r.samples_N[0].token_ids_T) == 20
        assert r.samples_N[0].finish_reason == FinishReason.LENGTH
    # An end-of-sequence token (newline for the tiny model) stops with STOP; it is in
    # the tokens, not in the text.
    base = await engine.generate(requests(engine, None))
    stopped = [r.samples_N[0] for r in base if r.samples_N[0].finish_reason == FinishReason.STOP]
    assert stopped, "the tiny model ends some answers with a newline"
    for s in stopped:
        assert s.token_ids_T[-1] in engine._eos
        assert "\n" not in s.text
        assert s.text == engine._tokenizer.decode(list(s.token_ids_T[:-1]),
                                                  skip_special_tokens=True)
    # A stop string: STOP, the text cut before it (on the longest base answer).
    longest = max(base, key=lambda r: len(r.samples_N[0].text))
    full = longest.samples_N[0].text
    assert len(full) >= 3
    stop = full[1:3]
    cut = await engine.generate([GenerationRequest(longest.prompt_token_ids, 1,
                                                   SamplingSpec(max_tokens=MAX_TOKENS,
                                                                stop=(stop,)))])
    sample = cut[0].samples_N[0]
    assert sample.finish_reason == FinishReason.STOP
    assert sample.text == full[: full.index(stop)]
    # No logprobs when not asked for.
    quiet = await engine.generate(requests(engine, "e0", logprobs=False))
    assert all(r.samples_N[0].logprobs_T == () for r in quiet)


async def test_stream_matches_generate(engine, solo):
    got: dict[tuple[int, int], list[int]] = {}
    finished = set()
    reqs = requests(engine, "e1", n=2)
    async for delta in engine.generate_stream(reqs):
        got.setdefault((delta.prompt_index, delta.sample_index), []).extend(delta.token_ids)
        if delta.finish_reason is not None:
            finished.add((delta.prompt_index, delta.sample_index))
    assert finished == {(p, s) for p in range(len(PROMPTS)) for s in range(2)}
    for p in range(len(PROMPTS)):
        assert got[(p, 0)] == got[(p, 1)] == solo["e1"][p]


async def test_a_cancelled_request_leaves_the_engine_serving(engine, solo):
    long = requests(engine, None, n=8, max_tokens=40, ignore_eos=True, temperature=1.0)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.generate(long), 0.01)
    assert tokens(await engine.generate(requests(engine, "e0"))) == solo["e0"]
    assert engine.status().running_requests == 0
    # A stream abandoned half way stops its rows too.
    stream = engine.generate_stream(long)
    async for _ in stream:
        break
    await stream.aclose()
    assert tokens(await engine.generate(requests(engine, "e1"))) == solo["e1"]


async def test_errors_carry_reasons(engine, adapter_dirs, tmp_path):
    prompt = tuple(engine.tokenize(PROMPTS[0]))
    with pytest.raises(InvalidArgument) as err:
        await engine.generate([GenerationRequest(prompt, 1, SamplingSpec(max_tokens=60))])
    assert err.value.reason == "PROMPT_TOO_LONG"
    assert err.value.metadata["max_model_len"] == "64"
    with pytest.raises(InvalidArgument) as err:
        await engine.generate([GenerationRequest((1, 100_000), 1, SamplingSpec())])
    assert err.value.reason == "TOKEN_ID_OUT_OF_RANGE"
    wide = EngineAdapter("wide", 1, 50, str(adapter_dirs["wide"]), 16)
    with pytest.raises(FailedPrecondition) as err:
        await engine.add_adapter(wide)
    assert err.value.reason == "RANK_ABOVE_ENGINE_MAX"
    # The config may understate the rank: the weights are checked too.
    with pytest.raises(FailedPrecondition) as err:
        await engine.add_adapter(EngineAdapter("wide", 1, 51, str(adapter_dirs["wide"]), 4))
    assert err.value.reason == "RANK_ABOVE_ENGINE_MAX"
    with pytest.raises(FailedPrecondition) as err:
        await engine.add_adapter(EngineAdapter("gone", 1, 52, str(tmp_path / "nope"), 8))
    assert err.value.reason == "ADAPTER_LOAD_FAILED"
    with pytest.raises(FailedPrecondition) as err:
        await engine.add_adapter(EngineAdapter("mem", 1, 53, "mem://n/mem/1", 8))
    assert err.value.reason == "ADAPTER_LOAD_FAILED"
    with pytest.raises(FailedPrecondition) as err:
        await engine.generate([GenerationRequest(prompt, 1, SamplingSpec(),
                                                 EngineAdapter("x", 1, 99, "", 8))])
    assert err.value.reason == "ADAPTER_NOT_LOADED"
    with pytest.raises(FailedPrecondition) as err:
        await engine.compute_logprobs([ScoreSequence(prompt, 1)], EngineAdapter("x", 1, 99, "", 8))
    assert err.value.reason == "ADAPTER_NOT_LOADED"
    # Nothing of the failed loads stayed behind; the engine still serves.
    assert engine.status().healthy
    assert len(await engine.generate(requests(engine, "e0", max_tokens=2))) == len(PROMPTS)


async def test_memory_adapter_is_shared_not_copied_and_must_stay_unchanged(engine, solo,
                                                                           adapter_dirs):
    loaded = load_peft_adapter(adapter_dirs["e2"])
    engine._memory.versions["mem://node/e2/1"] = AdapterWeights(loaded.spec, loaded.tensors,
                                                                "memory")
    mem = EngineAdapter("e2m", 1, 60, "mem://node/e2/1", 8)
    before = engine.load_counts["memory"]
    await engine.add_adapter(mem)
    assert engine.load_counts["memory"] == before + 1
    assert engine.attached_source(mem) == "memory"
    # The layers use the very tensors the source holds.
    held = {t.data_ptr() for t in loaded.tensors.values()}
    assert {t.data_ptr() for t in engine.attached_tensors(mem)} == held
    reqs = [GenerationRequest(r.prompt_token_ids, 1, r.sampling, mem)
            for r in requests(engine, None)]
    assert tokens(await engine.generate(reqs)) == solo["e2"]
    # An in-place write to a published version is caught, not served.
    with torch.no_grad():
        next(iter(loaded.tensors.values())).add_(1.0)
    with pytest.raises(DataLoss) as err:
        await engine.generate(reqs)
    assert err.value.reason == "ADAPTER_WEIGHTS_MODIFIED"
    await engine.remove_adapter(mem)
    assert engine.attached_source(mem) is None


async def test_rollout_service_on_the_torch_engine(engine, adapter_dirs, tmp_path, solo):
    """The rollout domain (resolution, loading by reference, eviction) over this engine."""
    resolver = InMemoryResolver()
    resolver.publish("e1", adapter_dirs["e1"])
    resolver.publish("wide", adapter_dirs["wide"])
    manager = AdapterManager(resolver, engine, cache_dir=tmp_path, watch=False)
    service = RolloutService(engine, manager, base_model="tiny")
    result = await service.generate(GenerateCall(PROMPTS, AdapterSelection.parse("e1@latest"),
                                                 sampling=SamplingSpec(max_tokens=MAX_TOKENS)))
    assert result.adapter_version == 1
    assert [list(r.samples_N[0].token_ids_T) for r in result.results_P] == solo["e1"]
    with pytest.raises(FailedPrecondition) as err:
        await service.generate(GenerateCall(PROMPTS, AdapterSelection.parse("wide")))
    assert err.value.reason == "RANK_ABOVE_ENGINE_MAX"
    with pytest.raises(NotFound):
        await service.generate(GenerateCall(PROMPTS, AdapterSelection.parse("nope")))
    with pytest.raises(InvalidArgument) as err:
        await service.generate(GenerateCall(["x" * 60], sampling=SamplingSpec(max_tokens=8)))
    assert err.value.reason == "PROMPT_TOO_LONG"
    assert await manager.unload("e1") == 1
    await manager.close()
