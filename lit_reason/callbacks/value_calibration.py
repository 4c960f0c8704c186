"""Step-level value calibration of any method, logged under ``value/`` (docs/architecture.md).

Every method in lit_reason predicts the value of a reasoning prefix: a critic, a value head, a
soft Q, an implicit value ``beta * log pi / pi_ref``, a global value model. :class:`ValueCalibration`
scores that prediction, on a fixed probe set of step-boundary states, against Monte Carlo
estimates from fresh rollouts of the current policy and against the outcome of the probe
trajectory the state came from; it also measures VinePPO's ranking test (arXiv
2410.01679; docs/vineppo.md): do the predicted values order sibling next steps like their MC values?

The protocol
------------
A LightningModule is calibrated when it exposes::

    policy                  # the current policy (a Hugging Face causal LM)
    tokenizer               # its tokenizer (pad and EOS tokens set)
    task                    # the lit_reason Task (prompts, reward)
    splitter: StepSplitter  # optional, default StepSplitter() (newline steps)
    value_range: tuple[float, float]   # optional, default (0.0, 1.0)

    def state_values(self, prompt_ids: list[list[int]], partial_ids: list[list[int]],
                     examples: list[dict]) -> torch.Tensor:
        '''[N] predicted value V(S) of each state S = prompt ++ partial response.'''

``partial_ids[i]`` may be empty (the state S_0 = the prompt), and a partial response may end with
the EOS token (a terminal state: an alternative final step in the ranking test).
``state_values`` is called under ``torch.no_grad()`` with the module in eval mode (every
submodule's train/eval flag is restored afterwards), in chunks of at most ``batch_size`` states;
it may return a tensor on any device. ``value_range`` is the scale of the predictions: it is mapped
affinely onto ``[0, 1]`` (``(lo, hi) -> p = (v - lo) / (hi - lo)``, clipped) before MAE, ECE,
Brier and explained variance are computed, so a method predicting in ``[-1, 1]`` sets
``value_range = (-1.0, 1.0)``. Ranking uses the raw values (order is scale-free). A module without
``state_values`` fails at fit start with an error naming its class; a non-finite prediction raises
rather than logging a NaN.

What one calibration does
-------------------------
1. Probe states (built once, the first time the callback runs, then fixed for the run and saved in
   checkpoints through ``state_dict``): one response per probe prompt (the first ``probe_size``
   rows of ``split``) sampled with the policy of that moment by an engine seeded with ``seed``,
   split into steps; every step-boundary state S_k, k < T, is a probe state, kept with its prompt
   ids, partial-response ids, example index, step index and the trajectory's 0/1 outcome.
2. Ground truth: ``mc_values`` with ``mc_rollouts`` fresh continuations per state from the current
   policy (temperature ``temperature``; truncated continuations score 0).
3. Prediction: ``pl_module.state_values`` on the same states; both go into
   :class:`~lit_reason.metrics.CalibrationStats` (with the outcome and the step index).
4. Ranking: at ``rank_states`` probe states spread evenly over the probe set, ``rank_alternatives``
   alternative next steps are sampled at ``rank_temperature`` (1.0, as VinePPO's analysis), each
   cut right after its first step (:class:`~lit_reason.steps.StepSplitter`, stop string = the
   splitter's delimiter). Each alternative state S ++ a' gets an MC value (``mc_rollouts``
   continuations; an alternative that ends with EOS is terminal and its value is its own reward)
   and a prediction; duplicate alternatives of a state and empty ones are masked out.
   :class:`~lit_reason.metrics.RankStats` counts pairwise agreement (ties in the prediction earn
   0.5; pairs tied in the truth carry no information and are not counted).

Under several processes (DDP) the probe states are built on rank 0 and broadcast, every rank
scores its shard ``states[rank::world_size]`` (and its shard of the ranking states), and the
sufficient statistics are summed with ``all_reduce`` before ``compute()``: the metrics are those
of the whole probe set, never averages of per-rank metrics. (The rollout engine decodes each
rank's shard independently, so sharded calibration assumes a policy whose forward passes need no
collective, as under DDP; FSDP-sharded policies are not supported by the engine.)

Logged keys (``log_metrics`` at the current global step, every logger)
---------------------------------------------------------------------
``value/mae_vs_mc``, ``value/ece``, ``value/ece_vs_mc``, ``value/brier``, ``value/brier_vs_mc``,
``value/explained_var``, ``value/count`` (states scored), ``value/clip_fraction`` (predictions
outside ``value_range``, scored as the boundary), ``value/rank_pairs`` (informative pairs; 0 when
ranking is off or every pair was tied in the truth) and ``value/rank_acc`` (only when
``rank_pairs > 0``: never a fabricated 0.5 or a NaN). See
:meth:`~lit_reason.metrics.CalibrationStats.compute` for the definitions (``ece``/``brier`` are
against the 0/1 outcomes, the ``_vs_mc`` variants against the MC values; ``explained_var`` is 0.0
when the MC values have no variance).

**Skip**: when there is no state to score (an empty probe split), ``value/skipped = 1`` is logged
and a warning names the reason; no other ``value/`` metric is logged for that calibration.

Files (global rank 0): ``<run folder>/calibration/reliability_step{global_step:06d}.png`` (the
reliability diagram, :func:`~lit_reason.metrics.plot_reliability`) and ``.json`` beside it
(metrics, reliability rows, MAE per step index). The run folder is ``trainer.log_dir``, else
``trainer.default_root_dir``. With a ``WandbLogger`` the PNG is logged as the image
``value/reliability`` and the rows as the table ``value/reliability_table``.

When: at the start of training (``at_start``; in ``on_train_start``, where a resumed run already
has its checkpoint's global step), every ``every_n_steps`` optimiser steps, at the end of training
(``at_end``); never twice at one global step (a calibration saved in a checkpoint is not repeated
on resume). ``history`` keeps ``(global_step, metrics)`` pairs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_reason.callbacks.evaluation import log_metrics
from lit_reason.contracts import HasStateValues, require
from lit_reason.io import atomic_write_json
from lit_reason.metrics import CalibrationStats, RankStats, plot_reliability
from lit_reason.parallel.fsdp import rollout_phase_of
from lit_reason.rollout.monte_carlo import mc_values, step_states
from lit_reason.rollout.next_step import sample_next_steps
from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.rollout.trajectories import encode_prompts, rollout
from lit_reason.steps import StepSplitter

__all__ = ["ProbeState", "ValueCalibration"]

_STATE_VERSION = 1
@dataclass
class ProbeState:
    """One fixed probe state S_k = prompt ++ the first k steps of a sampled probe response.

    Attributes:
        prompt_ids: Token ids of the prompt.
        partial_ids: Token ids of the partial response (empty for S_0).
        example_index: Row of the probe split the prompt belongs to.
        step_index: k.
        outcome: 0/1 reward of the whole probe trajectory the state was taken from.
    """

    prompt_ids: list[int]
    partial_ids: list[int]
    example_index: int
    step_index: int
    outcome: float


def _finite_json(x: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (standard JSON has no NaN)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _finite_json(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite_json(v) for v in x]
    return x


def _write_json(path: Path, payload: dict) -> None:
    """Writes ``payload`` atomically (temp file in the same folder, then rename)."""
    atomic_write_json(path, _finite_json(payload), indent=1)


class ValueCalibration(pl.Callback):
    """Step-level value calibration under ``value/`` (protocol and metrics: see the module doc).

    Args:
        probe_size: Probe prompts: the first ``probe_size`` rows of ``split`` (fixed for the run).
        mc_rollouts: Fresh continuations per state for the Monte Carlo ground truth (M).
        rank_states: Probe states at which alternative next steps are sampled (0: no ranking).
        rank_alternatives: Alternative next steps per ranking state (>= 2 when ranking).
        every_n_steps: Also calibrate every N optimiser steps (None: only at start and end).
        at_start: Calibrate at fit start (the policy before training).
        at_end: Calibrate at the end of training.
        temperature: Sampling temperature of the probe responses and the MC continuations.
        top_p: Nucleus mass of the probe responses and the MC continuations.
        rank_temperature: Sampling temperature of the alternative next steps.
        max_new_tokens: Length limit of probe responses, continuations and alternatives.
        seed: Seed of the probe sampling; the MC engines are seeded from (seed, step, rank).
        batch_size: Sequences decoded together, and states per ``state_values`` call.
        split: Task split of the probe prompts.
        n_bins: Reliability bins on [0, 1].
        progress: Show the rollout engine's progress bars.
    """

    #: what the LightningModule must provide (lit_reason.contracts); checked at fit start
    contract = HasStateValues

    def __init__(
        self,
        probe_size: int = 32,
        mc_rollouts: int = 8,
        rank_states: int = 16,
        rank_alternatives: int = 4,
        every_n_steps: int | None = None,
        at_start: bool = True,
        at_end: bool = True,
        temperature: float = 1.0,
        top_p: float = 1.0,
        rank_temperature: float = 1.0,
        max_new_tokens: int = 96,
        seed: int = 0,
        batch_size: int = 128,
        split: str = "validation",
        n_bins: int = 10,
        progress: bool = True,
    ) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"ValueCalibration: {msg}")

        check(probe_size >= 1, f"probe_size must be >= 1, got {probe_size}")
        check(mc_rollouts >= 1, f"mc_rollouts must be >= 1, got {mc_rollouts}")
        check(rank_states >= 0, f"rank_states must be >= 0, got {rank_states}")
        check(rank_states == 0 or rank_alternatives >= 2,
              f"rank_alternatives must be >= 2 to form pairs (or set rank_states=0), got {rank_alternatives}")
        check(every_n_steps is None or every_n_steps >= 1, f"every_n_steps must be None or >= 1, got {every_n_steps}")
        check(temperature >= 0 and rank_temperature >= 0, "temperatures must be >= 0")
        check(0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}")
        check(max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check(batch_size >= 1, f"batch_size must be >= 1, got {batch_size}")
        check(n_bins >= 1, f"n_bins must be >= 1, got {n_bins}")
        self.probe_size = probe_size
        self.mc_rollouts = mc_rollouts
        self.rank_states = rank_states
        self.rank_alternatives = rank_alternatives
        self.every_n_steps = every_n_steps
        self.at_start = at_start
        self.at_end = at_end
        self.temperature = temperature
        self.top_p = top_p
        self.rank_temperature = rank_temperature
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.batch_size = batch_size
        self.split = split
        self.n_bins = n_bins
        self.progress = progress
        self.states: list[ProbeState] | None = None  # None: not built yet (an empty list is built)
        self.history: list[tuple[int, dict[str, float]]] = []
        self._last_step: int | None = None
        self._verified = False  # loaded states checked against the current task/tokenizer

    @property
    def state_key(self) -> str:
        # several instances (e.g. two probe splits) keep separate states in a checkpoint; the class
        # name is fixed so that a subclass resumes from a checkpoint written by the base class
        return f"ValueCalibration{dict(split=self.split, probe_size=self.probe_size, seed=self.seed)!r}"

    # ------------------------------------------------------------------------------- protocol

    @staticmethod
    def check_protocol(pl_module: pl.LightningModule) -> None:
        """Raises a clear error when ``pl_module`` does not implement the calibration protocol."""
        fn = getattr(pl_module, "state_values", None)
        if fn is not None and not callable(fn):
            raise TypeError(f"{type(pl_module).__name__}.state_values must be a method, got {type(fn).__name__}")
        require(pl_module, ValueCalibration.contract, "ValueCalibration",
                hint="`state_values(prompt_ids, partial_ids, examples) -> Tensor[N]` is the predicted value of "
                     "each state prompt ++ partial response: implement it, or remove the ValueCalibration "
                     "callback for this method")
        ValueCalibration._pred_to_prob(pl_module)

    @staticmethod
    def _pred_to_prob(pl_module: pl.LightningModule) -> tuple[float, float]:
        """Affine map ``(scale, shift)`` taking the module's ``value_range`` onto [0, 1]."""
        value_range = getattr(pl_module, "value_range", None) or (0.0, 1.0)
        try:
            lo, hi = (float(v) for v in value_range)
        except (TypeError, ValueError):
            raise ValueError(
                f"{type(pl_module).__name__}.value_range must be a (low, high) pair, got {value_range!r}"
            ) from None
        if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
            raise ValueError(
                f"{type(pl_module).__name__}.value_range must be finite with high > low, got {value_range!r}"
            )
        return 1.0 / (hi - lo), -lo / (hi - lo)

    @staticmethod
    def _splitter(pl_module: pl.LightningModule) -> StepSplitter:
        return getattr(pl_module, "splitter", None) or StepSplitter()

    def predict(self, pl_module: pl.LightningModule, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Calls ``pl_module.state_values`` in eval mode without gradients, in chunks; [N] on CPU."""
        n = len(prompt_ids)
        if n == 0:
            return torch.zeros(0)
        modes = [(m, m.training) for m in pl_module.modules()]
        pl_module.eval()
        outs = []
        try:
            with torch.no_grad():
                for lo in range(0, n, self.batch_size):
                    hi = min(lo + self.batch_size, n)
                    out = pl_module.state_values(
                        list(prompt_ids[lo:hi]), list(partial_ids[lo:hi]), list(examples[lo:hi])
                    )
                    out = torch.as_tensor(out).detach().to("cpu", torch.float64)
                    if out.numel() != hi - lo or out.squeeze().dim() > 1:
                        raise ValueError(
                            f"{type(pl_module).__name__}.state_values returned shape {tuple(out.shape)} for "
                            f"{hi - lo} states; it must return one value per state ([N])"
                        )
                    outs.append(out.reshape(-1))
        finally:
            for m, was_training in modes:
                m.training = was_training
        pred = torch.cat(outs)
        n_bad = int((~torch.isfinite(pred)).sum())
        if n_bad:
            raise ValueError(
                f"{type(pl_module).__name__}.state_values returned {n_bad} non-finite value(s) out of {n}; "
                "refusing to log a NaN calibration"
            )
        return pred

    # ---------------------------------------------------------------------------- probe states

    def _examples(self, pl_module) -> list[dict]:
        return list(pl_module.task.examples(self.split)[: self.probe_size])

    def build_states(self, pl_module: pl.LightningModule) -> list[ProbeState]:
        """Samples one response per probe prompt and lists its step-boundary states."""
        examples = self._examples(pl_module)
        if not examples:
            return []
        engine = RolloutEngine(
            pl_module.policy, pl_module.tokenizer, max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size, seed=self.seed,
            progress=self.progress,
        )
        batch = rollout(engine, pl_module.task, self._splitter(pl_module), examples, k=1, desc="value probe")
        rewards = batch.rewards.tolist()
        # k=1: row b of the batch answers probe example b
        return [
            ProbeState(prompt_ids=list(p), partial_ids=list(part), example_index=int(row), step_index=int(k),
                       outcome=float(rewards[row]))
            for row, k, p, part in step_states(batch)
        ]

    def _ensure_states(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[ProbeState]:
        if self.states is not None and not self._verified:
            # loaded from a checkpoint: the prompts must still be those of the current task
            stale = False
            if trainer.is_global_zero:
                examples = pl_module.task.examples(self.split)
                stale = any(s.example_index >= len(examples) for s in self.states)
                if not stale and self.states:
                    idx = sorted({s.example_index for s in self.states})
                    enc = encode_prompts(pl_module.tokenizer, [pl_module.task.prompt(examples[i]) for i in idx])
                    by_idx = dict(zip(idx, enc))
                    stale = any(list(s.prompt_ids) != by_idx[s.example_index] for s in self.states)
            stale = trainer.strategy.broadcast(stale, src=0)
            if stale:
                rank_zero_warn(
                    "ValueCalibration: the saved probe states do not match the current task/tokenizer "
                    f"(split {self.split!r}); rebuilding the probe set with the current policy"
                )
                self.states = None
            self._verified = True
        if self.states is None:
            with rollout_phase_of(pl_module):  # FSDP: every rank gathers, rank 0 samples the probe set
                states = self.build_states(pl_module) if trainer.is_global_zero else None
            self.states = trainer.strategy.broadcast(states, src=0)
            self._verified = True
        return self.states

    # ------------------------------------------------------------------------------ calibration

    def _mc_seed(self, global_step: int, rank: int) -> int:
        return ((self.seed * 1_000_003 + global_step + 1) * 1_009 + rank) % (2**62)

    def _alternatives(self, engine: RolloutEngine, splitter: StepSplitter, states: list[ProbeState]):
        """Samples ``rank_alternatives`` next steps per state, each cut after its first step.

        Returns one list per state of the alternatives' token ids, with ``None`` in place of an
        empty alternative or a duplicate of an earlier one (masked out of the ranking).
        """
        tok = engine.tokenizer
        n = self.rank_alternatives
        steps = sample_next_steps(engine, splitter, [s.prompt_ids + s.partial_ids for s in states], k=n,
                                  temperature=self.rank_temperature, top_p=1.0, desc="rank alternatives")
        groups = []
        for g, _state in enumerate(states):
            seen: set[tuple[int, ...]] = set()
            group = []
            for step in steps[g * n : (g + 1) * n]:
                ids = step.ids
                empty = not ids or (not step.terminal and tok.decode(ids, skip_special_tokens=True) == "")
                if empty or tuple(ids) in seen:
                    group.append(None)
                else:
                    seen.add(tuple(ids))
                    group.append(ids)
            groups.append(group)
        return groups

    def _rank(
        self, pl_module, engine: RolloutEngine, states: list[ProbeState], examples: list[dict], stats: RankStats
    ) -> None:
        if not states:
            return
        groups = self._alternatives(engine, self._splitter(pl_module), states)
        n = self.rank_alternatives
        flat = [(g, j, alt) for g, group in enumerate(groups) for j, alt in enumerate(group) if alt is not None]
        mask = torch.zeros(len(states), n, dtype=torch.bool)
        truth = torch.zeros(len(states), n, dtype=torch.float64)
        pred = torch.zeros(len(states), n, dtype=torch.float64)
        if flat:
            prompts = [states[g].prompt_ids for g, _, _ in flat]
            partials = [states[g].partial_ids + alt for g, _, alt in flat]
            exs = [examples[states[g].example_index] for g, _, _ in flat]
            mc = mc_values(engine, pl_module.task, prompts, partials, exs, self.mc_rollouts,
                                 temperature=self.temperature, top_p=self.top_p, desc="rank mc rollouts")
            pv = self.predict(pl_module, prompts, partials, exs)
            for (g, j, _), t, p in zip(flat, mc.tolist(), pv.tolist()):
                mask[g, j] = True
                truth[g, j] = t
                pred[g, j] = p
        stats.update(pred, truth, mask)

    def calibrate(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float] | None:
        """Runs one calibration, logs it and returns the logged metrics (None for a skip)."""
        self.check_protocol(pl_module)
        step = trainer.global_step
        states = self._ensure_states(trainer, pl_module)
        rank, world = trainer.global_rank, trainer.world_size
        all_examples = pl_module.task.examples(self.split)
        engine = RolloutEngine(
            pl_module.policy, pl_module.tokenizer, max_new_tokens=self.max_new_tokens,
            temperature=self.temperature, top_p=self.top_p, batch_size=self.batch_size,
            seed=self._mc_seed(step, rank), progress=self.progress,
        )
        stats = CalibrationStats(n_bins=self.n_bins, pred_to_prob=self._pred_to_prob(pl_module))
        mine = states[rank::world]
        rank_stats = RankStats()
        with rollout_phase_of(pl_module):  # FSDP: every model gathered once for the whole measurement
            if mine:
                prompts = [s.prompt_ids for s in mine]
                partials = [s.partial_ids for s in mine]
                exs = [all_examples[s.example_index] for s in mine]
                mc = mc_values(engine, pl_module.task, prompts, partials, exs, self.mc_rollouts,
                               desc="value mc rollouts")
                pred = self.predict(pl_module, prompts, partials, exs)
                stats.update(pred, mc, outcome=[s.outcome for s in mine], step_index=[s.step_index for s in mine])
            if self.rank_states > 0 and states:
                count = min(self.rank_states, len(states))
                chosen = [states[(i * len(states)) // count] for i in range(count)]  # evenly spaced, fixed
                self._rank(pl_module, engine, chosen[rank::world], all_examples, rank_stats)
        # global sums, once, on every rank (ranks without states contribute zeros)
        stats.all_reduce()
        rank_stats.all_reduce()

        png = Path(trainer.log_dir or trainer.default_root_dir) / "calibration" / f"reliability_step{step:06d}.png"
        try:
            computed = stats.compute()
        except ValueError as err:
            reason = (f"no probe state (split {self.split!r} gave {len(states)} states)" if not states else str(err))
            rank_zero_warn(f"ValueCalibration skipped at step {step}: {reason}; logging value/skipped=1")
            metrics = {"value/skipped": 1.0}
            self._record(trainer, step, metrics)
            return None
        metrics = {f"value/{k}": float(v) for k, v in computed.items() if k != "rank_acc"}
        metrics["value/clip_fraction"] = stats.clip_fraction()
        metrics["value/rank_pairs"] = float(rank_stats.pairs)
        if rank_stats.pairs > 0:
            metrics["value/rank_acc"] = rank_stats.compute()["rank_acc"]
        self._record(trainer, step, metrics)
        if trainer.is_global_zero:
            self._write_outputs(trainer, png, step, metrics, stats)
        return metrics

    def _record(self, trainer: pl.Trainer, step: int, metrics: dict[str, float]) -> None:
        self.history.append((step, dict(metrics)))
        self._last_step = step
        log_metrics(trainer, metrics)

    def _write_outputs(self, trainer, png: Path, step: int, metrics: dict[str, float], stats: CalibrationStats) -> None:
        rows = stats.reliability_table()
        plot_reliability(rows, png, title=f"Value calibration, step {step}")
        _write_json(png.with_suffix(".json"), {
            "global_step": step,
            "metrics": metrics,
            "reliability": rows,
            "mae_by_step": stats.mae_by_step(),
            "probe": {"split": self.split, "probe_size": self.probe_size, "states": len(self.states or []),
                      "mc_rollouts": self.mc_rollouts, "seed": self.seed},
        })
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if not isinstance(logger, WandbLogger):
                continue
            columns = list(rows[0].keys())
            data = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in r.values()] for r in rows]
            try:
                logger.log_image(key="value/reliability", images=[str(png)], step=step)
                logger.log_table(key="value/reliability_table", columns=columns, data=data, step=step)
            except Exception as err:  # the PNG and JSON are on disk; a plotting backend issue must not stop training
                rank_zero_warn(f"ValueCalibration: could not log the reliability diagram to W&B: {err!r}")

    # -------------------------------------------------------------------------------- hooks

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.check_protocol(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # "fit start" calibration. Not on_fit_start: Lightning runs that hook before it restores a
        # checkpoint's loop state, so a resumed run would log it at global step 0. Here the step is
        # right, and a step already calibrated before the checkpoint is not repeated.
        if self.at_start and self._last_step != trainer.global_step:
            self.calibrate(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 and step != self._last_step:
            self.calibrate(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.calibrate(trainer, pl_module)

    # --------------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "probe": {"split": self.split, "probe_size": self.probe_size, "seed": self.seed},
            "states": None if self.states is None else [asdict(s) for s in self.states],
            "history": [(int(step), dict(m)) for step, m in self.history],
            "last_step": self._last_step,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [(int(step), dict(m)) for step, m in state_dict.get("history", [])]
        self._last_step = state_dict.get("last_step")
        probe = state_dict.get("probe", {})
        current = {"split": self.split, "probe_size": self.probe_size, "seed": self.seed}
        saved = state_dict.get("states")
        if saved is None:
            self.states = None
        elif probe != current:
            rank_zero_warn(
                f"ValueCalibration: the checkpoint's probe set was built with {probe}, this callback is "
                f"configured with {current}; the probe set will be rebuilt"
            )
            self.states = None
        else:
            self.states = [ProbeState(**s) for s in saved]
        self._verified = False
