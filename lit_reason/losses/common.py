"""Masked reductions, global-batch whitening and step-to-token broadcasting.

These are the building blocks every loss in :mod:`lit_reason.losses` uses. They follow the
normalisations of docs/index.md ("Notation": the *token mean* is the sum over all valid tokens
of the minibatch divided by their count) and of VinePPO (docs/vineppo.md: advantages are whitened
over all response tokens of the global batch with the unbiased variance).

Shape conventions: ``B`` = batch (sequences), ``L`` = response length (tokens), ``S`` = max steps.
A mask is a float or bool tensor ``[B, L]`` whose nonzero entries mark valid response tokens
(EOS included). Masked-out positions never leak into a result, even if they hold ``nan``/``inf``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "check_same_shape",
    "masked_sum",
    "masked_mean",
    "masked_whiten",
    "broadcast_step_values",
    "broadcast_sequence_values",
    "check_num_steps",
    "step_valid",
    "step_sums",
    "step_log_ratios",
]


def check_same_shape(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Raises ``ValueError`` naming the first argument whose shape differs from ``reference``.

    Args:
        reference_name: Name of the reference argument, used in the message.
        reference: The tensor whose shape the others must have.
        **others: Further tensors by argument name; ``None`` entries are skipped.

    Raises:
        ValueError: If any non-``None`` tensor in ``others`` has a different shape.
    """
    for name, tensor in others.items():
        if tensor is None:
            continue
        if tuple(tensor.shape) != tuple(reference.shape):
            raise ValueError(
                f"`{name}` has shape {tuple(tensor.shape)} but must match "
                f"`{reference_name}` of shape {tuple(reference.shape)}"
            )


