"""DVO: step-level log-ratio regression onto externally estimated value differences.

DVO (arXiv 2502.13723; docs/dvo.md)::

    L_k      = sum_{tokens t in step k} ( log pi_theta(a_t|s_t) - log pi_ref(a_t|s_t) )   # SUM
    target_k = r_k + V(S_{k+1}) - V(S_k)                  # from MCTS Q values (or a value model)
    L_DVO    = mean_b [ (1/T_b) * sum_{k < T_b} ( beta * L_k - target_k )^2 ],   beta = 0.1

The justification is the KL-regularised optimality identity
``beta * log pi*/pi_ref(a|s) = Q*(s,a) - V*(s) = r + V*(s') - V*(s)`` (docs/dvo.md). There is no explicit KL term, no stop-gradient on
the policy side and no pairing; the targets are constants. The normalisation is the per-sequence
mean over steps, then the batch mean (docs/index.md, notation).

Step indexing used throughout this module (0-based): a sequence ``b`` has ``T = num_steps[b]``
steps ``sigma_0 .. sigma_{T-1}``; **step k leads from node k to node k+1**, where node 0 is the
root (the question, state ``S_0``) and node ``T`` is the terminal node. The authors' code writes the same
target 1-based as ``q_credit_k = Q(node_k) - Q(node_{k-1})`` for ``k = 1..T``.

Shapes: ``B`` = batch (sequences), ``L`` = response length (tokens, right-padded), ``S`` = max
steps. ``num_steps[b] = T_b`` with ``1 <= T_b <= S``; step entries at ``k >= T_b`` are padding,
ignored on input (even ``nan``) and 0 on output.
"""

from __future__ import annotations

import torch

from lit_reason.losses.common import check_num_steps, masked_mean, step_log_ratios, step_valid

__all__ = ["step_logratios", "dvo_loss", "targets_from_q", "targets_from_values"]


def _float_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.get_default_dtype()


def step_logratios(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: torch.Tensor,
    max_steps: int,
) -> torch.Tensor:
    """Summed per-step log-ratios ``L_k`` (docs/dvo.md).

    ``L[b, k] = sum_{t : step_ids[b, t] == k} (logprobs[b, t] - ref_logprobs[b, t])`` for
    ``k < num_steps[b]``, and 0 for ``k >= num_steps[b]``. The log-ratio is **summed** over the
    step's tokens (not averaged), as the DVO code does. Computed with one vectorised
    ``scatter_add`` (no Python loop over tokens or steps).

    Which tokens count is decided by ``step_ids`` alone: tokens with ``step_ids == -1``
    (padding, or anything the caller wants excluded) contribute nothing, and neither do tokens
    whose step index is ``>= num_steps[b]`` (e.g. steps dropped because they did not fit in the
    maximum length; docs/dvo.md drops those steps together with their targets). Values at
    excluded positions never leak, even if they are ``nan``/``inf``. The step splitter assigns
    each token to the step containing its first character, EOS to the last step (docs/index.md, steps);
    with DVO's ``"\\n\\n"`` delimiter the delimiter tokens stay in the sum (docs/dvo.md,
    "Ambiguities": ``step_delim: []``).

    Args:
        logprobs: log pi_theta(a_t | s_t) of the response tokens, ``[B, L]`` (requires grad).
        ref_logprobs: log pi_ref(a_t | s_t), ``[B, L]``; treated as constants (detached).
        step_ids: Step index of each token, ``[B, L]`` integer in ``[-1, max_steps)``;
            -1 for padding.
        num_steps: T per sequence, ``[B]`` integer in ``[1, max_steps]``.
        max_steps: S, the padded number of steps of the output.

    Returns:
        ``[B, S]`` tensor of summed step log-ratios in the dtype of ``logprobs`` (float);
        differentiable with respect to ``logprobs``; 0 at ``k >= num_steps[b]``.

    Raises:
        ValueError: On shape mismatches (names the argument), a non-integer ``step_ids`` or
            ``num_steps``, a ``step_ids`` entry outside ``[-1, max_steps)``, or ``num_steps``
            outside ``[1, max_steps]``.
    """
    return step_log_ratios(logprobs, ref_logprobs, step_ids, num_steps, max_steps)


