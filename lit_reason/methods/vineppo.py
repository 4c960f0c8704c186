"""VinePPO: PPO whose advantages come from Monte Carlo values at each step (arXiv 2410.01679).

No critic. For every step-boundary state S_k of every sampled response,
V(S_k) = (1/K) sum_j R(eta_j) with eta_j ~ pi_theta(.|S_k) (K fresh continuations, the prefix
encoded once for all K); identical prefixes share one estimate. Then
A_k = r_k + V(S_{k+1}) - V(S_k) with V(S_T) = 0 and r_{T-1} = R (gamma = 1), broadcast to the
step's tokens, whitened over the global batch, and used in PPO-clip + k3 KL (docs/vineppo.md).
"""

from __future__ import annotations

import torch

from lit_reason.losses.vineppo import fill_values_backward, vineppo_token_advantages
from lit_reason.methods.online import OnlineRL
from lit_reason.rollout.batch import TrajectoryBatch
from lit_reason.rollout.monte_carlo import mc_step_values, mc_values


class VinePPO(OnlineRL):
    """VinePPO (see module doc). Other arguments: :class:`lit_reason.methods.online.OnlineRL`.

    Args:
        mc_rollouts: K, continuations per state (paper: 9). Must be >= 1.
        max_step_for_value_estimation: Only states S_k with k < M are rolled out; later states
            are filled backwards with V(S_k) = r_k + V(S_{k+1}) (None: all states; GSM8K used 25).
    """

    def __init__(self, mc_rollouts: int = 9, max_step_for_value_estimation: int | None = None, **kwargs) -> None:
        if mc_rollouts < 1:
            raise ValueError(f"VinePPO needs mc_rollouts (K) >= 1 continuations per state, got {mc_rollouts}")
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["task"])

    def compute_advantages(self, traj: TrajectoryBatch) -> torch.Tensor:
        values, estimated = mc_step_values(self.engine, self.task, traj, self.hparams.mc_rollouts,
                                           self.hparams.max_step_for_value_estimation)
        values, estimated = values.to(self.device), estimated.to(self.device)
        values = fill_values_backward(values, estimated, traj.num_steps, traj.rewards)
        traj.extras["step_values"] = values  # [B, S], for inspection and tests
        return vineppo_token_advantages(values, traj.num_steps, traj.rewards, traj.step_ids, traj.response_mask,
                                        whiten=self.hparams.whiten_advantages)

    @torch.no_grad()
    def state_values(self, prompt_ids, partial_ids, examples) -> torch.Tensor:
        """Value-calibration protocol: VinePPO's own K-rollout MC estimate of each state."""
        return mc_values(self.engine, self.task, prompt_ids, partial_ids, examples, self.hparams.mc_rollouts)
