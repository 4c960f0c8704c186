"""Step-level value calibration: predicted values against Monte Carlo and outcome ground truth.

Every method in the library predicts the value of a reasoning prefix (a critic, a value head, a
soft Q, an implicit value, a global value model). To compare them we score, on a fixed probe set
of states taken at step boundaries, the predicted value against

* ``mc``: a Monte Carlo estimate of the state's value (mean reward of fresh rollouts from the
  state), in ``[0, 1]``;
* ``outcome``: the 0/1 final outcome of the trajectory the state came from.

Design rules, and why:

* **Global sufficient statistics, never averages of per-batch metrics.** :class:`CalibrationStats`
  and :class:`RankStats` keep only sums (counts, sums of errors, per-bin sums, ...). Every metric
  is a ratio of those sums computed once in ``compute()``, so the result over many ``update()``
  calls, over accumulators combined with ``merge()``, or over DDP ranks reduced with
  ``all_reduce()`` equals the metric on the concatenated data (up to float64 summation order).
  Averaging per-micro-batch ECEs or explained variances would be biased: both are non-linear in
  the data. (Why not torchmetrics, whose ``Metric`` syncs sum states the same way: it is not a
  dependency, and these few float64 sums need one ``all_reduce`` plus an offline ``merge()`` of
  accumulators built in separate processes, which its state sync does not cover.)
* **One probability scale.** Predictions may live on another scale (rewards in ``{-1, +1}``,
  unbounded implicit values). An affine ``pred_to_prob = (scale, shift)`` maps them to
  ``p = clamp(scale * pred + shift, 0, 1)`` and *every* calibration metric (MAE, ECE, Brier,
  explained variance, the reliability table) is computed on ``p``. Clipping is needed because ECE
  and Brier are defined for probabilities and the targets lie in ``[0, 1]``; its consequence is
  that a prediction beyond the range is scored as if it sat on the boundary, so errors of
  out-of-range predictions are under-reported, never over-reported. :meth:`CalibrationStats.clip_fraction`
  says how often that happened. Pick the map so that the method's nominal range lands on
  ``[0, 1]`` (``"signed"`` = ``(0.5, 0.5)`` for values in ``[-1, 1]``).
* **No silent NaN.** Non-finite inputs raise :class:`ValueError`; so does ``compute()`` with no
  data, so callers can log a documented skip instead of a NaN curve.
* **Pairwise ranking is vectorised** (no Python loop over groups) and counted globally: the
  accuracy is ``correct pairs / all pairs``, not a mean of per-group fractions.

Statistics are accumulated on CPU in float64: this is a probe-set metric (not a hot path), the one
device sync per ``update()`` is cheap there, float64 keeps sums over millions of states accurate,
and some accelerators (MPS) have no float64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "PRED_TO_PROB_PRESETS",
    "CalibrationStats",
    "RankStats",
    "pairwise_outcome_accuracy",
    "rank_accuracy",
]

#: Named affine maps ``(scale, shift)``: ``p = clamp(scale * pred + shift, 0, 1)``.
PRED_TO_PROB_PRESETS: dict[str, tuple[float, float]] = {
    "identity": (1.0, 0.0),  # values already in [0, 1] (success probabilities, MC-trained critics)
    "signed": (0.5, 0.5),  # values in [-1, 1] (rewards in {-1, +1})
}

# MC estimates are means of rewards in [0, 1]; allow float32 rounding just outside, then clamp.
_RANGE_TOL = 1e-6
# Var(mc) at or below this counts as zero. The variance comes from sums (E[x^2] - E[x]^2), so a
# constant target gives ~1e-17 rather than exactly 0; dividing by that would turn the explained
# variance into a huge meaningless negative number. MC targets are in [0, 1] (variance <= 0.25),
# so an absolute threshold is appropriate.
_VAR_EPS = 1e-12
# Upper bound on the number of elements of a [G, n, n] pairwise block in rank_accuracy; groups are
# processed in chunks of this size only to bound memory, never one group at a time.
_PAIR_BLOCK = 1 << 22


# ----------------------------------------------------------------------------------------------
# input helpers
# ----------------------------------------------------------------------------------------------


def _to_f64(x: Any, name: str) -> Tensor:
    """Detached CPU float64 copy of ``x`` (tensor, array or sequence)."""
    t = torch.as_tensor(x)
    if t.is_complex():
        raise ValueError(f"{name} must be real-valued, got dtype {t.dtype}")
    return t.detach().to(device="cpu", dtype=torch.float64)


def _check_shape(name: str, t: Tensor, ref_name: str, ref: Tensor) -> None:
    if t.shape != ref.shape:
        raise ValueError(
            f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}; "
            "they must match element for element"
        )


def _check_finite(name: str, t: Tensor, where: Tensor | None = None) -> None:
    bad = ~torch.isfinite(t)
    if where is not None:
        bad &= where
    n_bad = int(bad.sum())
    if n_bad:
        raise ValueError(
            f"{name} contains {n_bad} non-finite value(s) (NaN/inf); refusing to produce a "
            "silent NaN metric -- fix or filter these states upstream"
        )


def _check_binary(name: str, t: Tensor) -> None:
    n_bad = int(((t != 0) & (t != 1)).sum())
    if n_bad:
        raise ValueError(f"{name} must hold only 0/1 values; {n_bad} element(s) do not")


def _check_unit_range(name: str, t: Tensor) -> Tensor:
    n_bad = int(((t < -_RANGE_TOL) | (t > 1 + _RANGE_TOL)).sum())
    if n_bad:
        raise ValueError(
            f"{name} must lie in [0, 1] (Monte Carlo mean rewards); {n_bad} element(s) do not"
        )
    return t.clamp(0.0, 1.0)


def _to_index(x: Any, name: str) -> Tensor:
    """CPU int64 copy of an integer-valued tensor (integral floats are accepted)."""
    t = torch.as_tensor(x).detach().to("cpu")
    if t.is_floating_point():
        _check_finite(name, t)
        if bool((t != t.round()).any()):
            raise ValueError(f"{name} must be integer-valued")
    elif t.is_complex():
        raise ValueError(f"{name} must be integer-valued, got dtype {t.dtype}")
    return t.to(torch.int64)


def _resolve_map(pred_to_prob: tuple[float, float] | str | None) -> tuple[float, float]:
    if pred_to_prob is None:
        return PRED_TO_PROB_PRESETS["identity"]
    if isinstance(pred_to_prob, str):
        try:
            return PRED_TO_PROB_PRESETS[pred_to_prob]
        except KeyError:
            raise ValueError(
                f"unknown pred_to_prob preset {pred_to_prob!r}; choose one of "
                f"{sorted(PRED_TO_PROB_PRESETS)} or pass (scale, shift)"
            ) from None
    if len(pred_to_prob) != 2:
        raise ValueError(f"pred_to_prob must be (scale, shift), got {pred_to_prob!r}")
    scale, shift = float(pred_to_prob[0]), float(pred_to_prob[1])
    if not (math.isfinite(scale) and math.isfinite(shift)) or scale == 0.0:
        raise ValueError(
            f"pred_to_prob needs a finite non-zero scale and a finite shift, got {pred_to_prob!r}"
        )
    return scale, shift


# ----------------------------------------------------------------------------------------------
# pairwise kernels
# ----------------------------------------------------------------------------------------------


def _rank_counts(pred: Any, truth: Any, mask: Any | None) -> tuple[float, int]:
    """Correct-pair credit and pair count for :func:`rank_accuracy` (see there)."""
    p = _to_f64(pred, "pred")
    t = _to_f64(truth, "truth")
    if p.dim() != 2:
        raise ValueError(f"pred must have shape [G, n] (groups x alternatives), got {tuple(p.shape)}")
    _check_shape("truth", t, "pred", p)
    if mask is None:
        m = torch.ones(p.shape, dtype=torch.bool)
    else:
        m_raw = torch.as_tensor(mask).detach().to("cpu")
        _check_shape("mask", m_raw, "pred", p)
        if m_raw.dtype != torch.bool:
            _check_binary("mask", m_raw)
        m = m_raw.to(torch.bool)
    # Padded (masked-out) slots may hold anything, NaN included; only real entries must be finite.
    _check_finite("pred", p, m)
    _check_finite("truth", t, m)
    p = torch.where(m, p, 0.0)
    t = torch.where(m, t, 0.0)

    g, n = p.shape
    if g == 0 or n < 2:
        return 0.0, 0
    upper = torch.ones(n, n, dtype=torch.bool).triu(1)  # each unordered pair i < j once
    correct = 0.0
    pairs = 0
    chunk = max(1, _PAIR_BLOCK // (n * n))
    for lo in range(0, g, chunk):  # chunks of groups only bound memory; groups are vectorised
        pc, tc, mc = p[lo : lo + chunk], t[lo : lo + chunk], m[lo : lo + chunk]
        dp = pc[:, :, None] - pc[:, None, :]  # [g, n, n]
        dt = tc[:, :, None] - tc[:, None, :]
        valid = upper & mc[:, :, None] & mc[:, None, :] & (dt != 0)
        # Compare signs, not the product dt * dp: the product of two tiny differences can
        # underflow to 0 and would be miscounted as a tie.
        agree = (torch.sign(dp) == torch.sign(dt)) & valid
        tie = (dp == 0) & valid
        correct += float(agree.sum()) + 0.5 * float(tie.sum())
        pairs += int(valid.sum())
    return correct, pairs


def _grouped_outcomes(values: Any, outcomes: Any, group_ids: Any) -> tuple[Tensor, Tensor, Tensor]:
    """Checked flat ``[N]`` values (float64), 0/1 outcomes (float64) and integer group ids."""
    v = _to_f64(values, "values")
    y = _to_f64(outcomes, "outcomes")
    gid = _to_index(group_ids, "group_ids")
    _check_shape("outcomes", y, "values", v)
    _check_shape("group_ids", gid, "values", v)
    _check_finite("values", v)
    _check_binary("outcomes", y)
    return v.reshape(-1), y.reshape(-1), gid.reshape(-1)


def _pairwise_outcome_counts(values: Any, outcomes: Any, group_ids: Any) -> tuple[float, int]:
    """Correct-pair credit and pair count for :func:`pairwise_outcome_accuracy` (see there).

    Per group this is the Mann-Whitney U statistic computed from mid-ranks: with the group's
    values ranked 1..m (tied values share their mean rank), ``U = R_pos - n_pos (n_pos + 1) / 2``
    where ``R_pos`` is the rank sum of the correct trajectories. U counts, over all
    (correct, incorrect) pairs, 1 when the correct one has the higher value and 0.5 on a tie.
    Computing it from one lexicographic sort is O(N log N) and fully vectorised, where the
    explicit pair matrix would be O(N^2) memory across all prompts.
    """
    v, y, gid = _grouped_outcomes(values, outcomes, group_ids)
    n = v.numel()
    if n == 0:
        return 0.0, 0

    # Lexicographic sort by (group, value): stable sort by the minor key, then by the major key.
    order = torch.sort(v, stable=True).indices
    order = order[torch.sort(gid[order], stable=True).indices]
    v, y, gid = v[order], y[order], gid[order]

    pos = torch.arange(n)
    new_group = torch.ones(n, dtype=torch.bool)
    new_group[1:] = gid[1:] != gid[:-1]
    new_run = new_group.clone()  # a run = maximal block of equal values inside one group
    new_run[1:] |= v[1:] != v[:-1]
    group_idx = torch.cumsum(new_group, 0) - 1
    run_idx = torch.cumsum(new_run, 0) - 1
    group_start = pos[new_group][group_idx]
    run_start = pos[new_run][run_idx]
    run_len = torch.bincount(run_idx)[run_idx]
    # 1-based rank inside the group, averaged over ties.
    midrank = (run_start - group_start).to(torch.float64) + (run_len.to(torch.float64) + 1.0) / 2.0

    n_groups = int(group_idx[-1]) + 1
    n_tot = torch.bincount(group_idx, minlength=n_groups).to(torch.float64)
    n_pos = torch.bincount(group_idx, weights=y, minlength=n_groups)
    rank_sum_pos = torch.bincount(group_idx, weights=midrank * y, minlength=n_groups)
    u = rank_sum_pos - n_pos * (n_pos + 1.0) / 2.0
    return float(u.sum()), int((n_pos * (n_tot - n_pos)).sum())


def rank_accuracy(pred: Any, truth: Any, mask: Any | None = None) -> tuple[float, int]:
    """Pairwise ranking accuracy of predicted values within groups of alternatives.

    Each row is one state with ``n`` sampled alternative next steps. Over every pair ``i < j`` of
    real (unmasked) entries of the same row whose true values differ, a pair is correct when the
    prediction orders it like the truth, ``(truth_i - truth_j) * (pred_i - pred_j) > 0``. A tie in
    ``pred`` (exact float equality, after conversion to float64) earns 0.5, the expected credit of
    a random tie-break, so constant predictions score chance (0.5) rather than 0. Pairs tied in
    ``truth`` (exact equality; MC estimates are ratios ``k / m`` so equality is meaningful) carry
    no ordering information and are excluded.

    The accuracy is global: ``sum of credit / number of pairs`` over all rows, not a mean of
    per-row fractions (which would over-weight rows with few informative pairs).

    Args:
        pred: ``[G, n]`` predicted values, any scale (only their order matters).
        truth: ``[G, n]`` ground-truth values (e.g. MC estimates of each alternative).
        mask: optional ``[G, n]`` bool (or 0/1) marking real entries; padded entries may hold
            anything, including NaN.

    Returns:
        ``(accuracy, num_pairs)``. With ``num_pairs == 0`` the accuracy is ``nan``: there is
        nothing to score, and callers must check ``num_pairs`` before logging (a fabricated 0.5
        would look like a real chance-level result).

    Raises:
        ValueError: on a shape mismatch (naming the argument), a non-2-D ``pred``, a non-finite
            unmasked entry, or a mask that is not boolean / 0-1.
    """
    correct, pairs = _rank_counts(pred, truth, mask)
    return (correct / pairs if pairs else float("nan")), pairs


def pairwise_outcome_accuracy(values: Any, outcomes: Any, group_ids: Any) -> tuple[float, int]:
    """DVPO's global-value-model metric: do correct trajectories get higher values?

    Among all pairs of trajectories sampled for the same prompt (same ``group_ids`` entry) where
    one is correct and the other incorrect, the fraction in which the correct one has the higher
    value; ties count 0.5. Global over all such pairs (not a mean of per-prompt fractions).
    Prompts whose trajectories are all correct or all incorrect contribute no pair. Vectorised in
    O(N log N) (see :func:`_pairwise_outcome_counts`); group ids need not be contiguous or sorted.

    Args:
        values: ``[N]`` predicted values of the trajectories (any scale).
        outcomes: ``[N]`` 0/1 (or bool) correctness of each trajectory.
        group_ids: ``[N]`` integer prompt id of each trajectory.

    Returns:
        ``(accuracy, num_pairs)``; accuracy is ``nan`` when ``num_pairs == 0`` (check it before
        logging, as for :func:`rank_accuracy`).

    Raises:
        ValueError: on a shape mismatch (naming the argument), non-finite values, non-0/1
            outcomes or non-integer group ids.
    """
    correct, pairs = _pairwise_outcome_counts(values, outcomes, group_ids)
    return (correct / pairs if pairs else float("nan")), pairs


def best_of_k_accuracy(values: Any, outcomes: Any, group_ids: Any) -> tuple[float, int]:
    """Selection accuracy: pick each prompt's highest-valued trajectory; how often is it correct?

    What a value model contributes to search and reranking: the accuracy of best-of-K selection
    among the K trajectories sampled for each prompt (same ``group_ids`` entry). Ties go to the
    earliest trajectory of the group (input order), as in beam search. Compare it with the mean
    outcome (random selection) and the fraction of prompts with any correct trajectory (pass@K,
    a perfect selector).

    Args:
        values: ``[N]`` predicted values of the trajectories (any scale).
        outcomes: ``[N]`` 0/1 (or bool) correctness of each trajectory.
        group_ids: ``[N]`` integer prompt id of each trajectory.

    Returns:
        ``(accuracy, num_groups)``: the mean over prompts of the chosen trajectory's outcome;
        ``nan`` when there is no trajectory.

    Raises:
        ValueError: on a shape mismatch (naming the argument), non-finite values, non-0/1
            outcomes or non-integer group ids.
    """
    v, y, gid = _grouped_outcomes(values, outcomes, group_ids)
    if v.numel() == 0:
        return float("nan"), 0
    # sort by (group, -value, input order): the first row of each group is its pick
    order = torch.sort(-v, stable=True).indices
    order = order[torch.sort(gid[order], stable=True).indices]
    first = torch.ones(order.numel(), dtype=torch.bool)
    first[1:] = gid[order][1:] != gid[order][:-1]
    picks = y[order][first]
    return float(picks.mean()), int(picks.numel())


# ----------------------------------------------------------------------------------------------
# accumulators
# ----------------------------------------------------------------------------------------------


class _SumStats:
    """A flat float64 buffer of named sums; merge/all_reduce are elementwise sums of it.

    Keeping every statistic in one flat tensor makes a DDP reduction a single collective (one
    round-trip instead of one per field) and makes merge a single add.
    """

    def __init__(self, fields: Sequence[tuple[str, int]]) -> None:
        self._slices: dict[str, slice] = {}
        offset = 0
        for name, size in fields:
            self._slices[name] = slice(offset, offset + size)
            offset += size
        self._buf = torch.zeros(offset, dtype=torch.float64)

    # -- layout ----------------------------------------------------------------------------
    def _v(self, name: str) -> Tensor:
        """Writable view of one field (in-place ops on it update the buffer)."""
        return self._buf[self._slices[name]]

    def _f(self, name: str) -> float:
        return float(self._buf[self._slices[name].start])

    def _config(self) -> dict[str, Any]:
        return {}

    # -- accumulation ------------------------------------------------------------------------
    def reset(self) -> None:
        """Zeroes every statistic (configuration is kept)."""
        self._buf.zero_()

    def merge(self, other: _SumStats) -> _SumStats:
        """Adds ``other``'s statistics into ``self`` in place and returns ``self``.

        Raises:
            ValueError: if ``other`` has another type or configuration (bins, steps, map).
        """
        if type(other) is not type(self) or other._config() != self._config():
            raise ValueError(
                f"cannot merge {type(other).__name__}{other._config()} into "
                f"{type(self).__name__}{self._config()}: configurations differ"
            )
        self._buf += other._buf
        return self

    def all_reduce(self, group: Any = None) -> _SumStats:
        """Sums the statistics over all ranks in place (no-op without torch.distributed).

        One ``all_reduce(SUM)`` of the flat float64 buffer. With the NCCL backend the buffer goes
        through the current CUDA device (NCCL reduces only CUDA tensors); otherwise (gloo, or a
        ``cpu:gloo,cuda:nccl`` mixed backend) it stays on CPU. Every rank must call this, with the
        same configuration, or the collective hangs / mis-sizes. Afterwards every rank holds the
        global sums, so calling it twice double counts: reduce once, right before ``compute()``.
        Ranks that saw no data still participate (their zeros are the identity of the sum).

        Returns:
            ``self``.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        buf = self._buf
        if dist.get_backend(group) == "nccl":
            buf = buf.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        if buf is not self._buf:
            self._buf.copy_(buf.cpu())
        return self

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Configuration and a copy of the sums (for checkpoints; sums of states merge fine)."""
        return {"config": self._config(), "buffer": self._buf.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores sums saved by :meth:`state_dict` from an identically configured object."""
        if dict(state["config"]) != self._config():
            raise ValueError(f"state config {state['config']} does not match {self._config()}")
        buf = torch.as_tensor(state["buffer"], dtype=torch.float64)
        _check_shape("state['buffer']", buf, "buffer", self._buf)
        self._buf.copy_(buf)


