"""Exact resume: everything random or positional that Lightning's checkpoint leaves out.

Lightning saves weights, optimiser, schedulers, loop counters and callback states. A run resumed
from that alone diverges at once: the rollout engine's and minibatch shuffler's generators restart
from their seeds, the global Python/NumPy/torch RNGs are wherever the new process left them, and the
training sampler starts its epoch again from the first prompt. :class:`ResumeState` saves those
pieces under ``checkpoint["lit_reason_resume"]`` and puts them back before the first resumed batch,
so a run killed at a checkpoint and resumed writes the same ``metrics.csv`` rows and reaches the
same parameters as an uninterrupted one (tested on CPU in ``tests/test_resume.py``).

What is saved:

* RNG states: ``random``, ``numpy``, torch CPU (and CUDA when present), taken at the checkpoint.
* Every ``torch.Generator`` held by the module or by a plain (non-``nn.Module``) object it holds
  (``engine.generator`` of the rollout engine, ``_shuffle`` of the minibatch order), by attribute path.
* Integer counters the module lists in ``resume_counters`` (default ``skipped_iterations``).
* The training sampler's position: its generator state (or, for a sampler seeded from the global
  torch RNG, that RNG's state) at the start of the epoch, and the batches already consumed. On
  resume the epoch's order is redrawn from that state and the consumed batches are skipped.
* The CSV log: the rows on disk at the checkpoint (flushed first) and the training row Lightning
  logs right *after* the checkpoint callback of that batch. A resumed run cuts ``metrics.csv`` back
  to those rows (dropping what the killed run wrote after its checkpoint) and logs the pending row,
  so the file reads as one uninterrupted run. Lightning repeats a value logged once in an epoch
  (e.g. an offline method's ``data/*`` counts, logged at its first batch) in every later row of that
  epoch; the first resumed batch logs those values again so the resumed rows carry them too.

Callback states that already live in the checkpoint (``EvalAccuracy`` history,
``ValueCalibration`` probe set, ``IterativeRounds`` and ``MCTSTargetRefresh`` rounds) need nothing here.
The ``lit_reason`` CLI adds this callback to every run.
"""

from __future__ import annotations

import csv
import os
import random
from contextlib import contextmanager
from typing import Any, Iterator

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import Sampler

KEY = "lit_reason_resume"
_VERSION = 1


# ------------------------------------------------------------------------------------- sampler
class ResumableSampler(Sampler):
    """Wraps a training sampler: remembers how each epoch's order was drawn, and can skip ahead.

    Args:
        inner: The sampler the DataLoader was built with (any; random ones are replayed exactly).
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.epoch_start: dict[str, Any] = {}
        self._replay: dict[str, Any] | None = None
        self._skip = 0

    def __len__(self) -> int:
        return len(self.inner)

    def resume(self, epoch_start: dict[str, Any], skip: int) -> None:
        """Makes the next epoch replay the order drawn from ``epoch_start`` and drop its first ``skip`` indices."""
        self._replay, self._skip = epoch_start, skip

    def _state(self) -> dict[str, Any]:
        gen = getattr(self.inner, "generator", None)
        # a RandomSampler without a generator seeds itself from the global torch RNG at iteration start
        return {"generator": gen.get_state() if gen is not None else None, "torch": torch.get_rng_state()}

    def __iter__(self) -> Iterator[int]:
        replay, skip = self._replay, self._skip
        self._replay, self._skip = None, 0
        gen = getattr(self.inner, "generator", None)
        if replay is None:
            self.epoch_start = self._state()
            it = iter(self.inner)
            first = list(_take(it, 1))
        else:
            self.epoch_start = replay
            if gen is not None and replay["generator"] is not None:
                gen.set_state(replay["generator"])
            with _torch_rng(replay["torch"]):
                it = iter(self.inner)
                first = list(_take(it, 1))  # samplers draw their seed lazily, on the first index
        for position, idx in enumerate(_chain(first, it)):
            if position >= skip:
                yield idx


def _chain(head: list[int], tail: Iterator[int]) -> Iterator[int]:
    yield from head
    yield from tail


def _take(it: Iterator[int], n: int) -> Iterator[int]:
    for _ in range(n):
        try:
            yield next(it)
        except StopIteration:
            return


@contextmanager
def _torch_rng(state: torch.Tensor):
    current = torch.get_rng_state()
    torch.set_rng_state(state)
    try:
        yield
    finally:
        torch.set_rng_state(current)


def _train_loaders(trainer: pl.Trainer) -> list:
    loaders = trainer.train_dataloader
    if loaders is None:
        return []
    flat = getattr(loaders, "flattened", None)
    if flat is not None:
        return list(flat)
    return list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]


def wrap_train_sampler(trainer: pl.Trainer) -> ResumableSampler | None:
    """Puts a :class:`ResumableSampler` around the training DataLoader's sampler (idempotent)."""
    for loader in _train_loaders(trainer):
        batch_sampler = getattr(loader, "batch_sampler", None)
        if batch_sampler is None or not hasattr(batch_sampler, "sampler"):
            continue
        if not isinstance(batch_sampler.sampler, ResumableSampler):
            batch_sampler.sampler = ResumableSampler(batch_sampler.sampler)
        return batch_sampler.sampler
    return None


