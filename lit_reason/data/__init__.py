"""Datasets: supervised sequences (SFT/RFT) and the on-disk trajectory dataset of the offline methods."""

from lit_reason.data.selection import balanced_selection, dpo_pairs
from lit_reason.data.trajectories import TrajectoryDataset, check_compatible

__all__ = ["TrajectoryDataset", "balanced_selection", "check_compatible", "dpo_pairs"]
