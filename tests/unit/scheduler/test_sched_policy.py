"""Pure scheduling policy: GRPO advantages, placement, weighted fair admission."""

from __future__ import annotations

import asyncio

import pytest

from lorafleet.api.scheduler.v1 import scheduler_pb2 as pb
from lorafleet.scheduler.fairshare import FairShareGate
from lorafleet.scheduler.grpo import group_advantages
from lorafleet.scheduler.placement import NodeCapacity, choose_node


def test_group_advantages_are_zero_mean_unit_std():
    adv = group_advantages([1.0, 0.0, 0.0, 1.0])
    assert adv == pytest.approx([1.0, -1.0, -1.0, 1.0])
    assert sum(group_advantages([0.2, 0.9, 0.4])) == pytest.approx(0.0, abs=1e-12)


def test_equal_rewards_carry_no_signal():
    assert group_advantages([0.5, 0.5, 0.5]) == [0.0, 0.0, 0.0]


def _spec(rank=8, base="tiny"):
    s = pb.ExperimentSpec(base_model=base)
    s.lora.rank = rank
    return s


def test_placement_best_fit_packs_the_fullest_node_with_room():
    nodes = [
        NodeCapacity("a", "tiny", 16, free_slots=3),
        NodeCapacity("b", "tiny", 16, free_slots=1),
        NodeCapacity("c", "tiny", 16, free_slots=0),
    ]
    assert choose_node(_spec(), nodes) == "b"


def test_placement_respects_rank_model_and_readiness():
    nodes = [
        NodeCapacity("a", "tiny", 8, free_slots=2),
        NodeCapacity("b", "other", 64, free_slots=2),
        NodeCapacity("c", "tiny", 64, free_slots=2, ready=False),
    ]
    assert choose_node(_spec(rank=16), nodes) is None
    assert choose_node(_spec(rank=8), nodes) == "a"


async def test_fair_gate_serves_light_experiments_between_a_hogs_requests():
    gate = FairShareGate(budget_tokens=100)
    order: list[str] = []
    release = asyncio.Event()

    async def work(exp: str, cost: int):
        async with gate.admit(exp, cost, weight=1.0):
            order.append(exp)
            await release.wait()

    # The hog holds the whole budget, then queues three more big requests
    # before the light experiments ask.
    first = asyncio.create_task(work("hog", 100))
    await asyncio.sleep(0)
    tasks = [asyncio.create_task(work("hog", 100)) for _ in range(3)]
    await asyncio.sleep(0)
    tasks += [asyncio.create_task(work(name, 10)) for name in ("a", "b")]
    await asyncio.sleep(0)
    release.set()
    await asyncio.gather(first, *tasks)
    # Light requests overtake the hog's queued backlog.
    assert order.index("a") < 3 and order.index("b") < 3
    assert gate.in_flight == 0


async def test_oversized_request_is_admitted_alone_not_starved():
    gate = FairShareGate(budget_tokens=10)
    async with gate.admit("big", 1000, 1.0):
        assert gate.in_flight == 1000
    assert gate.in_flight == 0


async def test_weights_divide_service_in_proportion():
    gate = FairShareGate(budget_tokens=1)
    served = {"heavy": 0, "light": 0}
    stop = asyncio.Event()

    async def loop(exp, weight):
        while not stop.is_set():
            async with gate.admit(exp, 1, weight):
                served[exp] += 1
                await asyncio.sleep(0)

    # Several requests outstanding per experiment, so admission order decides
    # (with one request each, any work-conserving gate just alternates).
    tasks = [asyncio.create_task(loop("heavy", 3.0)) for _ in range(4)]
    tasks += [asyncio.create_task(loop("light", 1.0)) for _ in range(4)]
    await asyncio.sleep(0.2)
    stop.set()
    await asyncio.gather(*tasks)
    ratio = served["heavy"] / max(served["light"], 1)
    assert 2.0 < ratio < 4.5, served


