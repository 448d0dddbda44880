"""Trainer and registry metrics move with real work: a fused pass of three
adapters' TrainSteps, slot gauges, SaveVersion/SaveState timings, by-reference
publishes, durable copies, resolves by outcome and watch streams (in-process
servers, one metric registry)."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import REGISTRY
from trainer_harness import random_samples, trainer_beside_registry

from lorafleet.core.errors import Aborted, NotFound

ADAPTERS = ("m-a", "m-b", "m-c")
SLOTS = 5


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def mesh(tmp_path, trainer_llama_dir):
    async with trainer_beside_registry(
        tmp_path,
        trainer_llama_dir,
        "node-m",
        max_adapters=SLOTS,
        # Fused (off by default on CPU), in a window wide enough that three
        # concurrent calls over loopback always meet.
        fuse=True,
        fuse_max_wait_ms=300,
    ) as (trainer, registry, _cache):
        yield trainer, registry


async def test_fused_pass_tokens_and_slots(mesh):
    trainer, _ = mesh
    for name in ADAPTERS:
        await trainer.client.create_adapter(name, lora={"rank": 4, "alpha": 8.0})
    assert value("lorafleet_trainer_adapter_slots_used") == len(ADAPTERS)
    assert value("lorafleet_trainer_adapter_slots_total") == SLOTS

    kind = {"kind": "train_step"}
    passes = value("lorafleet_trainer_fused_batch_adapters_count", **kind)
    adapters = value("lorafleet_trainer_fused_batch_adapters_sum", **kind)
    single = value("lorafleet_trainer_fused_batch_adapters_bucket", le="1.0", **kind)
    tokens = value("lorafleet_trainer_tokens_total", **kind)
    ok = value("lorafleet_trainer_requests_total", outcome="ok", **kind)
    seconds = value("lorafleet_trainer_pass_seconds_count", **kind)

    rng = random.Random(0)
    # 4 samples of 4 prompt + 6 completion tokens each.
    batches = {name: random_samples(rng, 4) for name in ADAPTERS}
    await asyncio.gather(*(trainer.client.train_step(n, s) for n, s in batches.items()))

    assert value("lorafleet_trainer_fused_batch_adapters_count", **kind) - passes == 1
    assert value("lorafleet_trainer_fused_batch_adapters_sum", **kind) - adapters == 3
    assert value("lorafleet_trainer_fused_batch_adapters_bucket", le="1.0", **kind) == single
    assert value("lorafleet_trainer_tokens_total", **kind) - tokens == 3 * 4 * 10
    assert value("lorafleet_trainer_requests_total", outcome="ok", **kind) - ok == 3
    assert value("lorafleet_trainer_pass_seconds_count", **kind) - seconds == 1

    # A request that fails alone is counted as an error, and trains no tokens.
    errors = value("lorafleet_trainer_requests_total", outcome="error", **kind)
    tokens = value("lorafleet_trainer_tokens_total", **kind)
    with pytest.raises(NotFound):
        await trainer.client.train_step("m-ghost", random_samples(rng, 2))
    assert value("lorafleet_trainer_requests_total", outcome="error", **kind) - errors == 1
    assert value("lorafleet_trainer_tokens_total", **kind) == tokens

    await trainer.client.drop_adapter("m-c")
    assert value("lorafleet_trainer_adapter_slots_used") == len(ADAPTERS) - 1


async def test_save_version_state_publish_and_resolve(mesh):
    trainer, registry = mesh
    await registry.client.create_adapter("m-pub", lora={"rank": 4, "alpha": 8.0}, base_model="t")
    await trainer.client.create_adapter("m-pub", lora={"rank": 4, "alpha": 8.0})

    saves = value("lorafleet_trainer_checkpoint_seconds_count", op="save_version")
    saved_bytes = value("lorafleet_trainer_checkpoint_bytes_total", op="save_version")
    published = value("lorafleet_registry_publishes_total", mode="reference", code="OK")
    published_bytes = value("lorafleet_registry_published_bytes_total", mode="reference")
    aborted = value("lorafleet_registry_publishes_total", mode="reference", code="ABORTED")
    copies = value("lorafleet_registry_durable_copies_total", outcome="ok")
    copied_bytes = value("lorafleet_registry_durable_copy_bytes_total")

    ref = await trainer.client.save_version("m-pub", expected_parent_version=0)
    assert ref.version == 1 and ref.size_bytes > 0
    # The background copy to the durable store, off the publish path.
    await registry.runtime.registry.settle()
    assert value("lorafleet_registry_durable_copies_total", outcome="ok") - copies == 1
    assert value("lorafleet_registry_durable_copy_bytes_total") - copied_bytes == ref.size_bytes
    assert value("lorafleet_trainer_checkpoint_seconds_count", op="save_version") - saves == 1
    assert (
        value("lorafleet_trainer_checkpoint_bytes_total", op="save_version") - saved_bytes
        == ref.size_bytes
    )
    assert value("lorafleet_registry_publishes_total", mode="reference", code="OK") - published == 1
    assert (
        value("lorafleet_registry_published_bytes_total", mode="reference") - published_bytes
        == ref.size_bytes
    )

    # A stale parent: the registry refuses (ABORTED); no successful save is timed.
    with pytest.raises(Aborted):
        await trainer.client.save_version("m-pub", expected_parent_version=0, request_id="again")
    assert (
        value("lorafleet_registry_publishes_total", mode="reference", code="ABORTED") - aborted
        == 1
    )
    assert value("lorafleet_trainer_checkpoint_seconds_count", op="save_version") - saves == 1

    latest_ok = value("lorafleet_registry_resolves_total", by="latest", code="OK")
    missing = value("lorafleet_registry_resolves_total", by="version", code="NOT_FOUND")
    await registry.client.resolve("m-pub@latest")
    with pytest.raises(NotFound):
        await registry.client.resolve("m-pub@7")
    assert value("lorafleet_registry_resolves_total", by="latest", code="OK") - latest_ok == 1
    assert (
        value("lorafleet_registry_resolves_total", by="version", code="NOT_FOUND") - missing == 1
    )

    states = value("lorafleet_trainer_checkpoint_seconds_count", op="save_state")
    state_bytes = value("lorafleet_trainer_checkpoint_bytes_total", op="save_state")
    loads = value("lorafleet_trainer_checkpoint_seconds_count", op="load_state")
    saved = await trainer.client.save_state("m-pub")
    await trainer.client.load_state("m-pub", saved.uri, saved.sha256)
    assert value("lorafleet_trainer_checkpoint_seconds_count", op="save_state") - states == 1
    assert (
        value("lorafleet_trainer_checkpoint_bytes_total", op="save_state") - state_bytes
        == saved.size_bytes
    )
    assert value("lorafleet_trainer_checkpoint_seconds_count", op="load_state") - loads == 1


async def test_watch_streams_are_counted_while_open(mesh):
    _, registry = mesh
    before = value("lorafleet_registry_watch_streams")
    stream = registry.client.watch(["m-watch"]).__aiter__()
    await registry.client.create_adapter("m-watch", lora={"rank": 4, "alpha": 8.0}, base_model="t")
    reader = asyncio.ensure_future(stream.__anext__())
    for _ in range(100):
        if value("lorafleet_registry_watch_streams") > before:
            break
        await asyncio.sleep(0.02)
    assert value("lorafleet_registry_watch_streams") == before + 1
    reader.cancel()
    await asyncio.gather(reader, return_exceptions=True)
    await stream.aclose()
    for _ in range(100):
        if value("lorafleet_registry_watch_streams") == before:
            break
        await asyncio.sleep(0.02)
    assert value("lorafleet_registry_watch_streams") == before
