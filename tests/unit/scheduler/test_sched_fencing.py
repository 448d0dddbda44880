"""The leading scheduler sends its lease's fencing token with every trainer call
that changes an adapter (the trainer's side: tests/integration/trainer/
test_trainer_fencing.py; the whole path across a failover:
tests/e2e/test_scheduler_e2e.py)."""

from __future__ import annotations

from lorafleet.api.trainer.v1 import trainer_pb2
from lorafleet.core.database import Database
from lorafleet.scheduler.config import SchedulerSettings
from lorafleet.scheduler.service import Scheduler
from lorafleet.scheduler.store import SchedulerStore


async def test_trainer_calls_that_change_the_adapter_carry_the_token(offline_runner):
    runner = offline_runner("exp-f", latest_version=1, fencing_token=9)
    sent = []

    async def call(stub, request, timeout_s):  # type: ignore[no-untyped-def]
        sent.append(request)
        return trainer_pb2.GetTrainerStatusResponse()

    runner.node.trainer.call = call  # type: ignore[method-assign]
    await runner._trainer("OptimStep", trainer_pb2.OptimStepRequest(adapter_id="exp-f"))
    await runner._trainer("SaveState", trainer_pb2.SaveStateRequest(adapter_id="exp-f"))
    # A read has no token to carry: it goes out as it came.
    await runner._trainer("GetTrainerStatus", trainer_pb2.GetTrainerStatusRequest())
    assert [r.fencing_token for r in sent[:2]] == [9, 9]
    assert [type(r).__name__ for r in sent] == [
        "OptimStepRequest",
        "SaveStateRequest",
        "GetTrainerStatusRequest",
    ]


async def test_leading_sets_the_token_of_every_runner_it_starts(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/scheduler.db")
    scheduler = Scheduler(SchedulerStore(db), None, SchedulerSettings())  # type: ignore[arg-type]
    await scheduler.prepare()
    assert scheduler.fencing_token == 0  # not leading: a lone scheduler is unfenced
    await scheduler.lead(fencing_token=5)
    try:
        assert scheduler.fencing_token == 5
        assert scheduler._runner_settings.fencing_token == 5
    finally:
        if scheduler._supervisor is not None:
            scheduler._supervisor.cancel()
        await db.dispose()