def _weights(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The mask as a weight tensor of ``dtype`` (bool -> 0/1)."""
    return mask.to(dtype)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Sum of ``x * mask``; positions where ``mask == 0`` contribute exactly 0 (even nan/inf).

    Args:
        x: Values, e.g. ``[B, L]``.
        mask: Same shape as ``x``; bool or float (float entries act as weights, 1 = valid).
        dim: Dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        The masked sum: a scalar if ``dim`` is ``None``, else ``x`` reduced over ``dim``
        (e.g. ``[B]`` for ``dim=1``).

    Raises:
        ValueError: If ``mask`` does not have the shape of ``x``.
    """
    check_same_shape("x", x, mask=mask)
    w = _weights(mask, x.dtype if x.is_floating_point() else torch.get_default_dtype())
    x = x.to(w.dtype)
    terms = torch.where(w != 0, x, torch.zeros_like(x)) * w
    return terms.sum() if dim is None else terms.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """Mean of ``x`` over valid positions: ``sum(x * mask) / sum(mask)``.

    With ``dim=None`` this is the "token mean" of docs/index.md: the sum over all valid
    tokens of the minibatch divided by their count (not a mean of per-sequence means).
    A reduction with no valid position returns 0 rather than ``nan``.

    Args:
        x: Values, e.g. ``[B, L]``.
        mask: Same shape as ``x``; bool or float (1 = valid).
        dim: Dimension(s) to reduce; ``None`` reduces everything to a scalar.

    Returns:
        Scalar if ``dim`` is ``None``, else ``x`` reduced over ``dim`` (``[B]`` for ``dim=1``).

    Raises:
        ValueError: If ``mask`` does not have the shape of ``x``.
    """
    total = masked_sum(x, mask, dim=dim)
    w = _weights(mask, total.dtype)
    count = w.sum() if dim is None else w.sum(dim=dim)
    nonempty = count != 0
    safe_count = torch.where(nonempty, count, torch.ones_like(count))
    return torch.where(nonempty, total / safe_count, torch.zeros_like(total))


def _stats_dtype(x: torch.Tensor) -> torch.dtype:
    # float64 for the sufficient statistics where the backend supports it (not on MPS).
    return torch.float32 if x.device.type == "mps" else torch.float64


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    eps: float = 1e-8,
    distributed: bool = True,
) -> torch.Tensor:
    """Whitens ``x`` over all valid tokens of the global batch (docs/vineppo.md).

    ``whitened = (x - mean) / sqrt(var_unbiased + eps)`` where ``mean`` and
    ``var_unbiased = var * n / (n - 1)`` are taken over every valid token of the *global* batch.
    When ``torch.distributed`` is initialised and ``distributed`` is true, the count, the sum and
    the centred sum of squares are all-reduced across ranks (two small all-reduces: first
    ``[sum, count]``, then ``sum((x - mean)^2)``), so the result equals whitening the
    concatenation of every rank's batch. Every rank must call this function (collective).

    Library choices (documented, not from the sources):
        * The statistics are computed on ``x.detach()`` in float64 (float32 on MPS); they act as
          constants, so gradients (if any) flow only through the affine map. Advantages carry no
          gradient in practice.
        * With ``n <= 1`` valid tokens the unbiased variance is undefined; it is taken as 0, so a
          single valid token whitens to 0.
        * ``shift_mean=False`` adds the mean back after scaling: ``(x - mean) / std + mean``
          (the usual convention of RLHF libraries' ``whiten``).
        * Masked-out positions of the result are 0.

    Args:
        x: Values to whiten, ``[B, L]`` (any shape works).
        mask: Same shape as ``x``; bool or 0/1 float, nonzero = valid token.
        shift_mean: If false, the mean is restored after scaling (see above).
        eps: Added to the variance before the square root (source: 1e-8).
        distributed: Reduce the statistics across ranks when a process group is initialised.

    Returns:
        Whitened tensor, same shape and dtype as ``x``; 0 at masked positions.

    Raises:
        ValueError: If ``mask`` does not have the shape of ``x``.
    """
    check_same_shape("x", x, mask=mask)
    valid = mask != 0
    sdt = _stats_dtype(x)
    xd = torch.where(valid, x.detach(), torch.zeros_like(x)).to(sdt)
    use_dist = distributed and dist.is_available() and dist.is_initialized()

    first = torch.stack([xd.sum(), valid.sum().to(sdt)])
    if use_dist:
        dist.all_reduce(first, op=dist.ReduceOp.SUM)
    total, count = first[0], first[1]
    mean = total / count.clamp(min=1.0)

    centred_sq = torch.where(valid, (xd - mean) ** 2, torch.zeros_like(xd)).sum().reshape(1)
    if use_dist:
        dist.all_reduce(centred_sq, op=dist.ReduceOp.SUM)
    var_unbiased = torch.where(count > 1, centred_sq[0] / (count - 1).clamp(min=1.0), torch.zeros_like(count))

    rstd = torch.rsqrt(var_unbiased + eps)
    whitened = (x - mean.to(x.dtype)) * rstd.to(x.dtype)
    if not shift_mean:
        whitened = whitened + mean.to(x.dtype)
    return torch.where(valid, whitened, torch.zeros_like(whitened))


