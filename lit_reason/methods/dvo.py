"""DVO: Direct Value Optimization (arXiv 2502.13723; docs/dvo.md).

The policy's summed step log-ratio, scaled by beta, is regressed onto externally estimated value
differences (:func:`lit_reason.losses.dvo.dvo_loss`)::

    L_k      = sum_{tokens t in step k} log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)
    target_k = V(S_{k+1}) - V(S_k)                          (V(S_T) = R, the +-1 outcome)
    L_DVO    = mean_b [ (1/T_b) sum_k (beta * L_k - target_k)^2 ]

Target sources (one switch, ``target_source``)
----------------------------------------------
``mcts`` (the paper's main variant)
    Step-level MCTS with the start policy on the training prompts
    (:mod:`lit_reason.rollout.mcts`: PUCT c = 1.5, width 5, depth 8, 80 simulations, +-1 terminal
    rewards backed up); up to 8 correct and 8 incorrect root-to-leaf paths per prompt,
    ``target_k = Q(node_{k+1}) - Q(node_k)`` (:mod:`lit_reason.rollout.mcts_paths`).
``value_model`` (the paper's "outcome value model" alternative)
    ``samples`` responses per prompt are collected (:func:`lit_reason.data.collect.collect`);
    a :class:`~lit_reason.models.value.ValueModel` on a copy of the policy's trunk is trained by
    MSE on the outcomes (every step-boundary state S_k of a response regressed onto its 2R - 1) and
    supplies V(S_k); ``targets_from_values``.
``mc``
    The same collected responses; V(S_k) = 2 * (mean outcome of ``mc_rollouts`` fresh
    continuations) - 1 (:func:`lit_reason.rollout.monte_carlo.mc_values`); ``targets_from_values``.

All three give targets on the same +-1 reward scale, so one beta serves them all. For the two
non-search sources the responses are selected as the search's paths are: truncated responses
are dropped (MCTS prunes those leaves), identical responses of a prompt are kept once (tree paths
are distinct), prompts without a correct response are dropped, and at most ``max_correct`` correct
and ``max_incorrect`` incorrect responses per prompt are drawn (uniformly; the search draws
proportionally to visits).

The target dataset is built on first use by :mod:`lit_reason.data.dvo_targets` (documented there).

Rounds: :meth:`DVO.refresh_targets` rebuilds the targets with the *current* policy (a new search);
:class:`lit_reason.callbacks.mcts_refresh.MCTSTargetRefresh` calls it every N epochs and
:class:`lit_reason.callbacks.rounds.IterativeRounds` at its round boundaries (through
:meth:`DVO.recollect`). The reference stays the start policy in every round (whether
the source updates pi_ref per round is not known, docs/dvo.md; a fixed reference keeps resume
exact, since the reference is never checkpointed).
"""


from __future__ import annotations

import time
from pathlib import Path

import torch

from lit_reason.data.dvo_targets import (
    TARGET_SOURCES,
    build_target_dataset,
    check_target_settings,
    target_dataset_stats,
)
from lit_reason.losses.dvo import dvo_loss, step_logratios
from lit_reason.methods.base import on_device
from lit_reason.methods.offline import OfflineRL
from lit_reason.models.logprobs import response_logprobs
from lit_reason.rollout.mcts_paths import step_targets_tensor

__all__ = ["DVO", "TARGET_SOURCES"]


