"""Held-out accuracy of the policy during training, logged as ``val/accuracy`` (``test/accuracy`` on the test split)."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import torch

from lit_reason.contracts import HasPolicy, require
from lit_reason.evaluation import evaluate_policy
from lit_reason.parallel.fsdp import gathered


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Sends metrics to every logger at the current global step, outside Lightning's ``self.log``.

    Evaluation runs at fit start and end, where ``self.log`` is not allowed; the values are also
    put in ``trainer.callback_metrics`` so checkpoint monitors and tests can read them.
    """
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)
    for k, v in metrics.items():
        trainer.callback_metrics[k] = torch.tensor(float(v))


def accuracy_name(split: str) -> str:
    """The one name of greedy accuracy on ``split``, shared with the ``validate``/``test`` loops."""
    return {"validation": "val/accuracy", "test": "test/accuracy"}.get(split, f"{split}/accuracy")


class EvalAccuracy(pl.Callback):
    """Greedy accuracy on held-out prompts: before training, every N steps, and at the end.

    The LightningModule must expose ``policy`` (a causal LM), ``tokenizer`` and ``task``.
    Under several processes each rank grades a shard and the counts are summed.

    Args:
        split: Task split to evaluate on (held out from training); the metric is
            ``val/accuracy`` for ``validation``, ``test/accuracy`` for ``test``.
        limit: Number of examples (the first ``limit`` of the split, so every run sees the same).
        every_n_steps: Also evaluate every N optimiser steps (None: only start and end).
        every_n_epochs: Also evaluate at the end of every N-th epoch (offline methods; with
            ``IterativeRounds`` of one epoch per round, 1 gives the accuracy after each round).
        max_new_tokens: Length limit of the evaluated responses.
        batch_size: Sequences per forward pass.
    """

    #: what the LightningModule must provide (lit_reason.contracts); checked at fit start
    contract = HasPolicy

    def __init__(self, split: str = "validation", limit: int = 200, every_n_steps: int | None = None,
                 max_new_tokens: int = 96, batch_size: int = 128, every_n_epochs: int | None = None) -> None:
        if limit < 1:
            raise ValueError(f"EvalAccuracy.limit must be >= 1, got {limit}")
        for name, value in (("every_n_steps", every_n_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and value < 1:
                raise ValueError(f"EvalAccuracy.{name} must be >= 1 or None, got {value}")
        self.split = split
        self.limit = limit
        self.every_n_steps = every_n_steps
        self.every_n_epochs = every_n_epochs
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.history: list[tuple[int, float]] = []
        self._last_step = -1
        self._fit_start = time.perf_counter()
        self._eval_seconds = 0.0

    def evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> float:
        require(pl_module, self.contract, "EvalAccuracy")
        started = time.perf_counter()
        examples = pl_module.task.examples(self.split)[: self.limit]
        shard = examples[trainer.global_rank :: trainer.world_size]
        correct = 0.0
        # FSDP: every rank gathers the policy once, even one with an empty shard (no per-token collectives)
        with gathered(pl_module.policy):
            if shard:
                result = evaluate_policy(pl_module.policy, pl_module.tokenizer, pl_module.task, shard,
                                         max_new_tokens=self.max_new_tokens, batch_size=self.batch_size,
                                         progress=True)
                correct = result["accuracy"] * result["n"]
        counts = torch.tensor([correct, float(len(shard))], device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum")
        acc = float(counts[0] / counts[1])
        self.history.append((trainer.global_step, acc))
        self._last_step = trainer.global_step
        # wall-clock since fit start up to this evaluation's start, minus earlier evaluations: the
        # training time of accuracy-vs-time curves (0 at the fit-start evaluation)
        elapsed = started - self._fit_start - self._eval_seconds
        self._eval_seconds += time.perf_counter() - started
        log_metrics(trainer, {accuracy_name(self.split): acc, "time/train_seconds": elapsed})
        return acc

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._eval_seconds = 0.0
        if trainer.ckpt_path is None:
            self.evaluate(trainer, pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed fit: Lightning restores the step only after on_fit_start, so evaluate here, and
        # not at all when the checkpoint's step was already evaluated
        if trainer.ckpt_path is not None and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        n = self.every_n_epochs
        if n and (trainer.current_epoch + 1) % n == 0 and trainer.global_step != self._last_step:
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step != self._last_step or len(self.history) < 2:
            self.evaluate(trainer, pl_module)

    @property
    def state_key(self) -> str:
        # several evaluators (other splits or schedules) may sit side by side in one Trainer
        return self._generate_state_key(split=self.split, limit=self.limit, every_n_steps=self.every_n_steps,
                                        every_n_epochs=self.every_n_epochs)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict.get("history", []))
        self._last_step = self.history[-1][0] if self.history else -1