def dvo_loss(
    step_logratios: torch.Tensor,
    step_targets: torch.Tensor,
    num_steps: torch.Tensor,
    beta: float = 0.1,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DVO step-level MSE (docs/dvo.md; docs/index.md, notation).

    ::

        L_DVO = mean_b [ (1/T_b) * sum_{k < T_b} ( beta * L[b, k] - target[b, k] )^2 ]

    A plain squared error as in the official trainer (``loss_type='mse'``); the paper's extra
    factor 1/2 is not applied (it only rescales the gradient). Each sequence first averages over
    its own ``T_b`` steps, then the sequences are averaged, so a long path weighs as much as a
    short one. The targets are constants (detached): the gradient flows only through
    ``step_logratios``.

    Args:
        step_logratios: Summed step log-ratios ``L_k``, ``[B, S]`` (from :func:`step_logratios`;
            requires grad). Entries at ``k >= T_b`` are ignored.
        step_targets: ``target_k`` per step, ``[B, S]`` (from :func:`targets_from_q` or
            :func:`targets_from_values`). Entries at ``k >= T_b`` are ignored.
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.
        beta: KL coefficient beta (source: 0.1).

    Returns:
        ``(loss, metrics)``: scalar loss; detached scalar metrics ``mse`` (the loss),
        ``implicit_value_mean`` (mean of ``beta * L_k`` over all valid steps of the batch) and
        ``target_mean`` (mean of ``target_k`` over all valid steps of the batch).

    Raises:
        ValueError: On shape mismatches (names the argument) or ``num_steps`` out of range.
    """
    if step_logratios.dim() != 2:
        raise ValueError(f"`step_logratios` must be [B, S], got shape {tuple(step_logratios.shape)}")
    if tuple(step_targets.shape) != tuple(step_logratios.shape):
        raise ValueError(
            f"`step_targets` has shape {tuple(step_targets.shape)} but must match `step_logratios` "
            f"of shape {tuple(step_logratios.shape)}"
        )
    batch, max_steps = step_logratios.shape
    check_num_steps(num_steps, batch, max_steps)

    valid = step_valid(num_steps, max_steps, step_logratios.device)
    dtype = _float_dtype(step_logratios)
    zeros = torch.zeros((batch, max_steps), dtype=dtype, device=step_logratios.device)
    implicit = torch.where(valid, beta * step_logratios.to(dtype), zeros)
    target = torch.where(valid, step_targets.detach().to(dtype), zeros)
    per_sequence = masked_mean((implicit - target) ** 2, valid, dim=1)  # [B], mean over T_b steps
    loss = per_sequence.mean()

    with torch.no_grad():
        metrics = {
            "mse": loss.detach(),
            "implicit_value_mean": masked_mean(implicit.detach(), valid),
            "target_mean": masked_mean(target, valid),
        }
    return loss, metrics


def targets_from_q(q_path: torch.Tensor, num_steps: torch.Tensor) -> torch.Tensor:
    """Per-step MCTS credit ``target_k = Q(node_{k+1}) - Q(node_k)`` (docs/dvo.md).

    ``q_path[b, j]`` is the MCTS value Q = W/N of the ``j``-th node on sequence ``b``'s
    root-to-leaf path: ``j = 0`` is the root (the question), ``j = T_b`` the terminal node, whose
    Q is its outcome reward (+-1 with DVO's rewards; a terminal node's Q is exactly the reward
    backed up to it). Step ``k`` (0-based) leads from node ``k`` to node ``k + 1``, so::

        target[b, k] = q_path[b, k + 1] - q_path[b, k]        for k < T_b,   0 otherwise

    which is the authors' 1-based ``q_credit_k = Q(node_k) - Q(node_{k-1})``. The targets telescope:
    ``sum_k target[b, k] = Q(node_T) - Q(root) = R - Q(root)``. Entries ``q_path[b, j]`` with
    ``j > T_b`` are ignored (even ``nan``). Intermediate rewards r_k are 0 (only terminal
    rewards are backed up), so they do not appear.

    Args:
        q_path: Q along each path, ``[B, S + 1]`` (node 0 = root .. node T = terminal).
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.

    Returns:
        ``[B, S]`` targets (detached, float); 0 at ``k >= T_b``.

    Raises:
        ValueError: If ``q_path`` is not ``[B, S + 1]`` with ``S >= 1``, or on a bad
            ``num_steps``.
    """
    if q_path.dim() != 2 or q_path.shape[1] < 2:
        raise ValueError(f"`q_path` must be [B, S + 1] with S >= 1, got shape {tuple(q_path.shape)}")
    batch, max_steps = q_path.shape[0], q_path.shape[1] - 1
    check_num_steps(num_steps, batch, max_steps)
    dtype = _float_dtype(q_path)
    q = q_path.detach().to(dtype)
    valid = step_valid(num_steps, max_steps, q.device)
    diff = q[:, 1:] - q[:, :-1]
    return torch.where(valid, diff, torch.zeros_like(diff))


def targets_from_values(step_values: torch.Tensor, rewards: torch.Tensor, num_steps: torch.Tensor) -> torch.Tensor:
    """Targets ``V(S_{k+1}) - V(S_k)`` from state values (docs/dvo.md).

    The alternative target sources of DVO: an *outcome value model* (a V network trained by MSE
    on outcomes; docs/dvo.md) or Monte-Carlo rollouts (docs/vineppo.md) supply
    ``V(S_k)`` for the non-terminal states ``S_0 .. S_{T-1}``. As in DVO's tree, the terminal
    state carries the outcome itself: **V(S_T) = R** (DVO's terminal node has Q = R), and the
    intermediate rewards are 0, so::

        target[b, k] = V(S_{k+1}) - V(S_k)   for k < T_b - 1
        target[b, T_b - 1] = R_b - V(S_{T_b - 1})

    and ``sum_k target[b, k] = R_b - V(S_0)``. This is numerically the same as VinePPO's
    ``r_k + V(S_{k+1}) - V(S_k)`` with ``V(S_T) = 0`` and ``r_{T-1} = R`` (docs/vineppo.md);
    only the bookkeeping of the terminal reward differs.

    Args:
        step_values: ``V(S_0) .. V(S_{T-1})`` per sequence, ``[B, S]``; entries at ``k >= T_b``
            are ignored.
        rewards: Outcome reward R per sequence, ``[B]`` (+-1 or {0, 1}, docs/index.md, rewards).
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.

    Returns:
        ``[B, S]`` targets (detached, float); 0 at ``k >= T_b``.

    Raises:
        ValueError: On shape mismatches (names the argument) or a bad ``num_steps``.
    """
    if step_values.dim() != 2:
        raise ValueError(f"`step_values` must be [B, S], got shape {tuple(step_values.shape)}")
    batch, max_steps = step_values.shape
    if rewards.dim() != 1 or rewards.shape[0] != batch:
        raise ValueError(f"`rewards` must have shape ({batch},), got {tuple(rewards.shape)}")
    check_num_steps(num_steps, batch, max_steps)
    dtype = _float_dtype(step_values)
    device = step_values.device
    v = step_values.detach().to(dtype)
    # Extended path [B, S + 1]: V(S_k) for k < T, R at k = T (the terminal node), 0 after.
    j = torch.arange(max_steps + 1, device=device).unsqueeze(0)
    t = num_steps.to(device).unsqueeze(1)
    v_ext = torch.cat([v, v.new_zeros(batch, 1)], dim=1)
    v_ext = torch.where(j < t, v_ext, torch.zeros_like(v_ext))
    v_ext = torch.where(j == t, rewards.detach().to(device=device, dtype=dtype).unsqueeze(1), v_ext)
    return targets_from_q(v_ext, num_steps)