# ------------------------------------------------------------------------------------ RNG state
def _generators(module: pl.LightningModule) -> dict[str, torch.Generator]:
    """Generators held by the module or by a plain object one attribute below it, by attribute path."""
    found: dict[str, torch.Generator] = {}
    for name, value in vars(module).items():
        if isinstance(value, torch.Generator):
            found[name] = value
        elif not isinstance(value, (torch.nn.Module, torch.Tensor, dict, list, tuple, str, int, float)) \
                and hasattr(value, "__dict__"):
            for sub, inner in vars(value).items():
                if isinstance(inner, torch.Generator):
                    found[f"{name}.{sub}"] = inner
    return found


def _global_rng() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    # plain lists, not arrays: Lightning and LightningCLI read checkpoints with weights_only=True
    state = {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_global_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- CSV log
def _csv_loggers(trainer: pl.Trainer) -> list[CSVLogger]:
    return [lg for lg in trainer.loggers if isinstance(lg, CSVLogger)]


def _csv_rows(path) -> tuple[list[str], list[dict]]:
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or []), list(reader)
    except FileNotFoundError:
        return [], []


#: where the CLI moves a resumed run's metrics.csv before Lightning's CSV writer (which deletes an
#: existing metrics.csv when it is created, in the Trainer's setup, before any callback runs) starts
BEFORE_RESUME = "metrics.before_resume.csv"


def _metrics_path(logger: CSVLogger) -> str:
    # from log_dir, not logger.experiment: creating the writer deletes an existing metrics.csv
    return os.path.join(logger.log_dir, "metrics.csv")


def set_aside_metrics(version_dir: str | os.PathLike) -> None:
    """Moves ``metrics.csv`` of a run about to resume out of the CSV writer's way (see BEFORE_RESUME)."""
    path = os.path.join(version_dir, "metrics.csv")
    if os.path.isfile(path):
        os.replace(path, os.path.join(version_dir, BEFORE_RESUME))


