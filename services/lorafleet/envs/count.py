"""``count``: how often does a letter occur in a short string.

Prompt ``"count b: abbcb="``, answer ``"3"``. Partial credit ``0.5 ** |error|``
for a parsable wrong count (closeness), ``0`` for anything unparsable.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from lorafleet.envs._strings import check_alphabet, check_lengths, random_string
from lorafleet.envs.types import Prompt, TaskParams, extract_answer, parse_int


@dataclass(frozen=True)
class CountParams(TaskParams):
    task_name = "count"
    min_len: int = 4
    """Shortest string to count in."""
    max_len: int = 10
    """Longest string to count in."""
    alphabet: str = "abcd"
    """Letters the string is drawn from (fewer letters, larger counts)."""

    def validate(self) -> None:
        check_lengths(self, self.min_len, self.max_len)
        check_alphabet(self, self.alphabet)


class CountTask:
    name = "count"
    description = "Count the occurrences of a letter in a short string."

    def __init__(self, params: CountParams | None = None) -> None:
        self.params = params or CountParams()

    def sample(self, rng: random.Random, n: int) -> list[Prompt]:
        p = self.params
        out = []
        for _ in range(n):
            letter = rng.choice(p.alphabet)
            s = random_string(rng, p.alphabet, p.min_len, p.max_len)
            out.append(
                Prompt(
                    task=self.name,
                    text=f"count {letter}: {s}=",
                    answer=str(s.count(letter)),
                    meta={"letter": letter, "string": s},
                )
            )
        return out

    def score(self, prompt: Prompt, completion: str) -> float:
        predicted = parse_int(extract_answer(completion))
        if predicted is None:
            return 0.0
        error = abs(predicted - int(prompt.answer))
        return 1.0 if error == 0 else 0.5 ** min(error, 64)
