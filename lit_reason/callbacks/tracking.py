"""One step axis, a progress bar that counts training batches right, and a closing summary line.

**Step axis.** Every metric a run logs is stamped with ``trainer.global_step``, the number of
optimiser steps taken when it was logged (the unit of ``trainer.max_steps``). Lightning stamps
``self.log`` rows with the number of *batches* instead, which differs from the optimiser step
count wherever a batch takes several optimiser steps (an online iteration: epochs x minibatches;
OREO: two optimisers). :class:`StepAxis` logs Lightning's ``step`` key (Lightning's documented
way to set the x-axis of a row) so training rows, evaluation and calibration share one axis.

**Progress bar.** :class:`StepProgressBar` counts training batches (online *iterations*) with a
total derived from ``max_steps`` and the optimiser steps a batch takes (measured on the first
batch), and feeds tqdm increments so the rate (s/it) is real.

**Summary.** :class:`RunSummary` prints one line at the end of fit: held-out accuracy at the
start and end (``EvalAccuracy``), the last calibration error (``ValueCalibration``), the run folder
and the W&B run path.

The ``lit_reason`` CLI adds all three to every ``fit`` (the bar only when progress bars are on).
"""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only


class StepAxis(pl.Callback):
    """Stamps every training row with the optimiser step count (``trainer.global_step``)."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pl_module.log("step", float(trainer.global_step), on_step=True, on_epoch=False, logger=True)


class StepProgressBar(TQDMProgressBar):
    """TQDM bar over training batches whose total follows ``max_steps`` in optimiser steps."""

    def __init__(self, refresh_rate: int = 1, leave: bool = False) -> None:
        super().__init__(refresh_rate=refresh_rate, leave=leave)
        self._steps_per_batch: float | None = None
        self._start_step = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self._start_step = trainer.global_step
        self.train_progress_bar.set_description(f"Epoch {trainer.current_epoch} (batches)")

    def _total(self, trainer: pl.Trainer, done: int) -> float:
        total = trainer.num_training_batches
        if trainer.max_steps and trainer.max_steps > 0 and self._steps_per_batch:
            left = math.ceil((trainer.max_steps - trainer.global_step) / self._steps_per_batch)
            total = min(total, done + max(left, 0))
        return total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        bar = self.train_progress_bar
        if bar is None or bar.disable:
            return
        n = batch_idx + 1
        if self._steps_per_batch is None and trainer.global_step > self._start_step:
            # optimiser steps of one batch (an online iteration takes epochs x minibatches)
            self._steps_per_batch = float(trainer.global_step - self._start_step)
        bar.total = self._total(trainer, n)
        if bar.n == 0 and n > 1:  # a resumed epoch starts mid-way; count the rate from here
            bar.n = bar.last_print_n = n - 1
        bar.update(max(n - bar.n, 0))
        bar.set_postfix(self.get_metrics(trainer, pl_module))


def wandb_run_path(trainer: pl.Trainer) -> str | None:
    """``entity/project/id`` (or ``project/id`` offline) of the run's W&B logger, if any."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            run = logger.experiment
            path = "/".join(p for p in (getattr(run, "entity", None), run.project, run.id) if p)
            if getattr(run.settings, "mode", None) == "offline":
                # where `wandb sync` finds it: the run folder above its files/
                path += f" ({run.dir.rsplit('/files', 1)[0]})"
            return path
    return None


def summary_line(trainer: pl.Trainer, seconds: float) -> str:
    """The closing line of a fit (see :class:`RunSummary`)."""
    from lit_reason.callbacks.evaluation import EvalAccuracy
    from lit_reason.callbacks.value_calibration import ValueCalibration

    parts = [f"lit_reason: fit done at step {trainer.global_step} in {seconds:.0f} s"]
    for cb in trainer.callbacks:
        if isinstance(cb, EvalAccuracy) and cb.history:
            (s0, a0), (s1, a1) = cb.history[0], cb.history[-1]
            parts.append(f"{cb.split} accuracy {a0:.3f} (step {s0}) -> {a1:.3f} (step {s1})")
        if isinstance(cb, ValueCalibration) and cb.history:
            step, metrics = cb.history[-1]
            shown = ", ".join(f"{k.split('/')[-1]} {metrics[k]:.3f}" for k in ("value/mae_vs_mc", "value/ece")
                              if k in metrics)
            if shown:
                parts.append(f"calibration at step {step}: {shown}")
    # trainer.log_dir's choice without its broadcast (a collective: this runs on rank 0 only)
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    first = trainer.loggers[0] if trainer.loggers else None
    folder = (trainer.default_root_dir if first is None
              else first.log_dir if isinstance(first, (CSVLogger, TensorBoardLogger)) else first.save_dir)
    parts.append(f"run folder {folder}")
    wandb = wandb_run_path(trainer)
    if wandb:
        parts.append(f"W&B {wandb}")
    return "; ".join(parts)


class RunSummary(pl.Callback):
    """Prints :func:`summary_line` when fit ends (rank 0)."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self.line: str | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._started = time.perf_counter()

    @rank_zero_only
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.line = summary_line(trainer, time.perf_counter() - self._started)
        print(self.line, flush=True)
