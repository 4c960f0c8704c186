"""DQO: Direct Q-function Optimization (arXiv 2410.09302; docs/dqo.md) as a LightningModule.

No official code exists; this trains the reconstruction of docs/dqo.md with the losses of
:mod:`lit_reason.losses.dqo`. The Q-function is the policy's log-ratio plus a separate value model,
``Q_theta(s_h, a_h) = beta * l_h + V_phi(s_h)``; the targets are lambda-returns of the soft rewards
``r~_h = r_h - beta * l_h`` (terminal values 0)::

    L_V = mean_b [ (1/|S_b|) sum_h ( V(s_h) - sg[G_h] )^2 ]
    L_Q = mean_b [ w_b (1/|S_b|) sum_h ( beta*l_h + sg[V(s_h)] - r_h - G_{h+1} )^2 ]

Per batch the update order is OREO's (docs/oreo.md; the machinery is shared in
:class:`~lit_reason.methods.oreo.ValueOfflineRL`): the value model's step on ``L_V`` first (its
targets read the current policy under no grad), then the policy's step on ``L_Q``.

Defaults, where the sources are silent (docs/dqo.md, "Defaults, and why"):

* ``lam = 0.95``: the loss module's default (lambda is unverified). ``lam = 1`` with no importance
  weights and ``stop_grad_future=True`` is token-level OREO without the KL term (docs/dqo.md).
* ``importance_sampling = True`` with ``is_clip = 1``: DQO's objective carries the trajectory
  ratio (OREO App. C contrasts "DQO without importance sampling" with OREO); OREO's
  re-implementation weight ``w = exp(min(sum_t l_t, 1))``, detached, on ``L_Q`` only.
* ``stop_grad_future = False``: gradients flow through the future log-ratios inside ``G_{h+1}``,
  as the reconstruction writes it and OREO App. C reads it (the loss module's default).
* ``beta = 0.03`` (OREO's reproduction) and the ``balanced`` items: OREO's reproduction trained DQO
  on OREO's data, the only checkable DQO number (OREO, arXiv 2412.16145, Table 3).
"""

from __future__ import annotations

from lit_reason.losses.dqo import dqo_policy_loss, dqo_value_loss
from lit_reason.methods.oreo import BatchForward, ValueOfflineRL
from lit_reason.rollout.batch import TrajectoryBatch

TOKEN_REDUCTIONS = ("mean", "sum")


class DQO(ValueOfflineRL):
    """DQO, reconstructed (docs/dqo.md). Other arguments: :class:`~lit_reason.methods.oreo.ValueOfflineRL`
    (``beta``, ``critic_lr``, ``critic_lora``, ``share_trunk``, ``value_source``, ``is_clip``, ``selection`` ...) and
    :class:`~lit_reason.methods.offline.OfflineRL`.

    Args:
        lam: Lambda of the lambda-returns, in [0, 1] (0.95; unverified).
        stop_grad_future: Detach the future log-ratios inside the Q target (docs/dqo.md's switch).
        importance_sampling: Weight ``L_Q`` per sequence by ``exp(min(sum_t l_t, is_clip))``.
        token_reduction: ``mean`` (per-sequence mean over states, OREO's normalisation) or ``sum``
            (the reconstruction's literal ``sum_h``).
    """

    def __init__(self, lam: float = 0.95, stop_grad_future: bool = False, importance_sampling: bool = True,
                 token_reduction: str = "mean", **kwargs) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must lie in [0, 1], got {lam}")
        if token_reduction not in TOKEN_REDUCTIONS:
            raise ValueError(f"token_reduction must be one of {TOKEN_REDUCTIONS}, got {token_reduction!r}")
        super().__init__(importance_sampling=importance_sampling, **kwargs)
        self.save_hyperparameters(ignore=["task"])

    def _common(self, b: TrajectoryBatch) -> dict:
        hp = self.hparams
        return {"rewards": b.rewards.float(), "mask": b.response_mask, "beta": hp.beta, "lam": hp.lam,
                "token_reduction": hp.token_reduction}

    def critic_loss(self, b: TrajectoryBatch, fwd: BatchForward):
        c = self._common(b)
        return dqo_value_loss(fwd.values, fwd.logprobs.detach(), fwd.ref_logprobs, c.pop("rewards"), c.pop("mask"),
                              **c)

    def policy_loss(self, b: TrajectoryBatch, fwd: BatchForward):
        c = self._common(b)
        return dqo_policy_loss(fwd.logprobs, fwd.ref_logprobs, fwd.values.detach(), c.pop("rewards"), c.pop("mask"),
                               importance_weights=fwd.weights, stop_grad_future=self.hparams.stop_grad_future, **c)
