"""N concurrent publishers on the same parent, through two registry replicas
sharing one database: exactly one wins per round, the rest are ABORTED, and the
version numbers have no gaps or duplicates. On SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio

from registry_harness import SPEC, make_settings, start_registry

from lorafleet.api.registry.v1 import registry_pb2 as pb
from lorafleet.core.errors import Aborted
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
