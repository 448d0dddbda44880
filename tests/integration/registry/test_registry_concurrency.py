"""Two registry replicas sharing one database: N concurrent publishers on the
same parent get exactly one winner per round (the rest ABORTED) and version
numbers without gaps or duplicates; a client given both replicas carries on
when one stops. On SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest
from registry_harness import SPEC, make_settings, start_registry

from lorafleet.api.registry.v1 import registry_pb2 as pb
from lorafleet.client.registry import AsyncRegistryClient
from lorafleet.core.errors import Aborted, DeadlineExceeded, Unavailable
from lorafleet.registry.testing import write_adapter

PUBLISHERS = 8
ROUNDS = 4


async def test_concurrent_publishers_one_winner_no_gaps(database_url, tmp_path):
    nodes = {"node-a": tmp_path / "nodes"}
    replicas = [
        await start_registry(
            make_settings(
                tmp_path / name, database_url=database_url, replica_id=name, file_roots=nodes
            )
        )
        for name in ("replica-a", "replica-b")
    ]
    try:
        await replicas[0].client.create_adapter("exp-race", lora=SPEC, base_model="tiny")
        for round_ in range(ROUNDS):
            parent = round_
            dirs = [
                write_adapter(tmp_path / "nodes" / f"r{round_}-p{i}", seed=round_ * 100 + i)
                for i in range(PUBLISHERS)
            ]
            results = await asyncio.gather(
                *(
                    replicas[i % 2].client.publish_version(
                        "exp-race", directory, expected_parent_version=parent
                    )
                    for i, directory in enumerate(dirs)
                ),
                return_exceptions=True,
            )
            winners = [r for r in results if isinstance(r, pb.PublishVersionResponse)]
            losers = [r for r in results if not isinstance(r, pb.PublishVersionResponse)]
            assert len(winners) == 1, results
            assert winners[0].version.version == parent + 1
            assert all(isinstance(e, Aborted) for e in losers), losers
            assert {e.reason for e in losers} <= {"PUBLISH_IN_PROGRESS", "PARENT_VERSION_MISMATCH"}

        for replica in replicas:
            versions = await replica.client.list_versions("exp-race", include_inactive=True)
            assert [(v.version, v.parent_version, v.state) for v in versions] == [
                (n, n - 1, pb.VERSION_STATE_READY) for n in range(1, ROUNDS + 1)
            ]
            assert (await replica.client.get_adapter("exp-race")).latest_version == ROUNDS
    finally:
        for replica in replicas:
            await replica.stop()


async def test_a_client_given_both_replicas_goes_around_one_that_stops(database_url, tmp_path):
    nodes = {"node-a": tmp_path / "nodes"}
    # One blob store, as replicas share it in production (a claim, a bucket).
    replicas = [
        await start_registry(
            make_settings(
                tmp_path / name,
                database_url=database_url,
                replica_id=name,
                file_roots=nodes,
                data_dir=tmp_path / "shared" / "registry",
            )
        )
        for name in ("replica-a", "replica-b")
    ]
    first, second = replicas
    running = list(replicas)
    both = AsyncRegistryClient(f"{first.address},{second.address}", timeout_s=5)
    only_first = AsyncRegistryClient(first.address, timeout_s=5)
    try:
        assert both.follows_replicas and not only_first.follows_replicas
        await both.create_adapter("exp-both", lora=SPEC, base_model="tiny")
        for n in range(1, 4):
            directory = write_adapter(tmp_path / "nodes" / f"v{n}", seed=n)
            published = await both.publish_version(
                "exp-both", directory, expected_parent_version=n - 1
            )
            assert published.version.version == n

        await first.stop()
        running.remove(first)
        with pytest.raises(Unavailable):  # the stopped replica alone
            await only_first.get_adapter("exp-both")
        # Given both: every call lands on the replica that still serves.
        for _ in range(6):
            assert (await both.get_adapter("exp-both")).latest_version == 3
        directory = write_adapter(tmp_path / "nodes" / "v4", seed=4)
        republished = await both.publish_version("exp-both", directory, expected_parent_version=3)
        assert republished.version.version == 4

        await second.stop()
        running.remove(second)
        # None serves: a call waits for a replica until its deadline, then fails.
        async with AsyncRegistryClient(f"{first.address},{second.address}", timeout_s=1) as late:
            with pytest.raises(DeadlineExceeded):
                await late.get_adapter("exp-both")
    finally:
        await both.close()
        await only_first.close()
        for replica in running:
            await replica.stop()
