"""The tiny model is an RL testbed: a few GRPO steps lift its greedy accuracy.

In-process (the training engine samples and trains; no services), so a recipe
change that makes the tiny model unlearnable fails here in seconds rather than in
the end-to-end scheduler test. Same settings as the scheduler's defaults for a
built-in task with exact-match rewards: 16 prompts x 8 samples at temperature 1,
rank-8 LoRA, learning rate 3e-3.
"""

from __future__ import annotations

import random

import pytest
import torch

from lorafleet.envs import STOP, get_task
from lorafleet.lora.engine import TrainEngine
from lorafleet.lora.spec import LoraSpec
from lorafleet.lora.types import LossConfig, OptimizerConfig, TrainRequest, TrainSample
from lorafleet.models.tokenizer import BOS, EOS, build_vocab
from lorafleet.scheduler.grpo import group_advantages

STEPS = 10
PROMPTS, GROUP = 16, 8
EVAL_PROMPTS = 64
MIN_RISE = 0.2

VOCAB = build_vocab()
ID_TO_CHAR = {i: c for c, i in VOCAB.items()}
STOPS = (VOCAB[EOS], VOCAB[STOP])


def encode(text: str) -> list[int]:
    return [VOCAB[BOS], *(VOCAB[c] for c in text)]


def decode(ids: tuple[int, ...]) -> str:
    return "".join(ID_TO_CHAR[i] for i in ids if i != VOCAB[EOS])


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    torch.set_num_threads(1)
    return TrainEngine.from_pretrained(tiny_model_dir)


def greedy_accuracy(engine: TrainEngine, adapter: str | None, task, prompts) -> float:  # type: ignore[no-untyped-def]
    outs = engine.sample(adapter, [encode(p.text) for p in prompts], max_new_tokens=16,
                         temperature=1e-6, stop_token_ids=STOPS)
    return sum(task.score(p, decode(o.completion_ids)) == 1.0
               for p, o in zip(prompts, outs, strict=True)) / len(prompts)


@pytest.mark.parametrize("task_name", ["copy", "count"])
def test_grpo_lifts_greedy_accuracy(engine: TrainEngine, task_name: str) -> None:
    task = get_task(task_name)
    held_out = task.sample(random.Random(999), EVAL_PROMPTS)
    name = f"rl-{task_name}"
    engine.create_adapter(name, LoraSpec(rank=8, alpha=16), OptimizerConfig(learning_rate=3e-3),
                          seed=0)
    try:
        base = greedy_accuracy(engine, None, task, held_out)
        rng, gen = random.Random(1), torch.Generator().manual_seed(1)
        for _ in range(STEPS):
            prompts = task.sample(rng, PROMPTS)
            outs = engine.sample(name, [encode(p.text) for p in prompts for _ in range(GROUP)],
                                 max_new_tokens=16, generator=gen, stop_token_ids=STOPS)
            samples = []
            for i, prompt in enumerate(prompts):
                group = outs[i * GROUP:(i + 1) * GROUP]
                rewards = [float(task.score(prompt, decode(o.completion_ids)) == 1.0)
                           for o in group]
                samples += [TrainSample(o.sequence, o.logprobs_C, advantage=a)
                            for o, a in zip(group, group_advantages(rewards), strict=True)]
            (result,) = engine.train_step([TrainRequest(name, tuple(samples), LossConfig())])
            assert result.applied
        trained = greedy_accuracy(engine, name, task, held_out)
    finally:
        engine.drop_adapter(name)
    assert trained >= base + MIN_RISE, (task_name, base, trained)
