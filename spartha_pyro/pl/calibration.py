"""Calibration plots: PIT histogram and reliability curve of predictive distributions."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from ..metrics.calibration import pit_histogram, reliability


def calibration(
    samples,
    observed,
    bins: int = 10,
    levels: Sequence[float] = tuple(np.round(np.arange(0.05, 1.0, 0.05), 2)),
    ties: str = "randomized",
    seed: int = 0,
    axes: Sequence[Axes] | None = None,
) -> np.ndarray:
    """Draw the PIT histogram (left) and the reliability curve (right).

    Parameters
    ----------
    samples
        Predictive draws ``(S, N, G)`` (e.g. sampled counts), or a mapping method name ->
        draws to overlay several methods.
    observed
        Held-out observations ``(N, G)`` in the units of the draws.
    bins
        PIT histogram bins on ``[0, 1]``.
    levels
        Nominal central-interval levels of the reliability curve.
    ties, seed
        PIT for discrete values, see :func:`spartha_pyro.metrics.pit` (randomised by default).
    axes
        Two axes to draw on; default a new 1 × 2 figure.

    Returns
    -------
    The two axes. A calibrated predictive has a flat PIT histogram at density 1 (dashed)
    and a reliability curve on the diagonal; a U-shaped histogram / curve below the
    diagonal means intervals too narrow.
    """
    methods = dict(samples) if isinstance(samples, Mapping) else {"": samples}
    if axes is None:
        _, axes = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    ax_pit, ax_rel = axes
    for name, draws in methods.items():
        hist = pit_histogram(draws, observed, bins, ties, seed)
        edges = np.append(hist["left"].to_numpy(), hist["right"].iloc[-1])
        ax_pit.stairs(hist["density"].to_numpy(), edges, label=name or None, linewidth=1.5, baseline=None)
        curve = reliability(draws, observed, levels, ties, seed)
        ax_rel.plot(curve["nominal"], curve["empirical"], marker="o", markersize=3, label=name or None)
    ax_pit.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax_pit.set_xlim(0, 1)
    ax_pit.set_xlabel(f"PIT ({ties})")
    ax_pit.set_ylabel("density")
    ax_pit.set_title("PIT histogram")
    ax_rel.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1)
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1)
    ax_rel.set_aspect("equal")
    ax_rel.set_xlabel("nominal coverage")
    ax_rel.set_ylabel("empirical coverage")
    ax_rel.set_title("central intervals")
    if len(methods) > 1:
        ax_rel.legend(frameon=False)
    return np.asarray(axes)