def broadcast_step_values(step_values: torch.Tensor, step_ids: torch.Tensor) -> torch.Tensor:
    """Gives every token the value of the step it belongs to (docs/vineppo.md, docs/index.md, steps).

    ``out[b, t] = step_values[b, step_ids[b, t]]``, and 0 where ``step_ids[b, t] == -1``
    (padding / tokens outside every step). The step splitter decides membership (a token belongs
    to the step containing its first character; EOS belongs to the last step).

    Args:
        step_values: Per-step values, ``[B, S]``.
        step_ids: Step index of each token, ``[B, L]`` integer, in ``[-1, S)``; -1 for padding.

    Returns:
        Per-token values, ``[B, L]``, dtype of ``step_values``; 0 where ``step_ids == -1``.

    Raises:
        ValueError: On non-2-D inputs, a batch-size mismatch, a non-integer ``step_ids``, or an
            index outside ``[-1, S)``.
    """
    if step_values.dim() != 2:
        raise ValueError(f"`step_values` must be [B, S], got shape {tuple(step_values.shape)}")
    if step_ids.dim() != 2:
        raise ValueError(f"`step_ids` must be [B, L], got shape {tuple(step_ids.shape)}")
    if step_ids.shape[0] != step_values.shape[0]:
        raise ValueError(
            f"`step_ids` has batch size {step_ids.shape[0]} but `step_values` has {step_values.shape[0]}"
        )
    if step_ids.is_floating_point() or step_ids.dtype == torch.bool:
        raise ValueError(f"`step_ids` must be an integer tensor, got {step_ids.dtype}")
    num_steps = step_values.shape[1]
    if step_ids.numel() and (bool((step_ids < -1).any()) or bool((step_ids >= num_steps).any())):
        raise ValueError(f"`step_ids` entries must lie in [-1, {num_steps}) (S = step_values.shape[1])")
    pad = step_ids < 0
    if num_steps == 0:
        return step_values.new_zeros(step_ids.shape)
    gathered = torch.gather(step_values, 1, step_ids.clamp(min=0).long())
    return torch.where(pad, torch.zeros_like(gathered), gathered)


