"""SaveVersion publishes into a real registry by reference; the version loads in
``peft`` unchanged and scores like the trainer; CreateAdapter from_version brings
it back; version conflicts are ABORTED and leave no directory behind."""

from __future__ import annotations

import random
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from trainer_harness import random_samples, start_registry, start_trainer, trainer_beside_registry

from lorafleet.core.errors import Aborted
from lorafleet.trainer.config import TrainerSettings

SEQS = [([5, 9, 11, 2, 40, 33, 7, 19, 60, 1], 3), ([3, 3, 8, 50, 21, 17], 2)]


@pytest.fixture
async def mesh(tmp_path, trainer_llama_dir):
    # The pairing under test: the registry may read the trainer's cache directory.
    async with trainer_beside_registry(tmp_path, trainer_llama_dir, "node-t", max_rank=16) as m:
        yield m


def _peft_logprobs(model_dir: Path, adapter_dir: Path, seqs) -> list[list[float]]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    out = []
    with torch.no_grad():
        for ids, p in seqs:
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
            out.append(lp[p - 1 :].tolist())
    return out


def _max_gap(a, b) -> float:
    return max(abs(x - y) for s, t in zip(a, b, strict=True) for x, y in zip(s, t, strict=True))


async def test_save_version_publishes_by_reference_and_loads_in_peft(
    mesh, tmp_path, trainer_llama_dir
):
    trainer, registry, cache = mesh
    client = trainer.client
    await registry.client.create_adapter(
        "exp", lora={"rank": 8, "alpha": 16.0}, base_model="test-llama"
    )
    await client.create_adapter(
        "exp", lora={"rank": 8, "alpha": 16.0}, optimizer={"learning_rate": 2e-2}, seed=3
    )
    v1 = await client.save_version("exp", expected_parent_version=0, training_step=0)
    assert v1.version == 1
    rng = random.Random(0)
    for _ in range(3):
        await client.train_step("exp", random_samples(rng, 4))
    v2 = await client.save_version(
        "exp", expected_parent_version=1, training_step=3, metrics={"reward_mean": 0.5}
    )

    # By reference: an absolute file:// URI of <cache>/<adapter>/v<N> and its digests.
    assert v2.version == 2
    version_dir = cache / "exp" / "v2"
    assert v2.uri == version_dir.as_uri()
    assert sorted(p.name for p in version_dir.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert [p.name for p in (cache / "exp").iterdir() if p.name.startswith(".")] == []
    stored = await registry.client.get_version("exp", 2)
    assert stored.training_step == 3 and stored.metrics["reward_mean"] == 0.5
    assert stored.sha256 == v2.sha256 and v2.uri in stored.uris

    # Downloaded through the registry, loaded by peft itself: same logprobs.
    downloaded = await registry.client.download_version("exp", 2, tmp_path / "dl")
    trainer_lp = await client.compute_logprobs(SEQS, adapter_id="exp")
    base_lp = await client.compute_logprobs(SEQS)
    peft_lp = _peft_logprobs(trainer_llama_dir, downloaded, SEQS)
    assert _max_gap(trainer_lp, base_lp) > 1e-3  # the adapter does something
    assert _max_gap(trainer_lp, peft_lp) < 1e-4

    # from_version: the published weights come back into a new trainer adapter.
    info = await client.create_adapter("copy", from_version="exp@2")
    assert info.step == 0 and info.lora.rank == 8
    assert _max_gap(await client.compute_logprobs(SEQS, adapter_id="copy"), trainer_lp) < 1e-6
    info = await client.create_adapter("first", from_version="exp@1")
    assert _max_gap(await client.compute_logprobs(SEQS, adapter_id="first"), base_lp) < 1e-6


async def test_conflicts_abort_and_leave_no_directory(mesh):
    trainer, registry, cache = mesh
    client = trainer.client
    await client.create_adapter("exp", lora={"rank": 4, "alpha": 8.0})
    # The registry adapter does not exist yet: SaveVersion registers it.
    v1 = await client.save_version("exp", expected_parent_version=0)
    assert v1.version == 1
    assert (await registry.client.get_adapter("exp")).lora.rank == 4

    await client.train_step("exp", random_samples(random.Random(1), 2))
    with pytest.raises(Aborted):
        await client.save_version("exp", expected_parent_version=0)  # v1 exists
    with pytest.raises(Aborted):
        await client.save_version("exp", expected_parent_version=5)  # not the latest
    assert sorted(p.name for p in (cache / "exp").iterdir()) == ["v1"]

    # A retried publish (same request_id) answers the same version, once.
    a = await client.save_version("exp", expected_parent_version=1, request_id="pub-2")
    b = await client.save_version("exp", expected_parent_version=1, request_id="pub-2")
    assert a == b and a.version == 2
    assert [v.version for v in await registry.client.list_versions("exp")] == [1, 2]

    # Another registry adapter name: its own directory tree.
    ref = await client.save_version(
        "exp", registry_adapter_id="exp-fork", expected_parent_version=0
    )
    path = Path(unquote(urlsplit(ref.uri).path))
    assert path == cache / "exp-fork" / "v1" and ref.adapter_id == "exp-fork"


async def test_local_cluster_pairing_with_relative_paths(tmp_path, monkeypatch, trainer_llama_dir):
    """lorafleet.cluster.topology: cwd = the run dir, the registry on its default
    file_roots {"local": "var"}, the trainer on var/node-<i>/adapters."""
    from lorafleet.registry.config import RegistrySettings

    monkeypatch.chdir(tmp_path)
    defaults = RegistrySettings()
    registry = await start_registry(tmp_path / "registry", defaults.file_roots)
    trainer = await start_trainer(
        TrainerSettings(
            model_path=str(trainer_llama_dir),
            adapter_cache_dir="var/node-0/adapters",
            node_id="node-0",
            registry_address=registry.address,
        )
    )
    try:
        await trainer.client.create_adapter("exp", lora={"rank": 4, "alpha": 8.0})
        ref = await trainer.client.save_version("exp", expected_parent_version=0)
        assert ref.uri == (tmp_path / "var" / "node-0" / "adapters" / "exp" / "v1").as_uri()
        resolved = await registry.client.resolve("exp@latest")
        assert resolved.ref.version == 1 and resolved.ref.sha256 == ref.sha256
    finally:
        await trainer.stop()
        await registry.stop()


async def test_retry_after_a_lost_answer_and_stale_directories(mesh):
    from lorafleet.core.idempotency import InMemoryIdempotencyStore

    trainer, registry, cache = mesh
    client = trainer.client
    await client.create_adapter("exp", lora={"rank": 4, "alpha": 8.0})
    first = await client.save_version("exp", expected_parent_version=0, request_id="pub-1")
    # The trainer restarted (its replay memory is gone) and the caller retries: the
    # same bytes land in the same directory and the registry replays its answer.
    trainer.runtime.servicer.idempotency = InMemoryIdempotencyStore()
    again = await client.save_version("exp", expected_parent_version=0, request_id="pub-1")
    assert again == first
    assert [v.version for v in await registry.client.list_versions("exp")] == [1]

    # A v2 directory left by an attempt the registry never recorded is replaced.
    stale = cache / "exp" / "v2"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("{}")
    (stale / "adapter_model.safetensors").write_bytes(b"junk")
    await client.train_step("exp", random_samples(random.Random(2), 2))
    v2 = await client.save_version("exp", expected_parent_version=1)
    assert v2.version == 2 and v2.uri == stale.as_uri()
    assert (stale / "adapter_model.safetensors").read_bytes() != b"junk"
    assert sorted(p.name for p in (cache / "exp").iterdir()) == ["v1", "v2"]
