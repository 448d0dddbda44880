"""The rollout service on the real vLLM(-CPU) engine, in a one-node mesh with the
real registry (both as processes, see ``rollout_node``).

One engine for the whole module (module-scoped node: each engine start costs
~20-40 s on 2 cores); tests run in file order and the restart test is last,
because it is the only one that replaces the engine.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from rollout_node import MAX_CPU_LORAS, Node, start_node, stop_node  # noqa: E402

from lorafleet.client.rollout import AsyncRolloutClient  # noqa: E402
from lorafleet.core.errors import (  # noqa: E402
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from lorafleet.rollout.testing import write_peft_adapter  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

PROMPTS = ["12+3=", "reverse abc:", "copy hello:", "sort 3 1 2:"]
ADAPTERS = ["e0", "e1", "e2", "e3"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Node:
    run_dir = tmp_path_factory.mktemp("rollout-node")
    model_dir = tiny_model_dir
    sources = {}
    for seed, name in enumerate(ADAPTERS):
        sources[name] = write_peft_adapter(
            model_dir, run_dir / "src" / name, rank=8, seed=seed, b_std=0.3
        )
    sources["wide"] = write_peft_adapter(model_dir, run_dir / "src" / "wide", rank=16, seed=9)
    node = start_node(run_dir, model_dir)
    node.sources = sources
    try:
        for name in ADAPTERS:
            assert node.publish(name, sources[name]) == 1
        yield node
    finally:
        stop_node(node)


@pytest.fixture(scope="module")
def solo(node: Node) -> dict[str | None, list[list[int]]]:
    """Greedy tokens of every prompt under each adapter (and the base), one
    adapter at a time."""
    out: dict[str | None, list[list[int]]] = {}
    for adapter in [None, *ADAPTERS]:
        response = node.rollout.generate(
            PROMPTS, adapter=f"{adapter}@1" if adapter else None, max_tokens=MAX_TOKENS
        )
        assert response.adapter_version == (1 if adapter else 0)
        out[adapter] = [list(r.completions[0].token_ids) for r in response.results]
    return out


def test_adapters_change_the_output(solo):
    # Precondition of the batch test: otherwise "same tokens" proves nothing.
    outputs = [tuple(map(tuple, tokens)) for tokens in solo.values()]
    assert len(set(outputs)) == len(outputs), "adapters must produce distinct outputs"


def test_mixed_adapter_batch_matches_each_adapter_alone(node, solo):
    """Requests of several adapters (and the base) at once meet in vLLM's
    continuous batch; each must still get exactly its own adapter's tokens."""
    order = [None, *ADAPTERS] * 3

    async def run() -> list:
        async with AsyncRolloutClient(node.rollout_address) as client:
            return await asyncio.gather(
                *(
                    client.generate(
                        PROMPTS,
                        adapter=f"{a}@1" if a else None,
                        max_tokens=MAX_TOKENS,
                        experiment_id=a or "",
                    )
                    for a in order
                )
            )

    responses = asyncio.run(run())
    for adapter, response in zip(order, responses, strict=True):
        assert response.adapter_version == (1 if adapter else 0)
        got = [list(r.completions[0].token_ids) for r in response.results]
        assert got == solo[adapter], f"adapter {adapter} differs when batched"


def test_stream_matches_generate(node, solo):
    tokens: dict[int, list[int]] = {}
    for message in node.rollout.generate_stream(PROMPTS, adapter="e2@1", max_tokens=MAX_TOKENS):
        assert message.adapter_version == 1
        tokens.setdefault(message.prompt_index, []).extend(message.token_ids)
    assert [tokens[i] for i in range(len(PROMPTS))] == solo["e2"]


def test_evicted_version_is_reloaded_transparently(node, solo):
    node.rollout.unload_adapter("e0")  # a known starting point
    for name in ADAPTERS:  # one more adapter than the node's max_cpu_loras
        node.rollout.generate(PROMPTS[:1], adapter=f"{name}@1", max_tokens=2)
    loaded = {a.engine_name for a in node.rollout.list_loaded()}
    assert len(loaded) == MAX_CPU_LORAS
    assert "e0@1" not in loaded, f"e0@1 should have been evicted (LRU), loaded: {loaded}"

    response = node.rollout.generate(PROMPTS, adapter="e0@1", max_tokens=MAX_TOKENS)
    assert response.adapter_version == 1
    assert [list(r.completions[0].token_ids) for r in response.results] == solo["e0"]
    assert "e0@1" in {a.engine_name for a in node.rollout.list_loaded()}


