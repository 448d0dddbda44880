"""`follow_live` against a real scheduler server: it follows each experiment's
watch stream to its terminal event, returns what the scheduler last says of each,
and reads the experiment again per event rather than polling on a clock.

The scheduler has no nodes here, so submitted experiments stay queued until the
test cancels them: the terminal events arrive when the test decides.
"""

from __future__ import annotations

import asyncio
import io
import time

import pytest
from rich.console import Console

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client.scheduler import SchedulerClient, builtin_spec
from lorafleet.cluster.progress import follow_live
from lorafleet.core.server import create_server, start_server
from lorafleet.scheduler.app import build_app
from lorafleet.scheduler.config import SchedulerSettings


@pytest.fixture
async def scheduler_address(tmp_path):
    settings = SchedulerSettings(
        database_url=f"sqlite:///{tmp_path}/scheduler.db", registry_address="127.0.0.1:1"
    )
    app = await build_app(settings)
    server, port, health = await create_server("127.0.0.1:0", app.bindings, settings=settings)
    await start_server(server, health, app.bindings)
    yield f"127.0.0.1:{port}"
    await server.stop(grace=None)
    await app.shutdown()


class CountingClient:
    """The real client, counting GetExperiment calls."""

    def __init__(self, client: SchedulerClient) -> None:
        self.client = client
        self.gets = 0

    def get(self, experiment_id: str) -> pb.Experiment:
        self.gets += 1
        return self.client.get(experiment_id)

    def watch(self, experiment_id: str):  # type: ignore[no-untyped-def]
        return self.client.watch(experiment_id)


async def test_follows_every_experiment_to_its_terminal_state(scheduler_address):
    # The server runs on this test's event loop: every blocking call goes to a thread.
    with SchedulerClient(scheduler_address) as client:
        ids = [
            (
                await asyncio.to_thread(
                    client.submit, builtin_spec(task, max_steps=5), experiment_id=f"follow-{task}"
                )
            ).experiment_id
            for task in ("add", "copy")
        ]
        counting = CountingClient(client)
        out = io.StringIO()
        console = Console(file=out, width=100)
        following = asyncio.create_task(
            asyncio.to_thread(
                follow_live, counting, ids, console, started=time.monotonic(), refresh_s=0.05
            )
        )
        # Queued, nothing happens for a while: the follower must neither return
        # nor read the experiments on a clock meanwhile.
        await asyncio.sleep(1.5)
        assert not following.done()
        gets_while_idle = counting.gets
        assert gets_while_idle <= 2 * len(ids) * 2, gets_while_idle
        await asyncio.sleep(1.0)
        assert counting.gets == gets_while_idle

        await asyncio.to_thread(client.cancel, ids[0])
        await asyncio.sleep(0.5)
        assert not following.done()  # one is still queued
        await asyncio.to_thread(client.cancel, ids[1])
        results = await asyncio.wait_for(following, timeout=10)

    assert [r.experiment.experiment_id for r in results] == ids
    for result in results:
        assert result.experiment.state == pb.EXPERIMENT_STATE_CANCELLED
        assert result.experiment.HasField("end_time")
        assert result.steps == []
    assert "follow-add" in out.getvalue() and "cancelled" in out.getvalue()
