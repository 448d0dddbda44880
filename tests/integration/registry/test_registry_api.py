"""The registry's RPCs end to end: real server on port 0, real client."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from registry_harness import SPEC, make_settings, staging_files, start_registry

from lorafleet.api.registry.v1 import registry_pb2 as pb
from lorafleet.client.registry import RegistryClient, digest_directory, manifest_sha256
from lorafleet.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    LorafleetError,
    NotFound,
)
from lorafleet.registry.manifest import manifest_sha256 as server_manifest_sha256
from lorafleet.registry.testing import write_adapter
from lorafleet.registry.types import FileDigest

READY = pb.VERSION_STATE_READY
DELETED = pb.VERSION_STATE_DELETED


def node_dir(registry, name: str, node: str = "node-a"):
    return registry.settings.file_roots[node] / name


async def publish(registry, parent: int, *, seed: int, adapter_id: str = "exp-1", **kw):
    directory = write_adapter(node_dir(registry, f"{adapter_id}-{seed}"), seed=seed)
    return await registry.client.publish_version(
        adapter_id, directory, expected_parent_version=parent, **kw
    )


async def test_create_get_list_with_pagination(registry):
    client = registry.client
    for i in range(5):
        await client.create_adapter(
            f"a-{i}", lora=SPEC, base_model="tiny", experiment_id="exp-x" if i % 2 else ""
        )
    first = await client.stub.ListAdapters(pb.ListAdaptersRequest(page_size=2))
    assert [a.adapter_id for a in first.adapters] == ["a-0", "a-1"]
    assert first.next_page_token
    assert [a.adapter_id for a in await client.list_adapters(page_size=2)] == [
        f"a-{i}" for i in range(5)
    ]
    assert [a.adapter_id for a in await client.list_adapters(experiment_id="exp-x")] == [
        "a-1",
        "a-3",
    ]
    got = await client.get_adapter("a-0")
    assert got.name == "adapters/a-0" and got.lora.rank == 4 and got.latest_version == 0

    with pytest.raises(AlreadyExists) as exc:
        await client.create_adapter("a-0", lora=SPEC, base_model="tiny")
    assert exc.value.reason == "ADAPTER_EXISTS"
    with pytest.raises(NotFound) as exc:
        await client.get_adapter("nope")
    assert exc.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(InvalidArgument) as exc:
        await client.create_adapter("Bad_Id", lora=SPEC, base_model="tiny")
    assert exc.value.reason == "INVALID_ADAPTER_ID"
    with pytest.raises(InvalidArgument) as exc:
        await client.create_adapter("r0", lora={"rank": 0, "alpha": 1}, base_model="tiny")
    assert exc.value.reason == "INVALID_LORA_SPEC"
    # A token only continues the listing it came from.
    with pytest.raises(InvalidArgument) as exc:
        await client._unary(
            client.stub.ListAdapters,
            pb.ListAdaptersRequest(experiment_id="exp-x", page_token=first.next_page_token),
        )
    assert exc.value.reason == "INVALID_PAGE_TOKEN"


async def test_publish_by_reference_then_durable_copy(registry, adapter):
    response = await publish(registry, 0, seed=1, training_step=10, metrics={"reward": 0.5})
    version = response.version
    assert version.version == 1 and version.parent_version == 0
    assert version.state == READY and list(version.aliases) == ["latest"]
    assert version.training_step == 10 and version.metrics["reward"] == 0.5
    source = node_dir(registry, "exp-1-1")
    files, digest = digest_directory(source)
    assert (
        version.sha256
        == digest
        == server_manifest_sha256([FileDigest(f.name, f.sha256, f.size_bytes) for f in files])
    )
    assert response.ref.uri == source.resolve().as_uri()
    assert response.ref.lora.rank == 4 and response.ref.base_model == "tiny-llama"

    await registry.runtime.registry.settle()
    copied = await registry.client.get_version("exp-1", 1)
    assert len(copied.uris) == 2 and copied.uris[1].startswith(
        (registry.settings.data_dir / "blobs").as_uri()
    )
    # The durable copy is what an outside consumer resolves to; the node itself
    # gets its own local path.
    anywhere = await registry.client.resolve("exp-1@latest")
    assert anywhere.ref.uri == copied.uris[1]
    on_node = await registry.client.resolve("exp-1@1", node_id="node-a")
    assert on_node.ref.uri == copied.uris[0]
    assert (await registry.client.get_adapter("exp-1")).latest_version == 1


async def test_upload_download_round_trip(registry, adapter, tmp_path):
    source = write_adapter(tmp_path / "outside", seed=7)
    response = await registry.client.upload_version(
        "exp-1", source, expected_parent_version=0, chunk_size=1000
    )
    assert response.version.version == 1 and response.version.state == READY
    assert response.ref.uri.startswith((registry.settings.data_dir / "blobs").as_uri())
    out = await registry.client.download_version("exp-1", 1, tmp_path / "dl", chunk_size=777)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (out / name).read_bytes() == (source / name).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert manifest_sha256(response.ref.files) == response.ref.sha256


async def test_stale_parent_is_aborted_and_numbers_follow(registry, adapter):
    await publish(registry, 0, seed=1)
    with pytest.raises(Aborted) as exc:
        await publish(registry, 0, seed=2)
    assert exc.value.reason == "PARENT_VERSION_MISMATCH"
    assert exc.value.metadata["latest_version"] == "1"
    await publish(registry, 1, seed=3)
    versions = await registry.client.list_versions("exp-1", include_inactive=True)
    assert [(v.version, v.parent_version) for v in versions] == [(1, 0), (2, 1)]


async def test_resolve_aliases_and_compare_and_set(registry, adapter):
    for parent in range(3):
        await publish(registry, parent, seed=parent)
    client = registry.client
    assert (await client.resolve("exp-1")).version.version == 3
    assert (await client.resolve("exp-1@2")).version.version == 2

    best = await client.set_alias("exp-1", "best", 2, expected_current_version=0)
    assert best.version == 2 and list(best.aliases) == ["best"]
    assert (await client.resolve("exp-1@best")).version.version == 2
    with pytest.raises(Aborted) as exc:
        await client.set_alias("exp-1", "best", 3, expected_current_version=1)
    assert exc.value.reason == "ALIAS_CONFLICT"
    moved = await client.set_alias("exp-1", "best", 3, expected_current_version=2)
    assert list(moved.aliases) == ["latest", "best"]
    assert await client.list_aliases("exp-1") == {"latest": 3, "best": 3}

    with pytest.raises(InvalidArgument) as exc:
        await client.set_alias("exp-1", "latest", 1)
    assert exc.value.reason == "ALIAS_RESERVED"
    with pytest.raises(NotFound) as exc:
        await client.resolve("exp-1@prod")
    assert exc.value.reason == "ALIAS_NOT_FOUND"
    with pytest.raises(NotFound) as exc:
        await client.resolve("exp-1@9")
    assert exc.value.reason == "VERSION_NOT_FOUND"
    await client.delete_alias("exp-1", "best")
    assert await client.list_aliases("exp-1") == {"latest": 3}


async def test_delete_version_protects_aliases(registry, adapter):
    for parent in range(3):
        await publish(registry, parent, seed=parent)
    await registry.runtime.registry.settle()
    client = registry.client
    await client.set_alias("exp-1", "prod", 1)
    for version in (1, 3):  # "prod" and "latest"
        with pytest.raises(FailedPrecondition) as exc:
            await client.delete_version("exp-1", version)
        assert exc.value.reason == "VERSION_ALIASED"
    durable = (await client.get_version("exp-1", 2)).uris[1]
    deleted = await client.delete_version("exp-1", 2)
    assert deleted.state == DELETED and not deleted.uris
    assert not any((registry.settings.data_dir / "blobs").rglob(durable.rsplit("/", 1)[1]))
    with pytest.raises(FailedPrecondition) as exc:
        await client.resolve("exp-1@2")
    assert exc.value.reason == "VERSION_NOT_READY"
    assert [v.version for v in await client.list_versions("exp-1")] == [1, 3]
    all_versions = await client.list_versions("exp-1", include_inactive=True, page_size=1)
    assert [(v.version, v.state) for v in all_versions] == [(1, READY), (2, DELETED), (3, READY)]


async def publish_aliased_history(running, versions: int) -> None:
    """Adapter "exp-1" with versions 1..`versions`, alias "best" on version 1."""
    await running.client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
    await publish(running, 0, seed=0)
    await running.client.set_alias("exp-1", "best", 1)
    for parent in range(1, versions):
        await publish(running, parent, seed=parent)
    await running.runtime.registry.settle()


async def test_retention_keeps_last_k_and_aliased(tmp_path):
    running = await start_registry(make_settings(tmp_path, keep_last_versions=2))
    try:
        client = running.client
        await publish_aliased_history(running, 6)
        ready = [v.version for v in await client.list_versions("exp-1")]
        assert ready == [1, 5, 6]  # aliased 1, last two
        states = {
            v.version: v.state for v in await client.list_versions("exp-1", include_inactive=True)
        }
        assert [states[v] for v in (2, 3, 4)] == [DELETED] * 3
        # Only the kept versions still have registry-owned bytes.
        kept = {
            p.parent.name.split("-")[0]
            for p in (running.settings.data_dir / "blobs").rglob("*.json")
        }
        assert kept == {"00000001", "00000005", "00000006"}
    finally:
        await running.stop()


async def test_retention_waits_for_min_age_without_asking_the_store(database_url, tmp_path):
    """Young versions past keep_last stay until they come of age; until then a
    publish does not even ask the store; a moved alias frees its old version at once."""
    running = await start_registry(
        make_settings(
            tmp_path, database_url=database_url, keep_last_versions=2, retention_min_age_s=2.0
        )
    )
    store = running.runtime.registry._store
    passes: list[str] = []
    real = store.apply_retention

    async def counted(adapter_id, **kw):
        passes.append(adapter_id)
        return await real(adapter_id, **kw)

    store.apply_retention = counted
    try:
        client = running.client
        await publish_aliased_history(running, 5)
        assert [v.version for v in await client.list_versions("exp-1")] == [1, 2, 3, 4, 5]
        # Passes after v1, the alias, v2, v3 and v4; after v4 the oldest retirable
        # version (v2; v1 is aliased) is known to be too young, so v5's is skipped.
        assert len(passes) == 5

        await asyncio.sleep(2.1)
        await publish(running, 5, seed=5)
        await running.runtime.registry.settle()
        assert [v.version for v in await client.list_versions("exp-1")] == [1, 5, 6]

        await client.set_alias("exp-1", "best", 6)
        await running.runtime.registry.settle()
        assert [v.version for v in await client.list_versions("exp-1")] == [5, 6]
    finally:
        await running.stop()


async def test_watch_replays_then_streams_new_versions(registry, adapter):
    await publish(registry, 0, seed=0)
    seen: list[int] = []
    done = asyncio.Event()

    async def consume():
        async for message in registry.client.watch(["exp-1"], after_version=0):
            seen.append(message.version.version)
            assert message.ref.sha256 == message.version.sha256
            if len(seen) == 2:
                done.set()
                return

    task = asyncio.create_task(consume())
    await asyncio.sleep(0.3)  # the watch is open before the next publishes
    await publish(registry, 1, seed=1)
    await publish(registry, 2, seed=2)
    await asyncio.wait_for(done.wait(), 5)
    await task
    assert seen == [2, 3]

    replayed = []
    async for message in registry.client.watch(["exp-1"], after_version=1):
        replayed.append(message.version.version)
        if len(replayed) == 2:
            break
    assert replayed == [2, 3]


async def test_watch_sees_versions_published_through_another_replica(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'shared.db'}"
    a = await start_registry(make_settings(tmp_path / "a", database_url=url, replica_id="a"))
    b = await start_registry(make_settings(tmp_path / "b", database_url=url, replica_id="b"))
    try:
        await a.client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
        watch = b.client.watch(["exp-1"])
        first = asyncio.ensure_future(watch.__anext__())
        await asyncio.sleep(0.3)
        await publish(a, 0, seed=0)
        message = await asyncio.wait_for(first, 5)
        assert message.version.version == 1
        await watch.aclose()
    finally:
        await b.stop()
        await a.stop()


async def test_request_id_replay_and_reuse(registry, adapter):
    rid = str(uuid.uuid4())
    first = await publish(registry, 0, seed=1, request_id=rid)
    again = await publish(registry, 0, seed=1, request_id=rid)
    assert again == first
    assert [v.version for v in await registry.client.list_versions("exp-1")] == [1]
    with pytest.raises(InvalidArgument) as exc:
        await publish(registry, 0, seed=1, request_id=rid, training_step=99)
    assert exc.value.reason == "REQUEST_ID_REUSED"

    alias_rid = str(uuid.uuid4())
    await registry.client.set_alias("exp-1", "best", 1, request_id=alias_rid)
    await registry.client.delete_alias("exp-1", "best")
    # The replay answers from the stored first answer, it does not redo the change.
    replay = await registry.client.set_alias("exp-1", "best", 1, request_id=alias_rid)
    assert list(replay.aliases) == ["latest", "best"]
    assert await registry.client.list_aliases("exp-1") == {"latest": 1}


async def test_replay_survives_restart(tmp_path):
    settings = make_settings(tmp_path)
    running = await start_registry(settings)
    rid = str(uuid.uuid4())
    try:
        await running.client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
        first = await publish(running, 0, seed=1, request_id=rid)
    finally:
        await running.stop()
    running = await start_registry(settings)
    try:
        again = await publish(running, 0, seed=1, request_id=rid)
        assert again == first
        assert len(await running.client.list_versions("exp-1", include_inactive=True)) == 1
    finally:
        await running.stop()


async def test_delete_adapter_requires_force_with_aliases(registry, adapter):
    await publish(registry, 0, seed=0)
    await registry.client.set_alias("exp-1", "prod", 1)
    with pytest.raises(FailedPrecondition) as exc:
        await registry.client.delete_adapter("exp-1")
    assert exc.value.reason == "ADAPTER_HAS_ALIASES"
    await registry.runtime.registry.settle()
    await registry.client.delete_adapter("exp-1", force=True)
    with pytest.raises(NotFound):
        await registry.client.get_adapter("exp-1")
    assert not any(p.is_file() for p in (registry.settings.data_dir / "blobs").rglob("*"))


def test_blocking_client(registry_in_thread):
    with RegistryClient(registry_in_thread) as client:
        client.create_adapter("sync-1", lora=SPEC, base_model="tiny")
        assert client.get_adapter("sync-1").adapter_id == "sync-1"
        assert [a.adapter_id for a in client.list_adapters()] == ["sync-1"]


async def test_abandoned_pending_publish_is_taken_over_after_its_lease(tmp_path):
    running = await start_registry(make_settings(tmp_path, pending_lease_s=0.5))
    try:
        await running.client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
        # A publish of a replica that died mid-way: its PENDING row stays behind.
        await running.runtime.store.reserve_version(
            "exp-1",
            expected_parent_version=0,
            files=(),
            sha256="",
            size_bytes=0,
            training_step=0,
            metrics={},
            source_uri="",
            request_id="ghost",
            attempt_id="f" * 32,
            owner="dead-replica",
            lease_s=0.5,
        )
        with pytest.raises(Aborted) as exc:
            await publish(running, 0, seed=1)
        assert exc.value.reason == "PUBLISH_IN_PROGRESS"
        await asyncio.sleep(0.6)
        response = await publish(running, 0, seed=2)
        assert response.version.version == 1
        versions = await running.client.list_versions("exp-1", include_inactive=True)
        assert [(v.version, v.state) for v in versions] == [(1, READY)]
    finally:
        await running.stop()


async def test_cancelled_and_stalled_uploads_release_their_number(tmp_path):
    running = await start_registry(make_settings(tmp_path, upload_idle_timeout_s=0.5))
    client = running.client
    try:
        await client.create_adapter("exp-1", lora=SPEC, base_model="tiny")
        source = write_adapter(tmp_path / "src")
        files, _ = digest_directory(source)
        header = pb.UploadVersionHeader(
            request_id="stall", adapter_id="exp-1", expected_parent_version=0, files=files
        )
        started = asyncio.Event()

        async def stalls():
            yield pb.UploadVersionRequest(header=header)
            yield pb.UploadVersionRequest(
                chunk=pb.FileChunk(file_name=files[0].name, offset=0, data=b"{")
            )
            started.set()
            await asyncio.Event().wait()

        # The server gives up on a silent stream.
        with pytest.raises(LorafleetError) as exc:
            await client._unary(client.stub.UploadVersion, stalls(), 10)
        assert exc.value.reason == "UPLOAD_IDLE_TIMEOUT"

        # The client gives up (cancels) mid-stream.
        started.clear()
        call = asyncio.ensure_future(client._unary(client.stub.UploadVersion, stalls(), 10))
        await started.wait()
        await asyncio.sleep(0.1)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        for _ in range(50):
            if not await client.list_versions("exp-1", include_inactive=True):
                break
            await asyncio.sleep(0.05)
        assert await client.list_versions("exp-1", include_inactive=True) == []

        response = await client.upload_version("exp-1", source, expected_parent_version=0)
        assert response.version.version == 1
        assert staging_files(running.settings) == []
    finally:
        await running.stop()