class DVO(OfflineRL):
    """DVO (docs/dvo.md). Other arguments: :class:`~lit_reason.methods.offline.OfflineRL`
    (its ``collect`` is replaced by ``targets``).

    Args:
        beta: KL coefficient beta of the implicit value (0.1).
        target_source: ``mcts`` (default), ``value_model`` or ``mc`` (module doc).
        targets: Settings of building the target dataset into ``data`` on first use
            (:func:`check_target_settings`); None: ``data`` must hold a complete target dataset.

    ``state_values`` (value calibration) is the implicit value ``beta * sum_t log pi/pi_ref`` of
    the partial response: the estimate of V(S_k) - V(S_0) on the +-1 reward scale that the
    training regresses (its steps telescope). ``value_range = (-1, 1)`` maps it onto [0, 1] with
    V(S_0) taken as 0 (success probability 1/2), so ``value/rank_acc`` is the scale-free measure
    and the MAE/ECE read the increment only.
    """

    value_range = (-1.0, 1.0)

    def __init__(self, beta: float = 0.1, target_source: str = "mcts", targets: dict | None = None,
                 **kwargs) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if kwargs.get("collect") is not None:
            raise ValueError("DVO builds its data with `targets` (settings of target_source "
                             f"{target_source!r}), not `collect`")
        check_target_settings(target_source, targets)
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])
        self.refresh_simulations: int | None = None  # set by MCTSTargetRefresh when it defers to rounds

    # ---- data -------------------------------------------------------------------------------
    def builds_data(self) -> bool:
        return self.hparams.targets is not None

    def build_dataset(self, output: Path) -> Path:
        """Searches (or resumes / reuses) the round-0 targets with the start policy.

        Runs in ``setup`` on rank 0, before the strategy places (or FSDP shards) the module: the
        still-unsharded policy is moved to the training device for the search and back after.
        """
        with on_device(self.policy, self.collection_device()):
            return self.build_targets(output, self.hparams.targets, policy_name=self.hparams.policy)

    def build_targets(self, output: str | Path, settings: dict, policy_name: str) -> Path:
        """Builds the target dataset with the module's *current* policy (:func:`build_target_dataset`)."""
        started = time.perf_counter()
        path = build_target_dataset(self.policy, self.tokenizer, self.task, self.splitter, output,
                                    self.hparams.target_source, settings, max_new_tokens=self.hparams.max_new_tokens,
                                    policy_name=policy_name, progress=self.hparams.progress)
        self.data_stats["data/build_seconds"] = time.perf_counter() - started
        return path

    def refresh_targets(self, output: str | Path, seed: int, tag: str, simulations: int | None = None) -> Path:
        """Rebuilds the targets with the current policy into ``output``; trains on them next.

        The settings are ``targets``' (else those in the current dataset's meta) with ``seed``
        replaced and, for the mcts source, ``simulations`` when given (or set by
        :class:`~lit_reason.callbacks.mcts_refresh.MCTSTargetRefresh`). The policy is recorded as
        ``<policy>@<tag>``. Runs on global rank 0 (callers broadcast the folder).
        """
        settings = dict(self.hparams.targets) if self.hparams.targets is not None else self._settings_from_meta()
        settings["seed"] = seed
        simulations = simulations if simulations is not None else self.refresh_simulations
        if simulations is not None:
            if self.hparams.target_source != "mcts":
                raise ValueError(f"simulations applies to target_source 'mcts', not {self.hparams.target_source!r}")
            settings["simulations"] = simulations
        path = self.build_targets(Path(output), settings, policy_name=f"{self.hparams.policy}@{tag}")
        self.use_dataset(path)
        return path

    def recollect(self, output: str | Path, seed: int, round_index: int) -> Path:
        """IterativeRounds' protocol: a round of DVO re-runs the target source (the search) with the current policy."""
        return self.refresh_targets(output, seed=seed, tag=f"round{round_index}")

    def _settings_from_meta(self) -> dict:
        from lit_reason.data.trajectories import read_meta

        meta = read_meta(self._require_data())
        stored = dict(meta.get("targets") or {})
        if stored.pop("source", None) != self.hparams.target_source:
            raise ValueError(f"dataset {self.data_path} was not built for target_source "
                             f"{self.hparams.target_source!r}: set `targets` to rebuild it")
        return {**stored, "split": meta["split"], "limit": meta["num_prompts"], "chunk_size": meta["chunk_size"],
                "temperature": meta["sampling"]["temperature"], "batch_size": meta["sampling"]["batch_size"]}

    def load_rows(self) -> list[dict]:
        built = {k: v for k, v in self.data_stats.items() if k == "data/build_seconds"}
        rows = super().load_rows()  # resets data_stats
        self.data_stats.update(built)
        if self.hparams.target_source == "mcts":
            self.data_stats.update({f"data/{k}": v for k, v in target_dataset_stats(self.data_path).items()
                                    if k.startswith("extraction/")})
        return rows

    def select_items(self, rows: list[dict]) -> list[dict]:
        for r in rows:
            targets = r.get("step_targets")
            if targets is None or len(targets) != len(r["step_ends"]):
                raise ValueError(f"DVO: dataset {self.data_path} row (prompt {r['prompt_index']}, sample "
                                 f"{r['sample_index']}) has no step_targets for its {len(r['step_ends'])} steps: "
                                 "it is not a DVO target dataset (build one with `targets`)")
        if rows:
            n = sum(len(r["step_targets"]) for r in rows)
            self.data_stats["data/target_abs_mean"] = sum(abs(t) for r in rows for t in r["step_targets"]) / n
        return list(rows)

    # ---- loss -------------------------------------------------------------------------------
    def training_step(self, rows: list[dict], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.log_data_stats()
        b = self.to_batch(rows)
        S = b.step_ends.shape[1]
        targets = step_targets_tensor(rows, S).to(self.device)  # [B, S], +-1 reward scale
        logp = response_logprobs(self.policy, b.input_ids, b.attention_mask, b.prompt_len)  # [B, L]
        ref = self.reference.logprobs(b.input_ids, b.attention_mask, b.prompt_len)  # [B, L]
        ratios = step_logratios(logp, ref, b.step_ids, b.num_steps, S)  # [B, S], summed over each step
        loss, metrics = dvo_loss(ratios, targets, b.num_steps, beta=self.hparams.beta)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=len(rows))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(rows))
        return loss

    # ---- values -----------------------------------------------------------------------------
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Value-calibration protocol: ``beta * sum_t log pi/pi_ref`` of each partial response, [N]."""
        return self.implicit_state_values(prompt_ids, partial_ids, self.hparams.beta)
