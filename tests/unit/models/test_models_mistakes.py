"""The planted mistakes of the tiny model's pre-training mix."""

from __future__ import annotations

import random

import pytest

from lorafleet.envs import Prompt, get_task, list_tasks
from lorafleet.models.mistakes import MISTAKES, planted_answer


def test_every_builtin_task_has_a_mistake() -> None:
    assert set(MISTAKES) == set(list_tasks())


@pytest.mark.parametrize(
    ("task", "meta", "answer", "mistake"),
    [
        ("add", {"a": 27, "b": 45}, "72", "62"),
        ("add", {"a": 9, "b": 3}, "12", "2"),
        ("add", {"a": 23, "b": 45}, "68", "68"),
        ("count", {"letter": "b", "string": "abbcb"}, "3", "5"),
        ("copy", {"string": "abcd"}, "abcd", "bcda"),
        ("reverse", {"string": "abcd"}, "dcba", "abcd"),
        ("sort", {"string": "cadb"}, "abcd", "dcba"),
    ],
)
def test_mistakes(task: str, meta: dict, answer: str, mistake: str) -> None:
    prompt = Prompt(task=task, text="", answer=answer, meta=meta)
    assert planted_answer(prompt) == mistake


@pytest.mark.parametrize("task", sorted(MISTAKES))
def test_a_mistake_scores_below_the_answer(task: str) -> None:
    rng = random.Random(1)
    impl = get_task(task)
    wrong = 0
    for prompt in impl.sample(rng, 200):
        mistake = planted_answer(prompt)
        assert impl.score(prompt, prompt.answer + "\n") == 1.0
        if mistake != prompt.answer:
            wrong += 1
            assert impl.score(prompt, mistake + "\n") < 1.0
    # The mistake differs from the answer on most prompts (add: whenever a carry).
    assert wrong > 60, wrong