class RankStats(_SumStats):
    """Accumulator of pairwise-ranking credit: ``(correct, pairs)`` global sums.

    Use one instance per metric: :meth:`update` feeds :func:`rank_accuracy`-style groups of
    alternatives, :meth:`update_grouped` feeds :func:`pairwise_outcome_accuracy`-style trajectories
    of the same prompt. The accuracy over many updates/ranks is ``sum correct / sum pairs``.
    """

    def __init__(self) -> None:
        super().__init__([("correct", 1), ("pairs", 1)])

    @property
    def pairs(self) -> int:
        """Number of informative pairs seen so far."""
        return int(self._f("pairs"))

    def add(self, correct: float, pairs: int) -> None:
        """Adds precomputed credit (ties already counted as 0.5) and its pair count."""
        self._v("correct").add_(float(correct))
        self._v("pairs").add_(float(pairs))

    def update(self, pred: Any, truth: Any, mask: Any | None = None) -> None:
        """Adds the pairs of ``[G, n]`` groups; semantics and errors as :func:`rank_accuracy`."""
        self.add(*_rank_counts(pred, truth, mask))

    def update_grouped(self, values: Any, outcomes: Any, group_ids: Any) -> None:
        """Adds correct/incorrect pairs per prompt; as :func:`pairwise_outcome_accuracy`.

        A prompt's trajectories must arrive in one call: pairs across calls are not formed.
        """
        self.add(*_pairwise_outcome_counts(values, outcomes, group_ids))

    def compute(self) -> dict[str, float]:
        """Returns ``{"rank_acc": correct / pairs, "rank_pairs": pairs}`` (chance is 0.5).

        Raises:
            ValueError: if no pair has been seen (log a skip rather than a NaN).
        """
        pairs = self._f("pairs")
        if pairs == 0:
            raise ValueError("no informative pairs to rank: every group had tied truths or < 2 entries")
        return {"rank_acc": self._f("correct") / pairs, "rank_pairs": pairs}


