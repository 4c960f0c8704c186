"""DVPO: a pretrained, frozen global value model (GVM) in place of reward model and critic.

DVPO, arXiv 2502.16944; the choices and their reasons are in docs/dvpo.md.

Stage 1 (GVM pretraining, TD(lambda) regression as in the official code)::

    V_old = V_phi(prefix_t) computed with no_grad;  r_t = 0 except r_last = +-1
    A^GAE_t = sum_l (gamma*lam)^l (r_{t+l} + gamma V_old(t+l+1) - V_old(t+l)),  gamma=1, lam=0.95
    G_t = A^GAE_t + V_old(t)
    L_GVM = 0.5 * masked_mean_tokens( (V_phi(t) - G_t)^2 )        # no value clipping

Stage 2 (policy optimisation with the frozen GVM; the loss itself is PPO-clip,
:func:`lit_reason.losses.ppo.ppo_policy_loss`)::

    V_t = whiten( GVM(prefix_t) )                        # frozen, no grad
    r_t = -beta_kl * (logp_old_t - logp_ref_t)           # KL-only per-token reward
    A_t = masked_whiten( GAE_{gamma=1, lam=0.95}(r, V) ) # mode "gae" (the code, default)
    A_t = whiten( GVM(prefix_t) )                        # mode "static" (the paper)

Shapes: ``B`` = batch (sequences), ``L`` = response length (tokens). Masks are bool or 0/1 float
``[B, L]`` with 1 on valid response tokens (EOS included). All functions are pure; the GAE
recursion is :func:`lit_reason.losses.ppo.gae_advantages` (value after the last valid token = 0).
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import check_same_shape, masked_mean, masked_whiten
from lit_reason.losses.ppo import gae_advantages, terminal_rewards

__all__ = ["td_lambda_targets", "gvm_loss", "dvpo_token_rewards", "dvpo_advantages", "DVPO_ADVANTAGE_MODES"]

DVPO_ADVANTAGE_MODES = ("gae", "static")


def _check_2d(name: str, x: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"`{name}` must be [B, L], got shape {tuple(x.shape)}")


def td_lambda_targets(
    old_values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> torch.Tensor:
    """TD(lambda) regression targets of the GVM, ``G_t = A^GAE_t + V_old(t)`` (docs/dvpo.md).

    Exactly the stage-1 code block of docs/dvpo.md: over the valid tokens of each row,
    ``delta_t = r_t + gamma * V_old(t+1) - V_old(t)``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``G_t = A_t + V_old(t)``, with ``V_old`` after the last valid token equal to 0 (the outcome
    reward sits in ``r`` at the last token). Equivalently the lambda-return
    ``G_t = r_t + gamma * ((1 - lam) * V_old(t+1) + lam * G_{t+1})``. The recursion is
    :func:`lit_reason.losses.ppo.gae_advantages` (masked positions are skipped).

    Args:
        old_values: GVM values from before the update, ``[B, L]`` (constants; no grad).
        rewards: Per-token rewards ``[B, L]``, usually 0 except the outcome (+-1 for DVPO's
            preference-derived data) at the last valid token
            (:func:`lit_reason.losses.ppo.terminal_rewards`).
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid token.
        gamma: Discount (source: 1.0).
        lam: lambda (source: 0.95).

    Returns:
        ``[B, L]`` targets ``G_t``, detached, 0 at masked positions.

    Raises:
        ValueError: On a shape mismatch (names the argument) or non-2-D inputs.
    """
    _check_2d("old_values", old_values)
    check_same_shape("old_values", old_values, rewards=rewards, mask=mask)
    _, returns = gae_advantages(rewards.detach(), old_values.detach(), mask, gamma=gamma, lam=lam)
    return returns


def gvm_loss(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GVM regression loss ``0.5 * masked_mean_tokens((V - G)^2)`` (docs/dvpo.md, stage 1).

    No value clipping (unlike the PPO critic of docs/baselines.md). Token-mean over every valid token of
    the minibatch (the token mean of docs/index.md, as DVPO's code).

    Args:
        values: Current GVM values V_phi(t), ``[B, L]`` (requires grad).
        returns: TD(lambda) targets G_t from :func:`td_lambda_targets`, ``[B, L]`` (constants).
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid token.

    Returns:
        ``(loss, metrics)``: scalar loss; detached scalar metrics ``gvm_loss`` (the loss),
        ``value_mean`` (masked mean of V), ``return_mean`` (masked mean of G) and
        ``explained_var`` (``1 - Var[G - V] / Var[G]`` over valid tokens with the current
        values, biased variances; 0 when ``Var[G] == 0``).

    Raises:
        ValueError: On a shape mismatch (names the argument) or non-2-D inputs.
    """
    _check_2d("values", values)
    check_same_shape("values", values, returns=returns, mask=mask)
    valid = mask != 0
    zeros = torch.zeros_like(values)
    v = torch.where(valid, values, zeros)
    g = torch.where(valid, returns.detach().to(values.dtype), zeros)
    loss = 0.5 * masked_mean((v - g) ** 2, mask)

    with torch.no_grad():
        vd = v.detach()
        var_g = masked_mean((g - masked_mean(g, mask)) ** 2, mask)
        resid = g - vd
        var_resid = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
        has_var = var_g > 0
        ratio = var_resid / torch.where(has_var, var_g, torch.ones_like(var_g))
        metrics = {
            "gvm_loss": loss.detach(),
            "value_mean": masked_mean(vd, mask),
            "return_mean": masked_mean(g, mask),
            "explained_var": torch.where(has_var, 1.0 - ratio, torch.zeros_like(var_g)),
        }
    return loss, metrics


