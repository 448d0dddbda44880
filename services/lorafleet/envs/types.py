"""Domain types of the built-in environments.

The text format, defined once for every built-in task
---------------------------------------------------

* A prompt is one short line of printable ASCII that ends with ``PROMPT_END``
  (``"="``), e.g. ``"reverse: abc="``. It starts with the task's name so one model
  can serve every task.
* A completion is the answer followed by ``STOP`` (``"\\n"``), e.g. ``"cba\\n"``.
  Engines stop on the newline (the tiny model's generation config also lists it as
  an end-of-sequence token). Scoring reads only the text before the first newline,
  with surrounding whitespace removed (:func:`extract_answer`), so a completion with
  or without its trailing newline scores the same.
* ``Prompt.answer`` holds the reference answer without the newline;
  ``Prompt.text + Prompt.answer + STOP`` is the supervised target string.

Scores are deterministic floats in ``[0, 1]``; exactly the reference answer scores
``1.0`` and anything else scores strictly less (partial credit where it fits).
"""

from __future__ import annotations

import dataclasses
import random
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

PROMPT_END = "="
"""Last character of every built-in prompt."""

STOP = "\n"
"""Ends every completion; engines use it as the stop string."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt of a task together with what the verifier needs."""

    task: str
    """Name of the task that produced the prompt."""
    text: str
    """The prompt exactly as the model sees it (ends with ``PROMPT_END``)."""
    answer: str
    """Reference answer, without the trailing ``STOP``."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Task-specific structured inputs (JSON-serialisable)."""

    @property
    def target(self) -> str:
        """The supervised completion: answer plus the stop newline."""
        return self.answer + STOP


@runtime_checkable
class Task(Protocol):
    """A task: samples prompts and scores completions, deterministically."""

    name: str
    description: str

    def sample(self, rng: random.Random, n: int) -> list[Prompt]:
        """Draw ``n`` prompts using only ``rng`` (same seed, same prompts)."""
        ...

    def score(self, prompt: Prompt, completion: str) -> float:
        """Reward in ``[0, 1]``; ``1.0`` exactly when the answer is correct."""
        ...


class InvalidTaskParams(ValueError):
    """A task's constructor parameters are unknown, mistyped or out of range."""


@dataclass(frozen=True)
class TaskParams:
    """Base of each task's parameter dataclass.

    Subclasses declare typed fields with defaults and override :meth:`validate`.
    Construction from untrusted config goes through :meth:`from_mapping`, which
    rejects unknown keys and wrong types with one clear message.
    """

    task_name: ClassVar[str] = "task"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InvalidTaskParams` when values are out of range."""

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any] | None) -> Self:
        params = dict(params or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(params) - set(fields))
        if unknown:
            raise InvalidTaskParams(
                f"task {cls.task_name!r}: unknown parameter(s) {unknown}; known: {sorted(fields)}"
            )
        hints = typing.get_type_hints(cls)
        for key, value in params.items():
            _check_type(cls.task_name, key, value, hints[key])
        return cls(**params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _require(self, ok: bool, message: str) -> None:
        if not ok:
            raise InvalidTaskParams(f"task {self.task_name!r}: {message}")


def _check_type(task: str, key: str, value: Any, hint: Any) -> None:
    is_union = isinstance(hint, types.UnionType)
    allowed: tuple[type, ...] = tuple(typing.get_args(hint)) if is_union else (hint,)
    # bool is an int subclass; a flag where a number belongs is a config mistake.
    mistaken_bool = isinstance(value, bool) and bool not in allowed
    if mistaken_bool or not isinstance(value, allowed):
        names = " | ".join(t.__name__ for t in allowed)
        raise InvalidTaskParams(
            f"task {task!r}: parameter {key!r} must be {names}, got {type(value).__name__} "
            f"({value!r})"
        )


def extract_answer(completion: str) -> str:
    """The part of a completion that is scored: its first line, stripped."""
    return completion.split(STOP, 1)[0].strip()


def char_credit(predicted: str, answer: str) -> float:
    """Per-position character credit: matches / max(len); 1.0 only when equal."""
    if predicted == answer:
        return 1.0
    longest = max(len(predicted), len(answer))
    if longest == 0:
        return 1.0
    matches = sum(1 for a, b in zip(predicted, answer, strict=False) if a == b)
    return matches / longest


def parse_int(text: str) -> int | None:
    """An optionally signed decimal integer, or ``None`` (no exceptions)."""
    body = text[1:] if text[:1] == "-" else text
    if not body or not body.isascii() or not body.isdigit() or len(body) > 18:
        return None
    return int(text)
