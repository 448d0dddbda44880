"""``copy``: repeat a short string verbatim.

Prompt ``"copy: abc="``, answer ``"abc"``. Partial credit per character
(:func:`~lorafleet.envs.types.char_credit`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafleet.envs._strings import LOWERCASE, check_alphabet, check_lengths, random_string
from lorafleet.envs.types import Prompt, TaskParams, char_credit, extract_answer


@dataclass(frozen=True)
class CopyParams(TaskParams):
    task_name = "copy"
    min_len: int = 4
    max_len: int = 12
    alphabet: str = LOWERCASE

    def validate(self) -> None:
        check_lengths(self, self.min_len, self.max_len)
        check_alphabet(self, self.alphabet)


class CopyTask:
    name = "copy"
    description = "Repeat a short string verbatim."

    def __init__(self, params: CopyParams | None = None) -> None:
        self.params = params or CopyParams()

    def sample(self, rng: random.Random, n: int) -> list[Prompt]:
        p = self.params
        out = []
        for _ in range(n):
            s = random_string(rng, p.alphabet, p.min_len, p.max_len)
            out.append(Prompt(task=self.name, text=f"copy: {s}=", answer=s, meta={"string": s}))
        return out

    def score(self, prompt: Prompt, completion: str) -> float:
        return char_credit(extract_answer(completion), prompt.answer)
