"""Small pieces every method module composes: task resolution, the warmup-cosine schedule."""

from __future__ import annotations

import math
from typing import Any

import torch


def resolve_task(task: Any):
    """Accepts a Task instance, a task name, or ``{"name": ..., **kwargs}``."""
    from lit_reason.tasks import get_task
    from lit_reason.tasks.base import Task

    if isinstance(task, Task):
        return task
    if isinstance(task, str):
        return get_task(task)
    if isinstance(task, dict):
        kwargs = dict(task)
        if "name" not in kwargs:
            raise ValueError(f"task config {task} needs a `name` key")
        return get_task(kwargs.pop("name"), **kwargs)
    raise TypeError(f"task must be a Task, a name or a dict, got {type(task).__name__}")


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_ratio: float = 0.1):
    """Linear warmup to the base LR, then cosine decay to ``min_ratio`` of it, stepped per update."""
    total_steps = max(total_steps, 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(warmup_steps, 1)
        progress = min(1.0, (step - warmup_steps) / max(total_steps - warmup_steps, 1))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
