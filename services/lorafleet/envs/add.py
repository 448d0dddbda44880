"""``add``: add two small non-negative integers.

Prompt ``"add: 23+45="``, answer ``"68"``. A parsable wrong sum earns
``0.9 * (digits + closeness) / 2``: ``digits`` is the fraction of right-aligned digits
that match (over the longer number), ``closeness`` is
``max(0, 1 - |error| / max(answer, 10))``. Nearer sums and more right digits score
more; only the exact sum scores ``1.0``; unparsable text scores ``0``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafleet.envs.types import Prompt, TaskParams, extract_answer, parse_int


@dataclass(frozen=True)
class AddParams(TaskParams):
    task_name = "add"
    min_value: int = 0
    """Smallest operand."""
    max_value: int = 49
    """Largest operand."""

    def validate(self) -> None:
        self._require(
            0 <= self.min_value <= self.max_value,
            f"need 0 <= min_value <= max_value, got {self.min_value}, {self.max_value}",
        )
        self._require(self.max_value < 10**9, "max_value must be below 10**9")


def sum_credit(predicted: int, answer: int) -> float:
    if predicted == answer:
        return 1.0
    a, b = str(predicted)[::-1], str(answer)[::-1]
    digits = sum(1 for x, y in zip(a, b, strict=False) if x == y) / max(len(a), len(b))
    closeness = max(0.0, 1.0 - abs(predicted - answer) / max(answer, 10))
    return 0.9 * (digits + closeness) / 2


class AddTask:
    name = "add"
    description = "Add two small non-negative integers."

    def __init__(self, params: AddParams | None = None) -> None:
        self.params = params or AddParams()

    def sample(self, rng: random.Random, n: int) -> list[Prompt]:
        p = self.params
        out = []
        for _ in range(n):
            a = rng.randint(p.min_value, p.max_value)
            b = rng.randint(p.min_value, p.max_value)
            out.append(
                Prompt(
                    task=self.name, text=f"add: {a}+{b}=", answer=str(a + b), meta={"a": a, "b": b}
                )
            )
        return out

    def score(self, prompt: Prompt, completion: str) -> float:
        predicted = parse_int(extract_answer(completion))
        if predicted is None:
            return 0.0
        return sum_credit(predicted, int(prompt.answer))
