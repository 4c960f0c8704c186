"""DQO: Direct Q-function Optimization (arXiv 2410.09302), as reconstructed in docs/dqo.md.

There is no official code. docs/dqo.md gives the reconstruction this
module implements: the Q-function is parameterised by the policy's log-ratio and a separate
value model, ``Q_theta(s_h, a_h) = beta * l_h + V_phi(s_h)``; the soft rewards are
``r~_h = r_h - beta * l_h`` (``r_h = R`` at the last valid token, 0 before); and the targets are
lambda-returns with terminal values 0::

    G_h   = r~_h + (1 - lam) * V(s_{h+1}) + lam * G_{h+1}        (G_H = 0, V(s_H) = 0)
    L_V   = E_b [ (1/|S_b|) sum_h ( V(s_h) - sg[G_h] )^2 ]
    L_Q   = E_b [ w_b (1/|S_b|) sum_h ( beta*l_h + sg[V(s_h)] - r_h - G_{h+1} )^2 ]

Inside ``L_Q`` the value terms of the target ``G_{h+1}`` are constants (L_Q trains the policy
only). The future log-ratios inside ``G_{h+1}`` carry gradient by default, as the
reconstruction writes it and as OREO's Appendix C reads ("DQO ... equals token-level OREO
without ... stop gradients"); ``stop_grad_future=True`` detaches them (the switch of
docs/dqo.md), which makes ``d L_Q / d l_t`` come from residual ``t`` alone, as in OREO's Eq. 9.

Identity (docs/dqo.md, tested): with ``lam = 1`` and no importance weights,
``G_{h+1} = sum_{i>h} (r_i - beta l_i)`` and the Q residual is
``V(s_h) + beta * sum_{i>=h} l_i - R``, OREO's token-level residual
(:func:`lit_reason.losses.oreo.oreo_token_residuals`); the value residual is the same number.
With ``stop_grad_future=True`` the DQO policy loss then equals
:func:`~lit_reason.losses.oreo.oreo_policy_loss` without the KL term, in value and gradient.

Library choices where the sources are silent (docs/dqo.md, "Defaults, and why"):

* Normalisation: per-sequence mean over states, then batch mean (OREO's), so the identity holds
  for the losses and not only the residuals;
  ``token_reduction="sum"`` gives the reconstruction's literal ``sum_h``.
* ``lam = 0.95`` and ``beta = 0.03`` by default (beta as in OREO's reproduction of DQO; lambda is
  unverified).
* Importance weights (``w_b = exp(min(sum_t l_t, c))``, detached; build them with
  :func:`lit_reason.losses.oreo.oreo_importance_weights`) multiply the policy loss only, as in
  the reconstruction's ``L_Q``; ``L_V`` is unweighted.

Shapes: ``B`` sequences, ``L`` response tokens. ``mask [B, L]`` marks the valid response tokens
(EOS included); ``values[:, t]`` is V(s_t) for the state before token ``t``. Masked positions may
sit anywhere (e.g. environment tokens between actions): the recursion runs over the valid tokens
in order, so the "next state" of an action is the state before the next valid token. The
lambda-returns are computed in closed form, ``G_h = sum_{j>=h} lam^(j-h) x_j`` with
``x_j = r~_j + (1 - lam) V(s_{j+1})``, as one matmul with an ``[L, L]`` matrix of powers.
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import masked_mean
from lit_reason.losses.oreo import (
    _check_token_inputs,
    _check_weights,
    _compute_dtype,
    _log_ratios,
    _weight_mean,
    _zeroed,
)

__all__ = ["dqo_lambda_returns", "dqo_residuals", "dqo_value_loss", "dqo_policy_loss", "dqo_losses"]

_REDUCTIONS = ("mean", "sum")


# ----------------------------------------------------------------------------- compact layout


def _compact_order(valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Permutation moving each row's valid tokens to the front (in order), and the compact mask."""
    order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices
    count = valid.sum(dim=1, keepdim=True)
    compact_valid = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0) < count
    return order, compact_valid


