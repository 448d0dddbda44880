"""The co-located node's pieces without a model: in-memory versions (what is
shared, immutability, retention), the node's adapter manager over a named fake
engine (memory first, files otherwise), and its settings."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from lorafleet.core.errors import FailedPrecondition  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.node.adapters import NodeAdapterManager  # noqa: E402
from lorafleet.node.config import NodeSettings  # noqa: E402
from lorafleet.node.memory import MemoryVersions, memory_uri  # noqa: E402
from lorafleet.rollout.adapters import AdapterManager, digest_directory  # noqa: E402
from lorafleet.rollout.resolvers import InMemoryResolver  # noqa: E402
from lorafleet.rollout.testing import FakeEngine, write_fake_adapter  # noqa: E402
from lorafleet.rollout.types import AdapterRef, AdapterSelection  # noqa: E402
from lorafleet.trainer.config import TrainerSettings  # noqa: E402

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj",))
sel = AdapterSelection.parse


def tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 8, generator=g),
        "model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(8, 4, generator=g),
    }


def registry_ref(adapter_id: str, version: int, sha: str) -> AdapterRef:
    return AdapterRef(adapter_id, version, f"file:///cache/{adapter_id}/v{version}", sha256=sha)


# -- MemoryVersions -------------------------------------------------------------------------


def test_published_version_resolves_to_the_stashed_tensors_themselves():
    memory = MemoryVersions("node-0")
    t = tensors(1)
    memory.stash("sha-1", SPEC, t)
    held = memory.publish(registry_ref("exp", 1, "sha-1"))
    assert held is not None
    assert held.ref.uri == memory_uri("node-0", "exp", 1) == "mem://node-0/exp/1"
    assert held.registry_uri == "file:///cache/exp/v1"
    assert held.ref.rank == 4 and held.ref.sha256 == "sha-1"
    weights = memory.get("mem://node-0/exp/1")
    assert weights is not None and weights.source == "memory"
    # Shared, not copied: the same tensor objects.
    assert all(weights.tensors[k] is t[k] for k in t)
    with pytest.raises(TypeError):
        weights.tensors["x"] = torch.zeros(1)  # type: ignore[index]
    assert memory.get("mem://node-0/exp/2") is None


def test_publish_needs_the_stashed_digest_and_replays_are_harmless():
    memory = MemoryVersions("n")
    assert memory.publish(registry_ref("exp", 1, "unknown")) is None
    memory.stash("sha-1", SPEC, tensors(1))
    first = memory.publish(registry_ref("exp", 1, "sha-1"))
    # A replayed SaveVersion answers the same ref again: same entry, nothing new.
    assert memory.publish(registry_ref("exp", 1, "sha-1")) is first
    assert len(memory) == 1 and memory.published == 1


def test_snapshot_detects_in_place_writes():
    memory = MemoryVersions("n")
    t = tensors(1)
    snapshot = memory.stash("sha-1", SPEC, t)
    assert snapshot.intact()
    with torch.no_grad():
        t["model.layers.0.self_attn.q_proj.lora_B.weight"].mul_(2)
    assert not snapshot.intact()


def test_retention_drops_superseded_versions_first():
    memory = MemoryVersions("n", capacity=3)
    for i, (adapter_id, version) in enumerate([("a", 1), ("b", 1), ("a", 2), ("c", 1)]):
        memory.stash(f"sha-{i}", SPEC, tensors(i))
        memory.publish(registry_ref(adapter_id, version, f"sha-{i}"))
    held = {(a, v) for a, v in [("a", 1), ("a", 2), ("b", 1), ("c", 1)]
            if memory.lookup(a, v) is not None}
    assert held == {("a", 2), ("b", 1), ("c", 1)}
    assert memory.dropped == 1
    assert memory.latest("a").ref.version == 2  # type: ignore[union-attr]
    assert memory.latest("zzz") is None


# -- NodeAdapterManager ---------------------------------------------------------------------


class MemoryFakeEngine(FakeEngine):
    """FakeEngine that also accepts mem:// paths (no file behind them)."""

    def __init__(self, memory: MemoryVersions, **kwargs) -> None:
        super().__init__(**kwargs)
        self.memory = memory
        self.paths: list[str] = []

    async def add_adapter(self, adapter) -> None:
        self.paths.append(adapter.path)
        if adapter.path.startswith("mem://"):
            if self.memory.get(adapter.path) is None:
                raise FailedPrecondition("not held", reason="ADAPTER_LOAD_FAILED")
            self.loaded[adapter.engine_id] = adapter
            self.added.append(adapter.name)
            return
        await super().add_adapter(adapter)


