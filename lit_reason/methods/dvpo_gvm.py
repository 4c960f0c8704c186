"""DVPO stage 1: pretraining the global value model (GVM) offline (arXiv 2502.16944; docs/dvpo.md).

The GVM is a causal-LM trunk with a scalar head (:class:`~lit_reason.models.value.ValueModel`,
head with bias, zero-initialised as trl's ``v_head``; optional LoRA), trained by TD(lambda)
regression on trajectories of the start policy with outcome rewards::

    r_t = 0 except r_last = +1 (correct) / -1 (wrong or truncated)        # docs/index.md, rewards: DVPO uses +-1
    V_old = V_phi(s_t) with no grad, once per batch                       # the code's "old values"
    G_t = GAE_{gamma, lam}(r, V_old)_t + V_old(t)                          # td_lambda_targets
    L   = 0.5 * masked_mean_tokens((V_phi(s_t) - G_t)^2)                  # gvm_loss, no clipping

``epochs_per_batch`` optimiser steps are taken on each batch's fixed targets (the code: 2), so
``trainer.max_steps`` counts optimiser steps. The value of token t is read at the last token of
``s_t = (x, y_<t)`` (:meth:`ValueModel.response_values`), i.e. the GVM predicts the return-to-go
from each prefix.

Trajectory conditioning: the DVPO paper writes Q_phi(tau, s_t, a_t), conditioned on trajectories
tau of the policy, but the format is unverified (docs/dvpo.md) and the released
code feeds at most the question. Here the GVM reads the state prefix only (the code's behaviour).
A fixed context would be a constant prefix (no information), and a per-batch context would make a
frozen value depend on which trajectories happen to share its batch; neither is worth the cost on
a frozen model, so no context option is offered.

Data: the :class:`~lit_reason.methods.offline.OfflineRL` machinery (collected on first use with
``collect``, reused when complete). The policy it loads is the *collecting* policy: it is frozen
(no gradient, eval mode, not in the optimiser) and kept only because the value-calibration
callback and the first-use collection need it. OfflineRL's reference copy is dropped.

Held-out metric (DVPO v1 Table 4): the last ``holdout_fraction`` of the dataset's prompts are not
trained on; ``validate`` scores the GVM on their trajectories with
:func:`~lit_reason.metrics.pairwise_outcome_accuracy` (correct vs incorrect responses of the same
prompt): ``gvm/pairwise_acc`` judges a trajectory by the mean of its per-token values (the paper's
aggregate), ``gvm/pairwise_acc_last`` by its outcome estimate (the value of the last state, see
:func:`gvm_response_values`). Also ``gvm/val_loss``, ``gvm/final_mae`` (that estimate vs the +-1
outcome) and ``gvm/pairs``.

Shapes: ``B`` trajectories, ``P`` (left-padded) prompt tokens, ``L`` (right-padded) response tokens.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from lit_reason.data.selection import group_by_prompt
from lit_reason.losses.dvpo import gvm_loss, td_lambda_targets
from lit_reason.losses.ppo import terminal_rewards
from lit_reason.methods.common import ExampleRows, as_list
from lit_reason.methods.offline import OfflineRL
from lit_reason.metrics.calibration import RankStats
from lit_reason.models.policy import freeze
from lit_reason.models.value import ValueModel
from lit_reason.rollout.batch import TrajectoryBatch

__all__ = ["DVPOGVM", "signed_outcomes", "gvm_response_values"]


def signed_outcomes(rewards: torch.Tensor) -> torch.Tensor:
    """{0,1} task rewards -> DVPO's {-1,+1} outcomes (docs/index.md, rewards; a truncated response is -1)."""
    return (rewards > 0).to(torch.float32) * 2.0 - 1.0


