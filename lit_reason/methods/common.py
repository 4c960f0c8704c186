"""Small pieces every method module composes: task resolution, the warmup-cosine schedule, and the
greedy-accuracy ``validate``/``test`` loops of the RL methods."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader


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


class ExampleRows(torch.utils.data.Dataset):
    """Task rows as a map-style dataset (batches are plain lists of rows, see :func:`as_list`)."""

    def __init__(self, rows: list) -> None:
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def as_list(batch: list) -> list:
    """Collate function that keeps a batch as the list of its items."""
    return list(batch)


class GreedyAccuracyLoops:
    """``validate``/``test`` as greedy accuracy on the task's validation/test split.

    Mixed into the RL modules (online and offline); the host provides ``task``, ``policy``,
    ``tokenizer`` and the hyper-parameters ``eval_limit``, ``max_new_tokens``, ``rollout_batch_size``.
    Logs ``val/accuracy`` / ``test/accuracy``.
    """

    def _eval_loader(self, split: str) -> DataLoader:
        rows = self.task.examples(split)[: self.hparams.eval_limit]
        return DataLoader(ExampleRows(rows), batch_size=self.hparams.rollout_batch_size, collate_fn=as_list)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    def _greedy_accuracy(self, examples: list[dict], name: str) -> None:
        from lit_reason.evaluation import evaluate_policy
        from lit_reason.parallel.fsdp import gathered

        with gathered(self.policy):  # FSDP: the policy gathered once, not per decoded token
            result = evaluate_policy(self.policy, self.tokenizer, self.task, examples,
                                     max_new_tokens=self.hparams.max_new_tokens,
                                     batch_size=self.hparams.rollout_batch_size)
        self.log(name, result["accuracy"], batch_size=len(examples), prog_bar=True)

    def validation_step(self, examples: list[dict], batch_idx: int) -> None:
        """``validate``: greedy accuracy on the validation split (``val/accuracy``)."""
        self._greedy_accuracy(examples, "val/accuracy")

    def test_step(self, examples: list[dict], batch_idx: int) -> None:
        """``test``: greedy accuracy on the test split (``test/accuracy``)."""
        self._greedy_accuracy(examples, "test/accuracy")
