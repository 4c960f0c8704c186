"""OREO: Offline REasoning Optimization (arXiv 2412.16145; docs/oreo.md) as a LightningModule.

A policy pi_theta and a **separate** value model V_phi (a copy of the start policy's trunk with a
zero-initialised, bias-free scalar head; with ``share_trunk``, the LoRA policy's own base weights
with a second adapter) are trained on an offline trajectory dataset with the
soft-Bellman losses of :mod:`lit_reason.losses.oreo` (paper Eqs. 8-9; token level by default, step
and response level as options). Per batch, exactly as docs/oreo.md:

1. critic step: ``L_V`` (Eq. 8) with ``A_t`` from the *current* policy under no grad, then the
   critic's own AdamW step (betas 0.9/0.95, warmup-cosine, gradient clip);
2. policy step: ``L_pi`` (Eq. 9, with the exact full-vocabulary KL regulariser weighted by alpha),
   then the policy's own AdamW step.

One forward per model per batch: the policy step reads ``sg[V_phi(s_t)]`` as computed for the
critic step, i.e. before the critic's update (library choice; a second critic forward would read
values one small step newer). The critic step changes no policy parameter, so the policy's
log-probs computed once serve both steps exactly.

:class:`ValueOfflineRL` holds what OREO and DQO (:mod:`lit_reason.methods.dqo`) share: the value
model, the two optimisers and their order, item selection, importance weights and the value
calibration protocol (``state_values``, explicit or implicit values).

Rewards are the dataset's outcome rewards, {0, 1} for the built-in tasks (as OREO's math runs,
docs/oreo.md), hence ``value_range = (0, 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lit_reason.data.selection import balanced_selection, group_by_prompt, is_positive
from lit_reason.losses.oreo import (
    oreo_importance_weights,
    oreo_policy_loss,
    oreo_response_loss,
    oreo_step_policy_loss,
    oreo_step_value_loss,
    oreo_value_loss,
    step_start_values,
)
from lit_reason.methods.offline import OfflineRL
from lit_reason.models.logprobs import full_kl, gather_logprobs, response_logits
from lit_reason.models.shared_trunk import check_not_sharded, check_share_trunk
from lit_reason.models.value import ValueModel
from lit_reason.rollout.batch import TrajectoryBatch

MODES = ("token", "step", "response")
ALPHA_BY_MODE = {"token": 0.01, "step": 0.1, "response": 0.3}  # docs/oreo.md / "Variants"
VALUE_SOURCES = ("explicit", "implicit")
SELECTIONS = ("balanced", "all")


@dataclass
class BatchForward:
    """What both losses of one batch read (``B`` rows, ``L`` response tokens).

    Attributes:
        logprobs: log pi_theta of the taken tokens ``[B, L]``, with gradient to the policy.
        ref_logprobs: log pi_ref ``[B, L]`` (constants).
        values: V_phi(s_t) ``[B, L]``, with gradient to the value model (``values[:, 0]`` = V(S_0)).
        kl: Exact per-position KL(pi_theta || pi_ref) ``[B, L]``, or None when not needed.
        weights: Importance weights ``[B]`` (detached), or None.
    """

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kl: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class ValueOfflineRL(OfflineRL):
    """Policy + separate value model, trained offline with two optimisers (critic, then policy).

    Subclasses implement :meth:`critic_loss` and :meth:`policy_loss`. Other arguments:
    :class:`~lit_reason.methods.offline.OfflineRL`.

    ``trainer.max_steps`` counts optimiser steps as Lightning does under manual optimisation:
    every batch makes **two** (critic and policy), so ``max_steps: 2`` trains on one batch.

    Args:
        beta: KL coefficient of the log-ratio (source: 0.03). Must be > 0.
        critic_lr: Value-model learning rate (None: ``lr``; OREO 7B with critic LoRA: 1e-4).
        critic_lora: LoRA arguments for the value model's trunk (OREO 7B: r 64, alpha 64,
            all-linear); None trains it fully (or, with ``share_trunk``, uses the policy's ``lora``).
        share_trunk: With a LoRA policy (``lora``), the value model reuses the policy's base weights
            (one copy in memory) and trains its own adapter (``critic_lora``, else the policy's
            ``lora`` arguments) plus its head; not under FSDP. DVPO's global value model has no such
            option: the GVM is trained in its own run and loaded frozen from its folder.
        value_source: What ``state_values`` returns (value calibration): ``explicit`` = V_phi at the
            last token of the state; ``implicit`` = ``V_phi(S_0) + beta * sum log pi/pi_ref`` of the
            partial response (OREO Fig. 1's implicit value). Run twice to compare them.
        importance_sampling: Weight each sequence's policy loss by
            ``w = exp(min(sum_t l_t, is_clip))``, detached (docs/oreo.md, docs/dqo.md; OREO's
            ``--importance_sampling``).
        is_clip: The clip ``c`` of the summed log-ratio in ``w`` (source: 1).
        selection: Training items: ``balanced`` (OREO's per-prompt rule,
            :func:`~lit_reason.data.selection.balanced_selection`) or ``all`` rows.
        max_pos: Positives kept per prompt at most (balanced; the paper's 7B setting: 4).
        max_neg: Negatives kept per prompt at most (balanced; the paper's 7B setting: 4).
    """

    value_range = (0.0, 1.0)
    _uses_kl = False  # whether the policy loss needs the exact full-vocabulary KL

    def __init__(
        self,
        beta: float = 0.03,
        critic_lr: float | None = None,
        critic_lora: dict | None = None,
        share_trunk: bool = False,
        value_source: str = "explicit",
        importance_sampling: bool = False,
        is_clip: float = 1.0,
        selection: str = "balanced",
        max_pos: int = 4,
        max_neg: int = 4,
        **kwargs,
    ) -> None:
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if critic_lr is not None and not critic_lr > 0:
            raise ValueError(f"critic_lr must be > 0 or None, got {critic_lr}")
        if value_source not in VALUE_SOURCES:
            raise ValueError(f"value_source must be one of {VALUE_SOURCES}, got {value_source!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
        if max_pos < 0 or max_neg < 0:
            raise ValueError(f"max_pos and max_neg must be >= 0, got {max_pos}, {max_neg}")
        check_share_trunk(share_trunk, kwargs.get("lora"), critic_lora)
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])
        self.automatic_optimization = False  # two optimisers, stepped in a fixed order
        # docs/oreo.md: a separate LM from the same start policy, head Linear(h, 1, bias=False) at 0
        if share_trunk:  # the same start trunk, not a copy: its own adapter on the policy's base weights
            self.value_model = ValueModel.shared_with(self.policy, critic_lora or self.hparams.lora, bias=False,
                                                      zero_init=True)
        else:
            self.value_model = ValueModel.from_policy_name(self.hparams.policy, dtype=self.hparams.dtype,
                                                           lora=critic_lora, bias=False, zero_init=True)

    def trainable_models(self) -> dict[str, torch.nn.Module]:
        return {**super().trainable_models(), "value_model": self.value_model}

    def setup(self, stage: str) -> None:
        if self.hparams.share_trunk:
            check_not_sharded(self)  # before the data build, which may take long
        super().setup(stage)

    # ---- items ------------------------------------------------------------------------------
    def select_items(self, rows: list[dict]) -> list[dict]:
        hp = self.hparams
        items = (balanced_selection(rows, max_pos=hp.max_pos, max_neg=hp.max_neg, seed=hp.seed)
                 if hp.selection == "balanced" else list(rows))
        groups = group_by_prompt(rows)
        self.data_stats.update({
            "data/items_positive": float(sum(is_positive(r) for r in items)),
            "data/items_negative": float(sum(not is_positive(r) for r in items)),
            "data/prompts_all_positive": float(sum(all(is_positive(r) for r in g) for g in groups.values())),
            "data/prompts_all_negative": float(sum(not any(is_positive(r) for r in g) for g in groups.values())),
        })
        return items

    # ---- the method's part ------------------------------------------------------------------
    def critic_loss(self, batch: TrajectoryBatch, fwd: BatchForward) -> tuple[torch.Tensor, dict]:
        """The value model's loss of one batch (gradient to ``fwd.values`` only)."""
        raise NotImplementedError

    def policy_loss(self, batch: TrajectoryBatch, fwd: BatchForward) -> tuple[torch.Tensor, dict]:
        """The policy's loss of one batch (gradient to ``fwd.logprobs`` / ``fwd.kl`` only)."""
        raise NotImplementedError

    # ---- the loop ---------------------------------------------------------------------------
    def forward_batch(self, b: TrajectoryBatch) -> BatchForward:
        """One forward of policy, reference and value model on a batch (see :class:`BatchForward`).

        The policy's log-probs keep their graph: the critic step reads them detached (the current
        policy's ``A_t`` under no grad, docs/oreo.md) and the policy step, which follows, back-
        propagates through them; the critic step changes no policy parameter in between.
        """
        resp = b.response_ids
        logits = response_logits(self.policy, b.input_ids, b.attention_mask, b.prompt_len)
        logp = gather_logprobs(logits, resp)
        kl = None
        if self._uses_kl:
            ref_logits = self.reference.logits(b.input_ids, b.attention_mask, b.prompt_len)
            ref_logp = gather_logprobs(ref_logits, resp)
            kl = full_kl(logits, ref_logits)  # exact over the vocabulary (source: --unbiased_kl)
        else:
            ref_logp = self.reference.logprobs(b.input_ids, b.attention_mask, b.prompt_len)
        del logits
        values = self.value_model.response_values(b.input_ids, b.attention_mask, b.prompt_len)
        weights = None
        if self.hparams.importance_sampling:
            weights = oreo_importance_weights(logp.detach(), ref_logp, b.response_mask, cap=self.hparams.is_clip)
        return BatchForward(logprobs=logp, ref_logprobs=ref_logp.detach(), values=values, kl=kl, weights=weights)

    def training_step(self, rows: list[dict], batch_idx: int) -> torch.Tensor:
        if batch_idx == 0:
            self.log_data_stats()
        b = self.to_batch(rows)
        fwd = self.forward_batch(b)
        # 1. critic (optimiser 0), 2. policy (optimiser 1): docs/oreo.md
        critic_loss, critic_metrics = self.critic_loss(b, fwd)
        opts, scheds = self.optimizers(), self.lr_schedulers()
        self.manual_step(opts[0], critic_loss, scheds[0])
        policy_loss, policy_metrics = self.policy_loss(b, fwd)
        self.manual_step(opts[1], policy_loss, scheds[1])
        n = len(rows)
        # the losses' metric names overlap (residual_mean, value_mean): the critic's go under train/critic/
        self.log_dict({f"train/critic/{k}": v for k, v in critic_metrics.items()}, batch_size=n)
        self.log_dict({f"train/{k}": v for k, v in policy_metrics.items()}, batch_size=n)
        self.log_dict({"train/value_loss": critic_loss.detach(), "train/reward": b.rewards.float().mean(),
                       "train/lr": self.lr_schedulers()[1].get_last_lr()[0],
                       "train/critic_lr": self.lr_schedulers()[0].get_last_lr()[0]}, batch_size=n)
        self.log("train/loss", policy_loss.detach(), prog_bar=True, batch_size=n)
        return policy_loss.detach()

    # ---- optimisation -----------------------------------------------------------------------
    def total_steps(self) -> int:
        """Batches of the run = steps of *each* optimiser (``max_steps`` counts both: 2 per batch)."""
        t = self.trainer
        batches = t.estimated_stepping_batches  # min(epochs x batches, max_steps)
        if t.max_steps and t.max_steps > 0:
            batches = min(batches, math.ceil(t.max_steps / 2))
        return int(batches)

    def configure_optimizers(self):
        """``(critic, policy)``: two AdamW (betas 0.9/0.95) with warmup-cosine (docs/oreo.md)."""
        critic_lr = self.hparams.critic_lr if self.hparams.critic_lr is not None else self.hparams.lr
        shared = self.value_model.shared
        # on a shared trunk both adapters live in both models: each optimiser takes its own adapter
        policy_params = (shared.policy_parameters() if shared is not None
                         else [p for p in self.policy.parameters() if p.requires_grad])
        critic = self.make_optimizer(self.value_model.trainable_parameters(), critic_lr)
        policy = self.make_optimizer(policy_params, self.hparams.lr)
        return critic, policy

    # ---- values -----------------------------------------------------------------------------
    @torch.no_grad()
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Value-calibration protocol (:mod:`lit_reason.callbacks.value_calibration`): [N] values.

        ``explicit``: V_phi at the last token of S = prompt ++ partial (what beam search reads; a
        terminal state ending with EOS is read at the token before it, as beam search does).
        ``implicit``: ``V_phi(S_0) + beta * sum_t l_t`` over the partial response: the soft Bellman
        equation with zero intermediate reward, ``V(s_{t+1}) = V(s_t) + beta * l_t`` (docs/oreo.md
        Eq. 3), telescoped from the prompt's explicit value (OREO Fig. 1, A_theta).
        """
        pad = self.tokenizer.pad_token_id
        if self.hparams.value_source == "explicit":
            seqs = [list(p) + list(q) for p, q in zip(prompt_ids, partial_ids)]
            return self.value_model.values_of(seqs, pad, eos_token_id=self.tokenizer.eos_token_id).float().cpu()
        v0 = self.value_model.values_of([list(p) for p in prompt_ids], pad).float().cpu()
        return v0 + self.implicit_state_values(prompt_ids, partial_ids, self.hparams.beta)


class OREO(ValueOfflineRL):
    """OREO (docs/oreo.md). Other arguments: :class:`ValueOfflineRL`, :class:`OfflineRL`.

    Losses (:mod:`lit_reason.losses.oreo`), by ``mode``:

    * ``token`` (default): critic :func:`oreo_value_loss` (Eq. 8), policy :func:`oreo_policy_loss`
      (Eq. 9 + alpha * exact KL).
    * ``step``: states only at step starts, read from the dataset's step spans
      (:func:`step_start_values`), critic :func:`oreo_step_value_loss`, policy
      :func:`oreo_step_policy_loss` on the summed step log-ratios.
    * ``response``: critic as ``token`` (the flag changes only OREO's actor loss), policy
      :func:`oreo_response_loss` from s_0 only (DPO-like).

    Args:
        mode: ``token``, ``step`` or ``response``.
        alpha: Weight of the exact-KL regulariser; None: 0.01 / 0.1 / 0.3 for token / step /
            response (docs/oreo.md). 0 skips the reference logits.
    """

    def __init__(self, mode: str = "token", alpha: float | None = None, **kwargs) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if alpha is not None and alpha < 0:
            raise ValueError(f"alpha must be >= 0 or None, got {alpha}")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])
        self.alpha = ALPHA_BY_MODE[mode] if alpha is None else float(alpha)
        self._uses_kl = self.alpha > 0

    def _common(self, b: TrajectoryBatch) -> dict:
        return {"rewards": b.rewards.float(), "mask": b.response_mask, "beta": self.hparams.beta}

    def critic_loss(self, b: TrajectoryBatch, fwd: BatchForward):
        c = self._common(b)
        if self.hparams.mode == "step":
            step_values = step_start_values(fwd.values, b.step_ends, b.num_steps)
            return oreo_step_value_loss(step_values, fwd.logprobs.detach(), fwd.ref_logprobs, c["rewards"],
                                        b.step_ids, b.num_steps, c["mask"], beta=c["beta"])
        return oreo_value_loss(fwd.values, fwd.logprobs.detach(), fwd.ref_logprobs, c["rewards"], c["mask"],
                               beta=c["beta"])

    def policy_loss(self, b: TrajectoryBatch, fwd: BatchForward):
        c = self._common(b)
        values = fwd.values.detach()
        extra = {"alpha": self.alpha, "kl": fwd.kl, "importance_weights": fwd.weights}
        if self.hparams.mode == "step":
            step_values = step_start_values(values, b.step_ends, b.num_steps)
            return oreo_step_policy_loss(fwd.logprobs, fwd.ref_logprobs, step_values, c["rewards"], b.step_ids,
                                         b.num_steps, c["mask"], beta=c["beta"], **extra)
        loss_fn = oreo_response_loss if self.hparams.mode == "response" else oreo_policy_loss
        return loss_fn(fwd.logprobs, fwd.ref_logprobs, values, c["rewards"], c["mask"], beta=c["beta"], **extra)