def _shift_left(x: torch.Tensor) -> torch.Tensor:
    """``out[:, h] = x[:, h+1]``, 0 in the last column."""
    return torch.cat([x[:, 1:], x.new_zeros((x.shape[0], 1))], dim=1)


def _discounted_reverse_sum(x: torch.Tensor, lam: float) -> torch.Tensor:
    """``out[:, h] = sum_{j>=h} lam^(j-h) x[:, j]`` as one matmul (``lam = 1``: reverse cumsum)."""
    length = x.shape[1]
    pos = torch.arange(length, device=x.device)
    gap = pos.unsqueeze(0) - pos.unsqueeze(1)  # gap[h, j] = j - h
    base = torch.tensor(float(lam), dtype=x.dtype, device=x.device)
    powers = torch.where(gap >= 0, torch.pow(base, gap.clamp(min=0).to(x.dtype)), torch.zeros((), dtype=x.dtype))
    return x @ powers.T


def _returns_compact(
    lr_c: torch.Tensor, v_c: torch.Tensor, r_c: torch.Tensor, beta: float, lam: float
) -> torch.Tensor:
    """Lambda-returns in the compact layout (inputs 0 past each row's valid tokens)."""
    x = r_c - beta * lr_c + (1.0 - lam) * _shift_left(v_c)
    return _discounted_reverse_sum(x, lam)


def _check_lam(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"`lam` must lie in [0, 1], got {lam}")


def _prepare(logprobs, ref_logprobs, values, rewards, mask, lam, token_reduction="mean"):
    valid = _check_token_inputs("logprobs", logprobs, rewards, mask, ref_logprobs=ref_logprobs, values=values)
    _check_lam(lam)
    if token_reduction not in _REDUCTIONS:
        raise ValueError(f"`token_reduction` must be one of {_REDUCTIONS}, got {token_reduction!r}")
    dtype = _compute_dtype(logprobs, values)
    order, compact_valid = _compact_order(valid)
    lr = _log_ratios(logprobs, ref_logprobs, valid, dtype)
    v = _zeroed(values, valid, dtype)
    lr_c = torch.gather(lr, 1, order)
    v_c = torch.gather(v, 1, order)
    last = compact_valid & ~_shift_left(compact_valid.to(torch.uint8)).bool()  # index n_b - 1
    r_c = torch.where(last, rewards.to(dtype).unsqueeze(1), torch.zeros((), dtype=dtype, device=last.device))
    return valid, dtype, order, compact_valid, lr_c, v_c, r_c


def _scatter_back(x_c: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x_c).scatter(1, order, x_c)


# ----------------------------------------------------------------------------- public API


def dqo_lambda_returns(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    lam: float = 0.95,
) -> torch.Tensor:
    """The lambda-return targets ``G_h`` of docs/dqo.md, per valid token.

    ``G_h = r~_h + (1 - lam) V(s_{h+1}) + lam G_{h+1}``, ``r~_h = r_h - beta l_h``, with
    ``G_H = V(s_H) = 0`` after the last valid token. ``lam = 1`` gives the Monte-Carlo soft
    return ``R - beta * sum_{i>=h} l_i``; ``lam = 0`` the one-step target
    ``r~_h + V(s_{h+1})``. Gradients flow to every input that requires them; the losses detach
    what they need.

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]``.
        ref_logprobs: log pi_ref of the taken tokens, ``[B, L]`` (constants).
        values: V_phi(s_t), ``[B, L]``.
        rewards: Outcome rewards R, ``[B]`` (placed at each row's last valid token).
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        beta: KL coefficient.
        lam: Lambda in ``[0, 1]``.

    Returns:
        ``[B, L]`` returns (float32 or wider), 0 at masked positions.

    Raises:
        ValueError: On a shape mismatch (names the argument), an empty ``mask`` row or ``lam``
            outside ``[0, 1]``.
    """
    _, _, order, _, lr_c, v_c, r_c = _prepare(logprobs, ref_logprobs, values, rewards, mask, lam)
    return _scatter_back(_returns_compact(lr_c, v_c, r_c, beta, lam), order)


