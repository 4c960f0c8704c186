"""Group-relative sequence advantages: GRPO (arXiv 2402.03300) and RLOO (arXiv 2402.14740).

See docs/baselines.md.

* GRPO row: ``A_i = (R_i - mean_j R_j) / std_j R_j`` over the G samples of a prompt, broadcast to
  all tokens; PPO-clip + beta * KL(k3) in the loss.
* RLOO row: ``A_i = R_i - 1/(k-1) * sum_{j != i} R_j`` (the leave-one-out MC value of the
  initial state), REINFORCE/PPO-style.

Both return one advantage per sequence ``[B]``; broadcast it to tokens with
:func:`lit_reason.losses.common.broadcast_sequence_values` and train with
:func:`lit_reason.losses.ppo.ppo_policy_loss`. Groups are given by ``group_ids [B]`` (any integer
labels; samples of one prompt share a label; order and contiguity do not matter). Everything is
vectorised with ``index_add``; there is no Python loop over groups.
"""

from __future__ import annotations

import torch

__all__ = ["grpo_advantages", "rloo_advantages"]


def _group_stats(rewards: torch.Tensor, group_ids: torch.Tensor, name: str = "rewards"):
    if rewards.dim() != 1:
        raise ValueError(f"`{name}` must be [B], got shape {tuple(rewards.shape)}")
    if group_ids.dim() != 1 or group_ids.shape[0] != rewards.shape[0]:
        raise ValueError(f"`group_ids` must have shape ({rewards.shape[0]},), got {tuple(group_ids.shape)}")
    if group_ids.is_floating_point() or group_ids.dtype == torch.bool:
        raise ValueError(f"`group_ids` must be an integer tensor, got {group_ids.dtype}")
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    r = rewards.detach().to(dtype)
    labels, inverse = torch.unique(group_ids, return_inverse=True)
    num_groups = labels.shape[0]
    counts = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, inverse, torch.ones_like(r))
    sums = torch.zeros(num_groups, dtype=dtype, device=r.device).index_add_(0, inverse, r)
    return r, labels, inverse, counts, sums


def grpo_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    eps: float = 1e-6,
    scale: bool = True,
    unbiased: bool = True,
) -> torch.Tensor:
    """GRPO advantages ``(R_i - mean_g) / (std_g + eps)`` (docs/baselines.md).

    Library choice (the sources do not say which std): ``std_g`` is the **unbiased** (Bessel-corrected,
    ``n - 1`` denominator) sample standard deviation of the group's rewards, as in the common
    GRPO implementations that call ``torch.std``; ``unbiased=False`` gives the population std.
    ``eps`` is added to the std (not the variance), so a group whose rewards are all equal gets
    advantage 0. With ``scale=False`` only the group mean is subtracted (Dr. GRPO-style).
    A group of size 1 has no spread: its advantage is 0 (its mean is its own reward).

    Args:
        rewards: Outcome rewards, ``[B]``.
        group_ids: ``[B]`` integer group labels (samples of the same prompt share a label).
        eps: Added to the group std before dividing.
        scale: Divide by ``std_g + eps`` (true) or only centre (false).
        unbiased: Use the ``n - 1`` (true) or ``n`` (false) denominator for the std.

    Returns:
        ``[B]`` advantages (detached), dtype of ``rewards`` if floating else the default dtype.

    Raises:
        ValueError: If ``rewards`` is not 1-D or ``group_ids`` does not match it.
    """
    r, _, inverse, counts, sums = _group_stats(rewards, group_ids)
    means = sums / counts
    centred = r - means[inverse]
    if not scale:
        return centred
    sq = torch.zeros_like(counts).index_add_(0, inverse, centred**2)
    denom = (counts - 1.0) if unbiased else counts
    var = torch.where(counts > 1, sq / denom.clamp(min=1.0), torch.zeros_like(sq))
    std = var.sqrt()
    adv = centred / (std[inverse] + eps)
    return torch.where(counts[inverse] > 1, adv, torch.zeros_like(adv))


def rloo_advantages(rewards: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
    """RLOO advantages ``R_i - 1/(k-1) * sum_{j != i} R_j`` (docs/baselines.md).

    ``k`` is the size of sample ``i``'s group; groups may have different sizes.

    Args:
        rewards: Outcome rewards, ``[B]``.
        group_ids: ``[B]`` integer group labels (samples of the same prompt share a label).

    Returns:
        ``[B]`` advantages (detached), dtype of ``rewards`` if floating else the default dtype.

    Raises:
        ValueError: If shapes disagree, or a group has a single sample (RLOO needs k >= 2); the
            message names the offending group label(s).
    """
    r, labels, inverse, counts, sums = _group_stats(rewards, group_ids)
    singletons = counts < 2
    if bool(singletons.any()):
        bad = labels[singletons].tolist()
        raise ValueError(f"RLOO needs at least 2 samples per group (k >= 2); group_ids {bad} have 1")
    k = counts[inverse]
    baseline = (sums[inverse] - r) / (k - 1.0)
    return r - baseline
