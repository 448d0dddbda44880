"""The co-located node's metrics: versions held in memory, memory loads in the
rollout's adapter-load histogram (source="memory"), and the scrape-time gauges."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from prometheus_client import REGISTRY  # noqa: E402

from lorafleet.core.errors import FailedPrecondition  # noqa: E402
from lorafleet.lora.spec import LoraSpec  # noqa: E402
from lorafleet.node import metrics as node_metrics  # noqa: E402
from lorafleet.node.adapters import NodeAdapterManager  # noqa: E402
from lorafleet.node.memory import MemoryVersions  # noqa: E402
from lorafleet.rollout.adapters import AdapterManager, digest_directory  # noqa: E402
from lorafleet.rollout.resolvers import InMemoryResolver  # noqa: E402
from lorafleet.rollout.testing import FakeEngine, write_fake_adapter  # noqa: E402
from lorafleet.rollout.types import AdapterSelection  # noqa: E402

SPEC = LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj",))


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class MemoryEngine(FakeEngine):
    """FakeEngine that also takes mem:// paths (there is no file behind them)."""

    def __init__(self, memory: MemoryVersions, **kwargs) -> None:
        super().__init__(**kwargs)
        self.memory = memory

    async def add_adapter(self, adapter) -> None:
        if adapter.path.startswith("mem://"):
            if self.memory.get(adapter.path) is None:
                raise FailedPrecondition("not held", reason="ADAPTER_LOAD_FAILED")
            self.loaded[adapter.engine_id] = adapter
            self.added.append(adapter.name)
            return
        await super().add_adapter(adapter)


async def test_memory_versions_and_loads_are_measured(tmp_path: Path):
    memory = MemoryVersions("n-metrics")
    engine = MemoryEngine(memory, max_loras=2, max_cpu_loras=3, max_lora_rank=16)
    await engine.start()
    resolver = InMemoryResolver()
    manager = NodeAdapterManager(
        AdapterManager(resolver, engine, cache_dir=tmp_path / "cache", watch=False), memory
    )
    await manager.start()
    node_metrics.track(memory, manager, lambda: 123_456)
    try:
        assert value("lorafleet_node_memory_versions") == 0
        assert value("lorafleet_node_process_pss_bytes") == 123_456

        directory = write_fake_adapter(tmp_path / "files" / "v1")
        ref = resolver.publish("exp", directory)
        _, sha = digest_directory(directory)
        snapshot = memory.stash(sha, SPEC, {
            "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 8),
            "model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(8, 4),
        })
        assert memory.publish(ref) is not None
        assert value("lorafleet_node_memory_versions") == 1
        assert value("lorafleet_node_memory_version_bytes") == snapshot.nbytes == 2 * 32 * 4

        loads = value("lorafleet_rollout_adapter_load_seconds_count", source="memory",
                      trigger="request")
        async with manager.use(AdapterSelection.parse("exp@1")) as adapter:
            assert adapter.path.startswith("mem://")
        assert value("lorafleet_rollout_adapter_load_seconds_count", source="memory",
                     trigger="request") - loads == 1
        assert value("lorafleet_node_memory_loaded_adapters") == 1
    finally:
        await manager.close()
