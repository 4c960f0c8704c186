"""Reasoning tasks: data, prompts, gold solutions and rewards.

Example:
    >>> task = get_task("arithmetic", seed=0)
    >>> task.prompt(task.examples("test")[0])  # doctest: +SKIP
    'Compute: 12+34-5\\n'
"""

from __future__ import annotations

from lit_reason.tasks.arithmetic import ArithmeticTask
from lit_reason.tasks.base import DatasetTask, Task
from lit_reason.tasks.gsm8k import GSM8KTask
from lit_reason.tasks.jsonl import MissingFieldError, read_jsonl
from lit_reason.tasks.math import MathTask, extract_boxed

TASKS: dict[str, type[Task]] = {
    ArithmeticTask.name: ArithmeticTask,
    GSM8KTask.name: GSM8KTask,
    MathTask.name: MathTask,
}


def get_task(name: str, **kwargs) -> Task:
    """Builds the task registered as ``name`` with ``kwargs``.

    Raises:
        ValueError: ``name`` is not registered (the message lists the known names).
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](**kwargs)


__all__ = [
    "TASKS",
    "ArithmeticTask",
    "DatasetTask",
    "GSM8KTask",
    "MathTask",
    "MissingFieldError",
    "Task",
    "extract_boxed",
    "get_task",
    "read_jsonl",
]
