"""Classic mistakes planted in the tiny model's pre-training mix.

Why: RL on a real LLM mostly *selects* among behaviours its base model already
has: the right answer is among its samples, the greedy answer is often not. A
tiny model pre-trained on right answers only has no such gap. Its mistakes are
capacity limits: sampling at temperature 1 is *worse* than its greedy answer
(measured on the v1 recipe: reverse 0.48 greedy, 0.2 mean sampled reward), so
GRPO sharpens a distribution whose mode greedy decoding already picks, and tens
of steps do not move greedy accuracy.

So for a share of each task's pre-training examples the target is a classic
mistake instead of the right answer: counting every letter instead of the asked
one, forgetting the carries, copying instead of reversing, starting a copy one
letter late, sorting the wrong way. The base model then answers greedily with the
mistake on most prompts while sampling the right procedure often: a weak greedy
policy with the right answer within reach, which GRPO finds and keeps (measured
with the default recipe, 30 steps, greedy accuracy on 128 held-out prompts:
count 0.00 -> 0.33, copy 0.26 -> 0.97, reverse 0.18 -> 0.81, sort 0.20 -> 0.72;
addition stays weak). The verifiers are untouched: a mistake scores as wrong as
it always did.
"""

from __future__ import annotations

from collections.abc import Callable

from lorafleet.envs.types import Prompt


def add_without_carries(prompt: Prompt) -> str:
    """Digit-by-digit sum that drops every carry (27+45 -> 62)."""
    a, b = str(prompt.meta["a"]), str(prompt.meta["b"])
    width = max(len(a), len(b))
    digits = [
        str((int(x) + int(y)) % 10) for x, y in zip(a.zfill(width), b.zfill(width), strict=True)
    ]
    return str(int("".join(digits)))


def count_every_letter(prompt: Prompt) -> str:
    """The string's length: every letter counted, not only the asked one."""
    return str(len(str(prompt.meta["string"])))


def copy_rotated(prompt: Prompt) -> str:
    """Starting one letter late and wrapping round (abcd -> bcda)."""
    s = str(prompt.meta["string"])
    return s[1:] + s[:1]


def reverse_unchanged(prompt: Prompt) -> str:
    return str(prompt.meta["string"])


def sort_descending(prompt: Prompt) -> str:
    return "".join(sorted(str(prompt.meta["string"]), reverse=True))


MISTAKES: dict[str, Callable[[Prompt], str]] = {
    "add": add_without_carries,
    "count": count_every_letter,
    "copy": copy_rotated,
    "reverse": reverse_unchanged,
    "sort": sort_descending,
}
"""Task name -> the planted wrong answer for a prompt of that task."""


def planted_answer(prompt: Prompt) -> str:
    """The mistaken answer for ``prompt`` (may equal the right one, e.g. no carry)."""
    return MISTAKES[prompt.task](prompt)
