"""A real trainer (and registry) on gRPC refuses a deposed owner's calls: once a
call with a higher fencing token has reached an adapter, every state-changing
call with a lower one fails FAILED_PRECONDITION STALE_FENCING_TOKEN and changes
nothing; replays of answered calls and unfenced callers are not affected; a
restarted trainer still refuses the deposed owner."""

from __future__ import annotations

import random

import pytest
from trainer_harness import random_samples, start_trainer, trainer_beside_registry

from lorafleet.client.trainer import AsyncTrainerClient
from lorafleet.core.errors import FailedPrecondition, NotFound

LORA = {"rank": 4, "alpha": 8.0}


@pytest.fixture
async def mesh(tmp_path, trainer_llama_dir):
    async with trainer_beside_registry(tmp_path, trainer_llama_dir, "node-t", max_rank=16) as (
        trainer,
        registry,
        _cache,
    ):
        old = AsyncTrainerClient(trainer.address, fencing_token=7)
        new = AsyncTrainerClient(trainer.address, fencing_token=8)
        try:
            yield trainer, registry, old, new
        finally:
            await old.close()
            await new.close()


async def stale(call):
    with pytest.raises(FailedPrecondition) as caught:
        await call
    assert caught.value.reason == "STALE_FENCING_TOKEN", caught.value
    assert caught.value.metadata["highest_fencing_token"] == "8"


async def test_a_deposed_owner_changes_nothing_once_the_new_one_has_called(mesh):
    trainer, registry, old, new = mesh
    rng = random.Random(3)
    await old.create_adapter("exp", lora=LORA, seed=1, request_id="old-create")
    first_samples = random_samples(rng, 2)
    first = await old.train_step("exp", first_samples, request_id="old-step-1")
    assert first.step == 1
    v1 = await old.save_version("exp", expected_parent_version=0, request_id="old-v1")

    # The new owner's first call raises the adapter's token to 8.
    saved = await new.save_state("exp")
    assert saved.step == 1

    samples = random_samples(rng, 2)
    await stale(old.train_step("exp", samples))
    await stale(old.forward_backward("exp", samples))
    await stale(old.optim_step("exp"))
    await stale(old.save_version("exp", expected_parent_version=1, training_step=2))
    await stale(old.save_state("exp"))
    await stale(old.load_state("exp", saved.uri, saved.sha256))
    await stale(old.drop_adapter("exp"))
    info = await new.adapter_info("exp")
    assert info is not None and info.step == 1 and not info.pending_gradient_bytes
    assert info.fencing_token == 8  # the owner, as the trainer's status shows it
    assert (await registry.client.get_adapter("exp")).latest_version == v1.version == 1

    # A retry of a call the old owner made before is a replay, not new work.
    replayed = await old.train_step("exp", first_samples, request_id="old-step-1")
    assert replayed == first

    # The new owner goes on; after it dropped the adapter, the old one cannot
    # bring it back.
    assert (await new.train_step("exp", samples)).step == 2
    await new.drop_adapter("exp")
    await stale(old.create_adapter("exp", lora=LORA, seed=1))
    assert await new.adapter_info("exp") is None


async def test_unfenced_callers_and_other_adapters_are_not_affected(mesh):
    trainer, _registry, old, new = mesh
    rng = random.Random(4)
    assert (await new.create_adapter("fenced", lora=LORA, seed=1)).fencing_token == 8
    await old.create_adapter("other", lora=LORA, seed=1)  # token 7 is the highest here
    assert (await old.train_step("other", random_samples(rng, 2))).step == 1
    # Token 0 takes no part in fencing, on either adapter.
    assert (await trainer.client.train_step("fenced", random_samples(rng, 2))).step == 1
    assert (await trainer.client.train_step("other", random_samples(rng, 2))).step == 2
    assert (await trainer.client.adapter_info("other")).fencing_token == 7
    with pytest.raises(NotFound):  # fencing does not hide the usual errors
        await new.train_step("missing", random_samples(rng, 2))


async def test_a_restarted_trainer_refuses_the_deposed_owner_calling_first(mesh):
    trainer, _registry, old, new = mesh
    await old.create_adapter("exp", lora=LORA, seed=1)
    await new.save_state("exp")  # the new owner takes "exp" over: token 8
    await trainer.stop()

    # Same settings, same state directory: the node's trainer after a restart.
    # Its adapters are gone; the deposed owner (token 7) reaches it first.
    restarted = await start_trainer(trainer.settings)
    old_again = AsyncTrainerClient(restarted.address, fencing_token=7)
    new_again = AsyncTrainerClient(restarted.address, fencing_token=8)
    try:
        assert await restarted.client.adapter_info("exp") is None
        await stale(old_again.create_adapter("exp", lora=LORA, seed=1))
        assert await restarted.client.adapter_info("exp") is None
        created = await new_again.create_adapter("exp", lora=LORA, seed=1)
        assert created.fencing_token == 8
        # Adapters the deposed owner never lost stay its own.
        assert (await old_again.create_adapter("fresh", lora=LORA, seed=1)).fencing_token == 7
    finally:
        await old_again.close()
        await new_again.close()
        await restarted.stop()
