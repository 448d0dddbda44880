"""RL learns (issue 4, must show): GRPO through the TrainerService API on a
built-in task raises the task reward of the adapter clearly above the base's.

Rollouts are sampled from the trainer's own model (``TrainEngine.sample``, the
adapter routed in, temperature 1: the policy being optimised), scored by the
task's verifier, turned into group-normalised advantages and sent as TrainStep
RPCs with the rollout's logprobs, as the scheduler drives the trainer. The reward
is measured on held-out prompts, base and adapter sampled with the same seed.

The task is ``count`` on strings of up to 6 letters, where the tiny model's base
reward at temperature 1 sits mid-range (about 0.57-0.60). What 20 GRPO steps buy on
this 0.66M-parameter model is the policy sharpening toward its best answers
(reward at temperature 1 up by about 0.1; greedy accuracy barely moves), the same
first effect GRPO has on larger models.

Determinism: every random draw is seeded and the trainer runs one adapter on one
torch thread, so a given software stack gives the same numbers every run.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest
import torch
from trainer_harness import start_trainer

from lorafleet.client.trainer import sample
from lorafleet.envs import STOP, get_task
from lorafleet.trainer.config import TrainerSettings

TASK, PARAMS = "count", {"max_len": 6}
STEPS = 20
UPDATES_PER_BATCH = 2  # PPO-style: the clipped ratio keeps the second update on-policy enough
PROMPTS, GROUP = 16, 8
EVAL_PROMPTS, EVAL_SAMPLES = 64, 8
MAX_NEW_TOKENS = 6
LORA = {"rank": 8, "alpha": 16.0}
OPTIMIZER = {"learning_rate": 5e-3, "max_grad_norm": 1.0}


@pytest.fixture
async def trainer(tmp_path, tiny_model_dir):
    threads = torch.get_num_threads()
    running = await start_trainer(
        TrainerSettings(
            model_path=str(tiny_model_dir),
            adapter_cache_dir=str(tmp_path / "cache"),
            registry_address="127.0.0.1:1",
            torch_threads=1,
            fuse_max_wait_ms=0.0,
        )
    )
    try:
        yield running
    finally:
        await running.stop()
        torch.set_num_threads(threads)


async def test_grpo_raises_task_reward_above_base(trainer, tiny_model_dir):
    from tokenizers import Tokenizer

    started = time.perf_counter()
    engine, client = trainer.runtime.engine, trainer.client
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    stop_id = tokenizer.token_to_id(STOP)
    task = get_task(TASK, PARAMS)

    async def rollout(adapter, prompts, n, generator):
        ids = [tokenizer.encode(p.text).ids for p in prompts for _ in range(n)]
        outs = await asyncio.to_thread(
            engine.sample,
            adapter,
            ids,
            max_new_tokens=MAX_NEW_TOKENS,
            generator=generator,
            stop_token_ids=[stop_id],
        )
        rewards = [
            task.score(p, tokenizer.decode(list(o.completion_ids)))
            for p, o in zip([p for p in prompts for _ in range(n)], outs, strict=True)
        ]
        return outs, rewards

    held_out = task.sample(random.Random(999), EVAL_PROMPTS)

    async def eval_reward(adapter):
        _, rewards = await rollout(
            adapter, held_out, EVAL_SAMPLES, torch.Generator().manual_seed(5)
        )
        return statistics.mean(rewards)

    base = await eval_reward(None)
    await client.create_adapter("rl", lora=LORA, optimizer=OPTIMIZER, seed=0)
    rng, generator = random.Random(0), torch.Generator().manual_seed(0)
    curve = []
    for step in range(STEPS):
        prompts = task.sample(rng, PROMPTS)
        outs, rewards = await rollout("rl", prompts, GROUP, generator)
        samples = []
        for g in range(PROMPTS):
            group = rewards[g * GROUP : (g + 1) * GROUP]
            mean, std = statistics.mean(group), statistics.pstdev(group)
            for o, r in zip(outs[g * GROUP : (g + 1) * GROUP], group, strict=True):
                samples.append(
                    sample(
                        list(o.prompt_ids) + list(o.completion_ids),
                        prompt_length=len(o.prompt_ids),
                        logprobs=o.logprobs_C,
                        advantage=(r - mean) / (std + 1e-4),
                        policy_version=step + 1,
                    )
                )
        for update in range(UPDATES_PER_BATCH):
            result = await client.train_step("rl", samples)
            assert result.applied
            if update == 0:
                # On-policy: the trainer scores the rollout's tokens as the rollout did.
                assert result.metrics.logprob_gap < 1e-4
        curve.append(round(statistics.mean(rewards), 3))

    trained = await eval_reward("rl")
    info = await client.adapter_info("rl")
    assert info.step == STEPS * UPDATES_PER_BATCH
    # Held-out prompts, 512 draws, same sampling seed for both (seen here: +0.09 to
    # +0.10 for training seeds 0, 1 and 2).
    assert trained > base + 0.06, (base, trained, curve)
    assert time.perf_counter() - started < 60
