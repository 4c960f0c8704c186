"""DVO's target refresh: re-run the search with the current policy, then train on the new targets.

DVO's iterative variant re-runs MCTS with the improved policy each round (docs/dvo.md,
"Targets"). :class:`MCTSTargetRefresh` does it every
``every_n_epochs`` epochs: at the end of epoch ``k * every_n_epochs`` (k = 1, 2, ...), unless the
run ends there, global rank 0 calls ``pl_module.refresh_targets(<output_dir>/refresh{k},
seed=seed + k, tag="refresh{k}", simulations=simulations)``, which searches the training prompts
with the current weights into that folder and switches the module to it; the other ranks wait at a
barrier, receive the folder and call ``pl_module.use_dataset``. The dataloader is rebuilt every
epoch (``trainer.reload_dataloaders_every_n_epochs = 1``, as :class:`IterativeRounds` does), so
the next epoch trains on the new targets.

The protocol (what the LightningModule needs; :class:`lit_reason.methods.dvo.DVO` has it)::

    refresh_targets(output, seed, tag, simulations=None) -> Path   # build with the current policy
    use_dataset(path)                                               # train on path from next epoch
    refresh_simulations: int | None                                 # the budget rounds' searches use

Composition with IterativeRounds (the rule)
-------------------------------------------
One schedule owns the data switches. When the Trainer also has a
:class:`~lit_reason.callbacks.rounds.RoundSchedule` (``IterativeRounds``), the refresh happens at
*its* round boundaries instead: ``IterativeRounds`` calls ``DVO.recollect``, which re-runs the
search (not a plain collection), and this callback stays passive except that its ``simulations``
becomes the module's ``refresh_simulations`` for those searches. Two schedules would otherwise
both replace the targets at shared boundaries (two searches, one of them wasted).

Checkpoints: ``state_dict`` keeps the refresh count, the folder of each refresh and the logged
statistics. The switch happens in ``on_train_epoch_end``, before a ModelCheckpoint of that epoch
saves, and the module keeps its data folder in the checkpoint too
(:meth:`~lit_reason.methods.offline.OfflineRL.on_save_checkpoint`), so a resumed run trains on the
refreshed targets without searching again; the guard ``k > refreshes`` keeps it from repeating a
refresh it has already done.

Logged (every logger, at the current global step): ``refresh/count`` at the start of a fresh (not
resumed) fit and after each
refresh; with each refresh ``refresh/rows``, ``refresh/prompts``, ``refresh/positive_fraction``,
``refresh/build_seconds`` and, for an MCTS dataset, ``refresh/simulations_per_s`` and
``refresh/tokens_per_s`` of the search.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info

from lit_reason.callbacks.evaluation import log_metrics
from lit_reason.contracts import RefreshesTargets, require
from lit_reason.callbacks.rounds import (
    RoundSchedule,
    build_on_rank_zero,
    dataset_stats,
    reload_every_epoch,
    resync_data,
)

__all__ = ["MCTSTargetRefresh"]

_STATE_VERSION = 1


def _refresh_stats(path: str | Path) -> dict[str, float]:
    from lit_reason.data.dvo_targets import target_dataset_stats

    stats = {k.replace("rounds/", "refresh/"): v for k, v in dataset_stats(path).items()}
    search = target_dataset_stats(path)
    for key in ("simulations_per_s", "tokens_per_s"):
        if f"search/{key}" in search:
            stats[f"refresh/{key}"] = search[f"search/{key}"]
    return stats


class MCTSTargetRefresh(pl.Callback):
    """Re-runs the target search with the current policy every N epochs (module doc).

    Args:
        every_n_epochs: Refresh after every N-th epoch (>= 1); never after the run's last epoch.
        simulations: Search budget per prompt of the refreshes (None: the module's ``targets``).
        output_dir: Folder of the refreshed datasets (``refresh1``, ``refresh2`` ...). None:
            ``<trainer.default_root_dir>/mcts_refresh``.
        seed: Refresh k searches with seed ``seed + k``.
    """

    #: what the LightningModule must provide (lit_reason.contracts); checked at fit start
    contract = RefreshesTargets

    def __init__(self, every_n_epochs: int = 1, simulations: int | None = None, output_dir: str | None = None,
                 seed: int = 0) -> None:
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"MCTSTargetRefresh: every_n_epochs must be an int >= 1, got {every_n_epochs!r}")
        if simulations is not None and (isinstance(simulations, bool) or not isinstance(simulations, int)
                                        or simulations < 1):
            raise ValueError(f"MCTSTargetRefresh: simulations must be an int >= 1 or None, got {simulations!r}")
        self.every_n_epochs = every_n_epochs
        self.simulations = simulations
        self.output_dir = Path(output_dir) if output_dir else None
        self.seed = seed
        self.refreshes = 0  # refreshes done; the module trains on paths[refreshes] when > 0
        self.paths: dict[int, str] = {}
        self.history: list[tuple[int, int, dict[str, float]]] = []  # (refresh, global_step, stats)
        self.passive = False  # True when a RoundSchedule owns the data switches

    # ----------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return

        require(pl_module, self.contract, "MCTSTargetRefresh", hint="use lit_reason.methods.dvo.DVO",
                error=TypeError)
        schedules = [type(cb).__name__ for cb in trainer.callbacks if isinstance(cb, RoundSchedule)]
        self.passive = bool(schedules)
        if self.passive:
            rank_zero_info(f"MCTSTargetRefresh: {schedules[0]} owns the rounds; the search is re-run at its round "
                           f"boundaries (simulations={self.simulations}), not every {self.every_n_epochs} epoch(s)")
            pl_module.refresh_simulations = self.simulations
            return
        reload_every_epoch(trainer, "MCTSTargetRefresh")

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run: the checkpoint's module data and ours must agree (ours wins, with a warning)
        if not self.passive:
            resync_data(pl_module, self.paths.get(self.refreshes), f"MCTSTargetRefresh: the checkpoint's refresh "
                        f"{self.refreshes}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a resumed run logged its count already (at its start or its last refresh): logging it again
        # would add a row the uninterrupted run does not have
        if not self.passive and trainer.ckpt_path is None:
            log_metrics(trainer, {"refresh/count": float(self.refreshes)})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.passive:
            return
        done = trainer.current_epoch + 1  # epochs finished, this one included
        if done % self.every_n_epochs:
            return
        last_epoch = trainer.max_epochs is not None and trainer.max_epochs > 0 and done >= trainer.max_epochs
        out_of_steps = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if last_epoch or out_of_steps or trainer.should_stop:
            return  # nothing would train on new targets
        k = done // self.every_n_epochs
        if k > self.refreshes:  # a resumed run whose checkpoint already refreshed does not search again
            self.refresh(trainer, pl_module, k)

    # ----------------------------------------------------------------------------- the refresh
    def refresh_dir(self, trainer: pl.Trainer, k: int) -> Path:
        """The folder of refresh ``k``'s targets."""
        root = self.output_dir or Path(trainer.default_root_dir) / "mcts_refresh"
        return root / f"refresh{k}"

    def refresh(self, trainer: pl.Trainer, pl_module: pl.LightningModule, k: int) -> None:
        """Refresh ``k``: rank 0 searches with the current policy, every rank switches to the result."""
        path, stats = build_on_rank_zero(
            trainer, pl_module,
            lambda: pl_module.refresh_targets(self.refresh_dir(trainer, k), seed=self.seed + k, tag=f"refresh{k}",
                                              simulations=self.simulations),
            _refresh_stats, prefix="refresh")
        self.refreshes = k
        self.paths[k] = path
        self.history.append((k, trainer.global_step, dict(stats)))
        log_metrics(trainer, {"refresh/count": float(k), **stats})
        rank_zero_info(f"MCTSTargetRefresh: refresh {k} trains on {path} {stats}")

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "refreshes": self.refreshes, "paths": dict(self.paths),
                "every_n_epochs": self.every_n_epochs, "history": [(k, s, dict(m)) for k, s, m in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("every_n_epochs", self.every_n_epochs)
        if saved != self.every_n_epochs:
            # the epoch -> refresh map would shift: the resumed run would refresh at other epochs
            raise ValueError(f"MCTSTargetRefresh: the checkpoint refreshed every {saved} epoch(s), this callback "
                             f"every {self.every_n_epochs}; resume with every_n_epochs={saved}")
        self.refreshes = int(state_dict.get("refreshes", 0))
        self.paths = {int(k): str(v) for k, v in state_dict.get("paths", {}).items()}
        self.history = [(int(k), int(s), dict(m)) for k, s, m in state_dict.get("history", [])]