def test_new_version_is_served_by_the_next_request_without_restart(node, solo):
    pid = node.cluster.services["rollout"].process.pid
    engine_pids = node.engine_pids()
    assert engine_pids, "the vLLM engine processes should be visible"
    node.rollout.generate(PROMPTS[:1], adapter="e0@latest", max_tokens=1)  # e0 is served here

    # Version 2 of e0 carries e3's weights, so its tokens are known: solo["e3"].
    published = time.monotonic()
    assert node.publish("e0", node.sources["e3"]) == 2
    # The watch stream announces it and the node preloads it before any request.
    node.wait_loaded("e0@2")
    print(f"publish -> preloaded: {(time.monotonic() - published) * 1000:.0f} ms")

    latest = node.rollout.generate(PROMPTS, adapter="e0@latest", max_tokens=MAX_TOKENS)
    assert latest.adapter_version == 2
    assert [list(r.completions[0].token_ids) for r in latest.results] == solo["e3"]
    # The old version is still servable and still itself (versioned engine names:
    # no prefix-cache blocks of v2 leak into v1 or back).
    old = node.rollout.generate(PROMPTS, adapter="e0@1", max_tokens=MAX_TOKENS)
    assert [list(r.completions[0].token_ids) for r in old.results] == solo["e0"]

    assert node.cluster.services["rollout"].process.poll() is None
    assert node.cluster.services["rollout"].process.pid == pid
    assert node.engine_pids() == engine_pids, "the engine must not restart for a new version"


def _peft_logprobs(model_dir: Path, adapter_dir: Path | None, seqs: list[tuple[list[int], int]]):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    out = []
    with torch.no_grad():
        for ids, prompt_length in seqs:
            logits = model(torch.tensor([ids])).logits[0].float()
            logprobs = torch.log_softmax(logits[:-1], dim=-1)
            token_lps = logprobs.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
            out.append(token_lps[prompt_length - 1 :].tolist())
    return out


def test_logprobs_agree_with_peft(node):
    """Rollout logprobs (sampled tokens, and ComputeLogprobs) against
    transformers + peft for the same tokens and adapter version, in fp32."""
    response = node.rollout.generate(
        PROMPTS, adapter="e1@1", n=4, temperature=1.0, seed=1234, max_tokens=16
    )
    seqs, sampled = [], []
    for result in response.results:
        for completion in result.completions:
            seqs.append(
                (
                    list(result.prompt_token_ids) + list(completion.token_ids),
                    len(result.prompt_token_ids),
                )
            )
            sampled.append(list(completion.logprobs))
            assert len(completion.logprobs) == len(completion.token_ids)
    reference = _peft_logprobs(node.model_dir, node.sources["e1"], seqs)
    diffs = [
        abs(a - b)
        for s, r in zip(sampled, reference, strict=True)
        for a, b in zip(s, r, strict=True)
    ]
    mean, worst = sum(diffs) / len(diffs), max(diffs)
    print(f"sampled logprobs vs peft: mean |diff| {mean:.2e}, max {worst:.2e} over {len(diffs)}")
    assert mean < 1e-4

    scored = node.rollout.compute_logprobs(seqs, adapter="e1@1")
    assert scored.adapter_version == 1
    got = [list(s.logprobs) for s in scored.sequences]
    diffs = [
        abs(a - b) for s, r in zip(got, reference, strict=True) for a, b in zip(s, r, strict=True)
    ]
    assert len(diffs) == sum(len(r) for r in reference)
    assert sum(diffs) / len(diffs) < 1e-4

    base = node.rollout.compute_logprobs(seqs[:4], adapter=None)
    assert base.adapter_version == 0
    base_ref = _peft_logprobs(node.model_dir, None, seqs[:4])
    diffs = [
        abs(a - b)
        for s, r in zip(base.sequences, base_ref, strict=True)
        for a, b in zip(s.logprobs, r, strict=True)
    ]
    assert sum(diffs) / len(diffs) < 1e-4
    # The adapter really is applied in scoring (not silently the base).
    assert any(abs(a - b) > 1e-3 for a, b in zip(got[0], base.sequences[0].logprobs, strict=True))


def test_full_length_sequence_can_be_scored(node):
    """A sequence exactly max_model_len long (a prompt plus max_tokens that
    filled the context) is scored like any other."""
    ids = node.rollout.generate(["x" * 100], max_tokens=1).results[0].prompt_token_ids
    ids = list(ids) + [ids[-1]] * (128 - len(ids))
    scored = node.rollout.compute_logprobs([(ids, 100)], adapter="e1@1")
    assert len(scored.sequences[0].logprobs) == 28
    assert all(lp <= 0 for lp in scored.sequences[0].logprobs)


