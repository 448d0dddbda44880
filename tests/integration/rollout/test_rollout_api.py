"""RolloutService over real gRPC (server on port 0, the real client) with a named
fake engine: proto mapping, error codes and reasons on the wire, idempotent
operator calls, streaming, and the blocking client."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from lorafleet.api.common.v1 import adapter_pb2, sampling_pb2
from lorafleet.client.rollout import AsyncRolloutClient, RolloutClient
from lorafleet.core.config import ServiceSettings
from lorafleet.core.errors import FailedPrecondition, InvalidArgument, NotFound
from lorafleet.core.idempotency import InMemoryIdempotencyStore
from lorafleet.core.server import create_server, start_server
from lorafleet.rollout.adapters import AdapterManager
from lorafleet.rollout.resolvers import InMemoryResolver, ref_to_pb
from lorafleet.rollout.server import RolloutServicer, servicer_binding
from lorafleet.rollout.service import RolloutService
from lorafleet.rollout.testing import FakeEngine, write_fake_adapter
from lorafleet.rollout.types import AdapterSelection


@pytest.fixture
async def rollout(tmp_path: Path):
    engine = FakeEngine(max_model_len=32, max_lora_rank=8)
    await engine.start()
    resolver = InMemoryResolver()
    cache = tmp_path / "cache"
    resolver.publish("exp", write_fake_adapter(cache / "exp" / "1", seed=1))
    resolver.publish("exp", write_fake_adapter(cache / "exp" / "2", seed=2))
    resolver.publish("wide", write_fake_adapter(cache / "wide" / "1", rank=16))
    manager = AdapterManager(resolver, engine, cache_dir=cache)
    await manager.start()
    service = RolloutService(engine, manager, base_model="fake", max_n=8)
    binding = servicer_binding(RolloutServicer(service, InMemoryIdempotencyStore()))
    server, port, health = await create_server("127.0.0.1:0", [binding], settings=ServiceSettings())
    await start_server(server, health, [binding])
    client = AsyncRolloutClient(f"127.0.0.1:{port}")
    try:
        yield client, engine, resolver, port
    finally:
        await client.close()
        await server.stop(None)
        await manager.close()


async def test_generate_over_grpc(rollout):
    client, engine, _, _ = rollout
    response = await client.generate(
        ["12+3=", [1, 5, 6]], adapter="exp@latest", n=2, max_tokens=4, temperature=1.0, seed=7
    )
    assert response.adapter_version == 2
    assert len(response.results) == 2
    first = response.results[0]
    assert list(first.prompt_token_ids) == engine.tokenize("12+3=")
    assert list(response.results[1].prompt_token_ids) == [1, 5, 6]
    assert [len(c.token_ids) for c in first.completions] == [4, 4]
    assert len(first.completions[0].logprobs) == 4
    assert first.completions[0].finish_reason == sampling_pb2.FINISH_REASON_LENGTH
    assert response.completion_tokens == 16

    base = await client.generate(["12+3="], max_tokens=3, logprobs=False)
    assert base.adapter_version == 0
    assert list(base.results[0].completions[0].logprobs) == []
    fixed = await client.generate(["12+3="], adapter="exp@1", max_tokens=3)
    assert fixed.adapter_version == 1
    prompt = engine.tokenize("12+3=")
    assert list(fixed.results[0].completions[0].token_ids) == [
        engine.expected_token(prompt, j, "exp@1") for j in range(3)
    ]


async def test_errors_carry_code_and_reason(rollout):
    client, _, _, _ = rollout
    with pytest.raises(NotFound) as err:
        await client.generate(["a"], adapter="nope")
    assert err.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(NotFound) as err:
        await client.generate(["a"], adapter="exp@9")
    assert err.value.reason == "VERSION_NOT_FOUND"
    with pytest.raises(InvalidArgument) as err:
        await client.generate(["x" * 30], max_tokens=8)
    assert err.value.reason == "PROMPT_TOO_LONG"
    assert err.value.metadata["max_model_len"] == "32"
    with pytest.raises(FailedPrecondition) as err:
        await client.generate(["a"], adapter="wide")
    assert err.value.reason == "RANK_ABOVE_ENGINE_MAX"
    with pytest.raises(InvalidArgument) as err:
        await client.generate(["a"], adapter="Bad_Id")
    assert err.value.reason == "INVALID_ADAPTER_ID"


async def test_stream_matches_generate(rollout):
    client, _, _, _ = rollout
    kwargs = dict(adapter="exp", n=2, max_tokens=5, temperature=1.0, seed=1)
    whole = await client.generate(["ab", "cd"], **kwargs)
    tokens: dict[tuple[int, int], list[int]] = {}
    finished = set()
    async for message in client.generate_stream(["ab", "cd"], **kwargs):
        assert message.adapter_version == 2
        tokens.setdefault((message.prompt_index, message.sample_index), []).extend(
            message.token_ids
        )
        if message.finish_reason != sampling_pb2.FINISH_REASON_UNSPECIFIED:
            finished.add((message.prompt_index, message.sample_index))
    assert finished == {(0, 0), (0, 1), (1, 0), (1, 1)}
    for p, result in enumerate(whole.results):
        for s, completion in enumerate(result.completions):
            assert tokens[(p, s)] == list(completion.token_ids)


async def test_compute_logprobs_over_grpc(rollout):
    client, _, _, _ = rollout
    response = await client.compute_logprobs([([1, 5, 6, 7], 1), ([1, 5], 1)], adapter="exp@1")
    assert response.adapter_version == 1
    assert [len(s.logprobs) for s in response.sequences] == [3, 1]
    with pytest.raises(InvalidArgument) as err:
        await client.compute_logprobs([([1, 5], 0)])
    assert err.value.reason == "INVALID_PROMPT_LENGTH"


async def test_operator_calls_are_idempotent(rollout):
    client, engine, resolver, _ = rollout
    first = await client.load_adapter("exp@1", request_id="load-1")
    again = await client.load_adapter("exp@1", request_id="load-1")
    assert first == again
    assert engine.added == ["exp@1"]
    assert first.engine_name == "exp@1" and first.version == 1 and first.rank == 4
    with pytest.raises(InvalidArgument) as err:
        await client.load_adapter("exp@2", request_id="load-1")
    assert err.value.reason == "REQUEST_ID_REUSED"

    # Load exactly a reference (e.g. handed over by a co-located trainer).
    ref = await resolver.resolve(AdapterSelection.parse("exp@2"))
    loaded = await client.load_adapter(ref_to_pb(ref))
    assert loaded.engine_name == "exp@2"
    names = {a.engine_name for a in await client.list_loaded()}
    assert names == {"exp@1", "exp@2"}

    assert await client.unload_adapter("exp", 0, request_id="unload-1") == 2
    assert await client.unload_adapter("exp", 0, request_id="unload-1") == 2  # replayed
    assert await client.unload_adapter("exp", 0) == 0
    assert await client.list_loaded() == []
    with pytest.raises(InvalidArgument):
        await client.load_adapter(adapter_pb2.AdapterRef(adapter_id="exp"))


async def test_status_and_blocking_client(rollout):
    client, _, _, port = rollout
    status = await client.status()
    assert status.engine == "fake"
    assert status.max_model_len == 32 and status.max_lora_rank == 8
    assert status.process_memory_bytes > 0
    assert await client.health() == "SERVING"

    def blocking() -> int:
        with RolloutClient(f"127.0.0.1:{port}") as sync:
            return sync.generate(["ab"], adapter="exp@1", max_tokens=2).adapter_version

    assert await asyncio.to_thread(blocking) == 1
