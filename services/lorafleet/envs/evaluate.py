"""Engine-agnostic evaluation of a task.

``generate_fn`` maps prompt strings to completion strings (greedy decoding for an
accuracy number); any engine (vLLM, transformers, a remote service) fits.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from lorafleet.envs.types import Task

GenerateFn = Callable[[list[str]], Sequence[str]]


@dataclass(frozen=True, slots=True)
class EvalResult:
    task: str
    n: int
    """Number of prompts evaluated."""
    accuracy: float
    """Exact-match rate: fraction of prompts whose score is 1.0."""
    mean_reward: float
    """Mean score, partial credit included."""


def evaluate_accuracy(generate_fn: GenerateFn, task: Task, n: int, seed: int) -> EvalResult:
    """Sample ``n`` prompts with ``random.Random(seed)``, generate once, score."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    prompts = task.sample(random.Random(seed), n)
    completions = list(generate_fn([p.text for p in prompts]))
    if len(completions) != len(prompts):
        raise ValueError(
            f"generate_fn returned {len(completions)} completions for {len(prompts)} prompts"
        )
    scores = [task.score(p, c) for p, c in zip(prompts, completions, strict=True)]
    exact = sum(1 for s in scores if s == 1.0)
    return EvalResult(task=task.name, n=n, accuracy=exact / n, mean_reward=sum(scores) / n)