def _restore_csv(logger: CSVLogger, header: list[str], kept: list[dict]) -> None:
    """Writes the rows kept from before the resume, then any row written since, and tells the writer the header."""
    writer = logger.experiment
    logger.save()
    new_header, since = _csv_rows(writer.metrics_file_path)
    fields = sorted(set(header) | set(new_header) | set(writer.metrics_keys))
    with open(writer.metrics_file_path, "w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=fields)
        out.writeheader()
        out.writerows(kept + since)
    # the writer rewrites the header only for keys it has not seen; it must know the old columns
    writer.metrics_keys = fields


# ------------------------------------------------------------------------------------ callback
class ResumeState(pl.Callback):
    """Saves and restores the state an exact resume needs beyond Lightning's own (see module docstring)."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None
        self._csv: list[tuple[CSVLogger, list[str], list[dict]]] = []
        self._carry: dict[str, float] | None = None
        self.sampler: ResumableSampler | None = None

    # ---- save
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        csv_rows = []
        for logger in _csv_loggers(trainer):
            logger.save()  # rows logged so far reach the disk with the checkpoint
            csv_rows.append(len(_csv_rows(_metrics_path(logger))[1]))
        pending = None
        connector = trainer._logger_connector
        if trainer.training and connector.should_update_logs:
            # the training row of this batch is sent to the loggers after on_train_batch_end
            pending = {k: float(v) for k, v in connector.metrics["log"].items()}
        sampler = self.sampler
        counters = getattr(pl_module, "resume_counters", ("skipped_iterations",))
        checkpoint[KEY] = {
            "version": _VERSION,
            "rng": _global_rng(),
            "generators": {name: g.get_state() for name, g in _generators(pl_module).items()},
            "counters": {name: getattr(pl_module, name) for name in counters if hasattr(pl_module, name)},
            "sampler": None if sampler is None else {
                "epoch_start": sampler.epoch_start,
                "batches_done": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "epoch": trainer.current_epoch,
            },
            "csv_rows": csv_rows,
            "pending_log": pending,
        }

    # ---- load
    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(KEY)
        self._csv = []
        if self._pending is not None and trainer.is_global_zero:
            # read now: the CSV writer, created later in the fit, deletes the file it finds
            for logger, keep in zip(_csv_loggers(trainer), self._pending.get("csv_rows", [])):
                aside = os.path.join(logger.log_dir, BEFORE_RESUME)
                header, rows = _csv_rows(aside if os.path.isfile(aside) else _metrics_path(logger))
                self._csv.append((logger, header, rows[:keep]))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.sampler = wrap_train_sampler(trainer)
        state, self._pending = self._pending, None
        if state is None:
            return
        generators = _generators(pl_module)
        for name, value in state["generators"].items():
            if name in generators:
                generators[name].set_state(value)
        for name, value in state["counters"].items():
            setattr(pl_module, name, value)
        sampler_state = state.get("sampler")
        if sampler_state and self.sampler is not None and sampler_state["epoch"] == trainer.current_epoch:
            loader = next(iter(_train_loaders(trainer)))
            batch_size = loader.batch_sampler.batch_size
            done = sampler_state["batches_done"]
            if done < len(loader):  # a checkpoint at an epoch's last batch resumes at the next epoch
                self.sampler.resume(sampler_state["epoch_start"], done * batch_size)
                # Lightning repeats every value logged earlier in an epoch in each later row of it;
                # the resumed epoch did not log those, so its first batch logs them again (below)
                self._carry = dict(state.get("pending_log") or {})
        if trainer.is_global_zero:
            for logger, header, kept in self._csv:
                _restore_csv(logger, header, kept)
                aside = os.path.join(logger.log_dir, BEFORE_RESUME)
                if os.path.isfile(aside):
                    os.remove(aside)
            self._csv = []
            if state.get("pending_log"):
                trainer._logger_connector.log_metrics(dict(state["pending_log"]))
        _set_global_rng(state["rng"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        carry, self._carry = self._carry, None
        if not carry:
            return
        logged = {v.meta.name for _, v in trainer._results.valid_items()}
        for name, value in carry.items():
            if name not in logged and name not in ("step", "epoch"):
                pl_module.log(name, value, on_step=True, on_epoch=False, batch_size=1)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # offline methods build a new DataLoader per epoch (reload_dataloaders_every_n_epochs)
        self.sampler = wrap_train_sampler(trainer) or self.sampler