@pytest.fixture
async def node(tmp_path: Path):
    memory = MemoryVersions("n0", capacity=8)
    engine = MemoryFakeEngine(memory, max_loras=2, max_cpu_loras=3, max_lora_rank=16)
    await engine.start()
    resolver = InMemoryResolver()
    cache = tmp_path / "cache"
    inner = AdapterManager(resolver, engine, cache_dir=cache, watch=False)
    manager = NodeAdapterManager(inner, memory)
    await manager.start()

    def publish(adapter_id: str, *, in_memory: bool) -> AdapterRef:
        """What SaveVersion does on the node: files + registry, and the snapshot."""
        directory = write_fake_adapter(cache / adapter_id / f"v{_next(adapter_id)}")
        ref = resolver.publish(adapter_id, directory)
        if in_memory:
            _, sha = digest_directory(directory)
            memory.stash(sha, SPEC, tensors(ref.version))
            assert memory.publish(ref) is not None
        return ref

    versions: dict[str, int] = {}

    def _next(adapter_id: str) -> int:
        versions[adapter_id] = versions.get(adapter_id, 0) + 1
        return versions[adapter_id]

    try:
        yield manager, engine, resolver, publish
    finally:
        await manager.close()


async def test_versions_held_in_memory_are_served_from_memory(node):
    manager, engine, resolver, publish = node
    publish("exp", in_memory=True)
    calls = resolver.resolve_calls
    async with manager.use(sel("exp@1")) as adapter:
        assert adapter.path == "mem://n0/exp/1"
    # A fixed version held in memory needs no registry round trip.
    assert resolver.resolve_calls == calls
    assert engine.paths == ["mem://n0/exp/1"]
    loaded = manager.list_loaded()
    assert [(v.engine_name, v.source) for v in loaded] == [("exp@1", "memory")]


async def test_other_versions_take_the_file_path(node):
    manager, engine, _, publish = node
    publish("other", in_memory=False)
    async with manager.use(sel("other@latest")) as adapter:
        assert not adapter.path.startswith("mem://")
    assert {(v.engine_name, v.source) for v in manager.list_loaded()} == {("other@1", "local")}


async def test_latest_sees_a_new_memory_version_before_the_registry_cache_does(node):
    manager, _, _, publish = node
    publish("exp", in_memory=True)
    async with manager.use(sel("exp@latest")) as adapter:
        assert adapter.version == 1
    publish("exp", in_memory=True)  # the inner manager's alias cache still says v1
    async with manager.use(sel("exp@latest")) as adapter:
        assert adapter.version == 2 and adapter.path == "mem://n0/exp/2"


async def test_memory_versions_share_the_slots_and_superseded_go_first(node):
    manager, engine, _, publish = node
    publish("a", in_memory=True)
    publish("b", in_memory=True)
    publish("a", in_memory=True)
    for name in ("a@1", "b@1", "a@2"):
        async with manager.use(sel(name)):
            pass
    publish("c", in_memory=True)
    async with manager.use(sel("c@1")):
        pass
    # max_cpu_loras 3: a@1 (superseded by a@2) made room, although b@1 is older.
    assert {v.engine_name for v in manager.list_loaded()} == {"b@1", "a@2", "c@1"}
    assert engine.removed == ["a@1"]
    # Evicted versions come back transparently.
    async with manager.use(sel("a@1")) as adapter:
        assert adapter.path == "mem://n0/a/1"


async def test_unloading_a_busy_memory_version_is_refused(node):
    manager, _, _, publish = node
    publish("exp", in_memory=True)
    async with manager.use(sel("exp@1")):
        with pytest.raises(FailedPrecondition) as err:
            await manager.unload("exp")
        assert err.value.reason == "ADAPTER_IN_USE"
    assert await manager.unload("exp") == 1
    assert manager.list_loaded() == []


# -- settings -------------------------------------------------------------------------------


def test_node_settings_cover_every_trainer_setting(monkeypatch):
    missing = set(TrainerSettings.model_fields) - set(NodeSettings.model_fields)
    assert not missing, f"NodeSettings lacks trainer settings {missing}"
    monkeypatch.setenv("LORAFLEET_NODE_MAX_RANK", "12")
    monkeypatch.setenv("LORAFLEET_TRAINER_MAX_ADAPTERS", "3")  # another service's variable
    trainer = NodeSettings(node_id="n7").trainer_settings(model_path="/m")
    assert trainer.max_rank == 12 and trainer.node_id == "n7" and trainer.model_path == "/m"
    assert trainer.max_adapters == NodeSettings.model_fields["max_adapters"].default


def test_serve_knows_the_node():
    from lorafleet.cli.serve import SERVICES, _load

    settings_path, build_path = SERVICES["node"]
    assert _load(settings_path) is NodeSettings
    assert callable(_load(build_path))


def test_node_trainer_uses_every_core_by_default():
    # Unlike a trainer beside a separate vLLM engine (half the cores), the node's
    # rollout takes turns with training on one model.
    import os

    cores = len(os.sched_getaffinity(0))
    assert NodeSettings(node_id="n").trainer_settings(model_path="/m").torch_threads == cores
    explicit = NodeSettings(node_id="n", torch_threads=3).trainer_settings(model_path="/m")
    assert explicit.torch_threads == 3
