"""Training in rounds: after each round's epochs, new data from the current policy, then train on.

Offline methods train on a dataset collected by a fixed policy. Their iterative variants (OREO's
"Iterative OREO: 3 rounds", DVO's rounds, STaR/ReST-EM style RFT; docs/oreo.md, docs/dvo.md)
re-collect with the improved policy and continue training, from the current weights, on the new
data. :class:`RoundSchedule` is the reusable part (the round counter, the epoch bookkeeping, the
data switch on every rank, logging, checkpoint state); :class:`IterativeRounds` fills in *how* a
round's data is made: :meth:`OfflineRL.recollect <lit_reason.methods.offline.OfflineRL.recollect>`
with the current policy.

Schedule
--------
Round k (0-based) is epochs ``[k * epochs_per_round, (k + 1) * epochs_per_round)``. Round 0 trains
on the module's own data (``data``/``collect``). At the end of the last epoch of round k < rounds - 1
the data of round k + 1 is built into ``<output_dir>/round{k+1}`` and the module switches to it.
The run has exactly ``rounds * epochs_per_round`` epochs: ``trainer.max_epochs`` must equal that
(checked at fit start with an error that names the number). Requiring it, rather than stopping
early or overriding it, keeps the method's LR schedule (which Lightning sizes from ``max_epochs``)
and the run's length the one the config says. ``max_steps`` may still end the run earlier.

Lightning builds the train dataloader once unless ``trainer.reload_dataloaders_every_n_epochs``
is set: the schedule sets it to 1 at setup (a public Trainer attribute; reloading every epoch,
not every ``epochs_per_round``, keeps round starts aligned after a resume in mid-round). For an
:class:`~lit_reason.methods.offline.OfflineRL` a reload within a round is cheap: the module keeps
its items until :meth:`use_dataset` drops them.

Checkpoints and resume
----------------------
The switch happens in ``on_train_epoch_end``, before a ModelCheckpoint of that epoch saves (Lightning
calls checkpoint callbacks last), so the checkpoint holds the new round index and data folders
(``state_dict``) and the module's data path (``OfflineRL.on_save_checkpoint``). A run resumed from
it trains the next round on that data without re-collecting. A checkpoint written before the switch
(e.g. at validation end) resumes into the same ``on_train_epoch_end``, which then does the switch.
A collection interrupted mid-way resumes its complete shards on the next attempt (see
:func:`lit_reason.data.collect.collect`); note those shards came from the policy of the
interrupted run, which a resumed run reproduces only as far as training is deterministic.

Writing another round callback (e.g. DVO's ``MCTSTargetRefresh``)
-----------------------------------------------------------------
Subclass :class:`RoundSchedule` and implement :meth:`RoundSchedule.build_round`, which runs on
global rank 0 only, writes round k's dataset into the folder it is given (re-running a search
instead of a collection, say), switches the module to it and returns the folder. The base class
then broadcasts the folder, other ranks call ``pl_module.use_dataset(folder)``, and the round is
logged and kept in the checkpoint. Override :meth:`RoundSchedule.check_module` for the protocol
the subclass needs. One schedule per run: two would both replace the data at every boundary, so a
second :class:`RoundSchedule` in a Trainer is an error.

Logged (``log_metrics``, every logger, at the current global step): ``rounds/round`` (the round
whose data is in use) at the start of a fresh (not resumed) fit and after each switch, and with each switch ``rounds/rows``,
``rounds/prompts``, ``rounds/positive_fraction`` (rows with reward > 0), ``rounds/mean_reward``,
``rounds/finished`` (rows that ended with EOS) and ``rounds/build_seconds`` of the new data.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lit_reason.callbacks.evaluation import log_metrics
from lit_reason.contracts import Recollects, RoundsCapable, require

_ROUNDS_HINT = "use an OfflineRL method: RFT, DPO, OREO ..."

__all__ = ["IterativeRounds", "RoundSchedule", "dataset_stats"]

_STATE_VERSION = 1


def dataset_stats(path: str | Path) -> dict[str, float]:
    """Size and outcome statistics of a trajectory dataset folder, as ``rounds/*`` metrics."""
    from lit_reason.data.trajectories import TrajectoryDataset

    ds = TrajectoryDataset(path)
    n = max(len(ds), 1)
    return {
        "rounds/rows": float(len(ds)),
        "rounds/prompts": float(len({r["prompt_index"] for r in ds})),
        "rounds/positive_fraction": sum(r["reward"] > 0 for r in ds) / n,
        "rounds/mean_reward": sum(float(r["reward"]) for r in ds) / n,
        "rounds/finished": sum(r["finish"] != "length" for r in ds) / n,
    }


def reload_every_epoch(trainer: pl.Trainer, owner: str) -> None:
    """Makes Lightning rebuild the train dataloader every epoch (public Trainer attribute).

    Every epoch rather than every round: after a resume in the middle of a round, a period of E
    epochs would drift off the round boundaries. Rebuilding is cheap: an offline module keeps its
    items until its data changes.
    """
    if trainer.reload_dataloaders_every_n_epochs != 1:
        if trainer.reload_dataloaders_every_n_epochs:
            rank_zero_warn(f"{owner}: reload_dataloaders_every_n_epochs "
                           f"{trainer.reload_dataloaders_every_n_epochs} -> 1 (the data changes between epochs)")
        trainer.reload_dataloaders_every_n_epochs = 1


def resync_data(pl_module: pl.LightningModule, path: str | None, what: str) -> None:
    """After a restore, points the module at the data folder the callback's state names (it wins)."""
    current = getattr(pl_module, "data_path", None)
    if path is not None and (current is None or Path(current) != Path(path)):
        rank_zero_warn(f"{what} trained on {path}, the module on {current}; switching to {path}")
        pl_module.use_dataset(path)


def build_on_rank_zero(trainer: pl.Trainer, pl_module: pl.LightningModule, build: Callable[[], str | Path],
                       stats: Callable[[str | Path], dict[str, float]], prefix: str) -> tuple[str, dict[str, float]]:
    """Rank 0 builds a dataset folder, then every rank trains on it.

    ``build()`` runs on rank 0 only; ``stats(path)`` gives its metrics, to which
    ``<prefix>/build_seconds`` is added. Building takes long, so the other ranks wait at a barrier
    first and then receive the small ``(path, stats)`` payload by broadcast.

    Returns:
        ``(path, stats)``, the same on every rank.
    """
    from lit_reason.parallel.fsdp import rollout_phase_of

    started = time.perf_counter()
    payload = None
    with rollout_phase_of(pl_module):  # FSDP: every rank gathers the models, rank 0 alone samples with them
        if trainer.is_global_zero:
            path = build()
            metrics = stats(path)
            metrics[f"{prefix}/build_seconds"] = time.perf_counter() - started
            payload = (str(path), metrics)
    trainer.strategy.barrier(f"lit_reason_{prefix}")
    path, metrics = trainer.strategy.broadcast(payload, src=0)
    if not trainer.is_global_zero:
        pl_module.use_dataset(path)
    return path, metrics


class RoundSchedule(pl.Callback):
    """Splits training into rounds of epochs and builds new data between rounds (see the module doc).

    Subclasses implement :meth:`build_round`; the rest (when, on which rank, logging, checkpoint
    state, the epoch check) is here.

    Args:
        rounds: Number of rounds (>= 1; 1 trains on the module's data only).
        epochs_per_round: Training epochs per round (>= 1).
        output_dir: Folder of the round datasets (``round1``, ``round2`` ...). None:
            ``<trainer.default_root_dir>/rounds``.
        seed: Round k builds its data with seed ``seed + k``.
    """

    #: what the LightningModule must provide (lit_reason.contracts); checked at fit start
    contract = RoundsCapable

    def __init__(self, rounds: int = 3, epochs_per_round: int = 1, output_dir: str | None = None,
                 seed: int = 0) -> None:
        name = type(self).__name__
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"{name}: rounds must be an int >= 1, got {rounds!r}")
        if not isinstance(epochs_per_round, int) or epochs_per_round < 1:
            raise ValueError(f"{name}: epochs_per_round must be an int >= 1, got {epochs_per_round!r}")
        self.rounds = rounds
        self.epochs_per_round = epochs_per_round
        self.output_dir = Path(output_dir) if output_dir else None
        self.seed = seed
        self.round = 0  # the round whose data the module trains on
        self.paths: dict[int, str] = {}  # round -> dataset folder built by this schedule (round 0: the module's)
        self.history: list[tuple[int, int, dict[str, float]]] = []  # (round, global_step, stats)

    # ------------------------------------------------------------------------- for subclasses

    def check_module(self, pl_module: pl.LightningModule) -> None:
        """Raises when ``pl_module`` lacks what :meth:`build_round` needs (default: ``use_dataset``)."""
        require(pl_module, self.contract, type(self).__name__, hint=_ROUNDS_HINT, error=TypeError)

    def build_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int,
                    output: Path) -> Path:
        """Builds round ``round_index``'s dataset in ``output`` and switches the module to it (global rank 0).

        Returns:
            The dataset folder (other ranks then call ``pl_module.use_dataset`` with it).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement build_round")

    # ----------------------------------------------------------------------------- schedule

    @property
    def total_epochs(self) -> int:
        """``rounds * epochs_per_round``: the ``trainer.max_epochs`` the schedule requires."""
        return self.rounds * self.epochs_per_round

    def round_dir(self, trainer: pl.Trainer, round_index: int) -> Path:
        """The folder of round ``round_index``'s dataset."""
        root = self.output_dir or Path(trainer.default_root_dir) / "rounds"
        return root / f"round{round_index}"

    def advance_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int) -> None:
        """Builds round ``round_index``'s data on rank 0, switches every rank to it, logs and records it."""
        path, stats = build_on_rank_zero(
            trainer, pl_module,
            lambda: self.build_round(trainer, pl_module, round_index, self.round_dir(trainer, round_index)),
            dataset_stats, prefix="rounds")
        self.round = round_index
        self.paths[round_index] = path
        metrics = {"rounds/round": float(round_index), **stats}
        self.history.append((round_index, trainer.global_step, dict(stats)))
        log_metrics(trainer, metrics)
        rank_zero_info(f"{type(self).__name__}: round {round_index} of {self.rounds} trains on {path} {stats}")

    # -------------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.check_module(pl_module)
        others = [cb for cb in trainer.callbacks if isinstance(cb, RoundSchedule) and cb is not self]
        if others:
            raise ValueError(f"{type(self).__name__}: one round schedule per run, found also "
                             f"{[type(cb).__name__ for cb in others]} (each would replace the data every round)")
        if trainer.max_epochs != self.total_epochs:
            raise ValueError(
                f"{type(self).__name__}: rounds={self.rounds} x epochs_per_round={self.epochs_per_round} needs "
                f"trainer.max_epochs={self.total_epochs}, got {trainer.max_epochs}; set "
                f"`--trainer.max_epochs {self.total_epochs}` (the LR schedule is sized from max_epochs)"
            )
        reload_every_epoch(trainer, type(self).__name__)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the checkpoint's module state and ours are restored by now: they must name the same data
        resync_data(pl_module, self.paths.get(self.round), f"{type(self).__name__}: the checkpoint's round {self.round}")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        current = getattr(pl_module, "data_path", None)
        if self.round == 0 and current is not None:
            self.paths.setdefault(0, str(current))  # round 0 is the module's own data (set up by now)
        if trainer.ckpt_path is None:  # a resumed run logged its round already (as MCTSTargetRefresh)
            log_metrics(trainer, {"rounds/round": float(self.round)})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        done = trainer.current_epoch + 1  # epochs finished, this one included
        if done % self.epochs_per_round:
            return
        following = done // self.epochs_per_round
        # the guard makes a resumed run, whose checkpoint already switched, not build the round again
        if following < self.rounds and following > self.round:
            self.advance_round(trainer, pl_module, following)

    # --------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "round": self.round, "paths": dict(self.paths),
                "epochs_per_round": self.epochs_per_round, "rounds": self.rounds,
                "history": [(k, s, dict(m)) for k, s, m in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("epochs_per_round", self.epochs_per_round)
        if saved != self.epochs_per_round:
            # the epoch -> round map would shift: the resumed run would switch data at the wrong epochs
            raise ValueError(f"{type(self).__name__}: the checkpoint ran {saved} epoch(s) per round, this "
                             f"callback {self.epochs_per_round}; resume with epochs_per_round={saved}")
        self.round = int(state_dict.get("round", 0))
        self.paths = {int(k): str(v) for k, v in state_dict.get("paths", {}).items()}
        self.history = [(int(k), int(s), dict(m)) for k, s, m in state_dict.get("history", [])]


class IterativeRounds(RoundSchedule):
    """Re-collects the offline dataset with the current policy between rounds (OREO/DVO iterations).

    At the end of round k < rounds - 1, global rank 0 calls
    ``pl_module.recollect(<output_dir>/round{k+1}, seed=seed + k + 1, round_index=k + 1)``: the
    module's sampling settings, the current weights, the policy recorded as ``<policy>@round{k+1}``
    in the dataset's meta; the module trains on it from the next epoch. Works with any
    :class:`~lit_reason.methods.offline.OfflineRL` (the protocol: ``recollect`` and
    ``use_dataset``). Schedule, resume and logging: see the module doc.

    Args:
        rounds: Number of rounds (>= 1); round 0 is the module's own data.
        epochs_per_round: Training epochs per round; ``trainer.max_epochs`` must be
            ``rounds * epochs_per_round``.
        output_dir: Folder of the round datasets. None: ``<trainer.default_root_dir>/rounds``.
        seed: Round k samples with seed ``seed + k``.
    """

    contract = Recollects


    def build_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, round_index: int,
                    output: Path) -> Path:
        return Path(pl_module.recollect(output, seed=self.seed + round_index, round_index=round_index))