class CalibrationStats(_SumStats):
    """Global sufficient statistics for step-level value calibration.

    Feed it with :meth:`update` (any number of calls, any micro-batch split), optionally
    :meth:`merge` other accumulators or :meth:`all_reduce` across DDP ranks, then read
    :meth:`compute`, :meth:`reliability_table` and :meth:`mae_by_step`. All metrics are computed on
    the probability scale ``p = clamp(scale * pred + shift, 0, 1)`` (see the module docstring for
    why clipping is needed and what it does to the error of out-of-range predictions).

    Sums kept (all float64): count; sum ``|p - mc|``; for explained variance sums of ``mc``,
    ``mc^2``, ``d = mc - p`` and ``d^2``; Brier sums ``(p - mc)^2`` and ``(p - outcome)^2`` with
    the number of outcome-labelled states; number of clipped predictions; per equal-width bin of
    ``p`` the count, sum ``p`` and sum ``mc`` over all states plus count, sum ``p`` and sum outcome
    over outcome-labelled states; per step index the count and sum ``|p - mc|``; pairwise-ranking
    credit and pair count (:meth:`update_rank`).

    Args:
        n_bins: number of equal-width bins on ``[0, 1]`` for ECE and the reliability table. Bin
            ``b`` is ``[b / n_bins, (b + 1) / n_bins)``; the last bin also holds ``p == 1``.
        max_steps: number of per-step-index buckets; step indices ``>= max_steps - 1`` share the
            last bucket.
        pred_to_prob: affine map ``(scale, shift)`` to the probability scale, or a preset name
            from :data:`PRED_TO_PROB_PRESETS` (``"identity"``, ``"signed"``). ``None`` = identity.
    """

    def __init__(
        self,
        n_bins: int = 10,
        max_steps: int = 32,
        pred_to_prob: tuple[float, float] | str | None = None,
    ) -> None:
        if int(n_bins) < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if int(max_steps) < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        self.n_bins = int(n_bins)
        self.max_steps = int(max_steps)
        self.pred_to_prob = _resolve_map(pred_to_prob)
        scalars = (
            "count", "abs_err", "sum_mc", "sum_mc2", "sum_d", "sum_d2", "sq_err_mc", "n_clipped",
            "n_outcome", "sq_err_outcome", "rank_correct", "rank_pairs",
        )  # fmt: skip
        per_bin = ("bin_count", "bin_sum_p", "bin_sum_mc", "bin_count_out", "bin_sum_p_out", "bin_sum_out")
        per_step = ("step_count", "step_abs_err")
        super().__init__(
            [(s, 1) for s in scalars]
            + [(b, self.n_bins) for b in per_bin]
            + [(s, self.max_steps) for s in per_step]
        )

    def _config(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "max_steps": self.max_steps, "pred_to_prob": self.pred_to_prob}

    # -- accumulation ------------------------------------------------------------------------
    def to_prob(self, pred: Any) -> Tensor:
        """Maps predictions to the probability scale: ``clamp(scale * pred + shift, 0, 1)``.

        Args:
            pred: predictions of any shape.

        Returns:
            float64 CPU tensor of the same shape.
        """
        scale, shift = self.pred_to_prob
        return (_to_f64(pred, "pred") * scale + shift).clamp(0.0, 1.0)

    def update(
        self,
        pred: Any,
        mc: Any,
        outcome: Any | None = None,
        step_index: Any | None = None,
    ) -> None:
        """Adds a batch of probe states.

        All arguments must have the same shape (normally ``[N]``; other shapes are flattened).
        An empty batch is a no-op.

        Args:
            pred: ``[N]`` predicted values on the method's own scale.
            mc: ``[N]`` Monte Carlo value estimates in ``[0, 1]`` (values within 1e-6 outside
                are clamped as float rounding; anything further raises).
            outcome: optional ``[N]`` 0/1 (or bool) final outcome of the trajectory each state
                came from. Outcome metrics use only states that had one.
            step_index: optional ``[N]`` non-negative integer step index of each state (0 = the
                prompt); indices ``>= max_steps - 1`` go to the last bucket.

        Raises:
            ValueError: on a shape mismatch (naming the argument), non-finite ``pred``/``mc``,
                ``mc`` outside ``[0, 1]``, non-0/1 ``outcome``, negative or non-integer
                ``step_index``. Nothing is accumulated when it raises.
        """
        pred_t = _to_f64(pred, "pred")
        mc_t = _to_f64(mc, "mc")
        _check_shape("mc", mc_t, "pred", pred_t)
        _check_finite("pred", pred_t)
        _check_finite("mc", mc_t)
        mc_t = _check_unit_range("mc", mc_t).reshape(-1)
        y = None
        if outcome is not None:
            y = _to_f64(outcome, "outcome")
            _check_shape("outcome", y, "pred", pred_t)
            _check_binary("outcome", y)
            y = y.reshape(-1)
        steps = None
        if step_index is not None:
            steps = _to_index(step_index, "step_index")
            _check_shape("step_index", steps, "pred", pred_t)
            if bool((steps < 0).any()):
                raise ValueError("step_index must be non-negative")
            steps = steps.reshape(-1).clamp(max=self.max_steps - 1)
        if pred_t.numel() == 0:
            return

        scale, shift = self.pred_to_prob
        raw = pred_t.reshape(-1) * scale + shift
        n_clipped = int(((raw < 0) | (raw > 1)).sum())
        p = raw.clamp(0.0, 1.0)
        abs_err = (p - mc_t).abs()
        d = mc_t - p
        # floor(p * n_bins) puts p in [b/B, (b+1)/B) into bin b; p == 1 would be bin B, so clamp
        # it into the last bin (closed on the right).
        bins = (p * self.n_bins).floor().to(torch.int64).clamp_(0, self.n_bins - 1)

        def per_bin(weights: Tensor | None) -> Tensor:
            out = torch.bincount(bins, weights=weights, minlength=self.n_bins)
            return out.to(torch.float64)

        self._v("count").add_(p.numel())
        self._v("abs_err").add_(abs_err.sum())
        self._v("sum_mc").add_(mc_t.sum())
        self._v("sum_mc2").add_((mc_t * mc_t).sum())
        self._v("sum_d").add_(d.sum())
        self._v("sum_d2").add_((d * d).sum())
        self._v("sq_err_mc").add_((d * d).sum())  # (p - mc)^2 == d^2; kept separate for clarity
        self._v("n_clipped").add_(n_clipped)
        self._v("bin_count").add_(per_bin(None))
        self._v("bin_sum_p").add_(per_bin(p))
        self._v("bin_sum_mc").add_(per_bin(mc_t))
        if y is not None:
            self._v("n_outcome").add_(y.numel())
            self._v("sq_err_outcome").add_(((p - y) ** 2).sum())
            self._v("bin_count_out").add_(per_bin(None))
            self._v("bin_sum_p_out").add_(per_bin(p))
            self._v("bin_sum_out").add_(per_bin(y))
        if steps is not None:
            self._v("step_count").add_(torch.bincount(steps, minlength=self.max_steps).to(torch.float64))
            self._v("step_abs_err").add_(torch.bincount(steps, weights=abs_err, minlength=self.max_steps))

    def update_rank(self, pred: Any, truth: Any, mask: Any | None = None) -> None:
        """Adds pairwise-ranking pairs of ``[G, n]`` alternatives (see :func:`rank_accuracy`).

        Ranking uses the raw ``pred`` (order is invariant to the affine map, and clipping would
        manufacture ties). ``compute()`` then also reports ``rank_acc``.
        """
        correct, pairs = _rank_counts(pred, truth, mask)
        self._v("rank_correct").add_(correct)
        self._v("rank_pairs").add_(pairs)

    # -- read-out ----------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """Number of states accumulated."""
        return int(self._f("count"))

    @property
    def outcome_count(self) -> int:
        """Number of states accumulated with an outcome label."""
        return int(self._f("n_outcome"))

    def clip_fraction(self) -> float:
        """Fraction of predictions whose mapped value fell outside ``[0, 1]`` and was clipped.

        Raises:
            ValueError: if no state has been accumulated.
        """
        self._require_data()
        return self._f("n_clipped") / self._f("count")

    def _require_data(self) -> None:
        if self._f("count") == 0:
            raise ValueError(
                "no states to calibrate: nothing was accumulated (on any rank, if all_reduce ran); "
                "skip logging calibration for this step"
            )

    def compute(self) -> dict[str, float]:
        """Calibration metrics over everything accumulated.

        Keys:
            ``mae_vs_mc``: mean ``|p - mc|``.
            ``ece``: expected calibration error ``sum_b (n_b / N) |mean p_b - mean y_b|`` against
            the 0/1 outcomes when any state had one (over those states only), else against MC
            (then equal to ``ece_vs_mc``). The probe set is fixed per run, so the choice does not
            flip within a run.
            ``ece_vs_mc``: the same with the MC estimate as target.
            ``brier``: mean ``(p - outcome)^2`` over outcome-labelled states; falls back to
            ``brier_vs_mc`` when no state had an outcome, like ``ece``.
            ``brier_vs_mc``: mean ``(p - mc)^2``.
            ``explained_var``: ``1 - Var(mc - p) / Var(mc)``; ``0.0`` when ``Var(mc) <= 1e-12``
            (constant targets: no variance to explain, and the ratio would be 0/0 or blow up on
            rounding), never NaN.
            ``count``: number of states.
            ``rank_acc``: only when :meth:`update_rank` saw at least one pair.

        Raises:
            ValueError: if nothing was accumulated ("no states to calibrate ...").
        """
        self._require_data()
        n = self._f("count")
        ece_vs_mc = float((self._v("bin_sum_p") - self._v("bin_sum_mc")).abs().sum()) / n
        brier_vs_mc = self._f("sq_err_mc") / n
        n_out = self._f("n_outcome")
        if n_out > 0:
            ece = float((self._v("bin_sum_p_out") - self._v("bin_sum_out")).abs().sum()) / n_out
            brier = self._f("sq_err_outcome") / n_out
        else:
            ece, brier = ece_vs_mc, brier_vs_mc
        mean_mc = self._f("sum_mc") / n
        var_mc = max(self._f("sum_mc2") / n - mean_mc * mean_mc, 0.0)
        mean_d = self._f("sum_d") / n
        var_d = max(self._f("sum_d2") / n - mean_d * mean_d, 0.0)
        explained_var = 0.0 if var_mc <= _VAR_EPS else 1.0 - var_d / var_mc
        out = {
            "mae_vs_mc": self._f("abs_err") / n,
            "ece": ece,
            "ece_vs_mc": ece_vs_mc,
            "brier": brier,
            "brier_vs_mc": brier_vs_mc,
            "explained_var": explained_var,
            "count": n,
        }
        rank_pairs = self._f("rank_pairs")
        if rank_pairs > 0:
            out["rank_acc"] = self._f("rank_correct") / rank_pairs
        return out

    def reliability_table(self) -> list[dict[str, float]]:
        """One row per probability bin, for reliability diagrams (:func:`plot_reliability`).

        Row keys: ``bin_lo``, ``bin_hi``, ``count`` (all states in the bin), ``mean_pred`` (mean
        ``p``), ``frac_positive`` (fraction of outcome-labelled states in the bin whose outcome is
        1), ``mean_mc``, ``outcome_count``. Means of an empty bin (or ``frac_positive`` of a bin
        with no labelled state) are ``nan``: "no data" must not read as a 0 % success rate.
        Rows are returned even before any update (all empty).
        """
        cnt = self._v("bin_count").tolist()
        sp = self._v("bin_sum_p").tolist()
        smc = self._v("bin_sum_mc").tolist()
        cnt_out = self._v("bin_count_out").tolist()
        sy = self._v("bin_sum_out").tolist()
        nan = float("nan")
        rows = []
        for b in range(self.n_bins):
            rows.append(
                {
                    "bin_lo": b / self.n_bins,
                    "bin_hi": (b + 1) / self.n_bins,
                    "count": int(cnt[b]),
                    "mean_pred": sp[b] / cnt[b] if cnt[b] else nan,
                    "frac_positive": sy[b] / cnt_out[b] if cnt_out[b] else nan,
                    "mean_mc": smc[b] / cnt[b] if cnt[b] else nan,
                    "outcome_count": int(cnt_out[b]),
                }
            )
        return rows

    def mae_by_step(self) -> dict[int, float]:
        """Mean ``|p - mc|`` per step index, for step indices that received states.

        Only states passed with ``step_index`` are counted; key ``max_steps - 1`` aggregates all
        indices ``>= max_steps - 1``.
        """
        cnt = self._v("step_count").tolist()
        err = self._v("step_abs_err").tolist()
        return {s: err[s] / cnt[s] for s in range(self.max_steps) if cnt[s]}
