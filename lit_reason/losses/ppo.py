"""PPO-clip policy loss with the k3 KL term, GAE and the clipped critic loss.

The clipped surrogate is PPO's (arXiv 1707.06347, Eq. 7) with the k3 KL term in the loss as in
VinePPO's trainer (docs/vineppo.md); GAE (arXiv 1506.02438) and the clipped critic loss are the
PPO baseline of docs/baselines.md. GRPO and RLOO reuse :func:`ppo_policy_loss` with their own
sequence-level advantages broadcast to tokens.

Shapes: ``B`` = batch (sequences), ``L`` = response length (tokens). Masks are bool or 0/1 float
``[B, L]`` with 1 on valid response tokens (EOS included). All functions are pure.
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import check_same_shape, masked_mean, masked_sum

__all__ = ["ppo_policy_loss", "gae_advantages", "value_loss", "terminal_rewards"]


def ppo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_clip_max: float | None = 10.0,
    ratio_threshold: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate plus the clipped k3 KL loss (docs/vineppo.md).

    With ``rho_t = exp(logp_t - logp_old_t)``::

        L_pg = masked_mean_tokens( max(-A_t * rho_t, -A_t * clip(rho_t, 1 - eps, 1 + eps)) )
        k3_t = exp(logp_ref_t - logp_t) - (logp_ref_t - logp_t) - 1
        L_kl = kl_coef * mean_over_sequences( sum_t clip(k3_t * mask_t, 0, kl_clip_max) )
        L    = L_pg + L_kl

    ``masked_mean_tokens`` is the sum over every valid token of the minibatch divided by their
    count (docs/index.md, notation). The KL is summed over each
    sequence's tokens (clipped per token) and averaged over all ``B`` sequences. If
    ``ratio_threshold`` is set and ``masked_mean(rho) > ratio_threshold`` the batch is skipped:
    the returned loss is ``0 * sum(valid logprobs)``, a zero that still backpropagates (exact zero
    gradients, even when ``rho`` overflowed) and ``metrics["skipped"] == 1``.

    The caller computes ``logprobs`` from the training logits divided by the sampling temperature
    (docs/vineppo.md); that is not part of this pure function.

    Args:
        logprobs: log pi_theta(a_t | s_t) of the taken tokens, ``[B, L]`` (requires grad).
        old_logprobs: log-probs under the policy at the start of the iteration, ``[B, L]``
            (treated as constants).
        advantages: Per-token advantages ``[B, L]`` (already whitened if desired; constants).
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        clip_eps: PPO clip range eps (source: 0.2).
        ref_logprobs: log pi_ref of the taken tokens, ``[B, L]``; required if ``kl_coef != 0``.
        kl_coef: beta_kl (source: 1e-4 for VinePPO / PPO). 0 disables the KL term.
        kl_clip_max: Upper clip of each token's ``k3_t * mask_t`` (source: 10); ``None`` = no
            upper clip (the lower clip at 0 always applies).
        ratio_threshold: Skip the batch when the masked mean ratio exceeds it (source: 10);
            ``None`` disables the check.

    Returns:
        ``(loss, metrics)``: ``loss`` is a scalar. ``metrics`` holds detached scalars:
        ``pg_loss`` (L_pg), ``kl_loss`` (L_kl, including ``kl_coef``), ``kl`` (masked mean of
        the unclipped k3 per token; 0 without ``ref_logprobs``), ``clip_frac`` (fraction of
        valid tokens where the clipped term is strictly the larger one, i.e. the gradient is
        cut), ``ratio_mean`` (masked mean of rho), ``approx_kl_old`` (masked mean of
        ``0.5 * (logp - logp_old)^2``), ``skipped`` (1.0 if the batch was zeroed, else 0.0).
        ``pg_loss``/``kl_loss`` report the computed values even for a skipped batch.

    Raises:
        ValueError: On a shape mismatch (the message names the argument), or if ``kl_coef`` is
            nonzero without ``ref_logprobs``.
    """
    check_same_shape(
        "logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask, ref_logprobs=ref_logprobs
    )
    if logprobs.dim() != 2:
        raise ValueError(f"`logprobs` must be [B, L], got shape {tuple(logprobs.shape)}")
    if kl_coef != 0.0 and ref_logprobs is None:
        raise ValueError("`ref_logprobs` is required when `kl_coef` is nonzero")

    valid = mask != 0
    zeros = torch.zeros_like(logprobs)
    # Masked positions get log-ratio 0 through `where`, so garbage there cannot produce nan/inf
    # in the forward pass or the gradient.
    log_ratio = torch.where(valid, logprobs - old_logprobs.detach(), zeros)
    ratio = torch.exp(log_ratio)
    adv = torch.where(valid, advantages.detach().to(logprobs.dtype), zeros)

    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    pg_loss = masked_mean(torch.maximum(unclipped, clipped), mask)

    if ref_logprobs is not None:
        d = torch.where(valid, ref_logprobs.detach() - logprobs, zeros)
        k3 = torch.exp(d) - d - 1.0
        per_token = k3 * mask.to(k3.dtype)
        per_token = per_token.clamp(min=0.0, max=kl_clip_max) if kl_clip_max is not None else per_token.clamp(min=0.0)
        kl_loss = kl_coef * per_token.sum(dim=1).mean()
        kl_mean = masked_mean(k3, mask)
    else:
        kl_loss = pg_loss.new_zeros(())
        kl_mean = pg_loss.new_zeros(())

    loss = pg_loss + kl_loss
    ratio_mean = masked_mean(ratio, mask)

    skipped = ratio_threshold is not None and bool(ratio_mean.detach() > ratio_threshold)
    if skipped:
        loss = masked_sum(logprobs, mask) * 0.0

    with torch.no_grad():
        metrics = {
            "pg_loss": pg_loss.detach(),
            "kl_loss": kl_loss.detach(),
            "kl": kl_mean.detach(),
            "clip_frac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask),
            "ratio_mean": ratio_mean.detach(),
            "approx_kl_old": masked_mean(0.5 * log_ratio.detach() ** 2, mask),
            "skipped": torch.tensor(1.0 if skipped else 0.0, device=logprobs.device),
        }
    return loss, metrics


