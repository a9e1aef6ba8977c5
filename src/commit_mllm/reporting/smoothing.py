"""Smoothing for plots: moving averages, normalization, the seed band."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


# Share of the first steps whose mean normalizes a gradient norm (the paper's Fig. 3).
GRAD_NORM_REFERENCE_FRACTION = 0.05


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average; the first ``window - 1`` points average what exists so far.

    Args:
        values: 1-D array without NaNs.
        window: Number of points averaged (>= 1).

    Returns:
        Array of the same length.
    """
    import numpy as np

    values = np.asarray(values, dtype=float)
    if window <= 1 or values.size == 0:
        return values.copy()
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    start = np.maximum(idx - window, 0)
    return (csum[idx] - csum[start]) / (idx - start)


def geo_moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Moving average in log space: kappa and 1/kappa weigh alike (as kappa_bar does)."""
    import numpy as np

    return np.exp(moving_average(np.log(values), window))


def normalized(
    steps: np.ndarray, values: np.ndarray, fraction: float = GRAD_NORM_REFERENCE_FRACTION
) -> np.ndarray | None:
    """Divide a series by its own mean over the first ``fraction`` of the run's steps.

    Args:
        steps: Steps of the series (ascending).
        values: Values of the series.
        fraction: Share of the step range forming the reference (at least one point).

    Returns:
        The normalized values, or None when the reference mean is not positive.
    """
    import numpy as np

    if values.size == 0:
        return None
    cutoff = steps[0] + fraction * (steps[-1] - steps[0])
    ref = values[steps <= cutoff]
    ref = ref if ref.size else values[:1]
    mean = float(np.mean(ref))
    return values / mean if mean > 0 and math.isfinite(mean) else None


def auto_window(n: int) -> int:
    """The default moving-average window for a run of ``n`` records."""
    # About 25 windows per run: smooth enough to see trends, short enough to see swings.
    return max(1, min(100, round(n / 25)))


def band(
    traces: Sequence[tuple[np.ndarray, np.ndarray]], log: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Median and min-max across seeds on the union of their steps (missing steps skipped).

    Args:
        traces: ``(steps, values)`` per seed.
        log: Take the median in log space (for kappa: the median of an even count is then
            the geometric mean of the middle two).

    Returns:
        ``(steps, median, low, high)``.
    """
    import numpy as np

    grid = np.unique(np.concatenate([s for s, _ in traces]))
    mat = np.full((len(traces), grid.size), np.nan)
    for i, (steps, vals) in enumerate(traces):
        mat[i, np.searchsorted(grid, steps)] = np.log(vals) if log else vals
    keep = ~np.all(np.isnan(mat), axis=0)
    grid, mat = grid[keep], mat[:, keep]
    med, lo, hi = np.nanmedian(mat, 0), np.nanmin(mat, 0), np.nanmax(mat, 0)
    if log:
        med, lo, hi = np.exp(med), np.exp(lo), np.exp(hi)
    return grid, med, lo, hi
