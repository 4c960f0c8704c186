"""OREO: the soft-Bellman value and policy losses (arXiv 2412.16145, Eqs. 8-9; docs/oreo.md).

OREO enforces the soft Bellman consistency ``V*(s_t) - V*(s_{t+1}) = r(s_t, a_t) - beta * l_t``
(paper Eq. 3) in telescoped form, ``V*(s_t) = R - beta * sum_{i>=t} l_i`` (the reward is given
only at the end), with a separate value model V_phi and the policy's log-ratio
``l_t = log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t)``. docs/oreo.md: token-level by default,
step-level and response-level as options, exact full-vocabulary KL regulariser (alpha).

Token level (the default; paper Eqs. 8-9), with ``A_t = sum_{i>=t} l_i``::

    L_V  = mean_b [ (1/|S_b|) sum_{t in S_b} ( V(s_t) + beta*sg[A_t] - R_b )^2 ]
    L_pi = mean_b [ w_b (1/|S_b|) sum_{t in S_b} ( sg[V(s_t)] + beta*(l_t + sg[sum_{i>t} l_i]) - R_b )^2 ]
           + alpha * mean_b [ (1/|resp_b|) sum_{t in resp_b} KL(pi_theta(.|s_t) || pi_ref(.|s_t)) ]

Shapes and layout: ``B`` sequences, ``L`` response tokens (right-padded), ``S`` steps.
``mask [B, L]`` (bool or 0/1 float) marks the valid response tokens, EOS included. Token ``t``
is the action taken in state ``s_t = (x, y_<t)``; ``values[:, t]`` is ``V(s_t)``, so
``values[:, 0]`` is the prompt's value V(S_0). The state set S_b of sequence ``b`` is the set of
its valid tokens' states (docs/oreo.md: every position whose next token is a response
token; the state after EOS is excluded), so ``|S_b| = |resp_b| = mask[b].sum()``. The reverse
cumulative sums skip masked positions, so any padding layout works for the token-level losses.

Every loss returns ``(loss, metrics)`` with ``metrics`` a dict of detached scalars. Masked
positions never leak into a result, even if they hold ``nan``/``inf``.
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import check_num_steps, check_same_shape, masked_mean, step_log_ratios, step_sums
from lit_reason.losses.common import step_valid as _step_mask

__all__ = [
    "oreo_token_residuals",
    "oreo_value_loss",
    "oreo_policy_loss",
    "oreo_importance_weights",
    "step_log_ratios",
    "step_start_values",
    "oreo_step_value_loss",
    "oreo_step_policy_loss",
    "oreo_response_loss",
]


# ----------------------------------------------------------------------------- input checks


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The promoted floating dtype of ``tensors``, at least float32 (bf16 inputs give fp32 losses)."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_token_inputs(
    reference_name: str,
    reference: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    **others: torch.Tensor | None,
) -> torch.Tensor:
    """Checks the ``[B, L]`` tensors, ``rewards [B]`` and that no mask row is empty.

    Returns:
        The mask as a bool tensor ``[B, L]``.
    """
    if reference.dim() != 2:
        raise ValueError(f"`{reference_name}` must be [B, L], got shape {tuple(reference.shape)}")
    check_same_shape(reference_name, reference, mask=mask, **others)
    batch = reference.shape[0]
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise ValueError(f"`rewards` must have shape ({batch},), got {tuple(rewards.shape)}")
    valid = mask != 0
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise ValueError(f"`mask` rows {rows} have no valid token (every sequence needs at least one state)")
    return valid


def _check_weights(importance_weights: torch.Tensor | None, batch: int) -> None:
    if importance_weights is not None and (importance_weights.dim() != 1 or importance_weights.shape[0] != batch):
        raise ValueError(
            f"`importance_weights` must have shape ({batch},), got {tuple(importance_weights.shape)}"
        )


def _zeroed(x: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` with masked positions set to exactly 0 (``where``, so nan/inf cannot leak)."""
    x = x.to(dtype)
    return torch.where(valid, x, torch.zeros_like(x))