def terminal_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Places each outcome reward R at its sequence's last valid token (docs/vineppo.md, PPO).

    The outcome reward is given only at the end (docs/index.md, notation), so the per-token
    reward for GAE is 0 everywhere except the final valid token (EOS when present).

    Args:
        rewards: Outcome rewards, ``[B]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid token. Any padding layout works; the
            "last valid token" is the valid position with the largest index.

    Returns:
        ``[B, L]`` float tensor (dtype of ``rewards`` if floating, else the default dtype).

    Raises:
        ValueError: If shapes disagree, or a row of ``mask`` has no valid token (its reward
            would otherwise be silently dropped).
    """
    if mask.dim() != 2:
        raise ValueError(f"`mask` must be [B, L], got shape {tuple(mask.shape)}")
    if rewards.dim() != 1 or rewards.shape[0] != mask.shape[0]:
        raise ValueError(f"`rewards` must have shape ({mask.shape[0]},), got {tuple(rewards.shape)}")
    valid = mask != 0
    has_token = valid.any(dim=1)
    if not bool(has_token.all()):
        bad = torch.nonzero(~has_token).flatten().tolist()
        raise ValueError(f"`mask` rows {bad} have no valid token, so their reward cannot be placed")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    positions = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape)
    last = torch.where(valid, positions, torch.full_like(positions, -1)).max(dim=1).values
    out = torch.zeros(mask.shape, dtype=dtype, device=rewards.device)
    out.scatter_(1, last.unsqueeze(1).to(rewards.device), rewards.to(dtype).unsqueeze(1))
    return out


@torch.no_grad()
def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level GAE (arXiv 1506.02438; the PPO baseline of docs/baselines.md).

    Over the valid tokens of each row, in order::

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}
        G_t     = A_t + V(s_t)

    with ``V`` after the last valid token equal to 0 (the outcome reward sits in ``r`` at the
    last token; see :func:`terminal_rewards`). Masked positions are skipped: their reward and
    value contribute nothing, the recursion jumps over them (so right, left or interior padding
    all work) and their advantage and return are 0. VinePPO's PPO baseline uses
    ``gamma = lam = 1`` (``lam1.jsonnet``). Computed without gradient; whiten the advantages
    afterwards with :func:`~lit_reason.losses.common.masked_whiten` as the PPO baseline does.

    Args:
        rewards: Per-token rewards ``[B, L]`` (usually 0 except R at the last valid token).
        values: Critic values V(s_t) ``[B, L]`` (the old values of the rollout).
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid token.
        gamma: Discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``[B, L]`` in the dtype of ``values``, 0 at masked
        positions, detached.

    Raises:
        ValueError: On a shape mismatch (names the argument) or non-2-D inputs.
    """
    check_same_shape("values", values, rewards=rewards, mask=mask)
    if values.dim() != 2:
        raise ValueError(f"`values` must be [B, L], got shape {tuple(values.shape)}")
    dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
    valid = mask != 0
    zeros = torch.zeros(values.shape, dtype=dtype, device=values.device)
    v = torch.where(valid, values.to(dtype), zeros)
    r = torch.where(valid, rewards.to(dtype), zeros)

    advantages = torch.zeros_like(v)
    next_value = v.new_zeros(v.shape[0])
    next_adv = v.new_zeros(v.shape[0])
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv_t = delta + gamma * lam * next_adv
        m = valid[:, t]
        advantages[:, t] = torch.where(m, adv_t, torch.zeros_like(adv_t))
        next_value = torch.where(m, v[:, t], next_value)
        next_adv = torch.where(m, adv_t, next_adv)
    returns = torch.where(valid, advantages + v, zeros)
    return advantages, returns


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped critic loss of the PPO baseline (docs/vineppo.md).

    ``L_V = 0.5 * masked_mean_tokens( max((V - G)^2, (clip(V, V_old - c, V_old + c) - G)^2) )``

    Args:
        values: Current critic values V(s_t), ``[B, L]`` (requires grad).
        old_values: Critic values at rollout time, ``[B, L]`` (constants).
        returns: Targets G_t (GAE returns ``A + V_old``), ``[B, L]`` (constants).
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid token.
        clip_range: c (source: 0.2). ``None`` gives the unclipped ``0.5 * masked_mean((V-G)^2)``.

    Returns:
        ``(loss, metrics)``: scalar loss; detached scalar metrics ``vf_loss`` (the loss),
        ``vf_clip_frac`` (fraction of valid tokens where the clipped term is strictly larger),
        ``value_mean`` (masked mean of V), ``explained_var``
        (``1 - Var[G - V_old] / Var[G]`` over valid tokens, biased variances; 0 when
        ``Var[G] == 0``; a diagnostic of how well the rollout-time critic predicted the returns).

    Raises:
        ValueError: On a shape mismatch (the message names the argument).
    """
    check_same_shape("values", values, old_values=old_values, returns=returns, mask=mask)
    valid = mask != 0
    zeros = torch.zeros_like(values)
    v = torch.where(valid, values, zeros)
    v_old = torch.where(valid, old_values.detach().to(values.dtype), zeros)
    g = torch.where(valid, returns.detach().to(values.dtype), zeros)

    loss_unclipped = (v - g) ** 2
    if clip_range is not None:
        v_clipped = torch.maximum(torch.minimum(v, v_old + clip_range), v_old - clip_range)
        loss_clipped = (v_clipped - g) ** 2
        per_token = torch.maximum(loss_unclipped, loss_clipped)
        clip_frac = masked_mean((loss_clipped > loss_unclipped).to(values.dtype), mask)
    else:
        per_token = loss_unclipped
        clip_frac = values.new_zeros(())
    loss = 0.5 * masked_mean(per_token, mask)

    with torch.no_grad():
        var_g = masked_mean((g - masked_mean(g, mask)) ** 2, mask)
        resid = g - v_old
        var_resid = masked_mean((resid - masked_mean(resid, mask)) ** 2, mask)
        has_var = var_g > 0
        ratio = var_resid / torch.where(has_var, var_g, torch.ones_like(var_g))
        explained = torch.where(has_var, 1.0 - ratio, torch.zeros_like(var_g))
        metrics = {
            "vf_loss": loss.detach(),
            "vf_clip_frac": clip_frac.detach(),
            "value_mean": masked_mean(v.detach(), mask),
            "explained_var": explained,
        }
    return loss, metrics
