"""The update-significance plot: D_c per component, log axis."""

from __future__ import annotations

from pathlib import Path

from .figures import legend, new_figure, run_title, save_figure
from .runs import Run
from .smoothing import geo_moving_average


def plot_run_d(run: Run, path: Path, window: int) -> str | None:
    """Update significance D_c (KL of moving only component c) per component, log axis."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    drawn = 0
    for i, comp in enumerate(run.components):
        steps, d = run.series(f"D/{comp}", positive=True)
        if not steps.size:
            continue  # never measured, or always zero (a frozen component)
        ax.scatter(steps, d, s=6, alpha=0.3, lw=0, color=f"C{i}")
        ax.plot(steps, geo_moving_average(d, window), lw=2, color=f"C{i}", label=f"D/{comp}")
        drawn += 1
    if not drawn:
        return "no positive D/<component> values"
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("D_c (nats, mean KL per supervised token)")
    ax.set_title(run_title(run, f"update significance per component (geo-MA {window})"))
    legend(ax)
    save_figure(fig, path)
    return None
