"""The offline loop shared by RFT, DPO, OREO, DQO and DVO (docs/architecture.md).

An offline method trains on a trajectory dataset (:mod:`lit_reason.data.trajectories`): rows of
prompt, sampled response, step spans, outcome reward and behaviour log-probs. The dataset is
either given (``data`` holds a complete dataset and ``collect`` is None) or collected on first use
with the start policy (``collect`` holds the sampling settings; an interrupted collection resumes,
a complete one is reused, one for other settings is refused). Each method chooses its training
*items* from the rows (:meth:`OfflineRL.select_items`: positives for RFT, pairs for DPO, OREO's
balanced subset ...) and its loss (:meth:`OfflineRL.training_step`).

Rounds: :class:`lit_reason.callbacks.IterativeRounds` calls :meth:`OfflineRL.recollect` with the
current policy and the module switches to the new dataset; the current dataset folder is saved in
checkpoints, so a resumed run trains on the data of its round. ``validate``/``test`` report greedy
accuracy as the online methods do.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from lit_reason.methods.base import RLModule
from lit_reason.methods.common import ExampleRows, as_list, warmup_cosine
from lit_reason.models.logprobs import pack_states, response_logprobs
from lit_reason.rollout.batch import TrajectoryBatch

# warmup of an offline run whose `warmup_steps` is None: OREO's 3% of the optimiser steps
DEFAULT_WARMUP_RATIO = 0.03

COLLECT_KEYS = {"samples", "limit", "split", "temperature", "top_p", "seed", "chunk_size", "batch_size"}
_CKPT_KEY = "lit_reason_offline"


def check_collect_settings(collect: dict | None) -> dict | None:
    """Validates the ``collect`` argument of an offline module (unknown keys name themselves)."""
    if collect is None:
        return None
    if not isinstance(collect, dict):
        raise TypeError(f"collect must be a dict of sampling settings or None, got {type(collect).__name__}")
    unknown = set(collect) - COLLECT_KEYS
    if unknown:
        raise ValueError(f"collect: unknown key(s) {sorted(unknown)}; known: {sorted(COLLECT_KEYS)}")
    if "samples" not in collect:
        raise ValueError("collect: `samples` (responses per prompt) is required")
    return dict(collect)


class OfflineRL(RLModule):
    """Trains the policy on a trajectory dataset; subclasses pick the items and the loss.

    Shared arguments (policy, task, weight_decay, grad_clip, max_new_tokens, splitter,
    merge_answer_line, dtype, lora, rollout_batch_size, eval_limit, seed, progress):
    :class:`~lit_reason.methods.base.RLModule`. The start ``policy`` is also the collecting policy
    of round 0; ``max_new_tokens`` and ``splitter`` apply to collection too.

    Args:
        data: Dataset folder. With ``collect`` set it is created (or resumed) on first use;
            without, it must hold a complete dataset. None: ``<default_root_dir>/data``.
        collect: Sampling settings for collecting on first use: ``samples`` (required), ``limit``
            (prompts of the split), ``split`` (``train``), ``temperature`` (1.0), ``top_p``, ``seed``,
            ``chunk_size``, ``batch_size``. None: ``data`` must exist.
        batch_size: Training items per optimiser step.
        lr: Policy learning rate (AdamW, betas (0.9, 0.95)).
        warmup_steps: Linear warmup over this many optimiser steps, then cosine decay to 10%.
            None: 3% of the run's optimiser steps (OREO's warmup ratio), because offline runs are
            usually set in epochs, whose steps are known only once the dataset is.
    """

    def __init__(
        self,
        data: str | None = None,
        collect: dict | None = None,
        batch_size: int = 16,
        lr: float = 1e-5,
        warmup_steps: int | None = None,
        **kwargs,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        collect = check_collect_settings(collect)
        super().__init__(lr=lr, **kwargs)
        self.save_hyperparameters(ignore=["task"])
        self.data_path: Path | None = Path(data) if data else None
        self.data_stats: dict[str, float] = {}
        self._items: list | None = None
        self._schedule_steps: int | None = None  # the LR schedule's length, fixed at the run's start

    # ---- data -------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        self._schedule_steps = None  # each fit estimates its schedule (a resume restores it after this)
        if self.data_path is None:
            self.data_path = Path(self.trainer.default_root_dir) / "data"
        if self.builds_data():
            # rank 0 builds (or resumes, or finds the complete dataset); the others wait and read it
            if self.trainer.is_global_zero:
                self.build_dataset(self.data_path)
            self.trainer.strategy.barrier("lit_reason_offline_data")

    def builds_data(self) -> bool:
        """Whether ``setup`` builds the dataset on first use (here: ``collect`` is set)."""
        return self.hparams.collect is not None

    def build_dataset(self, output: Path) -> Path:
        """Builds the round-0 dataset with the start policy (here: a collection)."""
        return self.collect_dataset(self.hparams.policy, output, self.hparams.collect)

    def collection_device(self) -> torch.device | None:
        """Where first-use collection runs: the Trainer's device (rank 0's GPU), None without a Trainer.

        ``setup`` runs before the strategy moves (or FSDP shards) the module, so the module's own
        policy is still on the CPU there; a separately loaded copy is moved here instead (rank 0
        only, no collective, so it cannot deadlock under FSDP).
        """
        return self.trainer.strategy.root_device if self._trainer is not None else None

    def collect_dataset(self, policy: Any, output: Path, settings: dict, policy_name: str | None = None) -> Path:
        """Collects (or resumes, or reuses) a dataset with ``policy`` (a name or ``(model, tokenizer)``)."""
        from lit_reason.data.collect import collect

        s = dict(settings)
        return collect(policy, self.task, output, samples=s.pop("samples"), max_new_tokens=self.hparams.max_new_tokens,
                       splitter=self.splitter, progress=self.hparams.progress, dtype=self.hparams.dtype,
                       policy_name=policy_name, device=self.collection_device() if isinstance(policy, str) else None,
                       **s)

    def recollect(self, output: str | Path, seed: int, round_index: int) -> Path:
        """Collects a new dataset with the *current* policy into ``output`` and trains on it next.

        The sampling settings are ``collect``'s, else those stored in the current dataset's meta;
        ``seed`` replaces the sampling seed (each round samples afresh). Called by
        :class:`lit_reason.callbacks.IterativeRounds` on global rank 0 (others then call
        :meth:`use_dataset`).
        """
        from lit_reason.data.trajectories import read_meta

        settings = dict(self.hparams.collect or {})
        if not settings:
            meta = read_meta(self._require_data())
            sampling = meta["sampling"]
            settings = {"samples": sampling["samples"], "temperature": sampling["temperature"],
                        "top_p": sampling["top_p"], "limit": meta["num_prompts"], "split": meta["split"]}
        settings["seed"] = seed
        name = f"{self.hparams.policy}@round{round_index}"
        path = self.collect_dataset((self.policy, self.tokenizer), Path(output), settings, policy_name=name)
        self.use_dataset(path)
        return path

    def use_dataset(self, path: str | Path) -> None:
        """Trains on ``path`` from the next ``train_dataloader`` call on."""
        self.data_path = Path(path)
        self._items = None

    def _require_data(self) -> Path:
        if self.data_path is None:
            raise ValueError(f"{type(self).__name__}: no dataset: set `data` (a collected dataset folder) or `collect`")
        return self.data_path

    def load_rows(self) -> list[dict]:
        """The current dataset's rows, after the tokenizer/task/splitter compatibility checks."""
        from lit_reason.data.trajectories import TrajectoryDataset, splitter_config

        path = self._require_data()
        if not (path / "meta.json").exists():
            hint = "" if self.hparams.collect else " (set `collect` to collect it on first use)"
            raise FileNotFoundError(f"{type(self).__name__}: dataset folder {path} holds no dataset{hint}")
        ds = TrajectoryDataset(path)
        ds.check_compatible(self.tokenizer, self.task)
        stored, ours = ds.meta["splitter"], splitter_config(self.splitter)
        if stored != ours:
            raise ValueError(f"trajectory dataset {path} was split into steps with {stored}, this run splits with "
                             f"{ours}: re-collect, or set the module's `splitter` to match")
        self.data_stats = {"data/rows": float(len(ds)), "data/skipped_rows": float(ds.skipped),
                           "data/prompts": float(ds.num_prompts),
                           "data/positive_fraction": sum(r["reward"] > 0 for r in ds) / max(len(ds), 1)}
        return ds.rows

    def select_items(self, rows: list[dict]) -> list:
        """The method's training items built from the dataset rows (default: every row)."""
        return list(rows)

    def train_dataloader(self) -> DataLoader:
        if self._items is None:
            rows = self.load_rows()
            self._items = self.select_items(rows)
            if not self._items:
                raise ValueError(f"{type(self).__name__}: dataset {self.data_path} gives no training item "
                                 f"({self.data_stats})")
            self.data_stats["data/items"] = float(len(self._items))
            rank_zero_info(f"{type(self).__name__}: training on {self.data_path}: {self.data_stats}")
        g = torch.Generator().manual_seed(self.hparams.seed + self.current_epoch)
        return DataLoader(ExampleRows(self._items), batch_size=self.hparams.batch_size, shuffle=True, generator=g,
                          collate_fn=as_list)

    def to_batch(self, rows: list[dict]) -> TrajectoryBatch:
        """Rows -> a :class:`TrajectoryBatch` on the module's device (behaviour log-probs in ``old_logprobs``)."""
        from lit_reason.data.trajectories import TrajectoryDataset

        return TrajectoryDataset.to_batch(rows, self.tokenizer.pad_token_id).to(self.device)

    def log_data_stats(self) -> None:
        if self.data_stats:
            self.log_dict(self.data_stats, prog_bar=False, batch_size=1)

    # ---- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[_CKPT_KEY] = {"data": str(self.data_path) if self.data_path else None,
                                 "schedule_steps": self._schedule_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get(_CKPT_KEY) or {}
        if state.get("data"):
            self.use_dataset(state["data"])
        # Lightning restores the module before configure_optimizers: the schedule keeps the length
        # the run started with (a resume inside a later IterativeRounds round would re-estimate it
        # from that round's dataset, and the LR would differ from the uninterrupted run's)
        if state.get("schedule_steps"):
            self._schedule_steps = int(state["schedule_steps"])

    # ---- optimisation -----------------------------------------------------------------------
    def total_steps(self) -> int:
        """Optimiser steps of the run (``max_steps``, else Lightning's estimate), fixed at its start."""
        if self._schedule_steps is None:
            t = self.trainer
            self._schedule_steps = int(t.max_steps) if t.max_steps and t.max_steps > 0 else int(t.estimated_stepping_batches)
        return self._schedule_steps

    def make_optimizer(self, params, lr: float):
        """AdamW (betas 0.9/0.95) with warmup-cosine over the run, as a Lightning config dict."""
        opt = self.adamw(params, lr)
        total = self.total_steps()
        warmup = self.hparams.warmup_steps
        sched = warmup_cosine(opt, int(DEFAULT_WARMUP_RATIO * total) if warmup is None else warmup, total)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_optimizers(self):
        return self.make_optimizer([p for p in self.policy.parameters() if p.requires_grad], self.hparams.lr)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # the module's grad_clip applies unless the Trainer sets its own
        val = gradient_clip_val if gradient_clip_val is not None else self.hparams.grad_clip
        if val:
            self.clip_gradients(optimizer, gradient_clip_val=val, gradient_clip_algorithm=gradient_clip_algorithm or "norm")

    # ---- values -----------------------------------------------------------------------------
    @torch.no_grad()
    def implicit_state_values(self, prompt_ids, partial_ids, beta: float, chunk: int = 128) -> torch.Tensor:
        """The implicit value increment ``beta * sum_t log pi_theta/pi_ref`` over each partial response.

        Under the KL-regularised optimum ``beta * log pi*/pi_ref(a|s) = Q*(s,a) - V*(s)``, so the
        summed log-ratio of the first k steps is ``V(S_k) - V(S_0)`` (docs/dvo.md, "Idea";
        OREO's Fig. 1 A_theta, arXiv 2412.16145). Returns [N] (0 for an empty partial response).
        """
        out = []
        for start in range(0, len(prompt_ids), chunk):
            ids, mask, P, resp = pack_states(prompt_ids[start : start + chunk], partial_ids[start : start + chunk],
                                             self.tokenizer.pad_token_id)
            ids, mask, resp = ids.to(self.device), mask.to(self.device), resp.to(self.device)
            if resp.shape[1] == 0:
                out.append(torch.zeros(ids.shape[0]))
                continue
            logp = response_logprobs(self.policy, ids, mask, P)
            ref = self.reference.logprobs(ids, mask, P)
            out.append((beta * ((logp - ref) * resp).sum(-1)).float().cpu())
        return torch.cat(out)

