"""The online loop shared by PPO, VinePPO, GRPO and RLOO (docs/architecture.md).

Each training step is one *iteration*: sample prompts, roll out the current policy, compute
targets (the method's advantage estimator), then run ``epochs_per_iteration`` epochs of
minibatch PPO-clip updates over that batch (manual optimisation; docs/vineppo.md).
``trainer.max_steps`` counts optimiser steps, as in the papers.

Subclasses implement :meth:`compute_advantages` (and, for value calibration, ``state_values``).
"""

from __future__ import annotations

from collections import defaultdict

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, RandomSampler

from lit_reason.losses.ppo import ppo_policy_loss
from lit_reason.methods.base import RLModule
from lit_reason.methods.common import ExampleRows, as_list
from lit_reason.models.logprobs import response_logprobs
from lit_reason.rollout.batch import TrajectoryBatch
from lit_reason.rollout.sampler import RolloutEngine
from lit_reason.rollout.trajectories import rollout


class OnlineRL(RLModule):
    """Rollout -> targets -> PPO-clip epochs; the advantage estimator is the subclass's.

    Shared arguments (policy, task, weight_decay, grad_clip, max_new_tokens, splitter,
    merge_answer_line, dtype, lora, rollout_batch_size, eval_limit, seed, progress):
    :class:`~lit_reason.methods.base.RLModule`.

    Args:
        prompts_per_iteration: Prompts sampled (with replacement) per iteration.
        samples_per_prompt: Responses per prompt (GRPO/RLOO group size).
        epochs_per_iteration: Passes over each rollout batch (VinePPO: 2).
        minibatch_size: Sequences per optimiser step.
        lr: Policy learning rate (AdamW, betas (0.9, 0.95), constant after warmup).
        warmup_steps: Linear LR warmup in optimiser steps.
        temperature: Sampling temperature; training log-probs divide logits by it (VinePPO).
        top_p: Nucleus mass of sampling.
        clip_eps: PPO ratio clip.
        kl_coef: Weight of the k3 KL to the reference, in the loss (VinePPO: 1e-4).
        kl_clip_max: Clip of the per-token k3 term.
        ratio_threshold: Skip a minibatch whose mean ratio exceeds this (None: never).
        whiten_advantages: Whiten over the global batch's tokens.
        length_groups: Score each minibatch in this many length-sorted forward passes, each cut to
            its own longest sequence (:func:`~lit_reason.models.logprobs.response_logprobs`): the
            same log-probs with fewer pad tokens computed. 1 = one padded pass.
        recompute_old_logprobs: Score every response again after sampling for the PPO ratio's old
            log-probs. Off by default: the sampler returns the same log-probs (same model, same
            temperature, full vocabulary), which saves one forward pass per response. Turn it on
            where the sampler's arithmetic may differ from the training forward (bf16 decoding
            with a KV cache differs from one full forward at about 1e-2 in log-prob).
    """

    def __init__(
        self,
        prompts_per_iteration: int = 16,
        samples_per_prompt: int = 4,
        epochs_per_iteration: int = 2,
        minibatch_size: int = 32,
        lr: float = 1e-4,
        warmup_steps: int = 0,
        temperature: float = 1.0,
        top_p: float = 1.0,
        clip_eps: float = 0.2,
        kl_coef: float = 1e-4,
        kl_clip_max: float | None = 10.0,
        ratio_threshold: float | None = None,
        whiten_advantages: bool = True,
        length_groups: int = 2,
        recompute_old_logprobs: bool = False,
        **kwargs,
    ) -> None:
        for name in ("prompts_per_iteration", "samples_per_prompt", "epochs_per_iteration", "minibatch_size",
                     "length_groups"):
            if locals()[name] < 1:
                raise ValueError(f"{name} must be >= 1, got {locals()[name]}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for on-policy sampling, got {temperature}")
        super().__init__(lr=lr, **kwargs)
        self.save_hyperparameters(ignore=["task"])
        self.automatic_optimization = False
        hp = self.hparams
        self.engine = RolloutEngine(self.policy, self.tokenizer, max_new_tokens=hp.max_new_tokens,
                                    temperature=temperature, top_p=top_p, batch_size=hp.rollout_batch_size,
                                    seed=hp.seed, progress=hp.progress)
        self._shuffle = torch.Generator().manual_seed(hp.seed)
        self.skipped_iterations = 0

    # ---- data -------------------------------------------------------------------------------
    def train_dataloader(self) -> DataLoader:
        rows = self.task.examples("train")
        sampler = RandomSampler(range(len(rows)), replacement=True, num_samples=len(rows),
                                generator=torch.Generator().manual_seed(self.hparams.seed))
        return DataLoader(ExampleRows(rows), batch_size=self.hparams.prompts_per_iteration, sampler=sampler,
                          collate_fn=as_list, drop_last=True)


    # ---- the method's part ------------------------------------------------------------------
    def compute_advantages(self, traj: TrajectoryBatch) -> torch.Tensor:
        """Per-token advantages [B, L] of a rollout batch (the method's estimator)."""
        raise NotImplementedError

    def critic_loss(self, mb: TrajectoryBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """An extra loss per minibatch (PPO's critic); None for critic-free methods."""
        return None

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        return []

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        """What the policy's parameter group trains (PPO with a shared trunk: its own adapter only)."""
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ---- the loop ---------------------------------------------------------------------------
    @torch.no_grad()
    def collect(self, examples: list[dict]) -> TrajectoryBatch:
        """Rolls out the current policy and attaches behaviour and reference log-probs.

        The behaviour log-probs are the sampler's own (``recompute_old_logprobs`` scores again).
        """
        traj = rollout(self.engine, self.task, self.splitter, examples, k=self.hparams.samples_per_prompt).to(self.device)
        T = self.hparams.temperature
        # temperature > 0 (checked in __init__), so the sampler has returned the old log-probs
        recompute = self.hparams.recompute_old_logprobs
        groups = self.hparams.length_groups
        self.policy.eval()
        old, ref = [], []
        for idx in torch.arange(len(traj)).split(self.hparams.minibatch_size):
            mb = traj.select(idx)
            if recompute:
                old.append(response_logprobs(self.policy, mb.input_ids, mb.attention_mask, mb.prompt_len, T, groups))
            ref.append(self.reference.logprobs(mb.input_ids, mb.attention_mask, mb.prompt_len, T, groups))
        self.policy.train()
        if recompute:
            traj.old_logprobs = torch.cat(old)
        traj.ref_logprobs = torch.cat(ref)
        return traj

    def training_step(self, examples: list[dict], batch_idx: int) -> None:
        hp = self.hparams
        with self.rollout_phase():  # FSDP: parameters gathered once for rollouts and targets
            traj = self.collect(examples)
            any_finished = self._any_rank(bool(traj.finished.any()))
            if any_finished:
                traj.advantages = self.compute_advantages(traj).detach()
        stats = {
            "train/reward": traj.rewards.mean(),
            "train/finished": traj.finished.float().mean(),
            "train/response_tokens": traj.response_mask.sum(-1).mean(),
            "train/num_steps": traj.num_steps.float().mean(),
        }
        if not any_finished:
            # nothing to learn from: every response was cut at max_new_tokens (documented skip)
            self.skipped_iterations += 1
            rank_zero_warn(f"iteration {batch_idx}: no response finished within max_new_tokens="
                           f"{hp.max_new_tokens}; skipping its update ({self.skipped_iterations} skipped so far)")
            self.log_dict({**stats, "train/skipped_iterations": float(self.skipped_iterations)})
            return None
        opt = self.optimizers()
        sums: dict[str, float] = defaultdict(float)
        n = 0
        for _ in range(hp.epochs_per_iteration):
            perm = torch.randperm(len(traj), generator=self._shuffle)
            for idx in perm.split(hp.minibatch_size):
                mb = traj.select(idx)
                logp = response_logprobs(self.policy, mb.input_ids, mb.attention_mask, mb.prompt_len, hp.temperature,
                                         hp.length_groups)
                loss, metrics = ppo_policy_loss(
                    logp, mb.old_logprobs, mb.advantages, mb.response_mask, clip_eps=hp.clip_eps,
                    ref_logprobs=mb.ref_logprobs, kl_coef=hp.kl_coef, kl_clip_max=hp.kl_clip_max,
                    ratio_threshold=hp.ratio_threshold,
                )
                extra = self.critic_loss(mb)
                if extra is not None:
                    loss = loss + extra[0]
                    metrics = {**metrics, **extra[1]}
                self.manual_step(opt, loss, self.lr_schedulers())
                for k, v in metrics.items():
                    sums[k] += float(v)
                n += 1
        stats.update({f"train/{k}": v / n for k, v in sums.items()})
        stats["train/skipped_iterations"] = float(self.skipped_iterations)
        self.log_dict(stats, prog_bar=False)
        # the bar shows it; loggers already get it as train/reward
        self.log("reward", traj.rewards.mean(), prog_bar=True, logger=False)
        return None

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank: every rank must take the same number of optimiser steps
        (their gradient reductions are collectives), so a skip is decided for all ranks together."""
        if self._trainer is None or self.trainer.world_size == 1:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        return bool(self.trainer.strategy.reduce(t, reduce_op="sum") > 0)

    def configure_optimizers(self):
        hp = self.hparams
        groups = [{"params": self.policy_parameters(), "lr": hp.lr}]
        critic = self.critic_parameters()
        if critic:
            groups.append({"params": critic, "lr": getattr(hp, "critic_lr", hp.lr)})
        opt = self.adamw(groups, hp.lr)  # each group carries its own lr
        if hp.warmup_steps <= 0:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / hp.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
