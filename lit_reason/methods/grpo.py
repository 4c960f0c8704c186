"""GRPO and RLOO: group-relative advantages, PPO-clip + k3 KL.

GRPO: arXiv 2402.03300, Sec. 4.1; RLOO: arXiv 2402.14740; see docs/baselines.md.

GRPO: A_i = (R_i - mean_j R_j) / std_j R_j over the G samples of a prompt; RLOO:
A_i = R_i - mean_{j != i} R_j. Both broadcast one advantage to all tokens of a response, which is
the point of comparison with VinePPO: no step-level credit assignment.
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import broadcast_sequence_values, masked_whiten
from lit_reason.losses.grpo import grpo_advantages, rloo_advantages
from lit_reason.methods.online import OnlineRL
from lit_reason.rollout.batch import TrajectoryBatch
from lit_reason.rollout.monte_carlo import mc_values


class _GroupBaseline(OnlineRL):
    def _to_tokens(self, adv: torch.Tensor, traj: TrajectoryBatch) -> torch.Tensor:
        """Broadcasts per-response advantages to tokens; whitens them over the global batch when
        ``whiten_advantages`` is set (off by default: the group statistics already normalise)."""
        tokens = broadcast_sequence_values(adv, traj.response_mask)
        return masked_whiten(tokens, traj.response_mask) if self.hparams.whiten_advantages else tokens

    @torch.no_grad()
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Value-calibration protocol: the group baseline, i.e. the mean reward of G samples of the
        *prompt*, predicted for every state of that prompt. This is the value these methods use
        implicitly: constant along a response, so its step-level calibration shows what they miss.
        """
        G = self.hparams.samples_per_prompt
        empty = [[] for _ in prompt_ids]
        return mc_values(self.engine, self.task, prompt_ids, empty, examples, G)


class GRPO(_GroupBaseline):
    """GRPO. Other arguments: :class:`lit_reason.methods.online.OnlineRL` (``samples_per_prompt`` = G).

    Args:
        scale_by_std: Divide by the group std (GRPO); False keeps only the mean baseline.
        whiten_advantages: Also whiten the token advantages over the global batch (off: the group
            statistics already normalise). In this signature, not only in ``**kwargs``, so that the
            CLI resolves this default rather than :class:`OnlineRL`'s.
    """

    def __init__(self, scale_by_std: bool = True, whiten_advantages: bool = False, **kwargs) -> None:
        super().__init__(whiten_advantages=whiten_advantages, **kwargs)
        self.save_hyperparameters(ignore=["task"])
        if self.hparams.samples_per_prompt < 2:
            raise ValueError("GRPO needs samples_per_prompt >= 2 (a group baseline of one sample is the sample)")

    def compute_advantages(self, traj: TrajectoryBatch) -> torch.Tensor:
        adv = grpo_advantages(traj.rewards, traj.group_ids, scale=self.hparams.scale_by_std)
        return self._to_tokens(adv, traj)


class RLOO(_GroupBaseline):
    """RLOO (leave-one-out baseline). Other arguments: :class:`lit_reason.methods.online.OnlineRL`.

    Args:
        whiten_advantages: As in :class:`GRPO` (off; explicit here so the CLI resolves it).
    """

    def __init__(self, whiten_advantages: bool = False, **kwargs) -> None:
        super().__init__(whiten_advantages=whiten_advantages, **kwargs)
        if self.hparams.samples_per_prompt < 2:
            raise ValueError("RLOO needs samples_per_prompt >= 2 (the leave-one-out baseline needs k >= 2)")

    def compute_advantages(self, traj: TrajectoryBatch) -> torch.Tensor:
        adv = rloo_advantages(traj.rewards, traj.group_ids)
        return self._to_tokens(adv, traj)
