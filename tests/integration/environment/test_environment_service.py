"""The built-in EnvironmentService on a real server: prompts, scores, bad input."""

from __future__ import annotations

import asyncio

import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lorafleet.client.environment import AsyncEnvironmentClient, EnvironmentClient
from lorafleet.core.errors import InvalidArgument, ResourceExhausted
from lorafleet.core.server import create_server, start_server
from lorafleet.environment.app import SERVICE, build_app
from lorafleet.environment.config import EnvironmentSettings


@pytest.fixture
async def env_address():
    settings = EnvironmentSettings(max_prompts_per_call=64)
    app = await build_app(settings)
    server, port, health = await create_server("127.0.0.1:0", app.bindings, settings=settings)
    await start_server(server, health, app.bindings)
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)


@pytest.fixture
async def env(env_address):
    async with AsyncEnvironmentClient(env_address) as client:
        yield client


async def test_health_and_reflection(env):
    assert await env.health() == "SERVING"
    assert await env.health(SERVICE.full_name) == "SERVING"
    stub = reflection_pb2_grpc.ServerReflectionStub(env.channel)

    async def one_request():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = []
    async for response in stub.ServerReflectionInfo(one_request()):
        names = [s.name for s in response.list_services_response.service]
    assert SERVICE.full_name in names
    assert "grpc.health.v1.Health" in names


async def test_describe_lists_every_builtin_task(env):
    described = await env.describe()
    names = {t.name for t in described.tasks}
    assert {"add", "copy", "count", "reverse", "sort"} <= names
    assert list(described.stop) == ["\n"]


async def test_same_seed_and_step_give_same_prompts_and_eval_differs(env):
    first = await env.sample_prompts("reverse", 8, seed=3, step=5)
    again = await env.sample_prompts("reverse", 8, seed=3, step=5)
    other_step = await env.sample_prompts("reverse", 8, seed=3, step=6)
    held_out = await env.sample_prompts("reverse", 8, seed=3, step=5, eval=True)
    assert [p.text for p in first] == [p.text for p in again]
    assert [p.text for p in first] != [p.text for p in other_step]
    assert [p.text for p in first] != [p.text for p in held_out]
    assert all(p.text.startswith("reverse") for p in first)


async def test_scores_reference_answers_one_and_wrong_answers_less(env):
    prompts = await env.sample_prompts("count", 6, params={"max_len": 8}, seed=1)
    answers = [p.metadata["answer"] for p in prompts]
    right = await env.score("count", [(p, a + "\n") for p, a in zip(prompts, answers, strict=True)])
    wrong = await env.score("count", [(p, "x\n") for p in prompts])
    assert [r.reward for r in right] == [1.0] * 6 and all(r.correct for r in right)
    assert all(r.reward < 1.0 and not r.correct for r in wrong)


@pytest.mark.parametrize(
    ("task", "num", "params", "reason"),
    [
        ("nope", 4, None, "UNKNOWN_TASK"),
        ("", 4, None, "TASK_REQUIRED"),
        ("count", 0, None, "INVALID_NUM_PROMPTS"),
        ("count", 4, {"max_len": "long"}, "INVALID_TASK_PARAMS"),
        ("count", 4, {"bogus": 1}, "INVALID_TASK_PARAMS"),
    ],
)
async def test_invalid_input_is_invalid_argument_and_server_keeps_serving(
    env, task, num, params, reason
):
    with pytest.raises(InvalidArgument) as info:
        await env.sample_prompts(task, num, params=params)
    assert info.value.reason == reason
    assert info.value.domain == "lorafleet"
    assert len(await env.sample_prompts("count", 2)) == 2


async def test_too_many_prompts_is_resource_exhausted(env):
    with pytest.raises(ResourceExhausted) as info:
        await env.sample_prompts("count", 65)
    assert info.value.reason == "TOO_MANY_PROMPTS"


async def test_score_without_reference_answer_is_rejected(env):
    prompts = await env.sample_prompts("add", 1)
    prompts[0].metadata.Clear()
    with pytest.raises(InvalidArgument) as info:
        await env.score("add", [(prompts[0], "3\n")])
    assert info.value.reason == "MISSING_REFERENCE_ANSWER"


async def test_blocking_client_works_from_plain_code(env_address):
    # The blocking client runs its own loop thread; it is driven from a worker
    # thread here because this test's loop must keep serving the server.
    def blocking_session():
        with EnvironmentClient(env_address) as client:
            return client.sample_prompts("sort", 3, seed=2), client.health()

    prompts, health = await asyncio.to_thread(blocking_session)
    assert len(prompts) == 3
    assert health == "SERVING"
