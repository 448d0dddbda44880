"""``sort``: sort the letters of a short string.

Prompt ``"sort: dbca="``, answer ``"abcd"``. Partial credit per character
(:func:`~lorafleet.envs.types.char_credit`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafleet.envs._strings import LOWERCASE, check_alphabet, check_lengths, random_string
from lorafleet.envs.types import Prompt, TaskParams, char_credit, extract_answer


@dataclass(frozen=True)
class SortParams(TaskParams):
    task_name = "sort"
    min_len: int = 3
    max_len: int = 7
    alphabet: str = LOWERCASE

    def validate(self) -> None:
        check_lengths(self, self.min_len, self.max_len)
        check_alphabet(self, self.alphabet)


class SortTask:
    name = "sort"
    description = "Sort the letters of a short string."

    def __init__(self, params: SortParams | None = None) -> None:
        self.params = params or SortParams()

    def sample(self, rng: random.Random, n: int) -> list[Prompt]:
        p = self.params
        out = []
        for _ in range(n):
            s = random_string(rng, p.alphabet, p.min_len, p.max_len)
            out.append(
                Prompt(
                    task=self.name,
                    text=f"sort: {s}=",
                    answer="".join(sorted(s)),
                    meta={"string": s},
                )
            )
        return out

    def score(self, prompt: Prompt, completion: str) -> float:
        return char_credit(extract_answer(completion), prompt.answer)
