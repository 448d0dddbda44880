"""A step whose publish loses to another incarnation's (a leader stopping with a
step in flight while the next one resumes the experiment): the runner drops its
diverged trainer state and asks to start again from what is stored, instead of
failing the experiment. Found when a clean leader stop failed an experiment with
PUBLISH_IN_PROGRESS in the CLI's failover test."""

from __future__ import annotations

import pytest

from lorafleet.api.trainer.v1 import trainer_pb2
from lorafleet.core.errors import Aborted
from lorafleet.scheduler.runner import PublishRaced


@pytest.fixture
def runner_and_calls(offline_runner):
    runner = offline_runner("exp-r", latest_version=3, fencing_token=4)
    calls: list = []
    answers: dict = {}

    async def call(stub, request, timeout_s):  # type: ignore[no-untyped-def]
        calls.append(request)
        answer = answers.get(type(request).__name__)
        if isinstance(answer, Exception):
            raise answer
        return answer

    runner.node.trainer.call = call  # type: ignore[method-assign]
    return runner, calls, answers


@pytest.mark.parametrize("reason", ["PUBLISH_IN_PROGRESS", "PARENT_VERSION_MISMATCH"])
async def test_a_lost_publish_race_drops_the_trainer_state_and_asks_to_resume(
    runner_and_calls, reason
):
    runner, calls, answers = runner_and_calls
    answers["SaveVersionRequest"] = Aborted("version 4 is being published", reason=reason)
    answers["DropAdapterRequest"] = trainer_pb2.DropAdapterResponse()
    with pytest.raises(PublishRaced, match=reason):
        await runner._save_version(step=3, metrics={})
    save, drop = calls
    assert save.expected_parent_version == 3
    assert isinstance(drop, trainer_pb2.DropAdapterRequest)
    assert (drop.adapter_id, drop.fencing_token) == ("exp-r", 4)


async def test_other_aborts_are_not_mistaken_for_a_race(runner_and_calls):
    runner, calls, answers = runner_and_calls
    answers["SaveVersionRequest"] = Aborted(
        "the database refused the write", reason="TRANSACTION_CONFLICT"
    )
    with pytest.raises(Aborted):
        await runner._save_version(step=3, metrics={})
    assert [type(c).__name__ for c in calls] == ["SaveVersionRequest"]
