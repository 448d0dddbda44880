"""``reverse``: reverse a short string.

Prompt ``"reverse: abc="``, answer ``"cba"``. Partial credit per character
(:func:`~lorafleet.envs.types.char_credit`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafleet.envs._strings import LOWERCASE, check_alphabet, check_lengths, random_string
from lorafleet.envs.types import Prompt, TaskParams, char_credit, extract_answer


@dataclass(frozen=True)
class ReverseParams(TaskParams):
    task_name = "reverse"
    min_len: int = 3
    max_len: int = 7
    alphabet: str = LOWERCASE

    def validate(self) -> None:
        check_lengths(self, self.min_len, self.max_len)
        check_alphabet(self, self.alphabet)


class ReverseTask:
    name = "reverse"
    description = "Reverse a short string."

    def __init__(self, params: ReverseParams | None = None) -> None:
        self.params = params or ReverseParams()

    def sample(self, rng: random.Random, n: int) -> list[Prompt]:
        p = self.params
        out = []
        for _ in range(n):
            s = random_string(rng, p.alphabet, p.min_len, p.max_len)
            out.append(
                Prompt(task=self.name, text=f"reverse: {s}=", answer=s[::-1], meta={"string": s})
            )
        return out

    def score(self, prompt: Prompt, completion: str) -> float:
        return char_credit(extract_answer(completion), prompt.answer)
