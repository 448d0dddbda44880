"""TrainerService over real gRPC (in-process server on port 0, the real client):
fused steps of heterogeneous adapters, per-request errors with codes and
reasons, request_id replay, checkpoints, status."""

from __future__ import annotations

import asyncio
import random
import shutil

import pytest
from trainer_harness import random_samples, start_trainer

from lorafleet.api.common.v1 import adapter_pb2
from lorafleet.api.registry.v1 import registry_pb2 as pb_registry
from lorafleet.client.trainer import TrainerClient
from lorafleet.core.errors import (
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from lorafleet.trainer.config import TrainerSettings

LORA_4 = {"rank": 4, "alpha": 8.0}
LORA_8 = {"rank": 8, "alpha": 16.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
OPT = {"learning_rate": 1e-2}
PROBE = [([1, 2, 3, 4, 5, 6, 7, 8], 3), ([9, 8, 7, 6, 5], 2)]


@pytest.fixture
async def trainer(tmp_path, trainer_llama_dir):
    settings = TrainerSettings(
        model_path=str(trainer_llama_dir),
        adapter_cache_dir=str(tmp_path / "cache"),
        max_adapters=3,
        max_rank=8,
        # Fused passes (off by default on CPU), and a window wide enough that
        # requests sent together always meet in one batch.
        fuse=True,
        fuse_max_wait_ms=200.0,
        registry_address="127.0.0.1:1",
    )
    running = await start_trainer(settings)
    try:
        yield running
    finally:
        await running.stop()


async def test_concurrent_steps_of_different_ranks_fuse(trainer):
    client = trainer.client
    a = await client.create_adapter("exp-a", lora=LORA_4, optimizer=OPT, seed=1)
    b = await client.create_adapter("exp-b", lora=LORA_8, optimizer=OPT, seed=2)
    assert (a.lora.rank, b.lora.rank) == (4, 8)
    assert len(a.lora.target_modules) == 7  # empty = every linear layer of the blocks
    assert sorted(b.lora.target_modules) == ["down_proj", "q_proj", "v_proj"]
    before = await client.compute_logprobs(PROBE, adapter_id="exp-a")

    rng = random.Random(0)
    ra, rb = await asyncio.gather(
        client.train_step("exp-a", random_samples(rng, 4)),
        client.train_step("exp-b", random_samples(rng, 3, completion=9)),
    )
    assert ra.metrics.fused_batch_adapters == 2
    assert rb.metrics.fused_batch_adapters == 2
    assert (ra.step, rb.step) == (1, 1) and ra.applied and rb.applied
    assert (ra.metrics.num_sequences, rb.metrics.num_sequences) == (4, 3)
    assert (ra.metrics.num_loss_tokens, rb.metrics.num_loss_tokens) == (24, 27)
    assert ra.metrics.grad_norm > 0 and rb.metrics.grad_norm > 0
    after = await client.compute_logprobs(PROBE, adapter_id="exp-a")
    assert (
        max(
            abs(x - y)
            for s, t in zip(before, after, strict=True)
            for x, y in zip(s, t, strict=True)
        )
        > 1e-4
    )
    assert [len(s) for s in after] == [5, 3]


async def test_bad_request_in_a_fused_batch_fails_alone(trainer):
    client = trainer.client
    await client.create_adapter("good", lora=LORA_4, optimizer=OPT)
    await client.create_adapter("bad", lora=LORA_4, optimizer=OPT)
    rng = random.Random(1)
    batches_before = trainer.runtime.queue.batches_run
    good, bad = await asyncio.gather(
        client.train_step("good", random_samples(rng, 2)),
        client.train_step("bad", random_samples(rng, 2, bad_logprobs=True)),
        return_exceptions=True,
    )
    # Both arrived in one batch; the bad one failed alone, the good one trained.
    assert trainer.runtime.queue.batches_run == batches_before + 1
    assert isinstance(bad, InvalidArgument), bad
    assert bad.reason == "LOGPROBS_LENGTH_MISMATCH"
    assert not isinstance(good, BaseException), good
    assert good.step == 1 and good.applied
    status = {a.adapter_id: a.step for a in (await client.status()).adapters}
    assert status == {"good": 1, "bad": 0}


async def test_error_codes_and_reasons(trainer):
    client = trainer.client
    rng = random.Random(2)
    with pytest.raises(NotFound) as e:
        await client.train_step("nobody", random_samples(rng, 1))
    assert e.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(NotFound) as e:
        await client.compute_logprobs(PROBE, adapter_id="nobody")
    assert e.value.reason == "ADAPTER_NOT_FOUND"
    with pytest.raises(NotFound):
        await client.drop_adapter("nobody")

    with pytest.raises(FailedPrecondition) as e:
        await client.create_adapter("wide", lora={"rank": 16, "alpha": 16.0})
    assert e.value.reason == "RANK_ABOVE_NODE_MAX"
    with pytest.raises(InvalidArgument) as e:
        await client.create_adapter("Bad/Id", lora=LORA_4)
    assert e.value.reason == "INVALID_ADAPTER_ID"
    with pytest.raises(InvalidArgument) as e:
        await client.create_adapter("no-rank")
    assert e.value.reason == "RANK_TOO_SMALL"

    for name in ("s1", "s2", "s3"):
        await client.create_adapter(name, lora=LORA_4)
    with pytest.raises(AlreadyExists) as e:
        await client.create_adapter("s1", lora=LORA_4)
    assert e.value.reason == "ADAPTER_EXISTS"
    with pytest.raises(ResourceExhausted) as e:
        await client.create_adapter("s4", lora=LORA_4)
    assert e.value.reason == "NO_FREE_SLOT"

    # Shape and token errors, each with its own reason.
    with pytest.raises(InvalidArgument) as e:
        await client.train_step("s1", random_samples(rng, 1, vocab=1000))
    assert e.value.reason == "TOKEN_OUT_OF_RANGE"
    with pytest.raises(InvalidArgument) as e:
        await client.compute_logprobs([([1, 2, 3], 0)], adapter_id="s1")
    assert e.value.reason == "INVALID_PROMPT_LENGTH"
    with pytest.raises(InvalidArgument) as e:
        await client.train_step("s1", [])
    assert e.value.reason == "EMPTY_REQUEST"
    for call in (client.train_step, client.forward_backward):
        with pytest.raises(InvalidArgument) as e:
            await call("s1", random_samples(rng, 1), weight=-1.0)
        assert e.value.reason == "INVALID_WEIGHT"
    assert {a.adapter_id: a.step for a in (await client.status()).adapters}["s1"] == 0

    # A freed slot is usable again.
    await client.drop_adapter("s3")
    await client.create_adapter("s4", lora=LORA_4)
    status = await client.status()
    assert (status.slots_total, status.slots_used, status.max_rank) == (3, 3, 8)


async def test_out_of_device_memory_is_resource_exhausted_naming_the_setting(
        tmp_path, trainer_llama_dir, monkeypatch):
    """What a user whose passes outgrow the GPU sees over gRPC: RESOURCE_EXHAUSTED,
    the micro-batch size they configured and the setting to lower; nothing trained.
    (A GPU's OutOfMemoryError, raised here by every micro-batch.)"""
    import torch

    from lorafleet.lora.engine import TrainEngine

    def out_of_memory(self, batch):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(TrainEngine, "_micro_batch_stats", out_of_memory)
    running = await start_trainer(TrainerSettings(
        model_path=str(trainer_llama_dir), adapter_cache_dir=str(tmp_path / "cache"),
        max_rank=8, micro_batch_tokens=512, registry_address="127.0.0.1:1"))
    try:
        client = running.client
        await client.create_adapter("a", lora=LORA_4, optimizer=OPT)
        with pytest.raises(ResourceExhausted) as e:
            await client.train_step("a", random_samples(random.Random(3), 2))
        assert e.value.reason == "TRAIN_PASS_OUT_OF_MEMORY"
        assert "512 padded tokens" in str(e.value)
        assert "LORAFLEET_TRAINER_MICRO_BATCH_TOKENS" in str(e.value)
        assert e.value.metadata == {"micro_batch_tokens": "512", "device": "cpu"}
        assert [a.step for a in (await client.status()).adapters] == [0]
    finally:
        await running.stop()


async def test_replayed_request_id_does_not_train_twice(trainer):
    client = trainer.client
    await client.create_adapter("exp", lora=LORA_4, optimizer=OPT, request_id="create-1")
    # CreateAdapter replays too (no ALREADY_EXISTS on a retry).
    await client.create_adapter("exp", lora=LORA_4, optimizer=OPT, request_id="create-1")
    samples = random_samples(random.Random(3), 3)
    first = await client.train_step("exp", samples, request_id="step-1")
    after_first = await client.compute_logprobs(PROBE, adapter_id="exp")
    again = await client.train_step("exp", samples, request_id="step-1")
    assert again == first
    assert (await client.adapter_info("exp")).step == 1
    assert await client.compute_logprobs(PROBE, adapter_id="exp") == after_first
    # The same id for a different request is refused, not answered with stale data.
    with pytest.raises(InvalidArgument) as e:
        await client.train_step("exp", samples[:1], request_id="step-1")
    assert e.value.reason == "REQUEST_ID_REUSED"
    second = await client.train_step("exp", samples, request_id="step-2")
    assert second.step == 2


async def logprob_distances(client, first: str, second: str) -> tuple[float, float]:
    """Largest |difference| of PROBE's logprobs between two adapters, and between
    the first adapter and the base model."""
    a = await client.compute_logprobs(PROBE, adapter_id=first)
    b = await client.compute_logprobs(PROBE, adapter_id=second)
    base = await client.compute_logprobs(PROBE)
    flat = [
        (x, y, z)
        for s, t, u in zip(a, b, base, strict=True)
        for x, y, z in zip(s, t, u, strict=True)
    ]
    return max(abs(x - y) for x, y, _ in flat), max(abs(x - z) for x, _, z in flat)


async def test_forward_backward_then_optim_step_equals_train_step(trainer):
    client = trainer.client
    for name in ("split", "joint"):
        await client.create_adapter(name, lora=LORA_8, optimizer=OPT, seed=7)
    rng = random.Random(4)
    samples = random_samples(rng, 4)
    fb = await client.forward_backward("split", samples)
    assert fb.metrics.num_sequences == 4
    assert (await client.adapter_info("split")).step == 0
    opt = await client.optim_step("split")
    assert opt.step == 1 and opt.applied
    joint = await client.train_step("joint", samples)
    assert joint.metrics.loss == pytest.approx(fb.metrics.loss, abs=1e-6)
    apart, off_base = await logprob_distances(client, "split", "joint")
    assert apart < 1e-6
    assert off_base > 1e-4  # training moved it off the base
    # No gradient accumulated: the step is skipped, nothing changes.
    skipped = await client.optim_step("split")
    assert (skipped.step, skipped.applied) == (1, False)


async def test_scaled_chunks_then_one_optim_step_equal_one_train_step(trainer):
    """The scheduler's way of training a hog's step in fair-share-sized pieces
    (lorafleet.scheduler.batching) lands on the same weights as one TrainStep,
    KL term and pending-gradient report included."""
    from lorafleet.api.trainer.v1 import trainer_pb2
    from lorafleet.scheduler.batching import loss_tokens, scaled_chunk, train_chunks

    client = trainer.client
    for name in ("chunked", "whole"):
        await client.create_adapter(name, lora=LORA_8, optimizer=OPT, seed=3)
    rng = random.Random(9)
    samples = random_samples(rng, 3, completion=3) + random_samples(rng, 4, completion=9)
    loss = trainer_pb2.LossConfig(kind=trainer_pb2.LOSS_KIND_POLICY_GRADIENT, kl_coef=0.05)
    chunks = train_chunks(samples, 30)
    assert len(chunks) >= 3
    step_tokens = sum(loss_tokens(s) for s in samples)
    total_loss = 0.0
    for chunk in chunks:
        scaled, chunk_loss = scaled_chunk(chunk, loss, step_tokens)
        answer = await client.forward_backward("chunked", scaled, loss=chunk_loss)
        total_loss += answer.metrics.loss
    pending = {a.adapter_id: a.pending_gradient_bytes for a in (await client.status()).adapters}
    assert pending["chunked"] > 0 and pending["whole"] == 0
    stepped = await client.optim_step("chunked")
    whole = await client.train_step("whole", samples, loss=loss)
    assert stepped.applied and stepped.grad_norm == pytest.approx(whole.metrics.grad_norm, rel=1e-4)
    assert total_loss == pytest.approx(whole.metrics.loss, abs=1e-5)
    chunked_lp = await client.compute_logprobs(PROBE, adapter_id="chunked")
    whole_lp = await client.compute_logprobs(PROBE, adapter_id="whole")
    pairs = zip(chunked_lp, whole_lp, strict=True)
    assert max(abs(x - y) for a, b in pairs for x, y in zip(a, b, strict=True)) < 1e-5
    assert all(a.pending_gradient_bytes == 0 for a in (await client.status()).adapters)


async def test_dropping_zero_advantage_samples_keeps_the_update(trainer):
    """The scheduler leaves samples with advantage 0 out of training
    (lorafleet.scheduler.batching.drop_zero_advantage): the rescaled rest must
    land on the same weights as the whole batch."""
    from lorafleet.scheduler.batching import drop_zero_advantage

    client = trainer.client
    for name in ("kept", "whole"):
        await client.create_adapter(name, lora=LORA_8, optimizer=OPT, seed=5)
    rng = random.Random(11)
    samples = random_samples(rng, 3, completion=4) + random_samples(rng, 5, completion=8)
    for s in samples[1::2]:
        s.advantage = 0.0
    kept, dropped = drop_zero_advantage(samples, kl_coef=0.0)
    assert dropped == 4
    trained = await client.train_step("kept", kept)
    whole = await client.train_step("whole", samples)
    assert trained.metrics.num_sequences == 4 and whole.metrics.num_sequences == 8
    assert trained.metrics.loss == pytest.approx(whole.metrics.loss, abs=1e-6)
    assert trained.metrics.grad_norm == pytest.approx(whole.metrics.grad_norm, rel=1e-5)
    apart, off_base = await logprob_distances(client, "kept", "whole")
    assert apart < 1e-6
    assert off_base > 1e-4  # training moved it off the base


def with_sampling_logprobs(samples, rewrite):
    """Copies of `samples` whose sampling logprobs are `rewrite(logprobs)`."""
    from lorafleet.api.trainer.v1 import trainer_pb2

    out = []
    for s in samples:
        copy = trainer_pb2.TrainSample()
        copy.CopyFrom(s)
        copy.sampling_logprobs[:] = rewrite(list(s.sampling_logprobs))
        out.append(copy)
    return out


async def train_fresh_adapters(client, batches, loss, seed):
    """One step of a fresh adapter per (name, batch): its metrics and the
    logprobs it then gives PROBE."""
    out = []
    for name, batch in batches:
        await client.create_adapter(name, lora=LORA_8, optimizer=OPT, seed=seed)
        metrics = (await client.train_step(name, batch, loss=loss)).metrics
        out.append((metrics, await client.compute_logprobs(PROBE, adapter_id=name)))
    return out


async def test_on_policy_update_ignores_the_engines_logprob_rounding(trainer):
    """With on_policy the importance ratio comes from the trainer's own logprobs:
    the same tokens give the same update whatever sampling logprobs came with
    them; without it the engine's logprobs weigh the update (and here differ)."""
    from lorafleet.api.trainer.v1 import trainer_pb2

    client = trainer.client
    samples = random_samples(random.Random(13), 6)
    nudged = with_sampling_logprobs(
        samples, lambda lps: [x + 0.25 * ((i % 3) - 1) for i, x in enumerate(lps)]
    )

    async def train_both(on_policy: bool):
        loss = trainer_pb2.LossConfig(kind=trainer_pb2.LOSS_KIND_POLICY_GRADIENT,
                                      on_policy=on_policy)
        out = await train_fresh_adapters(client, (("a", samples), ("b", nudged)), loss, seed=2)
        for name in ("a", "b"):
            await client.drop_adapter(name)
        return out

    (on_a, on_a_lp), (on_b, on_b_lp) = await train_both(on_policy=True)
    assert (on_a.loss, on_a.grad_norm) == (on_b.loss, on_b.grad_norm)
    assert on_a_lp == on_b_lp
    assert on_a.clip_fraction == 0.0
    assert on_a.logprob_gap != on_b.logprob_gap  # the engine's logprobs still feed the gap
    (off_a, _), (off_b, _) = await train_both(on_policy=False)
    assert off_a.grad_norm != off_b.grad_norm


async def test_on_policy_samples_may_leave_out_sampling_logprobs(trainer):
    """On-policy, the engine's logprobs only feed logprob_gap: samples without
    them train exactly as with them, and the gap is reported as unmeasured.
    Off-policy they are the ratio's behaviour policy, and leaving them out is
    refused."""
    from lorafleet.api.trainer.v1 import trainer_pb2

    client = trainer.client
    samples = random_samples(random.Random(17), 6)
    bare = with_sampling_logprobs(samples, lambda lps: [])
    on_policy = trainer_pb2.LossConfig(kind=trainer_pb2.LOSS_KIND_POLICY_GRADIENT,
                                       on_policy=True)
    (with_m, with_lp), (without_m, without_lp) = await train_fresh_adapters(
        client, (("with", samples), ("without", bare)), on_policy, seed=3
    )
    assert (with_m.loss, with_m.grad_norm) == (without_m.loss, without_m.grad_norm)
    assert with_lp == without_lp
    assert with_m.HasField("logprob_gap") and not without_m.HasField("logprob_gap")
    off_policy = trainer_pb2.LossConfig(kind=trainer_pb2.LOSS_KIND_POLICY_GRADIENT)
    with pytest.raises(InvalidArgument) as info:
        await client.train_step("without", bare, loss=off_policy)
    assert info.value.reason == "LOGPROBS_LENGTH_MISMATCH"
    assert (await client.train_step("without", bare, loss=on_policy)).step == 2  # unchanged


async def test_save_and_load_state(trainer):
    client = trainer.client
    await client.create_adapter("exp", lora=LORA_4, optimizer=OPT)
    rng = random.Random(5)
    await client.train_step("exp", random_samples(rng, 2))
    state = await client.save_state("exp")
    assert state.step == 1 and state.uri.startswith("file:///") and len(state.sha256) == 64
    saved_lp = await client.compute_logprobs(PROBE, adapter_id="exp")
    await client.train_step("exp", random_samples(rng, 2))

    with pytest.raises(DataLoss) as e:
        await client.load_state("exp", state.uri, "0" * 64)
    assert e.value.reason == "STATE_DIGEST_MISMATCH"
    with pytest.raises(NotFound) as e:
        await client.load_state("exp", state.uri + ".gone", state.sha256)
    assert e.value.reason == "STATE_NOT_FOUND"

    # Replace in place: back to step 1 and its weights.
    info = await client.load_state("exp", state.uri, state.sha256)
    assert info.step == 1
    assert await client.compute_logprobs(PROBE, adapter_id="exp") == saved_lp
    # Replace an adapter of another shape, and create one that is absent.
    await client.create_adapter("other", lora=LORA_8)
    info = await client.load_state("other", state.uri, state.sha256)
    assert (info.step, info.lora.rank) == (1, 4)
    await client.drop_adapter("exp")
    info = await client.load_state("exp", state.uri, state.sha256)
    assert info.step == 1 and info.optimizer.learning_rate == pytest.approx(1e-2)
    assert await client.compute_logprobs(PROBE, adapter_id="exp") == saved_lp
    assert await client.compute_logprobs(PROBE, adapter_id="other") == saved_lp


async def test_status_reports_memory(trainer):
    client = trainer.client
    await client.create_adapter("exp", lora=LORA_8, optimizer=OPT)
    await client.train_step("exp", random_samples(random.Random(6), 2))
    status = await client.status()
    assert status.base_model_bytes > 0
    assert status.process_memory_bytes > status.base_model_bytes
    (info,) = status.adapters
    assert info.step == 1 and info.parameter_count > 0
    assert info.parameter_bytes == 4 * info.parameter_count  # fp32
    assert info.optimizer_state_bytes >= 2 * info.parameter_bytes  # AdamW moments


async def test_blocking_client(trainer):
    # The sync twin runs on its own loop thread; the server's loop keeps serving.
    def blocking() -> int:
        with TrainerClient(trainer.address) as client:
            client.create_adapter("sync", lora=LORA_4)
            return client.status().slots_used

    assert await asyncio.to_thread(blocking) == 1


class FakeRegistry:
    """Resolves every selector to one stored version; counts downloads."""

    def __init__(self, directory, ref) -> None:
        self.directory, self.ref, self.downloads = directory, ref, 0

    async def resolve(self, selector, *, node_id=""):
        return pb_registry.ResolveVersionResponse(ref=self.ref)

    async def download_version(self, adapter_id, version, dest_dir):
        self.downloads += 1
        for f in self.ref.files:
            shutil.copy(self.directory / f.name, dest_dir / f.name)
        return dest_dir


async def test_create_from_version_loads_in_place_or_downloads(trainer, tmp_path):
    client, engine = trainer.client, trainer.runtime.engine
    await client.create_adapter("src", lora=LORA_8, optimizer=OPT, seed=3)
    await client.train_step("src", random_samples(random.Random(7), 2))
    saved = await asyncio.to_thread(engine.save_peft, "src", tmp_path / "src-v1")
    ref = adapter_pb2.AdapterRef(
        adapter_id="src",
        version=1,
        uri=(tmp_path / "src-v1").as_uri(),
        sha256=saved.sha256,
        files=[
            adapter_pb2.FileDigest(name=f.name, sha256=f.sha256, size_bytes=f.size_bytes)
            for f in saved.files
        ],
    )
    fake = FakeRegistry(tmp_path / "src-v1", ref)
    trainer.runtime.servicer.registry = fake
    src_lp = await client.compute_logprobs(PROBE, adapter_id="src")

    await client.create_adapter("local", from_version="src@1")  # readable file://: in place
    assert fake.downloads == 0
    ref.uri = "s3://bucket/adapters/src/1"  # not readable here: downloaded
    await client.create_adapter("remote", from_version="src@1")
    assert fake.downloads == 1
    ref.uri = (tmp_path / "src-v1").as_uri()
    ref.files[0].sha256 = "0" * 64  # local files no longer match: downloaded
    await client.drop_adapter("local")
    await client.create_adapter("local", from_version="src@1")
    assert fake.downloads == 2
    for name in ("local", "remote"):
        assert await client.compute_logprobs(PROBE, adapter_id=name) == src_lp
        assert (await client.adapter_info(name)).step == 0  # fresh optimizer
    downloads = trainer.settings.cache_path / ".trainer-downloads"
    assert list(downloads.iterdir()) == []  # loaded, then cleaned up