def gvm_response_values(gvm: ValueModel, b: TrajectoryBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """GVM values of every response state, and its estimate of the outcome.

    Args:
        gvm: The value model.
        b: A batch (prompts left-padded to ``P``, responses right-padded to ``L``).

    Returns:
        ``(values [B, L], final [B])``: ``values[:, t] = V(s_t)``, ``s_t = (x, y_<t)`` (0 on
        padding), and ``final = V(s_{m-1})``, the value of the last state of each response (m =
        its length). Stage 1 trains states s_0 .. s_{m-1} only, and the TD target of s_{m-1} is
        exactly the outcome (+-1), so ``final`` is the GVM's estimate of R; the complete response
        (x, y) is never a training state, so its raw value is not used anywhere.
    """
    P = b.prompt_len
    values = gvm(b.input_ids, b.attention_mask)[:, P - 1 : -1] * b.response_mask  # [B, L]
    last = (b.response_mask.sum(-1).long() - 1).clamp(min=0)  # [B]
    final = values.gather(1, last.unsqueeze(1)).squeeze(1)
    return values, final


class DVPOGVM(OfflineRL):
    """Stage 1 of DVPO: the GVM by TD(lambda) regression. Other arguments: :class:`OfflineRL`.

    Args:
        gamma: TD discount (source: 1.0).
        lam: TD lambda (source: 0.95).
        epochs_per_batch: Optimiser steps on each batch's fixed TD targets (the code: 2).
        holdout_fraction: Last fraction of the dataset's prompts kept out of training for the
            ``validate`` metrics (0: no held-out slice, validation is skipped).
        gvm_lora: LoRA arguments of the GVM trunk (DVPO code: ``{r: 8, lora_alpha: 32, ...}``);
            None trains the whole trunk. The policy's own ``lora`` is unused (it is frozen).
        policy: The collecting policy; the GVM trunk is initialised from the same checkpoint.
    """

    def __init__(self, gamma: float = 1.0, lam: float = 0.95, epochs_per_batch: int = 2,
                 holdout_fraction: float = 0.1, gvm_lora: dict | None = None, **kwargs) -> None:
        if epochs_per_batch < 1:
            raise ValueError(f"epochs_per_batch must be >= 1, got {epochs_per_batch}")
        if not 0.0 <= holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])
        self.automatic_optimization = False  # several optimiser steps per batch
        # the collecting policy is never trained here; its reference copy is never needed
        freeze(self.policy)
        self.reference = None
        self.value_model = ValueModel.from_policy_name(self.hparams.policy, dtype=self.hparams.dtype, lora=gvm_lora,
                                                       bias=True, zero_init=True)
        self.value_range = (-1.0, 1.0)  # value-calibration protocol: +-1 outcomes
        self._heldout: list[list[dict]] | None = None
        self._val = {"mean": RankStats(), "last": RankStats()}
        self._val_sums: dict[str, float] = {}

    def train(self, mode: bool = True):
        super().train(mode)
        self.policy.eval()  # frozen collecting policy: no dropout ever
        return self

    def trainable_models(self) -> dict[str, torch.nn.Module]:
        return {"value_model": self.value_model}

    def frozen_models(self) -> dict[str, torch.nn.Module]:
        return {"policy": self.policy}

    # ---- data: train on the prompts before the held-out slice --------------------------------
    def _split(self, rows: list[dict]) -> tuple[list[dict], list[list[dict]]]:
        prompts = sorted({r["prompt_index"] for r in rows})
        n_out = int(len(prompts) * self.hparams.holdout_fraction)
        held = set(prompts[len(prompts) - n_out :]) if n_out else set()
        train = [r for r in rows if r["prompt_index"] not in held]
        groups = [g for g in group_by_prompt([r for r in rows if r["prompt_index"] in held]).values()]
        return train, groups

    def select_items(self, rows: list[dict]) -> list[dict]:
        train, self._heldout = self._split(rows)
        self.data_stats["data/heldout_prompts"] = float(len(self._heldout))
        return train

    def val_dataloader(self) -> DataLoader:
        if self._heldout is None:
            self._split_from_disk()
        # one item per prompt, so a prompt's trajectories stay together under a distributed sampler
        return DataLoader(ExampleRows(self._heldout or []), batch_size=max(1, self.hparams.batch_size // 4),
                          collate_fn=as_list)

    def _split_from_disk(self) -> None:
        if self.data_path is None and self._trainer is not None:
            from pathlib import Path

            self.data_path = Path(self.trainer.default_root_dir) / "data"
        _, self._heldout = self._split(self.load_rows())

    # ---- stage 1 loss -----------------------------------------------------------------------
    def td_targets(self, b: TrajectoryBatch) -> torch.Tensor:
        """``[B, L]`` TD(lambda) targets G_t from the current (pre-update) values, no grad."""
        with torch.no_grad():
            old, _ = gvm_response_values(self.value_model, b)
            rewards = terminal_rewards(signed_outcomes(b.rewards), b.response_mask)
            return td_lambda_targets(old, rewards, b.response_mask, self.hparams.gamma, self.hparams.lam)

    def training_step(self, rows: list[dict], batch_idx: int) -> None:
        if batch_idx == 0:
            self.log_data_stats()
        b = self.to_batch(rows)
        returns = self.td_targets(b)
        opt, sch = self.optimizers(), self.lr_schedulers()
        for _ in range(self.hparams.epochs_per_batch):
            values, _ = gvm_response_values(self.value_model, b)
            loss, metrics = gvm_loss(values, returns, b.response_mask)
            self.manual_step(opt, loss, sch)
        self.log_dict({f"train/{k}": v for k, v in metrics.items()}, batch_size=len(rows))
        self.log("train/loss", metrics["gvm_loss"], prog_bar=True, batch_size=len(rows))

    def total_steps(self) -> int:
        t = self.trainer
        if t.max_steps and t.max_steps > 0:
            return int(t.max_steps)
        return int(t.estimated_stepping_batches) * self.hparams.epochs_per_batch

    def configure_optimizers(self):
        params = [p for p in self.value_model.parameters() if p.requires_grad]
        cfg = self.make_optimizer(params, self.hparams.lr)
        return [cfg["optimizer"]], [cfg["lr_scheduler"]]

    # ---- held-out GVM quality ---------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        for s in self._val.values():
            s.reset()
        self._val_sums = {"loss": 0.0, "mae": 0.0, "n": 0.0}

    @torch.no_grad()
    def validation_step(self, groups: list[list[dict]], batch_idx: int) -> None:
        rows = [r for g in groups for r in g]
        if not rows:
            return
        b = self.to_batch(rows)
        values, final = gvm_response_values(self.value_model, b)
        returns = self.td_targets(b)
        loss, _ = gvm_loss(values, returns, b.response_mask)
        outcome = (b.rewards > 0).float()
        mean_v = values.sum(-1) / b.response_mask.sum(-1).clamp(min=1)
        self._val["mean"].update_grouped(mean_v.cpu(), outcome.cpu(), b.group_ids.cpu())
        self._val["last"].update_grouped(final.cpu(), outcome.cpu(), b.group_ids.cpu())
        n = float(len(rows))
        self._val_sums["loss"] += float(loss) * n
        self._val_sums["mae"] += float((final - signed_outcomes(b.rewards)).abs().sum())
        self._val_sums["n"] += n

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        group = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for s in self._val.values():
                s.all_reduce(group)
            sums = torch.tensor([self._val_sums.get(k, 0.0) for k in ("loss", "mae", "n")], dtype=torch.float64)
            torch.distributed.all_reduce(sums)
            self._val_sums = dict(zip(("loss", "mae", "n"), sums.tolist()))
        n = self._val_sums.get("n", 0.0)
        if not n:
            return
        metrics = {"gvm/val_loss": self._val_sums["loss"] / n, "gvm/final_mae": self._val_sums["mae"] / n,
                   "gvm/pairs": float(self._val["mean"].pairs)}
        if self._val["mean"].pairs:  # never a fabricated 0.5 when no prompt had mixed outcomes
            metrics["gvm/pairwise_acc"] = self._val["mean"].compute()["rank_acc"]
            metrics["gvm/pairwise_acc_last"] = self._val["last"].compute()["rank_acc"]
        self.log_dict(metrics, rank_zero_only=True, batch_size=1)

    # ---- value-calibration protocol ---------------------------------------------------------
    @torch.no_grad()
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """[N] GVM value V(S) of each state S = prompt ++ partial response (scale +-1)."""
        seqs = [list(p) + list(q) for p, q in zip(prompt_ids, partial_ids)]
        # a terminal state (ending with EOS) is read before its EOS, where the GVM is trained
        return self.value_model.values_of(seqs, self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id).cpu()
