"""Built-in environments: tasks with deterministic verifiers (no torch here).

The prompt/completion text format is defined in :mod:`lorafleet.envs.types`.
"""

from lorafleet.envs.evaluate import EvalResult, evaluate_accuracy
from lorafleet.envs.registry import BUILTIN_TASKS, UnknownTask, get_task, list_tasks
from lorafleet.envs.types import (
    PROMPT_END,
    STOP,
    InvalidTaskParams,
    Prompt,
    Task,
    TaskParams,
    extract_answer,
)

__all__ = [
    "BUILTIN_TASKS",
    "PROMPT_END",
    "STOP",
    "EvalResult",
    "InvalidTaskParams",
    "Prompt",
    "Task",
    "TaskParams",
    "UnknownTask",
    "evaluate_accuracy",
    "extract_answer",
    "get_task",
    "list_tasks",
]