def test_sequence_mean_weights_make_token_mean_a_sample_mean():
    from lorafleet.api.trainer.v1 import trainer_pb2
    from lorafleet.scheduler.runner import sequence_mean_weights

    def sample(completion_len, advantage):
        s = trainer_pb2.TrainSample(advantage=advantage)
        s.sequence.token_ids.extend([1, 2, 3] + [7] * completion_len)
        s.sequence.prompt_length = 3
        return s

    # A short right answer and a long wrong one: zero-sum advantages.
    samples = [sample(2, 1.0), sample(10, -1.0)]
    sequence_mean_weights(samples)
    lengths = [2, 10]
    token_mean = sum(s.advantage * n for s, n in zip(samples, lengths, strict=True)) / sum(
        lengths
    )
    assert token_mean == pytest.approx(0.0, abs=1e-6)  # = mean of per-sample advantages
    assert samples[0].advantage > 0 > samples[1].advantage


def test_rollout_chunks_cover_every_prompt_within_the_cost():
    from lorafleet.scheduler.batching import rollout_chunks

    # The default step (16 prompts x 8 samples x 48 tokens) is one request.
    assert rollout_chunks(16, 8 * 48, 65536 // 4) == [(0, 16)]
    chunks = rollout_chunks(256, 8 * 96, 65536 // 4)
    assert chunks[0] == (0, 21) and chunks[-1][1] == 256
    assert all(hi - lo <= 21 for lo, hi in chunks)
    assert [i for lo, hi in chunks for i in range(lo, hi)] == list(range(256))
    # A prompt whose samples cost more than a chunk still goes out, alone.
    assert rollout_chunks(3, 10_000, 100) == [(0, 1), (1, 2), (2, 3)]


def _train_sample(prompt_len, completion_len, advantage=1.0):
    from lorafleet.api.trainer.v1 import trainer_pb2

    s = trainer_pb2.TrainSample(advantage=advantage)
    s.sequence.token_ids.extend([1] * prompt_len + [7] * completion_len)
    s.sequence.prompt_length = prompt_len
    return s


def test_train_chunks_keep_order_within_the_token_bound():
    from lorafleet.scheduler.batching import sample_tokens, train_chunks

    samples = [_train_sample(4, n) for n in (2, 6, 3, 9, 1, 5, 4)]  # 6..13 tokens each
    chunks = train_chunks(samples, 20)
    assert [s for c in chunks for s in c] == samples
    assert all(sum(sample_tokens(s) for s in c) <= 20 for c in chunks)
    assert len(chunks) == 4
    # The default step (~4k tokens) is one chunk; a sample over the bound goes alone.
    assert len(train_chunks(samples, 65536 // 8)) == 1
    assert [len(c) for c in train_chunks([_train_sample(4, 50), _train_sample(4, 1)], 20)] == [1, 1]


def test_scaled_chunks_sum_to_the_whole_step():
    from lorafleet.api.trainer.v1 import trainer_pb2
    from lorafleet.scheduler.batching import loss_tokens, scaled_chunk, train_chunks

    samples = [_train_sample(3, n, advantage=a) for n, a in ((2, 1.0), (8, -0.5), (5, 2.0))]
    loss = trainer_pb2.LossConfig(kind=trainer_pb2.LOSS_KIND_POLICY_GRADIENT, kl_coef=0.1)
    step_tokens = sum(loss_tokens(s) for s in samples)  # 15
    chunks = train_chunks(samples, 12)
    assert [len(c) for c in chunks] == [1, 1, 1]
    scaled = [scaled_chunk(c, loss, step_tokens) for c in chunks]
    # Chunk k's per-token loss is scaled by its share of the step's loss tokens,
    # so share_k * mean_k summed over chunks is the step's token mean.
    assert [s[0].advantage for s, _ in scaled] == pytest.approx([2 / 15, -0.5 * 8 / 15, 2 / 3])
    assert sum(chunk_loss.kl_coef for _, chunk_loss in scaled) == pytest.approx(0.1)
    assert samples[1].advantage == -0.5  # the caller's samples are untouched
    with pytest.raises(ValueError):
        sft = trainer_pb2.LossConfig(kind=trainer_pb2.LOSS_KIND_CROSS_ENTROPY)
        scaled_chunk(chunks[0], sft, 15)


def test_zero_advantage_samples_are_dropped_and_the_rest_rescaled():
    from lorafleet.scheduler.batching import drop_zero_advantage, loss_tokens

    samples = [_train_sample(3, n, advantage=a) for n, a in ((2, 1.0), (8, 0.0), (5, -2.0))]
    kept, dropped = drop_zero_advantage(samples, kl_coef=0.0)
    assert dropped == 1 and [loss_tokens(s) for s in kept] == [2, 5]
    # The trainer divides by the kept 7 loss tokens; the whole batch had 15.
    assert [s.advantage for s in kept] == pytest.approx([7 / 15, -2.0 * 7 / 15])
    assert samples[0].advantage == 1.0  # the caller's samples are untouched
    # A KL term gives every sample a gradient: nothing is dropped.
    assert drop_zero_advantage(samples, kl_coef=0.1) == (samples, 0)
    # Nothing to drop: the very same samples.
    kept, dropped = drop_zero_advantage(samples[:1], kl_coef=0.0)
    assert dropped == 0 and kept[0] is samples[0]
    # All zero: the shortest stays, so the optimizer still steps (on a zero gradient).
    flat = [_train_sample(3, n, advantage=0.0) for n in (6, 2, 9)]
    kept, dropped = drop_zero_advantage(flat, kl_coef=0.0)
    assert dropped == 2 and [loss_tokens(s) for s in kept] == [2] and kept[0].advantage == 0.0


def test_merged_train_metrics_weigh_chunks_by_loss_tokens():
    from lorafleet.api.common.v1 import metrics_pb2
    from lorafleet.scheduler.batching import merge_train_metrics

    parts = [
        metrics_pb2.TrainMetrics(loss=0.2, entropy=1.0, num_loss_tokens=30, num_sequences=3,
                                 fused_batch_adapters=1),
        metrics_pb2.TrainMetrics(loss=0.1, entropy=2.0, num_loss_tokens=10, num_sequences=1,
                                 fused_batch_adapters=3),
    ]
    merged = merge_train_metrics(parts, grad_norm=0.7)
    assert merged.loss == pytest.approx(0.3)
    assert merged.entropy == pytest.approx(1.25)
    assert (merged.num_loss_tokens, merged.num_sequences, merged.fused_batch_adapters) == (40, 4, 3)
    assert merged.grad_norm == pytest.approx(0.7)
    assert not merged.HasField("logprob_gap")  # no chunk carried sampling logprobs


def test_merged_logprob_gap_counts_only_chunks_that_measured_it():
    from lorafleet.api.common.v1 import metrics_pb2
    from lorafleet.scheduler.batching import merge_train_metrics

    parts = [
        metrics_pb2.TrainMetrics(logprob_gap=0.3, num_loss_tokens=30),
        metrics_pb2.TrainMetrics(num_loss_tokens=50),  # on-policy, no sampling logprobs
        metrics_pb2.TrainMetrics(logprob_gap=0.1, num_loss_tokens=10),
    ]
    merged = merge_train_metrics(parts, grad_norm=0.0)
    assert merged.HasField("logprob_gap")
    assert merged.logprob_gap == pytest.approx((0.3 * 30 + 0.1 * 10) / 40)


async def test_a_hog_holds_at_most_its_share_while_others_are_active():
    gate = FairShareGate(budget_tokens=100)
    release = asyncio.Event()
    admitted: list[str] = []

    async def work(exp: str, cost: int, weight: float = 1.0):
        async with gate.admit(exp, cost, weight):
            admitted.append(exp)
            await release.wait()

    # Alone, the hog may fill the whole budget.
    hog = [asyncio.create_task(work("hog", 25)) for _ in range(4)]
    await asyncio.sleep(0)
    assert gate.in_flight_by["hog"] == 100
    release.set()
    await asyncio.gather(*hog)
    release.clear()
    # With a light experiment active, the hog is held to half of it, and the
    # light request goes in at once instead of waiting for a hog chunk to end.
    light = asyncio.create_task(work("light", 10))
    await asyncio.sleep(0)
    hog = [asyncio.create_task(work("hog", 25)) for _ in range(4)]
    await asyncio.sleep(0)
    assert gate.in_flight_by == {"light": 10, "hog": 50}
    release.set()
    await asyncio.gather(light, *hog)
    assert gate.in_flight == 0 and not gate.in_flight_by
    # Weights divide the budget: weight 3 against 1 may hold three quarters.
    release.clear()
    light = asyncio.create_task(work("light", 10))
    await asyncio.sleep(0)
    heavy = [asyncio.create_task(work("heavy", 25, weight=3.0)) for _ in range(4)]
    await asyncio.sleep(0)
    assert gate.in_flight_by["heavy"] == 75
    release.set()
    await asyncio.gather(light, *heavy)