def test_errors_have_codes_and_reasons_and_leave_the_engine_serving(node, solo):
    engine_pids = node.engine_pids()
    with pytest.raises(NotFound) as err:
        node.rollout.generate(PROMPTS[:1], adapter="no-such-adapter")
    assert err.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        node.rollout.generate(PROMPTS[:1], adapter="e1@99")
    assert err.value.reason == "VERSION_NOT_FOUND"
    with pytest.raises(InvalidArgument) as err:
        node.rollout.generate(["x" * 120], max_tokens=16)
    assert err.value.reason == "PROMPT_TOO_LONG"
    assert node.publish("wide", node.sources["wide"], rank=16) == 1
    with pytest.raises(FailedPrecondition) as err:
        node.rollout.generate(PROMPTS[:1], adapter="wide@1")
    assert err.value.reason == "RANK_ABOVE_ENGINE_MAX"
    with pytest.raises(FailedPrecondition) as err:
        node.rollout.load_adapter("wide@1")
    assert err.value.reason == "RANK_ABOVE_ENGINE_MAX"

    response = node.rollout.generate(PROMPTS, adapter="e2@1", max_tokens=MAX_TOKENS)
    assert [list(r.completions[0].token_ids) for r in response.results] == solo["e2"]
    assert node.engine_pids() == engine_pids


def test_status_reports_the_engine(node):
    status = node.rollout.status()
    assert status.engine == "vllm"
    assert status.max_loras == 2 and status.max_cpu_loras == MAX_CPU_LORAS
    assert status.max_lora_rank == 8 and status.max_model_len == 128
    assert status.base_model == str(node.model_dir)
    assert status.process_memory_bytes > 100 * 2**20


def test_cpu_engine_runs_in_one_process(node):
    """On CPU the engine's scheduler and model share one process
    (lorafleet.rollout.engine_process): no worker process beside the engine core.
    Every other test of this module runs on that engine."""
    engines = [psutil.Process(pid) for pid in node.engine_pids()]
    assert [p.name() for p in engines] == ["VLLM::EngineCore"]


def test_engine_process_sleeps_between_batches(node):
    """After a batch the engine goes to sleep instead of polling for work: on a
    CPU node a busy engine process takes the co-located trainer's core."""
    engines = [psutil.Process(pid) for pid in node.engine_pids()]
    assert engines

    def cpu_s():
        return sum(sum(p.cpu_times()[:2]) for p in engines)

    node.rollout.generate(PROMPTS, max_tokens=MAX_TOKENS)
    time.sleep(0.05)
    before = cpu_s()
    time.sleep(1.0)
    # Polling, an engine process burns ~1 CPU-second in that second.
    assert cpu_s() - before < 0.3


def test_engine_processes_run_on_tcmalloc(node):
    """vLLM's CPU backend expects tcmalloc preloaded; the rollout service adds the
    system's (lorafleet.rollout.allocator) to its engine processes."""
    from lorafleet.rollout.allocator import find_tcmalloc

    if find_tcmalloc() is None:
        pytest.skip("no system tcmalloc (Debian: libtcmalloc-minimal4; .ci/run installs it)")
    for pid in node.engine_pids():
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtcmalloc" in maps, f"engine process {pid} runs without tcmalloc"


def test_engine_failure_is_unavailable_then_restarted(node, solo):
    """Kill the engine core: requests answer UNAVAILABLE (never hang or
    INTERNAL), the engine comes back on its own, adapters reload."""
    old = node.engine_pids()
    core = [p for p in node.rollout_process.children(recursive=True) if "EngineCore" in p.name()]
    assert core, "no EngineCore process found"
    for proc in core:
        os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(Unavailable) as err:
        node.rollout.generate(PROMPTS[:1], adapter="e1@1", max_tokens=2)
    assert err.value.reason in {"ENGINE_DEAD", "ENGINE_RESTARTING"}

    deadline = time.monotonic() + 180
    while True:
        try:
            response = node.rollout.generate(PROMPTS, adapter="e1@1", max_tokens=MAX_TOKENS)
            break
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)
    assert [list(r.completions[0].token_ids) for r in response.results] == solo["e1"]
    assert node.engine_pids().isdisjoint(old)
    assert node.cluster.services["rollout"].process.poll() is None
    shutil.rmtree(node.run_dir / "src", ignore_errors=True)
