"""A one-node mesh for the vLLM rollout tests: the real registry and the real
rollout service as processes (exactly as in a container), adapters made with
peft on the tiny model and published by reference from the node cache.

Processes, not in-process servers: vLLM spawns its engine workers, and pytest's
own process should stay free of them (and of their start-method constraints).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from lorafleet.client.registry import RegistryClient
from lorafleet.client.rollout import RolloutClient
from lorafleet.cluster.local import LocalCluster, ServiceSpec

NODE_ID = "node-0"
MAX_LORAS = 2
MAX_CPU_LORAS = 3
MAX_LORA_RANK = 8
# Engine start on 2 shared cores is ~20-40 s; leave room for a loaded machine.
START_TIMEOUT_S = 240.0


@dataclass
class Node:
    run_dir: Path
    model_dir: Path
    cache: Path
    cluster: LocalCluster
    registry: RegistryClient
    rollout: RolloutClient
    rollout_address: str
    sources: dict[str, Path] = field(default_factory=dict)
    """Adapter files by name, outside the node cache (publishing copies them in)."""

    def publish(self, adapter_id: str, source: Path, *, rank: int = MAX_LORA_RANK) -> int:
        """Copy ``source`` into the node cache as the adapter's next version and
        publish it by reference (the trainer's step 5). Returns the version."""
        try:
            latest = self.registry.get_adapter(adapter_id).latest_version
        except Exception:
            self.registry.create_adapter(
                adapter_id, lora={"rank": rank, "alpha": 2.0 * rank}, base_model="tiny"
            )
            latest = 0
        target = self.cache / adapter_id / f"v{latest + 1}"
        shutil.copytree(source, target)
        response = self.registry.publish_version(adapter_id, target, expected_parent_version=latest)
        return int(response.version.version)

    @property
    def rollout_process(self) -> psutil.Process:
        return psutil.Process(self.cluster.services["rollout"].process.pid)

    def engine_pids(self) -> set[int]:
        """The vLLM engine processes under the rollout service."""
        return {
            p.pid
            for p in self.rollout_process.children(recursive=True)
            if "VLLM" in p.name() or "VLLM" in " ".join(p.cmdline()[:1])
        }

    def wait_loaded(self, engine_name: str, timeout_s: float = 30.0) -> float:
        """Seconds until ``engine_name`` shows in ListLoadedAdapters."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if engine_name in {a.engine_name for a in self.rollout.list_loaded()}:
                return time.monotonic() - started
            time.sleep(0.02)
        raise AssertionError(f"{engine_name} was not loaded within {timeout_s} s")


def start_node(run_dir: Path, model_dir: Path) -> Node:
    cache = run_dir / "node-cache"
    cache.mkdir(parents=True)
    cluster = LocalCluster(run_dir)
    try:
        registry_address = cluster.start_and_wait(
            ServiceSpec(
                "registry",
                "registry",
                {
                    "LORAFLEET_REGISTRY_DATA_DIR": str(run_dir / "registry"),
                    "LORAFLEET_REGISTRY_FILE_ROOTS": json.dumps({NODE_ID: str(cache)}),
                },
            )
        )
        rollout_address = cluster.start_and_wait(
            ServiceSpec(
                "rollout",
                "rollout",
                {
                    "LORAFLEET_ROLLOUT_MODEL_PATH": str(model_dir),
                    "LORAFLEET_ROLLOUT_REGISTRY_ADDRESS": registry_address,
                    "LORAFLEET_ROLLOUT_NODE_ID": NODE_ID,
                    "LORAFLEET_ROLLOUT_ADAPTER_CACHE_DIR": str(cache),
                    "LORAFLEET_ROLLOUT_MAX_LORAS": str(MAX_LORAS),
                    "LORAFLEET_ROLLOUT_MAX_CPU_LORAS": str(MAX_CPU_LORAS),
                    "LORAFLEET_ROLLOUT_MAX_LORA_RANK": str(MAX_LORA_RANK),
                    "LORAFLEET_ROLLOUT_MAX_MODEL_LEN": "128",
                    "LORAFLEET_ROLLOUT_HEALTH_CHECK_INTERVAL_S": "0.5",
                    "LORAFLEET_ROLLOUT_KV_CACHE_GIB": "0.5",
                },
            ),
            timeout_s=START_TIMEOUT_S,
        )
    except BaseException:
        cluster.stop_all()
        raise
    return Node(
        run_dir=run_dir,
        model_dir=model_dir,
        cache=cache,
        cluster=cluster,
        registry=RegistryClient(registry_address),
        rollout=RolloutClient(rollout_address, timeout_s=120.0),
        rollout_address=rollout_address,
    )


def stop_node(node: Node) -> None:
    node.rollout.close()
    node.registry.close()
    node.cluster.stop_all(timeout_s=60.0)