def _log_ratios(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, valid: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """``l_t = logp_t - sg[ref_logp_t]`` at valid positions, 0 elsewhere."""
    return _zeroed(logprobs.to(dtype) - ref_logprobs.detach().to(dtype), valid, dtype)


def _reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """``out[:, t] = sum_{i>=t} x[:, i]`` along dim 1 (masked entries must already be 0)."""
    return torch.flip(torch.cumsum(torch.flip(x, dims=[1]), dim=1), dims=[1])


def _sequence_loss(
    residual: torch.Tensor, valid: torch.Tensor, importance_weights: torch.Tensor | None
) -> torch.Tensor:
    """``mean_b [ w_b * (1/|S_b|) sum_{t in S_b} residual_t^2 ]`` (OREO's sequence mean, docs/index.md)."""
    per_sequence = masked_mean(residual**2, valid, dim=1)
    if importance_weights is not None:
        per_sequence = per_sequence * importance_weights.detach().to(per_sequence.dtype)
    return per_sequence.mean()


def _kl_term(
    kl: torch.Tensor | None, valid: torch.Tensor, alpha: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha * mean_b[(1/|resp_b|) sum_t KL_t], masked token-mean of KL)``; zeros without ``kl``."""
    if kl is None:
        zero = torch.zeros((), dtype=dtype, device=valid.device)
        return zero, zero
    kl = _zeroed(kl, valid, dtype)
    return alpha * masked_mean(kl, valid, dim=1).mean(), masked_mean(kl.detach(), valid)


def _residual_metrics(residual: torch.Tensor, valid: torch.Tensor, values: torch.Tensor) -> dict[str, torch.Tensor]:
    residual, values = residual.detach(), values.detach()
    return {
        "residual_mean": masked_mean(residual, valid),
        "residual_abs_mean": masked_mean(residual.abs(), valid),
        "value_mean": masked_mean(values, valid),
    }


# ----------------------------------------------------------------------------- token level


def oreo_token_residuals(
    values: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
) -> torch.Tensor:
    """OREO's token-level soft-Bellman residual, with no stop-gradient anywhere (docs/oreo.md).

    ``delta_t = V(s_t) + beta * sum_{i>=t} l_i - R`` at valid tokens, 0 elsewhere. It is the
    residual of both Eq. 8 and Eq. 9 (they differ only in where gradients are stopped); it is
    exposed for diagnostics and for the DQO identity of docs/dqo.md.

    Args:
        values: V(s_t), ``[B, L]``.
        logprobs: log pi_theta of the taken tokens, ``[B, L]``.
        ref_logprobs: log pi_ref of the taken tokens, ``[B, L]`` (constants).
        rewards: Outcome rewards R, ``[B]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        beta: KL coefficient (source: 0.03).

    Returns:
        ``[B, L]`` residuals (float32 or wider), 0 at masked positions.

    Raises:
        ValueError: On a shape mismatch (names the argument) or an empty ``mask`` row.
    """
    valid = _check_token_inputs("values", values, rewards, mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    dtype = _compute_dtype(values, logprobs)
    lr = _log_ratios(logprobs, ref_logprobs, valid, dtype)
    v = _zeroed(values, valid, dtype)
    r = rewards.to(dtype).unsqueeze(1)
    return torch.where(valid, v + beta * _reverse_cumsum(lr) - r, torch.zeros_like(v))


def _value_regression(v, advantage, rewards, valid, beta, importance_weights):
    """The critic's regression shared by the token- and step-level variants (Eq. 8):
    residual (V + beta * sg[A] - R) on valid states, per-sequence mean, then batch mean."""
    residual = torch.where(valid, v + beta * advantage - rewards.detach().to(v.dtype).unsqueeze(1), torch.zeros_like(v))
    loss = _sequence_loss(residual, valid, importance_weights)
    with torch.no_grad():
        metrics = {"value_loss": loss.detach(), **_residual_metrics(residual, valid, v)}
    return loss, metrics


def oreo_value_loss(
    values: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level OREO critic loss (docs/oreo.md, paper Eq. 8).

    ::

        A_t = sum_{i>=t} l_i                    (valid tokens only; computed without gradient)
        L_V = mean_b [ w_b * (1/|S_b|) sum_{t in S_b} ( V(s_t) + beta*sg[A_t] - R_b )^2 ]

    ``logprobs`` and ``ref_logprobs`` are detached inside, so no gradient reaches the policy.
    ``w_b`` is 1 unless ``importance_weights`` is given (source: the ``--importance_sampling``
    weight is "multiplied into each sequence's loss"; whether the critic is weighted too is not
    stated, so it is opt-in here).

    Args:
        values: V_phi(s_t), ``[B, L]`` (requires grad); ``values[:, 0]`` is V(S_0).
        logprobs: log pi_theta of the taken tokens, ``[B, L]`` (the current policy; detached).
        ref_logprobs: log pi_ref of the taken tokens, ``[B, L]`` (detached).
        rewards: Outcome rewards R, ``[B]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token (EOS included).
        beta: KL coefficient (source: 0.03).
        importance_weights: Optional per-sequence weights ``[B]`` (detached inside).

    Returns:
        ``(loss, metrics)``: scalar loss; detached scalar metrics ``value_loss``,
        ``residual_mean`` / ``residual_abs_mean`` (token-mean over all states of the batch of the
        residual ``V + beta*A - R``), ``value_mean`` (token-mean of V over the states).

    Raises:
        ValueError: On a shape mismatch (names the argument) or an empty ``mask`` row.
    """
    valid = _check_token_inputs("values", values, rewards, mask, logprobs=logprobs, ref_logprobs=ref_logprobs)
    _check_weights(importance_weights, values.shape[0])
    dtype = _compute_dtype(values, logprobs)
    with torch.no_grad():
        advantage = _reverse_cumsum(_log_ratios(logprobs.detach(), ref_logprobs, valid, dtype))
    return _value_regression(_zeroed(values, valid, dtype), advantage, rewards, valid, beta, importance_weights)


def oreo_policy_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    alpha: float = 0.01,
    kl: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level OREO policy loss with the exact-KL regulariser (docs/oreo.md, Eq. 9).

    ::

        delta_t = sg[V(s_t)] + beta * ( l_t + sg[sum_{i>t} l_i] ) - R_b
        L_pi    = mean_b [ w_b * (1/|S_b|) sum_{t in S_b} delta_t^2 ]
                  + alpha * mean_b [ (1/|resp_b|) sum_{t in resp_b} KL_t ]

    The stop-gradient on the future log-ratios "makes each step have the same scale in the
    gradient": ``d L_pi / d l_t`` comes from residual ``t`` alone. ``values`` are detached, so no
    gradient reaches the critic. ``KL_t`` is the exact full-vocabulary
    ``KL(pi_theta(.|s_t) || pi_ref(.|s_t))`` computed outside by
    :func:`lit_reason.models.logprobs.full_kl` (source: ``--unbiased_kl``, the paper's L_reg);
    gradients flow through it as given. The importance weights ``w_b`` (the
    ``--importance_sampling`` option; see :func:`oreo_importance_weights`) multiply each
    sequence's Bellman term; the KL regulariser is not weighted (library choice: the weights
    correct the off-policy Bellman residual, the regulariser is an on-sample penalty).

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]`` (requires grad).
        ref_logprobs: log pi_ref of the taken tokens, ``[B, L]`` (constants).
        values: V_phi(s_t), ``[B, L]`` (detached inside).
        rewards: Outcome rewards R, ``[B]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token (EOS included).
        beta: KL coefficient of the log-ratio (source: 0.03).
        alpha: Weight of the exact-KL regulariser (source: 0.01 token level).
        kl: Per-position exact KL ``[B, L]``, or ``None`` for no regulariser.
        importance_weights: Optional per-sequence weights ``[B]`` (detached inside).

    Returns:
        ``(loss, metrics)``: scalar loss; detached scalar metrics ``policy_loss`` (the Bellman
        term, weighted), ``kl_loss`` (alpha times the KL term), ``kl`` (token-mean exact KL; 0
        without ``kl``), ``residual_mean`` / ``residual_abs_mean`` (token-mean of delta),
        ``value_mean`` (token-mean of V), ``weight_mean`` (mean importance weight; 1 without).

    Raises:
        ValueError: On a shape mismatch (names the argument) or an empty ``mask`` row.
    """
    valid = _check_token_inputs(
        "logprobs", logprobs, rewards, mask, ref_logprobs=ref_logprobs, values=values, kl=kl
    )
    _check_weights(importance_weights, logprobs.shape[0])
    dtype = _compute_dtype(logprobs, values)
    lr = _log_ratios(logprobs, ref_logprobs, valid, dtype)
    return _policy_loss_core(lr, values, rewards, valid, valid, beta, alpha, kl, importance_weights, dtype)


def _policy_loss_core(
    ratios: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    states: torch.Tensor,
    tokens: torch.Tensor,
    beta: float,
    alpha: float,
    kl: torch.Tensor | None,
    importance_weights: torch.Tensor | None,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The policy loss shared by the token and step levels (paper Eq. 9 and its step variant).

    ``ratios [B, N]`` are the log-ratios of the N actions (tokens: ``l_t``; steps: ``L_k``) and
    ``values [B, N]`` V at their states; ``states [B, N]`` marks the valid actions and ``tokens
    [B, L]`` the valid tokens of the per-token KL regulariser. The residual is
    ``sg[V] + beta * (ratio + sg[sum of later ratios]) - R`` at every valid action.
    """
    future = (_reverse_cumsum(ratios) - ratios).detach()  # sum over the later actions
    v = _zeroed(values.detach(), states, dtype)
    residual = torch.where(
        states, v + beta * (ratios + future) - rewards.detach().to(dtype).unsqueeze(1), torch.zeros_like(v)
    )
    bellman = _sequence_loss(residual, states, importance_weights)
    kl_loss, kl_mean = _kl_term(kl, tokens, alpha, dtype)
    loss = bellman + kl_loss
    with torch.no_grad():
        metrics = {
            "policy_loss": bellman.detach(),
            "kl_loss": kl_loss.detach(),
            "kl": kl_mean,
            **_residual_metrics(residual, states, v),
            "weight_mean": _weight_mean(importance_weights, dtype, ratios.device),
        }
    return loss, metrics


