"""The adapter manager against a named fake engine and an in-memory resolver:
resolution caching, loading by reference, digests, LRU eviction, preloading."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from lorafleet.core.errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)
from lorafleet.rollout.adapters import DOWNLOADS_DIR, AdapterManager, manifest_sha256
from lorafleet.rollout.resolvers import InMemoryResolver
from lorafleet.rollout.testing import FakeEngine, write_fake_adapter
from lorafleet.rollout.types import AdapterSelection, FileDigest

sel = AdapterSelection.parse


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    path = tmp_path / "cache"
    path.mkdir()
    return path


@pytest.fixture
def resolver() -> InMemoryResolver:
    return InMemoryResolver()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(max_loras=2, max_cpu_loras=3, max_lora_rank=16)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def manager(resolver, engine, cache, clock):
    await engine.start()
    mgr = AdapterManager(resolver, engine, cache_dir=cache, alias_ttl_s=2.0, clock=clock)
    await mgr.start()
    yield mgr
    await mgr.close()


def publish(
    resolver: InMemoryResolver, cache: Path, adapter_id: str, *, seed: int = 0, rank: int = 4
) -> object:
    version = len(resolver._versions.get(adapter_id, {})) + 1
    directory = write_fake_adapter(cache / adapter_id / str(version), rank=rank, seed=seed)
    return resolver.publish(adapter_id, directory)


async def wait_for(predicate, timeout_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_selection_parsing():
    assert sel("exp") == AdapterSelection("exp", None, "latest")
    assert sel("exp@latest") == AdapterSelection("exp", None, "latest")
    assert sel("exp@7").version == 7
    assert sel("exp@best").alias == "best"
    assert str(sel("exp@7")) == "exp@7"
    for bad, reason in [
        ("Exp", "INVALID_ADAPTER_ID"),
        ("", "INVALID_ADAPTER_ID"),
        ("exp@0", "INVALID_ADAPTER_VERSION"),
        ("exp@Best!", "INVALID_ADAPTER_ALIAS"),
    ]:
        with pytest.raises(InvalidArgument) as err:
            sel(bad)
        assert err.value.reason == reason


def test_manifest_digest_matches_proto_definition():
    files = [FileDigest("b", "22", 2), FileDigest("a", "11", 1)]
    import hashlib

    expected = hashlib.sha256(b"a\t11\t1\nb\t22\t2\n").hexdigest()
    assert manifest_sha256(files) == expected


async def test_file_uri_in_cache_is_loaded_in_place(manager, resolver, engine, cache):
    ref = publish(resolver, cache, "exp")
    loaded = await manager.load(sel("exp@1"))
    assert loaded.source == "local"
    assert loaded.path == str((cache / "exp" / "1").resolve())
    assert loaded.engine_name == "exp@1"
    assert engine.added == ["exp@1"]
    assert ref.uri.startswith("file://")
    assert not (cache / DOWNLOADS_DIR).exists()


async def test_version_outside_roots_is_downloaded_and_verified(
    manager, resolver, engine, cache, tmp_path
):
    elsewhere = write_fake_adapter(tmp_path / "elsewhere" / "v1", seed=3)
    resolver.publish("exp", elsewhere)
    loaded = await manager.load(sel("exp"))
    assert loaded.source == "download"
    path = Path(loaded.path)
    assert path.is_relative_to(cache / DOWNLOADS_DIR)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert (path / name).read_bytes() == (elsewhere / name).read_bytes()
    # No temporary directories left behind.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


async def test_corrupt_download_is_data_loss_and_not_loaded(manager, resolver, engine, tmp_path):
    elsewhere = write_fake_adapter(tmp_path / "elsewhere" / "v1", seed=3)
    resolver.publish("exp", elsewhere)
    real_download = resolver.download

    async def corrupting(ref, dest):
        await real_download(ref, dest)
        with open(dest / "adapter_model.safetensors", "r+b") as f:
            f.seek(-1, 2)
            f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")

    resolver.download = corrupting
    with pytest.raises(DataLoss) as err:
        await manager.load(sel("exp@1"))
    assert err.value.reason == "CHECKSUM_MISMATCH"
    assert engine.added == []


async def test_local_copy_not_matching_its_digest_is_downloaded_instead(
    manager, resolver, engine, cache, tmp_path
):
    good = write_fake_adapter(tmp_path / "good", seed=1)
    bad = write_fake_adapter(cache / "exp" / "1", seed=2)  # same shape, other bytes
    resolver.publish("exp", good, uri=bad.as_uri())
    loaded = await manager.load(sel("exp@1"))
    assert loaded.source == "download"
    assert (Path(loaded.path) / "adapter_model.safetensors").read_bytes() == (
        good / "adapter_model.safetensors"
    ).read_bytes()


async def test_unknown_adapter_and_version_are_not_found(manager, resolver, cache):
    with pytest.raises(NotFound):
        await manager.load(sel("nope"))
    publish(resolver, cache, "exp")
    with pytest.raises(NotFound) as err:
        await manager.load(sel("exp@5"))
    assert err.value.reason == "VERSION_NOT_FOUND"


async def test_rank_above_engine_max_is_refused_before_the_engine(
    manager, resolver, engine, cache, tmp_path
):
    publish(resolver, cache, "big", rank=32)
    with pytest.raises(FailedPrecondition) as err:
        await manager.load(sel("big"))
    assert err.value.reason == "RANK_ABOVE_ENGINE_MAX"
    assert engine.added == []

    # A registry that states the rank lets the manager refuse before downloading.
    directory = write_fake_adapter(tmp_path / "remote", rank=32)
    ref = resolver.publish("big2", directory, rank=32)
    downloads = []
    resolver.download = lambda *a: downloads.append(a)  # type: ignore[assignment]
    with pytest.raises(FailedPrecondition):
        await manager.load(ref)
    assert downloads == []


async def test_lru_prefers_superseded_versions_and_reloads_evicted_ones(
    manager, resolver, engine, cache
):
    for aid in ("a", "b", "c"):
        publish(resolver, cache, aid)
        await manager.load(sel(aid))
    async with manager.use(sel("a")):  # a is now the most recently used
        pass
    publish(resolver, cache, "a", seed=9)
    await manager.load(sel("a@2"))
    # Full (3 slots): a@1 was superseded by a@2, so it goes before b (the LRU).
    assert engine.removed == ["a@1"]
    assert {v.engine_name for v in manager.list_loaded()} == {"a@2", "b@1", "c@1"}

    publish(resolver, cache, "d")
    await manager.load(sel("d"))
    assert engine.removed == ["a@1", "b@1"]  # then plain LRU

    # The evicted version is READY: the next request reloads it, never NOT_FOUND.
    async with manager.use(sel("b@1")) as adapter:
        assert adapter.name == "b@1"
        assert adapter.engine_id in engine.loaded
    assert engine.added.count("b@1") == 2
    assert engine.served_unloaded == []
    assert len(engine.loaded) <= engine.max_cpu_loras


async def test_engine_ids_are_unique_per_version_and_stable(manager, resolver, engine, cache):
    publish(resolver, cache, "a")
    publish(resolver, cache, "a", seed=1)
    async with manager.use(sel("a@1")) as v1, manager.use(sel("a@2")) as v2:
        assert v1.engine_id != v2.engine_id
        assert (v1.name, v2.name) == ("a@1", "a@2")
    await manager.unload("a", 1)
    async with manager.use(sel("a@1")) as again:
        assert again.engine_id == v1.engine_id


async def test_pinned_versions_are_never_evicted(resolver, cache, clock):
    engine = FakeEngine(max_loras=1, max_cpu_loras=1)
    await engine.start()
    mgr = AdapterManager(resolver, engine, cache_dir=cache, clock=clock)
    for aid in ("a", "b", "c"):
        publish(resolver, cache, aid)
    async with mgr.use(sel("a")) as a:
        await mgr.load(sel("b"))
        assert a.engine_id in engine.loaded  # overflow rather than pull it from under a request
    await mgr.load(sel("c"))
    assert "a@1" in engine.removed
    with pytest.raises(FailedPrecondition):
        async with mgr.use(sel("c")):
            await mgr.unload("c")
    await mgr.close()


async def test_alias_cache_ttl_and_watch_invalidation(manager, resolver, cache, clock):
    publish(resolver, cache, "exp")
    await asyncio.sleep(0)  # let the watch subscribe
    assert (await manager.resolve(sel("exp"))).version == 1
    calls = resolver.resolve_calls
    assert (await manager.resolve(sel("exp@latest"))).version == 1
    assert resolver.resolve_calls == calls  # cached

    publish(resolver, cache, "exp", seed=1)
    await wait_for(lambda: manager._aliases.get(("exp", "latest"), (None,))[0].version == 2)
    assert (await manager.resolve(sel("exp"))).version == 2
    assert resolver.resolve_calls == calls  # the watch event answered it

    resolver.set_alias("exp", "best", 1)
    assert (await manager.resolve(sel("exp@best"))).version == 1
    resolver.set_alias("exp", "best", 2)
    assert (await manager.resolve(sel("exp@best"))).version == 1  # within the TTL
    clock.now += 2.5
    assert (await manager.resolve(sel("exp@best"))).version == 2


async def test_stale_alias_is_served_while_the_registry_is_down(manager, resolver, cache, clock):
    publish(resolver, cache, "exp")
    assert (await manager.resolve(sel("exp"))).version == 1

    async def down(selection):
        raise Unavailable("registry down")

    resolver.resolve = down  # type: ignore[assignment]
    clock.now += 60
    assert (await manager.resolve(sel("exp"))).version == 1
    with pytest.raises(Unavailable):
        await manager.resolve(sel("other"))


async def test_new_versions_of_served_adapters_are_preloaded(manager, resolver, engine, cache):
    publish(resolver, cache, "served")
    publish(resolver, cache, "idle")
    async with manager.use(sel("served")):
        pass
    await asyncio.sleep(0)
    publish(resolver, cache, "served", seed=5)
    publish(resolver, cache, "idle", seed=5)
    await wait_for(lambda: manager.is_loaded("served", 2))
    assert not manager.is_loaded("idle", 2)
    # Unloading every version stops preloading the adapter.
    await manager.unload("served")
    publish(resolver, cache, "served", seed=6)
    await asyncio.sleep(0.05)
    assert not manager.is_loaded("served", 3)


async def test_engine_restart_drops_the_loaded_set(manager, resolver, engine, cache):
    publish(resolver, cache, "exp")
    await manager.load(sel("exp"))
    engine.restart()
    assert manager.list_loaded() == []
    async with manager.use(sel("exp")) as adapter:
        assert adapter.engine_id in engine.loaded
    assert engine.added == ["exp@1", "exp@1"]


async def test_concurrent_requests_share_one_load(manager, resolver, engine, cache):
    publish(resolver, cache, "exp")

    async def one():
        async with manager.use(sel("exp@1")) as adapter:
            return adapter.engine_id

    ids = await asyncio.gather(*(one() for _ in range(10)))
    assert len(set(ids)) == 1
    assert engine.added == ["exp@1"]


async def test_vanished_files_are_fetched_again(manager, resolver, engine, cache, tmp_path):
    source = write_fake_adapter(tmp_path / "remote", seed=4)
    resolver.publish("exp", source)
    first = await manager.load(sel("exp"))
    shutil.rmtree(first.path)
    async with manager.use(sel("exp")) as adapter:
        assert Path(adapter.path, "adapter_config.json").is_file()
    assert engine.added == ["exp@1", "exp@1"]


async def test_replayed_older_version_event_does_not_move_latest_back(manager, resolver, cache):
    publish(resolver, cache, "exp")
    second = publish(resolver, cache, "exp", seed=1)
    first = await resolver.resolve(sel("exp@1"))
    manager._handle_watch_event(second)
    manager._handle_watch_event(first)
    assert (await manager.resolve(sel("exp@latest"))).version == 2
