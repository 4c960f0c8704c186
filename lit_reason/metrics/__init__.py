"""Pure-tensor evaluation metrics (no model, no I/O except the reliability PNG writer).

* :class:`CalibrationStats`: step-level value calibration (MAE vs MC, ECE, Brier, explained
  variance, reliability table, per-step MAE, optional ranking accuracy) from global sufficient
  statistics that merge across micro-batches and DDP ranks exactly.
* :class:`RankStats`, :func:`rank_accuracy`, :func:`pairwise_outcome_accuracy`: pairwise ranking
  of values within groups of alternatives / trajectories of the same prompt (chance = 0.5).
* :func:`best_of_k_accuracy`: accuracy of picking each prompt's highest-valued trajectory.
* :func:`plot_reliability`: reliability-diagram PNG, written atomically.
"""

from lit_reason.metrics.calibration import (
    PRED_TO_PROB_PRESETS,
    CalibrationStats,
    RankStats,
    best_of_k_accuracy,
    pairwise_outcome_accuracy,
    rank_accuracy,
)
from lit_reason.metrics.reliability import plot_reliability

__all__ = [
    "PRED_TO_PROB_PRESETS",
    "CalibrationStats",
    "RankStats",
    "best_of_k_accuracy",
    "pairwise_outcome_accuracy",
    "plot_reliability",
    "rank_accuracy",
]