def _weight_mean(importance_weights: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if importance_weights is None:
        return torch.ones((), dtype=dtype, device=device)
    return importance_weights.detach().to(dtype).mean()


@torch.no_grad()
def oreo_importance_weights(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, cap: float = 1.0
) -> torch.Tensor:
    """Per-sequence importance weights ``w_b = exp(min(sum_t l_t, cap))``, detached (docs/oreo.md).

    OREO's ``--importance_sampling`` option (used for its DQO reproduction; docs/dqo.md
    "Importance sampling"): the trajectory-level ratio pi_theta/pi_ref of the offline sample
    (pi_ref is the behaviour policy), clipped from above at ``exp(cap)``.

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]``.
        ref_logprobs: log pi_ref of the taken tokens, ``[B, L]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        cap: Upper clip ``c`` of the summed log-ratio (source: 1).

    Returns:
        ``[B]`` weights, float32 or wider, without gradient.

    Raises:
        ValueError: On a shape mismatch (names the argument) or non-2-D inputs.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"`logprobs` must be [B, L], got shape {tuple(logprobs.shape)}")
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    valid = mask != 0
    dtype = _compute_dtype(logprobs)
    total = _log_ratios(logprobs, ref_logprobs, valid, dtype).sum(dim=1)
    return torch.exp(torch.clamp(total, max=cap))


# ----------------------------------------------------------------------------- step level


def _check_step_structure(
    step_ids: torch.Tensor, num_steps: torch.Tensor, mask_valid: torch.Tensor, max_steps: int
) -> torch.Tensor:
    """Checks ``step_ids``/``num_steps`` against the mask; returns the step validity ``[B, S]``."""
    batch = mask_valid.shape[0]
    if tuple(step_ids.shape) != tuple(mask_valid.shape):
        raise ValueError(
            f"`step_ids` has shape {tuple(step_ids.shape)} but must match `mask` of shape {tuple(mask_valid.shape)}"
        )
    if step_ids.is_floating_point() or step_ids.dtype == torch.bool:
        raise ValueError(f"`step_ids` must be an integer tensor, got {step_ids.dtype}")
    check_num_steps(num_steps, batch, max_steps)
    ids = step_ids.long()
    bad = mask_valid & ((ids < 0) | (ids >= num_steps.long().unsqueeze(1)))
    if bool(bad.any()):
        rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
        raise ValueError(f"`step_ids` of valid tokens must lie in [0, num_steps); rows {rows} do not")
    return _step_mask(num_steps, max_steps)


def step_start_values(values: torch.Tensor, step_ends: torch.Tensor, num_steps: torch.Tensor) -> torch.Tensor:
    """Reads V(S_k) at the step boundaries from per-token values (right-padded responses).

    S_0 = x is read at token 0 and S_k (k >= 1) at the token after step k-1's last token:
    ``out[b, k] = values[b, step_ends[b, k-1] + 1]`` (``values[:, t]`` = V(s_t), s_t = (x, y_<t)).

    Args:
        values: V(s_t), ``[B, L]``.
        step_ends: Index of each step's last token ``[B, S]``, -1 past ``num_steps``.
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.

    Returns:
        ``[B, S]`` values V(S_0..S_{T-1}); 0 at ``k >= T_b``. Gradients flow to ``values``.

    Raises:
        ValueError: On shape mismatches or a step boundary outside the response.
    """
    if values.dim() != 2 or step_ends.dim() != 2:
        raise ValueError("`values` must be [B, L] and `step_ends` [B, S]")
    batch, length = values.shape
    if step_ends.shape[0] != batch:
        raise ValueError(f"`step_ends` has batch size {step_ends.shape[0]} but `values` has {batch}")
    if num_steps.dim() != 1 or num_steps.shape[0] != batch:
        raise ValueError(f"`num_steps` must have shape ({batch},), got {tuple(num_steps.shape)}")
    max_steps = step_ends.shape[1]
    k = torch.arange(max_steps, device=step_ends.device).unsqueeze(0)
    valid = k < num_steps.to(step_ends.device).unsqueeze(1)
    starts = torch.cat([step_ends.new_full((batch, 1), -1), step_ends[:, :-1]], dim=1).long() + 1
    if bool((valid & ((starts < 0) | (starts >= length))).any()):
        raise ValueError("`step_ends` puts a step start outside the response")
    gathered = torch.gather(values, 1, torch.where(valid, starts, torch.zeros_like(starts)))
    return torch.where(valid, gathered, torch.zeros_like(gathered))


def _check_step_inputs(
    step_values: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    valid = _check_token_inputs("logprobs", logprobs, rewards, mask, ref_logprobs=ref_logprobs, kl=kl)
    if step_values.dim() != 2 or step_values.shape[0] != logprobs.shape[0]:
        raise ValueError(f"`step_values` must be [B={logprobs.shape[0]}, S], got shape {tuple(step_values.shape)}")
    step_valid = _check_step_structure(step_ids, num_steps, valid, step_values.shape[1])
    return valid, step_valid.to(valid.device)


def oreo_step_value_loss(
    step_values: torch.Tensor,
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step-level OREO critic loss (docs/oreo.md: states only at step starts).

    Eq. 8 with the step states S_0..S_{T-1} in place of the token states::

        L_V = mean_b [ w_b * (1/T_b) sum_{k<T_b} ( V(S_k) + beta*sg[sum_{j>=k} L_j] - R_b )^2 ]

    Args:
        step_values: V_phi(S_k), ``[B, S]`` (requires grad); see :func:`step_start_values`.
        logprobs: log pi_theta of the taken tokens, ``[B, L]`` (detached inside).
        ref_logprobs: log pi_ref, ``[B, L]`` (detached).
        rewards: Outcome rewards R, ``[B]``.
        step_ids: Step index per token ``[B, L]`` integer (-1 on padding).
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        beta: KL coefficient (source: 0.03).
        importance_weights: Optional per-sequence weights ``[B]`` (detached inside).

    Returns:
        ``(loss, metrics)`` as :func:`oreo_value_loss`, the means taken over valid steps.

    Raises:
        ValueError: On shape mismatches (names the argument), an empty ``mask`` row or step
            indices out of range.
    """
    valid, step_valid = _check_step_inputs(step_values, logprobs, ref_logprobs, rewards, step_ids, num_steps, mask)
    _check_weights(importance_weights, logprobs.shape[0])
    dtype = _compute_dtype(step_values, logprobs)
    max_steps = step_values.shape[1]
    with torch.no_grad():
        step_lr = step_sums(_log_ratios(logprobs.detach(), ref_logprobs, valid, dtype), step_ids, valid, max_steps)
        advantage = _reverse_cumsum(step_lr)
    v = _zeroed(step_values, step_valid, dtype)
    return _value_regression(v, advantage, rewards, step_valid, beta, importance_weights)


def oreo_step_policy_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    step_values: torch.Tensor,
    rewards: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    alpha: float = 0.1,
    kl: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Step-level OREO policy loss (docs/oreo.md: ``--step_level``).

    States exist only at step starts and the action is the whole step, with the summed step
    log-ratio ``L_k`` (:func:`step_log_ratios`)::

        delta_k = sg[V(S_k)] + beta * ( L_k + sg[sum_{j>k} L_j] ) - R_b
        L_pi    = mean_b [ w_b * (1/T_b) sum_{k<T_b} delta_k^2 ]
                  + alpha * mean_b [ (1/|resp_b|) sum_{t in resp_b} KL_t ]

    The KL regulariser stays per token, as at token level (source: alpha = 0.1 for step level).

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]`` (requires grad).
        ref_logprobs: log pi_ref, ``[B, L]`` (constants).
        step_values: V_phi(S_k) at the step starts, ``[B, S]`` (detached inside).
        rewards: Outcome rewards R, ``[B]``.
        step_ids: Step index per token ``[B, L]`` integer (-1 on padding).
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        beta: KL coefficient (source: 0.03).
        alpha: Weight of the exact-KL regulariser (source: 0.1 step level).
        kl: Per-position exact KL ``[B, L]`` or ``None``.
        importance_weights: Optional per-sequence weights ``[B]`` (detached inside).

    Returns:
        ``(loss, metrics)`` as :func:`oreo_policy_loss`; residual and value means over valid steps.

    Raises:
        ValueError: On shape mismatches (names the argument), an empty ``mask`` row or step
            indices out of range.
    """
    valid, step_valid = _check_step_inputs(
        step_values, logprobs, ref_logprobs, rewards, step_ids, num_steps, mask, kl=kl
    )
    _check_weights(importance_weights, logprobs.shape[0])
    dtype = _compute_dtype(logprobs, step_values)
    step_lr = step_sums(_log_ratios(logprobs, ref_logprobs, valid, dtype), step_ids, valid, step_values.shape[1])
    return _policy_loss_core(step_lr, step_values, rewards, step_valid, valid, beta, alpha, kl, importance_weights,
                             dtype)


# ----------------------------------------------------------------------------- response level


def oreo_response_loss(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.03,
    alpha: float = 0.3,
    kl: torch.Tensor | None = None,
    importance_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Response-level OREO policy loss (docs/oreo.md: ``--traj_actor_loss``).

    Only the initial state s_0 is used (DPO-like)::

        delta_b = sg[V(s_0)] + beta * sum_{i>=0} l_i - R_b
        L_pi    = mean_b [ w_b * delta_b^2 ] + alpha * mean_b [ (1/|resp_b|) sum_t KL_t ]

    This is a policy (actor) loss: ``values`` are detached. The flag changes only the actor
    loss in OREO, so the critic keeps the token-level :func:`oreo_value_loss`.

    Args:
        logprobs: log pi_theta of the taken tokens, ``[B, L]`` (requires grad).
        ref_logprobs: log pi_ref, ``[B, L]`` (constants).
        values: Either V(s_0) per sequence ``[B]``, or per-token values ``[B, L]`` from which
            the value at each row's first valid token (``values[:, 0]`` when right-padded) is read.
        rewards: Outcome rewards R, ``[B]``.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token.
        beta: KL coefficient (source: 0.03).
        alpha: Weight of the exact-KL regulariser (source: 0.3 response level).
        kl: Per-position exact KL ``[B, L]`` or ``None``.
        importance_weights: Optional per-sequence weights ``[B]`` (detached inside).

    Returns:
        ``(loss, metrics)``: scalar loss; detached scalar metrics ``policy_loss``, ``kl_loss``,
        ``kl``, ``residual_mean`` / ``residual_abs_mean`` (over sequences), ``value_mean``
        (mean V(s_0)), ``weight_mean``.

    Raises:
        ValueError: On a shape mismatch (names the argument) or an empty ``mask`` row.
    """
    valid = _check_token_inputs("logprobs", logprobs, rewards, mask, ref_logprobs=ref_logprobs, kl=kl)
    batch = logprobs.shape[0]
    _check_weights(importance_weights, batch)
    if values.dim() == 2:
        check_same_shape("logprobs", logprobs, values=values)
        first = torch.argmax(valid.to(torch.int8), dim=1, keepdim=True)  # first valid position
        v0 = torch.gather(values, 1, first).squeeze(1)
    elif values.dim() == 1 and values.shape[0] == batch:
        v0 = values
    else:
        raise ValueError(f"`values` must be [B] or [B, L] with B={batch}, got shape {tuple(values.shape)}")
    dtype = _compute_dtype(logprobs, values)
    total = _log_ratios(logprobs, ref_logprobs, valid, dtype).sum(dim=1)
    v0 = v0.detach().to(dtype)
    residual = v0 + beta * total - rewards.detach().to(dtype)
    per_sequence = residual**2
    if importance_weights is not None:
        per_sequence = per_sequence * importance_weights.detach().to(dtype)
    bellman = per_sequence.mean()
    kl_loss, kl_mean = _kl_term(kl, valid, alpha, dtype)
    loss = bellman + kl_loss
    with torch.no_grad():
        metrics = {
            "policy_loss": bellman.detach(),
            "kl_loss": kl_loss.detach(),
            "kl": kl_mean,
            "residual_mean": residual.detach().mean(),
            "residual_abs_mean": residual.detach().abs().mean(),
            "value_mean": v0.mean(),
            "weight_mean": _weight_mean(importance_weights, dtype, logprobs.device),
        }
    return loss, metrics
