"""PPO with a learned critic and GAE: VinePPO's baseline (arXiv 1707.06347, 1506.02438; docs/baselines.md).

The critic is a separate LM with a scalar head initialised from the policy checkpoint, trained
jointly with the clipped value loss 0.5 * masked_mean(max((V-G)^2, (clip(V, V_old +- c) - G)^2)).
GAE uses gamma = lambda = 1 by default; advantages are whitened over the global batch. With a LoRA
policy and ``share_trunk``, the critic is instead the policy's own base weights with a second adapter
(:mod:`lit_reason.models.shared_trunk`).
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import masked_whiten
from lit_reason.losses.ppo import gae_advantages, terminal_rewards, value_loss
from lit_reason.methods.online import OnlineRL
from lit_reason.models.shared_trunk import check_not_sharded, check_share_trunk
from lit_reason.models.value import ValueModel
from lit_reason.rollout.batch import TrajectoryBatch


class PPO(OnlineRL):
    """PPO + GAE with a separate critic. Other arguments: :class:`lit_reason.methods.online.OnlineRL`.

    Args:
        critic_lr: Learning rate of the critic's parameter group.
        gamma: GAE discount (1.0 as VinePPO's tuned baseline).
        lam: GAE lambda (1.0 likewise).
        value_clip: Clip range of the value loss around the rollout-time values.
        vf_coef: Weight of the value loss in the summed loss (separate parameters, one optimiser).
        share_trunk: With a LoRA policy (``lora``), the critic reuses the policy's base weights (one
            copy in memory) and trains its own adapter (the policy's ``lora`` arguments) plus its
            head, in the critic's parameter group; not under FSDP. DVPO's global value model has no
            such option: the GVM is trained in its own run and loaded frozen from its folder.
    """

    def __init__(self, critic_lr: float = 1e-4, gamma: float = 1.0, lam: float = 1.0, value_clip: float | None = 0.2,
                 vf_coef: float = 1.0, share_trunk: bool = False, **kwargs) -> None:
        check_share_trunk(share_trunk, kwargs.get("lora"))
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])
        if share_trunk:
            self.critic = ValueModel.shared_with(self.policy, self.hparams.lora)
        else:
            self.critic = ValueModel.from_policy_name(self.hparams.policy, dtype=self.hparams.dtype,
                                                      lora=self.hparams.lora)

    def trainable_models(self) -> dict[str, torch.nn.Module]:
        return {**super().trainable_models(), "critic": self.critic}

    def setup(self, stage: str) -> None:
        if self.hparams.share_trunk:
            check_not_sharded(self)
        super().setup(stage)

    def critic_parameters(self) -> list[torch.nn.Parameter]:
        return self.critic.trainable_parameters()

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        # on a shared trunk the value adapter also lives in the policy: it belongs to the critic group
        shared = self.critic.shared
        return shared.policy_parameters() if shared is not None else super().policy_parameters()

    def compute_advantages(self, traj: TrajectoryBatch) -> torch.Tensor:
        with torch.no_grad():
            values = torch.cat([
                self.critic.response_values(mb.input_ids, mb.attention_mask, mb.prompt_len)
                for mb in (traj.select(i) for i in torch.arange(len(traj)).split(self.hparams.minibatch_size))
            ])
        values = values * traj.response_mask
        rewards = terminal_rewards(traj.rewards, traj.response_mask)
        adv, returns = gae_advantages(rewards, values, traj.response_mask, self.hparams.gamma, self.hparams.lam)
        traj.extras["old_values"], traj.extras["returns"] = values, returns
        if self.hparams.whiten_advantages:
            adv = masked_whiten(adv, traj.response_mask)
        return adv

    def critic_loss(self, mb: TrajectoryBatch):
        values = self.critic.response_values(mb.input_ids, mb.attention_mask, mb.prompt_len)
        loss, metrics = value_loss(values, mb.extras["old_values"], mb.extras["returns"], mb.response_mask,
                                   clip_range=self.hparams.value_clip)
        return self.hparams.vf_coef * loss, metrics

    @torch.no_grad()
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Value-calibration protocol: the critic's value at the last token of each state (a terminal
        state ending with EOS is read at the token before it, where the critic was trained)."""
        seqs = [list(p) + list(q) for p, q in zip(prompt_ids, partial_ids)]
        return self.critic.values_of(seqs, self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id).cpu()
