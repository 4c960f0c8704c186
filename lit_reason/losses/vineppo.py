"""VinePPO's Monte-Carlo step advantages and their token broadcast (arXiv 2410.01679; docs/vineppo.md).

docs/vineppo.md::

    step_rewards r_k = 0 for k < T-1,  r_{T-1} = R
    V(S_T) = 0                                      (terminal)
    V(S_k) = (1/K) sum_j R(eta_j)                   for k < min(T, M)   (MC rollouts; not here)
    V(S_k) = r_k + V(S_{k+1})                       for the states not estimated (k >= M)
    A_k    = r_k + V(S_{k+1}) - V(S_k)              (gamma = 1, no GAE; A_{T-1} = R - V(S_{T-1}))

Every token takes the advantage of its step (EOS takes the last step's), and the token
advantages are whitened over all response tokens of the global batch. The policy loss is
:func:`lit_reason.losses.ppo.ppo_policy_loss` (PPO-clip + k3 KL).

Shapes: ``B`` = batch (sequences), ``S`` = max steps, ``L`` = response length (tokens).
``num_steps[b] = T_b`` is the number of steps of sequence ``b`` (``1 <= T_b <= S``); entries at
step positions ``k >= T_b`` are padding and are ignored on input and 0 on output.
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import broadcast_step_values, check_num_steps, masked_whiten, step_valid

__all__ = [
    "value_estimation_mask",
    "fill_values_backward",
    "vineppo_step_advantages",
    "vineppo_token_advantages",
]


def _check_step_inputs(step_values: torch.Tensor, num_steps: torch.Tensor, rewards: torch.Tensor) -> None:
    if step_values.dim() != 2:
        raise ValueError(f"`step_values` must be [B, S], got shape {tuple(step_values.shape)}")
    batch, max_steps = step_values.shape
    check_num_steps(num_steps, batch, max_steps)
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise ValueError(f"`rewards` must have shape ({batch},), got {tuple(rewards.shape)}")


def _step_rewards(num_steps: torch.Tensor, rewards: torch.Tensor, max_steps: int, dtype: torch.dtype) -> torch.Tensor:
    """r_k as ``[B, S]``: R at k = T-1, else 0."""
    k = torch.arange(max_steps, device=num_steps.device).unsqueeze(0)
    last = (k == (num_steps.unsqueeze(1) - 1)).to(rewards.device)
    return torch.where(last, rewards.to(dtype).unsqueeze(1), torch.zeros((), dtype=dtype, device=rewards.device))


def value_estimation_mask(
    num_steps: torch.Tensor, max_steps: int, max_step_for_value_estimation: int | None = None
) -> torch.Tensor:
    """Which step states get MC rollouts: ``k < min(T, M)`` (docs/vineppo.md).

    ``M`` is ``max_step_for_value_estimation`` (GSM8K 25; MATH ``None`` = all steps).

    Args:
        num_steps: T per sequence, ``[B]`` integer.
        max_steps: S, the padded number of steps.
        max_step_for_value_estimation: M, or ``None`` for no limit.

    Returns:
        ``[B, S]`` bool mask, true where S_k is to be estimated by rollouts.
    """
    mask = step_valid(num_steps, max_steps)
    if max_step_for_value_estimation is not None:
        k = torch.arange(max_steps, device=num_steps.device).unsqueeze(0)
        mask = mask & (k < max_step_for_value_estimation)
    return mask


def fill_values_backward(
    step_values: torch.Tensor,
    estimated_mask: torch.Tensor,
    num_steps: torch.Tensor,
    rewards: torch.Tensor,
) -> torch.Tensor:
    """Fills the values of states that got no MC estimate: ``V(S_k) = r_k + V(S_{k+1})``.

    As in VinePPO's released code (docs/vineppo.md), states S_k with k >= M are filled backwards,
    ``V(S_k) = r_k + V(S_{k+1})`` (= R, the trajectory itself). Filling runs from ``k = T-1`` down to 0 with
    ``V(S_T) = 0`` and ``r_{T-1} = R``; estimated states keep their value, and any state not
    estimated (not only a suffix) takes ``r_k`` plus its successor's (possibly filled) value.

    Args:
        step_values: MC estimates ``[B, S]``; entries where ``estimated_mask`` is false are
            ignored.
        estimated_mask: ``[B, S]`` bool, true where V(S_k) was estimated by rollouts.
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.
        rewards: Outcome reward R per sequence, ``[B]``.

    Returns:
        ``[B, S]`` values V(S_0..S_{T-1}) with the gaps filled; 0 at ``k >= T``.

    Raises:
        ValueError: On shape mismatches (names the argument) or ``num_steps`` out of range.
    """
    _check_step_inputs(step_values, num_steps, rewards)
    if tuple(estimated_mask.shape) != tuple(step_values.shape):
        raise ValueError(
            f"`estimated_mask` has shape {tuple(estimated_mask.shape)} but must match "
            f"`step_values` of shape {tuple(step_values.shape)}"
        )
    dtype = step_values.dtype if step_values.is_floating_point() else torch.get_default_dtype()
    batch, max_steps = step_values.shape
    valid = step_valid(num_steps, max_steps)
    estimated = estimated_mask.bool() & valid
    r = _step_rewards(num_steps, rewards, max_steps, dtype)
    vals = step_values.to(dtype)
    out = torch.zeros((batch, max_steps), dtype=dtype, device=step_values.device)
    next_value = out.new_zeros(batch)  # V(S_{k+1}); 0 beyond T since out is 0 there
    for k in range(max_steps - 1, -1, -1):
        filled = r[:, k] + next_value
        v_k = torch.where(estimated[:, k], vals[:, k], filled)
        v_k = torch.where(valid[:, k], v_k, torch.zeros_like(v_k))
        out[:, k] = v_k
        next_value = v_k
    return out


def vineppo_step_advantages(
    step_values: torch.Tensor, num_steps: torch.Tensor, rewards: torch.Tensor
) -> torch.Tensor:
    """Step advantages ``A_k = r_k + V(S_{k+1}) - V(S_k)`` (docs/vineppo.md).

    gamma = 1, no GAE, ``V(S_T) = 0`` and ``r_k = R`` only at ``k = T-1``, so
    ``A_k = V(S_{k+1}) - V(S_k)`` for ``k < T-1`` and ``A_{T-1} = R - V(S_{T-1})``.

    Args:
        step_values: V(S_0..S_{T-1}) per sequence, ``[B, S]`` (MC estimates, gaps already
            filled with :func:`fill_values_backward`); entries at ``k >= T`` are ignored.
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.
        rewards: Outcome reward R per sequence, ``[B]``.

    Returns:
        ``[B, S]`` step advantages; 0 at ``k >= T``.

    Raises:
        ValueError: On shape mismatches (names the argument) or ``num_steps`` out of range.
    """
    _check_step_inputs(step_values, num_steps, rewards)
    dtype = step_values.dtype if step_values.is_floating_point() else torch.get_default_dtype()
    batch, max_steps = step_values.shape
    valid = step_valid(num_steps, max_steps)
    v = torch.where(valid, step_values.to(dtype), torch.zeros((), dtype=dtype, device=step_values.device))
    v_next = torch.cat([v[:, 1:], v.new_zeros(batch, 1)], dim=1)  # V(S_T) = 0 since v is 0 at k >= T
    r = _step_rewards(num_steps, rewards, max_steps, dtype)
    adv = r + v_next - v
    return torch.where(valid, adv, torch.zeros_like(adv))


def vineppo_token_advantages(
    step_values: torch.Tensor,
    num_steps: torch.Tensor,
    rewards: torch.Tensor,
    step_ids: torch.Tensor,
    mask: torch.Tensor,
    whiten: bool = True,
    distributed: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Per-token VinePPO advantages (docs/vineppo.md).

    Computes :func:`vineppo_step_advantages`, gives every valid token its step's advantage
    (``step_ids`` from the step splitter: a token belongs to the step containing its first
    character, EOS to the last step; docs/index.md, steps), then, if ``whiten``, whitens them
    over all valid tokens of the global batch with :func:`~lit_reason.losses.common.masked_whiten`
    (unbiased variance, eps 1e-8, all-reduced across ranks when ``distributed``).

    Args:
        step_values: V(S_0..S_{T-1}), ``[B, S]``.
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.
        rewards: Outcome reward R per sequence, ``[B]``.
        step_ids: Step index of each token, ``[B, L]`` integer; -1 for padding.
        mask: ``[B, L]`` bool or 0/1 float; 1 = valid response token (EOS included).
        whiten: Whiten over the global batch's valid tokens (source: true).
        distributed: Passed to :func:`masked_whiten`.
        eps: Variance epsilon of the whitening.

    Returns:
        ``[B, L]`` token advantages (detached); 0 at masked positions.

    Raises:
        ValueError: On shape mismatches (names the argument), a valid token with
            ``step_ids == -1``, or a valid token whose step index is ``>= T`` of its sequence.
    """
    _check_step_inputs(step_values, num_steps, rewards)
    if tuple(mask.shape) != tuple(step_ids.shape):
        raise ValueError(
            f"`mask` has shape {tuple(mask.shape)} but must match `step_ids` of shape {tuple(step_ids.shape)}"
        )
    valid = mask != 0
    if bool((valid & (step_ids < 0)).any()):
        raise ValueError("`step_ids` is -1 at a valid token (`mask` = 1); every response token needs a step")
    if bool((valid & (step_ids >= num_steps.to(step_ids.device).unsqueeze(1))).any()):
        raise ValueError("`step_ids` holds a step index >= `num_steps` of its sequence at a valid token")
    step_adv = vineppo_step_advantages(step_values.detach(), num_steps, rewards.detach())
    token_adv = broadcast_step_values(step_adv, torch.where(valid, step_ids, torch.full_like(step_ids, -1)))
    if whiten:
        token_adv = masked_whiten(token_adv, mask, shift_mean=True, eps=eps, distributed=distributed)
    return token_adv
