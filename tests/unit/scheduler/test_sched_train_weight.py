"""The runner sends its experiment's fair-share weight with every train call, so
the trainer's fewest-steps order counts steps per unit of weight (the trainer's
side: tests/integration/lora/test_lora_fusing_queue.py)."""

from __future__ import annotations

import pytest

from lorafleet.api.trainer.v1 import trainer_pb2
from lorafleet.client.scheduler import builtin_spec
from lorafleet.scheduler.nodes import NodeHandle
from lorafleet.scheduler.runner import ExperimentRunner, Rollout, RunnerSettings
from lorafleet.scheduler.types import ExperimentRecord, NodeRecord


def _runner(weight: float, budget_tokens: int) -> tuple[ExperimentRunner, NodeHandle, list]:
    spec = builtin_spec("add")
    spec.weight = weight
    record = ExperimentRecord("exp-w", spec, adapter_id="exp-w", latest_version=1)
    node = NodeHandle.connect(
        NodeRecord("n0", "127.0.0.1:1", "127.0.0.1:1", "tiny", slots=1, max_rank=8),
        budget_tokens=budget_tokens,
    )
    # The registry is never called here; any channel will do.
    runner = ExperimentRunner(record, node, node.trainer, store=None, env=None,  # type: ignore[arg-type]
                              settings=RunnerSettings(5.0, 5.0, 1),
                              on_step=lambda m: None, should_stop=lambda: False)
    calls: list = []

    async def trainer(method, request, timeout_s=None):  # type: ignore[no-untyped-def]
        calls.append((method, request))
        if method == "TrainStep":
            return trainer_pb2.TrainStepResponse(step=1, applied=True)
        if method == "ForwardBackward":
            return trainer_pb2.ForwardBackwardResponse()
        return trainer_pb2.OptimStepResponse(step=1, applied=True)

    runner._trainer = trainer  # type: ignore[method-assign]
    return runner, node, calls


def _batch(samples: int) -> Rollout:
    out = []
    for i in range(samples):
        sample = trainer_pb2.TrainSample(advantage=1.0 if i % 2 else -1.0, policy_version=1)
        sample.sequence.token_ids.extend([1, 2, 3, 4, 5, 6])
        sample.sequence.prompt_length = 3
        out.append(sample)
    return Rollout(step=1, policy_version=1, samples=out, rewards=[0.0] * samples,
                   correct=[False] * samples, rollout_ms=0.0, reward_ms=0.0,
                   queue_wait_ms=0.0, tokens=3 * samples, zero_advantage=0)


@pytest.mark.parametrize("weight", [1.0, 2.5])
async def test_train_step_carries_the_experiment_weight(weight):
    runner, node, calls = _runner(weight, budget_tokens=65536)
    try:
        await runner._train(_batch(4))
    finally:
        await node.close()
    assert [(m, r.weight) for m, r in calls] == [("TrainStep", weight)]


async def test_every_chunk_carries_the_experiment_weight():
    # A train gate of 64 tokens: chunks of 8 tokens, one sample of 6 each.
    runner, node, calls = _runner(3.0, budget_tokens=64)
    try:
        await runner._train(_batch(4))
    finally:
        await node.close()
    assert [m for m, _ in calls] == ["ForwardBackward"] * 4 + ["OptimStep"]
    assert all(r.weight == 3.0 for m, r in calls if m == "ForwardBackward")