def dvpo_token_rewards(
    logprobs_old: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    kl_coef: float = 0.2,
    task_rewards: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stage-2 per-token reward ``r_t = -kl_coef * (logp_old_t - logp_ref_t)`` (docs/dvpo.md).

    KL-only: there is no reward model and, by default, no terminal score. With ``task_rewards``
    (docs/dvpo.md, ``use_task_reward``) the verifier's outcome R is added at each sequence's last
    valid token (:func:`lit_reason.losses.ppo.terminal_rewards`); every other token is unchanged.

    Args:
        logprobs_old: log-probs of the rollout policy, ``[B, L]``.
        ref_logprobs: log-probs of the reference policy, ``[B, L]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid token.
        kl_coef: beta_kl (source: adaptive, init 0.2; the controller lives outside).
        task_rewards: Optional outcome reward per sequence, ``[B]``.

    Returns:
        ``[B, L]`` rewards, detached, 0 at masked positions.

    Raises:
        ValueError: On a shape mismatch (names the argument), or a row of ``mask`` without a
            valid token when ``task_rewards`` is given.
    """
    _check_2d("logprobs_old", logprobs_old)
    check_same_shape("logprobs_old", logprobs_old, ref_logprobs=ref_logprobs, mask=mask)
    dtype = logprobs_old.dtype if logprobs_old.is_floating_point() else torch.get_default_dtype()
    valid = mask != 0
    zeros = torch.zeros(logprobs_old.shape, dtype=dtype, device=logprobs_old.device)
    log_ratio = logprobs_old.detach().to(dtype) - ref_logprobs.detach().to(dtype)
    r = torch.where(valid, -kl_coef * log_ratio, zeros)
    if task_rewards is not None:
        r = r + terminal_rewards(task_rewards.detach(), mask).to(device=r.device, dtype=dtype)
    return r


@torch.no_grad()
def dvpo_advantages(
    gvm_values: torch.Tensor,
    logprobs_old: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "gae",
    kl_coef: float = 0.2,
    gamma: float = 1.0,
    lam: float = 0.95,
    task_rewards: torch.Tensor | None = None,
    whiten: bool = True,
) -> torch.Tensor:
    """Stage-2 advantages from the frozen GVM (docs/dvpo.md, stage 2).

    ``mode="gae"`` (default; the official code)::

        V_t = masked_whiten(gvm_values)                       # over the valid tokens
        r_t = -kl_coef * (logp_old_t - logp_ref_t)  [+ R at the last valid token]
        A_t = masked_whiten( GAE_{gamma, lam}(r, V) )

    ``mode="static"`` (the paper: "the advantage uses the fixed value estimates")::

        A_t = masked_whiten(gvm_values)

    Whitening of V: the official code whitens the value tensor as a whole, padding included, so
    its mean and variance depend on how much padding the batch happens to carry and on whatever
    the value head outputs at pad positions. Here V is whitened over the **valid tokens only**
    (global batch, unbiased variance, eps 1e-8, :func:`~lit_reason.losses.common.masked_whiten`)
    so the result is independent of the padding layout; on an unpadded batch both agree.

    ``whiten=False`` turns both whitenings off (raw GVM values in GAE and raw GAE advantages, or
    the raw GVM values in ``static`` mode). ``static`` ignores the KL reward (``kl_coef``,
    ``gamma``, ``lam``); put the KL in the loss instead (``ppo_policy_loss(kl_coef=...)``).
    ``task_rewards`` (``use_task_reward``, off by default as in the source) is only defined for
    ``gae`` and raises in ``static`` mode.

    Args:
        gvm_values: Frozen GVM values ``[B, L]`` (no grad).
        logprobs_old: log-probs of the rollout policy ``[B, L]``.
        ref_logprobs: log-probs of the reference policy ``[B, L]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid token.
        mode: ``"gae"`` or ``"static"``.
        kl_coef: beta_kl of the per-token KL reward (source: adaptive, init 0.2).
        gamma: GAE discount (source: 1.0).
        lam: GAE lambda (source: 0.95).
        task_rewards: Optional verifier outcome per sequence ``[B]`` added at the last valid
            token (``gae`` only).
        whiten: Whiten the GVM values and the resulting advantages (source: true).

    Returns:
        ``[B, L]`` advantages, detached, 0 at masked positions.

    Raises:
        ValueError: On an unknown ``mode`` (lists the modes), ``task_rewards`` with
            ``mode="static"``, or a shape mismatch (names the argument).
    """
    if mode not in DVPO_ADVANTAGE_MODES:
        raise ValueError(f"`mode` must be one of {DVPO_ADVANTAGE_MODES}, got {mode!r}")
    _check_2d("gvm_values", gvm_values)
    check_same_shape(
        "gvm_values", gvm_values, logprobs_old=logprobs_old, ref_logprobs=ref_logprobs, mask=mask
    )
    dtype = gvm_values.dtype if gvm_values.is_floating_point() else torch.get_default_dtype()
    valid = mask != 0
    values = torch.where(valid, gvm_values.detach().to(dtype), torch.zeros((), dtype=dtype, device=gvm_values.device))
    if whiten:
        values = masked_whiten(values, mask)

    if mode == "static":
        if task_rewards is not None:
            raise ValueError("`task_rewards` is only used by mode='gae'; the static advantage has no reward")
        return values

    rewards = dvpo_token_rewards(logprobs_old, ref_logprobs, mask, kl_coef=kl_coef, task_rewards=task_rewards)
    advantages, _ = gae_advantages(rewards.to(dtype), values, mask, gamma=gamma, lam=lam)
    if whiten:
        advantages = masked_whiten(advantages, mask)
    return advantages
