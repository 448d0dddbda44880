"""The co-located node as a real process (``python -m lorafleet.node`` on port 0,
beside a real registry process): one process serves RolloutService and
TrainerService on one base model, and a version saved by the trainer is served
by the rollout side from memory, exactly as the trainer computes it, without any
adapter file being read, and unchanged by later training.

Module-scoped node (a process start costs ~5-15 s on 2 shared cores); the tests
run in file order and build on each other's state (adapter ``exp``).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lorafleet.client.registry import RegistryClient  # noqa: E402
from lorafleet.client.rollout import RolloutClient  # noqa: E402
from lorafleet.client.trainer import TrainerClient, sample  # noqa: E402
from lorafleet.cluster.local import LocalCluster, ServiceSpec, health_status  # noqa: E402
from lorafleet.trainer.storage import local_path  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

NODE_ID = "node-0"
ROLLOUT = "lorafleet.rollout.v1.RolloutService"
TRAINER = "lorafleet.trainer.v1.TrainerService"
PROMPTS = ["12+3=", "reverse abc:", "copy hello:"]
START_TIMEOUT_S = 180.0


@dataclass
class Node:
    run_dir: Path
    cache: Path
    cluster: LocalCluster
    address: str
    registry: RegistryClient
    rollout: RolloutClient
    trainer: TrainerClient

    @property
    def pid(self) -> int:
        return self.cluster.services["node"].process.pid

    def events(self, name: str) -> list[dict]:
        path = self.cluster.services["node"].log_path
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == name:
                out.append(record)
        return out


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    run_dir = tmp_path_factory.mktemp("node")
    cache = run_dir / "node-cache"
    cache.mkdir()
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
        address = cluster.start_and_wait(
            ServiceSpec(
                "node",
                "node",
                {
                    "LORAFLEET_NODE_MODEL_PATH": str(tiny_model_dir),
                    "LORAFLEET_NODE_REGISTRY_ADDRESS": registry_address,
                    "LORAFLEET_NODE_NODE_ID": NODE_ID,
                    "LORAFLEET_NODE_ADAPTER_CACHE_DIR": str(cache),
                    "LORAFLEET_NODE_MAX_RANK": "8",
                    "LORAFLEET_NODE_MAX_LORA_RANK": "8",
                    # One intra-op thread: steady on a shared 2-core machine.
                    "LORAFLEET_NODE_TORCH_THREADS": "1",
                },
            ),
            timeout_s=START_TIMEOUT_S,
        )
    except BaseException:
        cluster.stop_all()
        raise
    node = Node(
        run_dir=run_dir,
        cache=cache,
        cluster=cluster,
        address=address,
        registry=RegistryClient(registry_address),
        rollout=RolloutClient(address, timeout_s=120.0),
        trainer=TrainerClient(address),
    )
    try:
        yield node
    finally:
        node.rollout.close()
        node.trainer.close()
        node.registry.close()
        cluster.stop_all(timeout_s=60.0)


def _samples(seed: int) -> list:
    rng = random.Random(seed)
    out = []
    for _ in range(8):
        ids = [1] + [rng.randrange(5, 95) for _ in range(13)]
        out.append(sample(ids, prompt_length=5, logprobs=[-3.5] * 9,
                          advantage=rng.uniform(-1.0, 1.0)))
    return out


def _sequences(response) -> list[tuple[list[int], int]]:
    return [
        (list(r.prompt_token_ids) + list(c.token_ids), len(r.prompt_token_ids))
        for r in response.results
        for c in r.completions
    ]


def _max_gap(a, b) -> float:
    return max(abs(x - y) for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True))


def _rollout_logprobs(node: Node, seqs, adapter: str) -> tuple[int, list[list[float]]]:
    response = node.rollout.compute_logprobs(seqs, adapter=adapter)
    return response.adapter_version, [list(s.logprobs) for s in response.sequences]


def test_one_process_serves_both_services(node):
    assert health_status(node.address, ROLLOUT) == "SERVING"
    assert health_status(node.address, TRAINER) == "SERVING"
    status = node.rollout.status()
    assert status.engine == "torch"
    # One process: no engine workers beside it.
    assert psutil.Process(node.pid).children(recursive=True) == []
    trainer_status = node.trainer.status()
    assert trainer_status.slots_total >= 1 and trainer_status.base_model_bytes > 0


def test_saved_version_is_served_from_memory_as_the_trainer_computes_it(node):
    node.trainer.create_adapter("exp", lora={"rank": 8, "alpha": 16},
                                optimizer={"learning_rate": 0.02}, seed=1)
    node.trainer.train_step("exp", _samples(0))
    ref = node.trainer.save_version("exp", expected_parent_version=0)
    assert ref.version == 1 and ref.uri.startswith("file://")
    # Published by reference like any trainer's version: the files are in the node
    # cache for the registry and other consumers. Delete them: the rollout side of
    # this node must not need them.
    version_dir = local_path(ref.uri)
    assert (version_dir / "adapter_model.safetensors").is_file()
    shutil.rmtree(version_dir)

    sampled = node.rollout.generate(PROMPTS, adapter="exp@1", n=2, temperature=1.0, seed=11,
                                    max_tokens=12)
    assert sampled.adapter_version == 1
    seqs = _sequences(sampled)
    trainer_lps = node.trainer.compute_logprobs(seqs, adapter_id="exp")
    version, rollout_lps = _rollout_logprobs(node, seqs, "exp@1")
    assert version == 1
    assert _max_gap(rollout_lps, trainer_lps) < 1e-5
    sampled_lps = [list(c.logprobs) for r in sampled.results for c in r.completions]
    diffs = [abs(a - b) for s, t in zip(sampled_lps, trainer_lps, strict=True)
             for a, b in zip(s, t, strict=True)]
    assert sum(diffs) / len(diffs) < 1e-4
    # Precondition: the adapter is not the base model (else agreement proves nothing).
    base_lps = node.trainer.compute_logprobs(seqs)
    assert _max_gap(base_lps, trainer_lps) > 1e-3

    # No adapter file was read by the rollout side: every version it loaded came
    # from memory, and nothing was downloaded.
    added = [e for e in node.events("engine_adapter_added") if e["adapter"].startswith("exp@")]
    assert added and all(e["source"] == "memory" for e in added), added
    assert all(e["path"] == "mem://node-0/exp/1" for e in added)
    assert not node.events("adapter_downloaded")
    assert not (node.cache / ".rollout-downloads").exists()
    loaded = {a.engine_name for a in node.rollout.list_loaded()}
    assert "exp@1" in loaded


def test_later_training_does_not_change_an_earlier_version(node):
    greedy = node.rollout.generate(PROMPTS, adapter="exp@1", max_tokens=12)
    seqs = _sequences(node.rollout.generate(PROMPTS, adapter="exp@1", n=2, temperature=1.0,
                                            seed=5, max_tokens=12))
    _, before = _rollout_logprobs(node, seqs, "exp@1")
    trainer_before = node.trainer.compute_logprobs(seqs, adapter_id="exp")

    for step in range(2):
        node.trainer.train_step("exp", _samples(10 + step))
    trainer_after = node.trainer.compute_logprobs(seqs, adapter_id="exp")
    # Precondition: training really moved the live adapter.
    assert _max_gap(trainer_after, trainer_before) > 1e-3

    again = node.rollout.generate(PROMPTS, adapter="exp@1", max_tokens=12)
    assert [list(r.completions[0].token_ids) for r in again.results] == [
        list(r.completions[0].token_ids) for r in greedy.results
    ]
    _, after = _rollout_logprobs(node, seqs, "exp@1")
    assert _max_gap(after, before) == 0.0

    # The next version is the trained one, served at once as @latest, from memory.
    ref = node.trainer.save_version("exp", expected_parent_version=1)
    assert ref.version == 2
    version, latest = _rollout_logprobs(node, seqs, "exp@latest")
    assert version == 2
    assert _max_gap(latest, trainer_after) < 1e-5
    added = [e for e in node.events("engine_adapter_added") if e["adapter"] == "exp@2"]
    assert [e["source"] for e in added] == ["memory"]


def test_versions_are_published_for_other_consumers(node, tmp_path):
    # The registry has both versions; v2's files (still in the node cache) download
    # and verify like any version's.
    assert node.registry.get_version("exp", 1).version == 1
    dest = node.registry.download_version("exp", 2, tmp_path / "v2")
    assert (Path(dest) / "adapter_config.json").is_file()
    assert (Path(dest) / "adapter_model.safetensors").is_file()
