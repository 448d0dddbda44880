"""Built-in tasks: deterministic sampling, exact and partial credit, registry errors."""

from __future__ import annotations

import random

import pytest

from lorafleet.envs import (
    PROMPT_END,
    STOP,
    InvalidTaskParams,
    Prompt,
    Task,
    UnknownTask,
    evaluate_accuracy,
    extract_answer,
    get_task,
    list_tasks,
)

TASKS = list_tasks()
GARBAGE = ["", "\n", "   ", "-", "?!?", "999999999999999999999999", "abc\ndef", "x" * 200, "\x00é"]


def test_at_least_five_tasks() -> None:
    assert len(TASKS) >= 5
    assert {"add", "copy", "count", "reverse", "sort"} <= set(TASKS)


@pytest.mark.parametrize("name", TASKS)
def test_sampling_is_deterministic_for_a_seed(name: str) -> None:
    task = get_task(name)
    assert isinstance(task, Task)
    a = task.sample(random.Random(7), 50)
    b = task.sample(random.Random(7), 50)
    c = task.sample(random.Random(8), 50)
    assert a == b
    assert a != c
    assert len({p.text for p in a}) > 25  # actually varied


@pytest.mark.parametrize("name", TASKS)
def test_prompt_format(name: str) -> None:
    for p in get_task(name).sample(random.Random(0), 50):
        assert p.task == name
        assert p.text.startswith(name) and p.text.endswith(PROMPT_END)
        assert STOP not in p.text and STOP not in p.answer and p.answer
        assert p.target == p.answer + STOP
        assert p.text.isascii() and p.answer.isascii()


@pytest.mark.parametrize("name", TASKS)
def test_correct_answer_scores_one(name: str) -> None:
    task = get_task(name)
    for p in task.sample(random.Random(1), 50):
        assert task.score(p, p.answer) == 1.0
        assert task.score(p, p.answer + STOP) == 1.0
        assert task.score(p, p.answer + STOP + "trailing junk") == 1.0


@pytest.mark.parametrize("name", TASKS)
def test_wrong_and_garbage_answers(name: str) -> None:
    task = get_task(name)
    for p in task.sample(random.Random(2), 50):
        for junk in GARBAGE:
            s = task.score(p, junk)
            assert 0.0 <= s <= 1.0
            if extract_answer(junk) != p.answer:
                assert s < 1.0
        assert task.score(p, p.answer + "x") < 1.0
        assert task.score(p, "z" + p.answer) < 1.0


def _prompt(name: str, **meta: object) -> Prompt:
    task = get_task(name)
    for p in task.sample(random.Random(3), 500):
        if all(p.meta.get(k) == v for k, v in meta.items()):
            return p
    raise AssertionError(f"no prompt of {name} with {meta}")


@pytest.mark.parametrize("name", ["reverse", "copy", "sort"])
def test_string_partial_credit_is_monotone(name: str) -> None:
    task = get_task(name)
    p = next(p for p in task.sample(random.Random(4), 200) if len(p.answer) >= 5)
    ans = p.answer
    # Corrupting more positions never scores more.
    scores = []
    for k in range(len(ans) + 1):
        wrong = "".join("#" if i < k else c for i, c in enumerate(ans))
        scores.append(task.score(p, wrong))
    assert scores[0] == 1.0
    assert all(a > b for a, b in zip(scores, scores[1:], strict=False))
    assert scores[-1] == 0.0
    # A missing tail earns partial credit, less than one wrong character.
    assert 0 < task.score(p, ans[:-2]) < task.score(p, ans[:-1]) < 1.0


@pytest.mark.parametrize("name", ["count", "add"])
def test_numeric_partial_credit(name: str) -> None:
    task = get_task(name)
    for p in task.sample(random.Random(5), 50):
        truth = int(p.answer)
        exact = task.score(p, str(truth))
        near = task.score(p, str(truth + 1))
        far = task.score(p, str(truth + 100))
        assert exact == 1.0 > near >= far >= 0.0
        assert task.score(p, "not a number") == 0.0


def test_count_closeness() -> None:
    task = get_task("count")
    p = Prompt(task="count", text="count a: aaab=", answer="3", meta={})
    assert [task.score(p, str(k)) for k in (3, 2, 4, 1, 5)] == [1.0, 0.5, 0.5, 0.25, 0.25]


def test_add_credit() -> None:
    task = get_task("add")
    p = Prompt(task="add", text="add: 23+45=", answer="68", meta={})
    assert task.score(p, "68") == 1.0
    assert task.score(p, "67") == pytest.approx(0.45 * (0.5 + 67 / 68))
    assert task.score(p, "18") == pytest.approx(0.45 * (0.5 + 18 / 68))
    assert task.score(p, "168") == pytest.approx(0.45 * 2 / 3)
    assert task.score(p, "0") == 0.0
    assert task.score(p, "67") > task.score(p, "78") > task.score(p, "168")


def test_answers_are_right() -> None:
    p = _prompt("count", letter="a")
    assert p.answer == str(p.meta["string"].count("a"))
    p = get_task("add").sample(random.Random(0), 1)[0]
    assert int(p.answer) == p.meta["a"] + p.meta["b"]
    p = get_task("sort").sample(random.Random(0), 1)[0]
    assert p.answer == "".join(sorted(p.meta["string"]))
    p = get_task("reverse").sample(random.Random(0), 1)[0]
    assert p.answer == p.meta["string"][::-1]


def test_unknown_task_lists_known_tasks() -> None:
    with pytest.raises(UnknownTask) as err:
        get_task("no-such-task")
    assert isinstance(err.value, ValueError)
    for name in TASKS:
        assert name in str(err.value)


def test_task_params() -> None:
    task = get_task("reverse", {"min_len": 2, "max_len": 3, "alphabet": "xy"})
    for p in task.sample(random.Random(0), 30):
        assert 2 <= len(p.answer) <= 3 and set(p.answer) <= {"x", "y"}
    with pytest.raises(InvalidTaskParams, match="unknown parameter"):
        get_task("reverse", {"lenght": 3})
    with pytest.raises(InvalidTaskParams, match="must be int"):
        get_task("count", {"max_len": "9"})
    with pytest.raises(InvalidTaskParams, match="min_len"):
        get_task("copy", {"min_len": 5, "max_len": 2})
    with pytest.raises(InvalidTaskParams, match="max_value"):
        get_task("add", {"min_value": 10, "max_value": 1})


def test_evaluate_accuracy_with_a_fake_engine() -> None:
    task = get_task("reverse")
    oracle = evaluate_accuracy(
        lambda ps: [p.split(": ")[1][-2::-1] + STOP for p in ps], task, 40, 0
    )
    assert oracle.accuracy == 1.0 and oracle.mean_reward == 1.0 and oracle.n == 40
    echo = evaluate_accuracy(lambda ps: [p.split(": ")[1][:-1] for p in ps], task, 40, 0)
    assert echo.accuracy < 0.2 and 0.0 < echo.mean_reward < 1.0
    with pytest.raises(ValueError, match="completions"):
        evaluate_accuracy(lambda ps: ps[:-1], task, 5, 0)


def test_envs_do_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, lorafleet.envs; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
