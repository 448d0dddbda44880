"""EnvironmentService over the built-in tasks (proto <-> lorafleet.envs)."""

from __future__ import annotations

import random

import grpc.aio

from lorafleet.api.environment.v1 import environment_pb2 as pb
from lorafleet.api.environment.v1 import environment_pb2_grpc
from lorafleet.core.errors import InvalidArgument, ResourceExhausted
from lorafleet.core.validation import require
from lorafleet.environment.structs import dict_to_struct, struct_to_dict
from lorafleet.envs import STOP, InvalidTaskParams, Prompt, Task, UnknownTask, get_task, list_tasks


def _task(name: str, params: dict) -> Task:
    require(bool(name), "task is required", reason="TASK_REQUIRED")
    try:
        return get_task(name, params)
    except UnknownTask as exc:
        raise InvalidArgument(str(exc), reason="UNKNOWN_TASK", metadata={"task": name}) from exc
    except InvalidTaskParams as exc:
        raise InvalidArgument(str(exc), reason="INVALID_TASK_PARAMS") from exc


def prompt_stream(seed: int, step: int, *, eval_split: bool, task: str) -> random.Random:
    """The RNG for one (seed, step, split): the same call always sees the same
    prompts, and the evaluation split never shares a stream with training."""
    split = "eval" if eval_split else "train"
    return random.Random(f"lorafleet:{task}:{split}:{seed}:{step}")


class BuiltinEnvironmentServicer(environment_pb2_grpc.EnvironmentServiceServicer):
    def __init__(self, *, max_prompts_per_call: int, max_items_per_call: int) -> None:
        self._max_prompts = max_prompts_per_call
        self._max_items = max_items_per_call

    async def DescribeEnvironment(
        self, request: pb.DescribeEnvironmentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DescribeEnvironmentResponse:
        tasks = [get_task(name, None) for name in list_tasks()]
        return pb.DescribeEnvironmentResponse(
            tasks=[pb.TaskInfo(name=t.name, description=t.description) for t in tasks],
            stop=[STOP],
        )

    async def SamplePrompts(
        self, request: pb.SamplePromptsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SamplePromptsResponse:
        task = _task(request.task, struct_to_dict(request.task_params))
        require(
            request.num_prompts >= 1,
            f"num_prompts must be >= 1, got {request.num_prompts}",
            reason="INVALID_NUM_PROMPTS",
        )
        if request.num_prompts > self._max_prompts:
            raise ResourceExhausted(
                f"num_prompts {request.num_prompts} exceeds the limit {self._max_prompts}",
                reason="TOO_MANY_PROMPTS",
            )
        rng = prompt_stream(request.seed, request.step, eval_split=request.eval, task=task.name)
        prompts = task.sample(rng, request.num_prompts)
        split = "eval" if request.eval else "train"
        return pb.SamplePromptsResponse(
            prompts=[
                pb.EnvPrompt(
                    prompt_id=f"{task.name}/{split}/{request.seed}/{request.step}/{i}",
                    text=p.text,
                    metadata=dict_to_struct({"answer": p.answer, "meta": p.meta}),
                )
                for i, p in enumerate(prompts)
            ]
        )

    async def Score(
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        task = _task(request.task, struct_to_dict(request.task_params))
        if len(request.items) > self._max_items:
            raise ResourceExhausted(
                f"{len(request.items)} items exceed the limit {self._max_items}",
                reason="TOO_MANY_ITEMS",
            )
        results = []
        for index, item in enumerate(request.items):
            metadata = struct_to_dict(item.prompt.metadata)
            answer = metadata.get("answer")
            require(
                isinstance(answer, str),
                f"items[{index}].prompt.metadata.answer is missing: score prompts as"
                " SamplePrompts returned them",
                reason="MISSING_REFERENCE_ANSWER",
            )
            prompt = Prompt(
                task=task.name, text=item.prompt.text, answer=answer, meta=metadata.get("meta", {})
            )
            reward = float(task.score(prompt, item.completion))
            results.append(pb.ScoreResult(reward=reward, correct=reward == 1.0))
        return pb.ScoreResponse(results=results)
