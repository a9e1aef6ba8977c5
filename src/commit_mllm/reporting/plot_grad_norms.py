"""The gradient-norm plots (the paper's Fig. 3): per component over its early mean."""

from __future__ import annotations

import math
from pathlib import Path

from .figures import draw_band, legend, new_figure, run_title, save_figure
from .runs import Groups, Run, all_components
from .smoothing import GRAD_NORM_REFERENCE_FRACTION, moving_average, normalized


def plot_run_grad_norms(run: Run, path: Path, window: int) -> str | None:
    """Gradient norm per component over its own early mean (paper's Fig. 3: diminishing)."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    drawn = 0
    for i, comp in enumerate(run.components):
        steps, norms = run.series(f"grad_norm/{comp}")
        rel = normalized(steps, norms)
        if rel is None:
            continue  # no gradient logged, or a frozen component (zero reference)
        ax.plot(steps, rel, color=f"C{i}", alpha=0.2, lw=0.8)
        ax.plot(steps, moving_average(rel, window), color=f"C{i}", lw=2, label=comp)
        drawn += 1
    if not drawn:
        return "no non-zero grad_norm/<component> values"
    ax.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    pct = round(100 * GRAD_NORM_REFERENCE_FRACTION)
    ax.set_ylabel(f"grad norm / mean over first {pct}% of steps")
    ax.set_title(run_title(run, f"normalized gradient norm (MA {window})"))
    legend(ax)
    save_figure(fig, path)
    return None


def plot_compare_grad_norms(groups: Groups, path: Path, window: int) -> str | None:
    """Normalized gradient norm per component, one subplot per label (seed band)."""
    comps = all_components(groups)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = new_figure(nrows, ncols, size=(5.0 * ncols, 3.8 * nrows), sharey=True)
    drawn = 0
    for k, (label, runs) in enumerate(groups.items()):
        ax = axes[k // ncols, k % ncols]
        for j, comp in enumerate(comps):
            traces = []
            for run in runs:
                steps, norms = run.series(f"grad_norm/{comp}")
                rel = normalized(steps, norms)
                if rel is not None:
                    traces.append((steps, moving_average(rel, window)))
            if traces:
                # Linear median: a frozen block (coordinate descent) can log a zero norm.
                draw_band(ax, traces, f"C{j}", comp)
                drawn += 1
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set(title=label, xlabel="step")
        legend(ax)
    for k in range(len(groups), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    if not drawn:
        return "no run has non-zero grad_norm/<component> values"
    axes[0, 0].set_ylabel("grad norm / early mean")
    fig.suptitle(f"normalized gradient norm (MA {window}): median over seeds, band = min-max")
    save_figure(fig, path)
    return None