def dqo_residuals(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    lam: float = 0.95,
    stop_grad_future: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The value and Q residuals of docs/dqo.md, per valid token.

    ::

        value residual  = V(s_h) - sg[G_h]                              (gradient to values only)
        Q residual      = beta*l_h + sg[V(s_h)] - r_h - G'_{h+1}         (gradient to logprobs only)

    where ``G'`` is the lambda-return with every value term detached and, if
    ``stop_grad_future``, the log-ratios detached too (then residual ``h`` depends on the
    policy only through ``l_h``).

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]``.
        ref_logprobs: log pi_ref, ``[B, L]`` (constants).
        values: V_phi(s_t), ``[B, L]``.
        rewards: Outcome rewards R, ``[B]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        beta: KL coefficient.
        lam: Lambda in ``[0, 1]``.
        stop_grad_future: Detach the future log-ratios inside the Q target.

    Returns:
        ``(value_residual, q_residual)``, both ``[B, L]``, 0 at masked positions.

    Raises:
        ValueError: As :func:`dqo_lambda_returns`.
    """
    _, _, order, compact_valid, lr_c, v_c, r_c = _prepare(logprobs, ref_logprobs, values, rewards, mask, lam)
    value_res_c, q_res_c = _residuals_compact(lr_c, v_c, r_c, compact_valid, beta, lam, stop_grad_future)
    return _scatter_back(value_res_c, order), _scatter_back(q_res_c, order)


def _residuals_compact(lr_c, v_c, r_c, compact_valid, beta, lam, stop_grad_future):
    v_sg = v_c.detach()
    with torch.no_grad():
        returns = _returns_compact(lr_c.detach(), v_sg, r_c, beta, lam)
    value_res = torch.where(compact_valid, v_c - returns, torch.zeros_like(v_c))
    if stop_grad_future:
        next_returns = _shift_left(returns)
    else:
        next_returns = _shift_left(_returns_compact(lr_c, v_sg, r_c, beta, lam))
    q_res = torch.where(compact_valid, beta * lr_c + v_sg - r_c - next_returns, torch.zeros_like(lr_c))
    return value_res, q_res


def _reduce(residual: torch.Tensor, valid: torch.Tensor, token_reduction: str, weights: torch.Tensor | None):
    sq = torch.where(valid, residual**2, torch.zeros_like(residual))
    per_sequence = masked_mean(sq, valid, dim=1) if token_reduction == "mean" else sq.sum(dim=1)
    if weights is not None:
        per_sequence = per_sequence * weights.detach().to(per_sequence.dtype)
    return per_sequence.mean()


def dqo_losses(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    lam: float = 0.95,
    importance_weights: torch.Tensor | None = None,
    stop_grad_future: bool = False,
    token_reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Both DQO losses from one forward of policy and critic (docs/dqo.md).

    ::

        L_V = mean_b [ (1/|S_b|) sum_h ( V(s_h) - sg[G_h] )^2 ]
        L_Q = mean_b [ w_b (1/|S_b|) sum_h ( beta*l_h + sg[V(s_h)] - r_h - G_{h+1} )^2 ]

    The two losses touch disjoint inputs (``L_V`` only ``values``, ``L_Q`` only ``logprobs``),
    so ``(L_V + L_Q).backward()`` gives each model exactly its own gradient; they are returned
    apart so that each can have its own optimiser step, as in OREO's update order. See the
    module doc for the stop-gradient switch, the identity with OREO and the normalisation.

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]`` (requires grad).
        ref_logprobs: log pi_ref, ``[B, L]`` (constants; pi_ref is the behaviour policy).
        values: V_phi(s_t), ``[B, L]`` (requires grad).
        rewards: Outcome rewards R, ``[B]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token (EOS included).
        beta: KL coefficient (default 0.03, OREO's reproduction).
        lam: Lambda of the lambda-returns, in ``[0, 1]`` (unverified; default 0.95).
        importance_weights: Optional ``[B]`` weights of ``L_Q`` (detached inside), e.g.
            :func:`lit_reason.losses.oreo.oreo_importance_weights`.
        stop_grad_future: Detach the future log-ratios inside the Q target (off by default).
        token_reduction: ``"mean"`` (per-sequence mean over states; default) or ``"sum"``.

    Returns:
        ``(value_loss, policy_loss, metrics)``: two scalar losses and detached scalar metrics
        ``value_loss``, ``policy_loss``, ``value_residual_mean`` / ``value_residual_abs_mean``,
        ``q_residual_mean`` / ``q_residual_abs_mean`` (token-means over all states),
        ``value_mean``, ``return_mean`` (token-mean of G_h), ``weight_mean``.

    Raises:
        ValueError: On a shape mismatch (names the argument), an empty ``mask`` row, ``lam``
            outside ``[0, 1]`` or an unknown ``token_reduction``.
    """
    _, dtype, _, compact_valid, lr_c, v_c, r_c = _prepare(
        logprobs, ref_logprobs, values, rewards, mask, lam, token_reduction
    )
    _check_weights(importance_weights, logprobs.shape[0])
    value_res, q_res = _residuals_compact(lr_c, v_c, r_c, compact_valid, beta, lam, stop_grad_future)
    value_loss = _reduce(value_res, compact_valid, token_reduction, None)
    policy_loss = _reduce(q_res, compact_valid, token_reduction, importance_weights)
    with torch.no_grad():
        value_res_d, q_res_d, v_d = value_res.detach(), q_res.detach(), v_c.detach()
        metrics = {
            "value_loss": value_loss.detach(),
            "policy_loss": policy_loss.detach(),
            "value_residual_mean": masked_mean(value_res_d, compact_valid),
            "value_residual_abs_mean": masked_mean(value_res_d.abs(), compact_valid),
            "q_residual_mean": masked_mean(q_res_d, compact_valid),
            "q_residual_abs_mean": masked_mean(q_res_d.abs(), compact_valid),
            "value_mean": masked_mean(v_d, compact_valid),
            "return_mean": masked_mean(v_d - value_res_d, compact_valid),
            "weight_mean": _weight_mean(importance_weights, dtype, logprobs.device),
        }
    return value_loss, policy_loss, metrics


