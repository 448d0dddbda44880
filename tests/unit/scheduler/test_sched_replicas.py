"""Two scheduler replicas over one database, each a real gRPC server: one leads,
the other stands by (health NOT_SERVING, calls refused with NOT_LEADER, nothing
changed), and takes over when the leader stops."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.client.scheduler import AsyncSchedulerClient, builtin_spec
from lorafleet.core.app import ServiceApp
from lorafleet.core.channel import make_channel
from lorafleet.core.config import ConfigError, load_settings
from lorafleet.core.errors import Unavailable
from lorafleet.core.server import create_server, start_server
from lorafleet.scheduler.app import SERVICE, build_app
from lorafleet.scheduler.config import SchedulerSettings, StaticNode

LEASE = {"lease_duration_s": 3.0, "lease_renew_deadline_s": 2.0, "lease_retry_period_s": 0.2}


@dataclass
class Replica:
    app: ServiceApp
    server: object
    address: str

    async def stop(self) -> None:
        await self.server.stop(grace=None)
        await self.app.shutdown()

    async def health(self, service: str = SERVICE.full_name) -> str:
        async with make_channel(self.address, retry=False) as channel:
            response = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=5
            )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def start_replica(url: str, replica_id: str) -> Replica:
    settings = SchedulerSettings(
        database_url=url,
        replica_id=replica_id,
        advertise_address=f"{replica_id}.example:50052",
        # A node nobody serves: submitted experiments stay QUEUED, which is all
        # these tests need from them.
        nodes=[
            StaticNode(
                node_id="node-0", rollout_address="127.0.0.1:1", trainer_address="127.0.0.1:1"
            )
        ],
        **LEASE,
    )
    app = await build_app(settings)
    server, port, health = await create_server("127.0.0.1:0", app.bindings, settings=settings)
    await start_server(server, health, app.bindings)
    await app.on_started(health, port)
    return Replica(app, server, f"127.0.0.1:{port}")


@pytest.fixture
async def replicas(tmp_path):
    url = f"sqlite:///{tmp_path}/scheduler.db"
    started: list[Replica] = []
    started.append(await start_replica(url, "sched-a"))
    started.append(await start_replica(url, "sched-b"))
    yield started
    for replica in started:
        with contextlib.suppress(Exception):
            await replica.stop()


async def wait_for(condition, timeout_s: float) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


async def test_the_standby_refuses_every_call_and_changes_nothing(replicas):
    leader, standby = replicas
    assert await leader.health() == "SERVING"
    assert await standby.health() == "NOT_SERVING"
    assert await standby.health("") == "SERVING"  # alive, just not leading

    async with AsyncSchedulerClient(standby.address) as client:
        with pytest.raises(Unavailable) as refused:
            await client.submit(builtin_spec("count", max_steps=5), experiment_id="exp-1")
        assert refused.value.reason == "NOT_LEADER"
        assert "'sched-a' at sched-a.example:50052" in refused.value.message
        assert refused.value.metadata == {
            "leader": "sched-a",
            "leader_address": "sched-a.example:50052",
        }
        for call in (client.list(), client.get("exp-1"), client.nodes()):
            with pytest.raises(Unavailable, match="standby"):
                await call
        with pytest.raises(Unavailable, match="standby"):
            async for _ in client.watch("exp-1"):
                pass
    async with AsyncSchedulerClient(leader.address) as client:
        assert await client.list() == []


async def test_the_standby_takes_over_when_the_leader_stops(replicas):
    leader, standby = replicas
    # One process holds both replicas here; the standby reported last.
    assert REGISTRY.get_sample_value("lorafleet_scheduler_leader") == 0
    async with AsyncSchedulerClient(leader.address) as client:
        submitted = await client.submit(builtin_spec("count", max_steps=5), experiment_id="exp-1")
    await leader.stop()  # releases the lease: no wait for it to run out
    started = asyncio.get_running_loop().time()
    await wait_for(lambda: _serving(standby), timeout_s=2.0)
    took = asyncio.get_running_loop().time() - started
    assert took < LEASE["lease_duration_s"], took
    assert REGISTRY.get_sample_value("lorafleet_scheduler_leader") == 1
    async with AsyncSchedulerClient(standby.address) as client:
        got = await client.get("exp-1")
        assert got.experiment_id == submitted.experiment_id
        assert [e.experiment_id for e in await client.list()] == ["exp-1"]


async def test_a_dead_leaders_lease_is_taken_after_its_duration(replicas):
    leader, standby = replicas
    # The leader stops renewing without releasing, as a crashed process would.
    [renewal] = [t for t in asyncio.all_tasks() if t.get_name() == "scheduler-lease-sched-a"]
    renewal.cancel()
    started = asyncio.get_running_loop().time()
    await wait_for(lambda: _serving(standby), timeout_s=10.0)
    took = asyncio.get_running_loop().time() - started
    # Not before the lease ran out on the standby's clock, and soon after.
    assert LEASE["lease_duration_s"] - 0.5 <= took <= LEASE["lease_duration_s"] + 2.0, took
    async with AsyncSchedulerClient(standby.address) as client:
        await client.submit(builtin_spec("count", max_steps=5), experiment_id="exp-2")
        assert [e.experiment_id for e in await client.list()] == ["exp-2"]


async def test_a_client_given_every_replica_follows_the_leader_through_a_failover(replicas):
    leader, standby = replicas
    # The standby first: the channel must route by health, not by order.
    async with AsyncSchedulerClient(f"{standby.address},{leader.address}") as client:
        assert client.follows_replicas
        await client.submit(builtin_spec("count", max_steps=5), experiment_id="exp-1")
        events: list = []
        first_seen = asyncio.Event()

        async def follow() -> None:
            async for event in client.watch("exp-1"):
                events.append(event)
                first_seen.set()

        watching = asyncio.create_task(follow())
        await asyncio.wait_for(first_seen.wait(), timeout=10)
        await leader.stop()  # the watch's stream breaks with its server
        # Made while the standby may not lead yet: the call waits for it.
        cancelled = await client.cancel("exp-1")
        assert cancelled.state == pb.EXPERIMENT_STATE_CANCELLED
        await asyncio.wait_for(watching, timeout=30)
    states = [e.lifecycle.state for e in events if e.WhichOneof("event") == "lifecycle"]
    # Every event once: the reopened stream's replay of the first is skipped.
    assert states == [pb.EXPERIMENT_STATE_QUEUED, pb.EXPERIMENT_STATE_CANCELLED], events


async def test_a_call_made_while_no_replica_leads_waits_for_the_next_leader(replicas):
    leader, standby = replicas
    async with AsyncSchedulerClient(f"{leader.address},{standby.address}") as client:
        await client.submit(builtin_spec("count", max_steps=5), experiment_id="exp-1")
        # The leader crashes: its server goes, its lease is neither renewed nor
        # released, so for the lease's duration no replica leads.
        [renewal] = [t for t in asyncio.all_tasks() if t.get_name() == "scheduler-lease-sched-a"]
        renewal.cancel()
        await leader.server.stop(grace=None)
        started = asyncio.get_running_loop().time()
        got = await client.get("exp-1")
        waited = asyncio.get_running_loop().time() - started
    assert got.experiment_id == "exp-1"
    # It waited for the takeover (well past the channel's own retries, ~1.5 s).
    assert LEASE["lease_duration_s"] - 1.0 <= waited < 20, waited


async def test_a_watch_that_cannot_open_fails_at_once(replicas):
    _leader, standby = replicas
    async with AsyncSchedulerClient(standby.address) as client:
        assert not client.follows_replicas
        started = asyncio.get_running_loop().time()
        with pytest.raises(Unavailable) as refused:
            async for _ in client.watch("exp-1"):
                pass
    assert refused.value.reason == "NOT_LEADER"
    assert asyncio.get_running_loop().time() - started < 10  # no reconnecting


async def _serving(replica: Replica) -> bool:
    return await replica.health() == "SERVING"


def test_lease_timings_out_of_order_are_a_config_error(monkeypatch):
    monkeypatch.setenv("LORAFLEET_SCHEDULER_LEASE_RENEW_DEADLINE_S", "20")
    with pytest.raises(
        ConfigError, match=r"lease_renew_deadline_s < lease_duration_s \(got 2, 20, 15\)"
    ):
        load_settings(SchedulerSettings)
