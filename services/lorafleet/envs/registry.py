"""Built-in tasks by name.

``get_task("count", {"max_len": 12})`` builds a task from plain config values;
parameters are validated by each task's :class:`~lorafleet.envs.types.TaskParams`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lorafleet.envs.add import AddParams, AddTask
from lorafleet.envs.copy import CopyParams, CopyTask
from lorafleet.envs.count import CountParams, CountTask
from lorafleet.envs.reverse import ReverseParams, ReverseTask
from lorafleet.envs.sort import SortParams, SortTask
from lorafleet.envs.types import Task

TaskFactory = Callable[[Mapping[str, Any] | None], Task]


class UnknownTask(ValueError):
    """No built-in task has this name."""

    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(f"unknown task {name!r}; known tasks: {', '.join(known)}")
        self.name = name
        self.known = known


BUILTIN_TASKS: dict[str, TaskFactory] = {
    "add": lambda params: AddTask(AddParams.from_mapping(params)),
    "copy": lambda params: CopyTask(CopyParams.from_mapping(params)),
    "count": lambda params: CountTask(CountParams.from_mapping(params)),
    "reverse": lambda params: ReverseTask(ReverseParams.from_mapping(params)),
    "sort": lambda params: SortTask(SortParams.from_mapping(params)),
}


def list_tasks() -> list[str]:
    """Names of the built-in tasks, sorted."""
    return sorted(BUILTIN_TASKS)


def get_task(name: str, params: Mapping[str, Any] | None = None) -> Task:
    """Build the named task; raises :class:`UnknownTask` or ``InvalidTaskParams``."""
    try:
        factory = BUILTIN_TASKS[name]
    except KeyError:
        raise UnknownTask(name, list_tasks()) from None
    return factory(params)