def dqo_value_loss(
    values: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    lam: float = 0.95,
    token_reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DQO critic loss ``L_V`` alone (see :func:`dqo_losses`); no gradient reaches ``logprobs``.

    Returns:
        ``(loss, metrics)``: the metrics of :func:`dqo_losses` whose names start with
        ``value`` or ``return``.
    """
    value_loss, _, metrics = dqo_losses(
        logprobs.detach(), ref_logprobs, values, rewards, mask, beta=beta, lam=lam,
        token_reduction=token_reduction,
    )
    keep = ("value_loss", "value_residual_mean", "value_residual_abs_mean", "value_mean", "return_mean")
    return value_loss, {k: metrics[k] for k in keep}


def dqo_policy_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    lam: float = 0.95,
    importance_weights: torch.Tensor | None = None,
    stop_grad_future: bool = False,
    token_reduction: str = "mean",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DQO policy (Q) loss ``L_Q`` alone (see :func:`dqo_losses`); no gradient reaches ``values``.

    Returns:
        ``(loss, metrics)``: the metrics of :func:`dqo_losses` for the policy (``policy_loss``,
        ``q_residual_mean``, ``q_residual_abs_mean``, ``value_mean``, ``return_mean``,
        ``weight_mean``).
    """
    _, policy_loss, metrics = dqo_losses(
        logprobs, ref_logprobs, values.detach(), rewards, mask, beta=beta, lam=lam,
        importance_weights=importance_weights, stop_grad_future=stop_grad_future,
        token_reduction=token_reduction,
    )
    keep = ("policy_loss", "q_residual_mean", "q_residual_abs_mean", "value_mean", "return_mean", "weight_mean")
    return policy_loss, {k: metrics[k] for k in keep}
