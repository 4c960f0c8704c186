"""Reliability-diagram PNG writer for :meth:`CalibrationStats.reliability_table` rows.

Uses ``matplotlib.figure.Figure`` with an explicit ``FigureCanvasAgg`` instead of ``pyplot``: no
global backend is selected or changed, no global figure registry is touched (so nothing leaks
across calls and it is safe from callback threads), and it works headless. matplotlib is imported
inside the function so that importing :mod:`lit_reason.metrics` stays cheap.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from lit_reason.io import atomic_file

__all__ = ["plot_reliability"]

_REQUIRED = ("bin_lo", "bin_hi", "count", "mean_pred", "frac_positive", "mean_mc")


def _finite(x: Any) -> bool:
    return x is not None and math.isfinite(float(x))


def plot_reliability(
    table: Iterable[Mapping[str, Any]],
    path: str | os.PathLike[str],
    title: str = "Value calibration",
) -> Path:
    """Writes a reliability diagram as a PNG, atomically.

    Per probability bin (x axis = predicted probability) it draws two bars side by side: the
    observed fraction of positive outcomes (``frac_positive``) and the mean Monte Carlo value
    (``mean_mc``), plus a marker at the bin's mean prediction and the diagonal of perfect
    calibration; each non-empty bin is annotated with its state count. Bins without data are left
    blank (``nan`` means are skipped, never drawn as 0).

    The file is first written to a temporary file in the destination folder and then moved into
    place with ``os.replace``, so a reader (or a crash) never sees a half-written PNG and no
    temporary file is left behind, even on error.

    Args:
        table: rows as returned by :meth:`CalibrationStats.reliability_table` (keys ``bin_lo``,
            ``bin_hi``, ``count``, ``mean_pred``, ``frac_positive``, ``mean_mc``).
        path: destination ``.png``; missing parent folders are created.
        title: figure title.

    Returns:
        The destination path.

    Raises:
        ValueError: if the table is empty or a row lacks a required key.
    """
    rows = list(table)
    if not rows:
        raise ValueError("table is empty: nothing to plot")
    for i, row in enumerate(rows):
        missing = [k for k in _REQUIRED if k not in row]
        if missing:
            raise ValueError(f"table row {i} lacks key(s) {missing}")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, 5.5), dpi=100)
    FigureCanvasAgg(fig)  # attaches itself to the figure; savefig then renders with Agg
    ax = fig.add_subplot(1, 1, 1)

    labelled = {"frac_positive": False, "mean_mc": False, "mean_pred": False}
    for row in rows:
        lo, hi = float(row["bin_lo"]), float(row["bin_hi"])
        width = hi - lo
        count = int(row["count"])
        tops = [0.0]
        if _finite(row["frac_positive"]):
            h = float(row["frac_positive"])
            ax.bar(lo + 0.05 * width, h, width=0.45 * width, align="edge", color="tab:blue",
                   edgecolor="black", linewidth=0.5,
                   label=None if labelled["frac_positive"] else "fraction positive (outcome)")  # fmt: skip
            labelled["frac_positive"] = True
            tops.append(h)
        if _finite(row["mean_mc"]):
            h = float(row["mean_mc"])
            ax.bar(lo + 0.5 * width, h, width=0.45 * width, align="edge", color="tab:orange",
                   edgecolor="black", linewidth=0.5,
                   label=None if labelled["mean_mc"] else "mean MC value")  # fmt: skip
            labelled["mean_mc"] = True
            tops.append(h)
        if _finite(row["mean_pred"]):
            # The gap between a bar and this marker is the bin's calibration error.
            ax.plot([lo + 0.05 * width, lo + 0.95 * width], [float(row["mean_pred"])] * 2,
                    color="black", linewidth=1.5,
                    label=None if labelled["mean_pred"] else "mean prediction")  # fmt: skip
            labelled["mean_pred"] = True
        if count > 0:
            ax.annotate(
                f"n={count}",
                (lo + 0.5 * width, min(max(tops), 1.0) + 0.02),
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90 if len(rows) > 12 else 0,  # many narrow bins: keep labels apart
            )

    ax.plot([0.0, 1.0], [0.0, 1.0], linestyle="--", color="gray", linewidth=1.0, label="perfect calibration")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.12)  # headroom for the count annotations above full bars
    ax.set_xlabel("predicted value (probability scale)")
    ax.set_ylabel("observed")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()

    dest = Path(path)
    with atomic_file(dest, "wb") as fh:
        fig.savefig(fh, format="png")
    return dest