def broadcast_sequence_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Broadcasts one value per sequence to all its valid tokens (GRPO/RLOO advantages).

    Args:
        values: Per-sequence values, ``[B]``.
        mask: ``[B, L]`` bool or float, nonzero = valid token.

    Returns:
        ``[B, L]`` tensor with ``values[b]`` at valid tokens of row ``b`` and 0 elsewhere.

    Raises:
        ValueError: If ``values`` is not ``[B]`` for the mask's ``B``.
    """
    if mask.dim() != 2:
        raise ValueError(f"`mask` must be [B, L], got shape {tuple(mask.shape)}")
    if values.dim() != 1 or values.shape[0] != mask.shape[0]:
        raise ValueError(f"`values` must have shape ({mask.shape[0]},), got {tuple(values.shape)}")
    expanded = values.unsqueeze(1).expand(mask.shape)
    return torch.where(mask != 0, expanded, torch.zeros_like(expanded))


# ----------------------------------------------------------------------------- step-level helpers


def check_num_steps(num_steps: torch.Tensor, batch: int, max_steps: int) -> None:
    """Validates ``num_steps``: an integer ``[B]`` tensor with entries in ``[1, S]``.

    Raises:
        ValueError: Naming ``num_steps`` and what is wrong with it.
    """
    if num_steps.dim() != 1 or num_steps.shape[0] != batch:
        raise ValueError(f"`num_steps` must have shape ({batch},), got {tuple(num_steps.shape)}")
    if num_steps.is_floating_point() or num_steps.dtype == torch.bool:
        raise ValueError(f"`num_steps` must be an integer tensor, got {num_steps.dtype}")
    if batch and (bool((num_steps < 1).any()) or bool((num_steps > max_steps).any())):
        raise ValueError(f"`num_steps` entries must lie in [1, S={max_steps}], got {num_steps.tolist()}")


def step_valid(num_steps: torch.Tensor, max_steps: int, device: torch.device | None = None) -> torch.Tensor:
    """``[B, S]`` bool, true at ``k < num_steps[b]``."""
    device = num_steps.device if device is None else device
    return torch.arange(max_steps, device=device).unsqueeze(0) < num_steps.to(device).unsqueeze(1)


def step_sums(x: torch.Tensor, step_ids: torch.Tensor, keep: torch.Tensor, max_steps: int) -> torch.Tensor:
    """Per-step sums of a per-token tensor: ``out[b, k] = sum_{t: keep[b,t], step_ids[b,t]==k} x[b, t]``.

    One vectorised ``scatter_add``; tokens that are not kept go to a spare column that is cut
    off, so their values (even ``nan``/``inf``) never leak.

    Args:
        x: Per-token values ``[B, L]`` (gradients flow).
        step_ids: Step index of each token ``[B, L]``, in ``[0, S)`` wherever ``keep``.
        keep: ``[B, L]`` bool, the tokens that count.
        max_steps: ``S``.

    Returns:
        ``[B, S]`` in the dtype of ``x``.
    """
    index = torch.where(keep, step_ids.long(), torch.full_like(step_ids, max_steps, dtype=torch.long))
    kept = torch.where(keep, x, torch.zeros_like(x))
    return x.new_zeros(x.shape[0], max_steps + 1).scatter_add(1, index, kept)[:, :max_steps]


def step_log_ratios(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    step_ids: torch.Tensor,
    num_steps: torch.Tensor,
    max_steps: int | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed log-ratio of each step, ``L_k = sum_{t in step k} (logp_t - logp_ref_t)``.

    The step-level quantity of OREO's step variant (docs/oreo.md) and of DVO (docs/dvo.md): the
    log-ratio is **summed** over the step's tokens. Which tokens count is decided by ``step_ids``:
    ``-1`` (padding) and steps ``>= num_steps[b]`` (e.g. steps dropped because they did not fit
    the maximum length) contribute nothing. With ``mask`` every valid token must belong to a step
    ``< num_steps`` (an error otherwise), and masked tokens are excluded too.

    Args:
        logprobs: log pi_theta(a_t | s_t), ``[B, L]`` (gradients flow).
        ref_logprobs: log pi_ref(a_t | s_t), ``[B, L]``; treated as constants (detached).
        step_ids: Step index of each token, ``[B, L]`` integer in ``[-1, S)``; -1 for padding.
        num_steps: T per sequence, ``[B]`` integer in ``[1, S]``.
        max_steps: ``S``, the padded number of steps; defaults to ``num_steps.max()``.
        mask: Optional ``[B, L]`` bool or 0/1 float of the valid response tokens.

    Returns:
        ``[B, S]`` in the dtype of ``logprobs`` (float); 0 at ``k >= num_steps[b]``.

    Raises:
        ValueError: On shape mismatches (names the argument), a non-integer ``step_ids`` or
            ``num_steps``, a ``step_ids`` entry outside ``[-1, S)``, ``num_steps`` outside
            ``[1, S]``, or (with ``mask``) a valid token outside every step.
    """
    if logprobs.dim() != 2:
        raise ValueError(f"`logprobs` must be [B, L], got shape {tuple(logprobs.shape)}")
    check_same_shape("logprobs", logprobs, ref_logprobs=ref_logprobs, step_ids=step_ids, mask=mask)
    if step_ids.is_floating_point() or step_ids.dtype == torch.bool:
        raise ValueError(f"`step_ids` must be an integer tensor, got {step_ids.dtype}")
    if max_steps is None:
        max_steps = int(num_steps.max()) if num_steps.numel() else 1
    max_steps = int(max_steps)
    if max_steps < 1:
        raise ValueError(f"`max_steps` must be >= 1, got {max_steps}")
    check_num_steps(num_steps, logprobs.shape[0], max_steps)
    if step_ids.numel() and (bool((step_ids < -1).any()) or bool((step_ids >= max_steps).any())):
        raise ValueError(f"`step_ids` entries must lie in [-1, {max_steps}) (max_steps = {max_steps})")
    keep = (step_ids >= 0) & (step_ids < num_steps.to(step_ids.device).unsqueeze(1))
    if mask is not None:
        valid = mask != 0
        bad = valid & ~keep
        if bool(bad.any()):
            rows = torch.nonzero(bad.any(dim=1)).flatten().tolist()
            raise ValueError(f"`step_ids` of valid tokens must lie in [0, num_steps); rows {rows} do not")
        keep = keep & valid
    dtype = logprobs.dtype if logprobs.is_floating_point() else torch.get_default_dtype()
    ratio = logprobs.to(dtype) - ref_logprobs.detach().to(dtype)
    return step_sums(ratio, step_ids, keep, max_steps)

