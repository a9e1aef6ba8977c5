"""The kappa plots: one run's kappa and kappa_bar with its states; kappa_bar across runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..method.diagnostics import describe_states
from .figures import (
    draw_band,
    legend,
    mark_collapse,
    new_figure,
    run_title,
    save_figure,
    shade_states,
)
from .runs import Groups, Run
from .smoothing import geo_moving_average

if TYPE_CHECKING:
    import numpy as np


def plot_run_kappa(run: Run, path: Path, window: int) -> str | None:
    """Raw kappa (dots) and kappa_bar (line) on a log axis, states shaded (paper's Fig. 2)."""
    steps, kappa = run.series("kappa", positive=True)
    bar_steps, kappa_bar = run.series("kappa_bar", positive=True)
    per_comp = {c: run.series(f"kappa_c/{c}", positive=True) for c in run.components}
    per_comp = {c: sv for c, sv in per_comp.items() if sv[0].size}
    if not (steps.size or bar_steps.size or per_comp):
        return "no kappa estimates"
    fig, axes = new_figure()
    ax = axes[0, 0]
    states = shade_states(ax, run)
    # Pairwise kappa when raw estimates exist; per-component kappa_c otherwise (n > 2).
    if steps.size or (bar_steps.size and not per_comp):
        ax.scatter(steps, kappa, s=6, alpha=0.3, lw=0, color="C0", label="kappa (estimate)")
        if bar_steps.size:
            ax.plot(bar_steps, kappa_bar, lw=2, color="C0", label="kappa_bar (window geo-mean)")
        ax.set_ylabel(kappa_axis_label(run.components))
    else:
        # n components: kappa_c = D_c / geometric mean of all D, one colour per component.
        for i, (comp, (cs, cv)) in enumerate(per_comp.items()):
            ax.scatter(cs, cv, s=6, alpha=0.3, lw=0, color=f"C{i}")
            ax.plot(cs, geo_moving_average(cv, window), lw=2, color=f"C{i}", label=comp)
        ax.set_ylabel("kappa_c = D_c / geo-mean(D)")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="balanced (kappa = 1)")
    ax.set_yscale("log")
    mark_collapse(ax, run)
    ax.set_xlabel("step")
    summary = describe_states(run.state_shares(), run.final_state()) if run.states() else "n/a"
    ax.set_title(run_title(run, f"multimodal balance coefficient\nstates: {summary}"), fontsize=9)
    legend(ax, states, loc="best", ncol=2)
    save_figure(fig, path)
    return None


def kappa_axis_label(components: Sequence[str]) -> str:
    """The y label: the ratio kappa stands for with these components."""
    others = [c for c in components if c != "llm"]
    if len(components) == 2 and len(others) == 1:
        return f"kappa = D_llm / D_{others[0]}"
    return "kappa"


def kappa_trace(run: Run, window: int) -> tuple[np.ndarray, np.ndarray] | None:
    """kappa_bar if logged, else a log-space moving average of the raw estimates."""
    steps, kbar = run.series("kappa_bar", positive=True)
    if steps.size:
        return steps, kbar
    steps, kappa = run.series("kappa", positive=True)
    return (steps, geo_moving_average(kappa, window)) if steps.size else None


def plot_compare_kappa(groups: Groups, path: Path, window: int) -> str | None:
    """kappa_bar per label: median over seeds (in log space) with a min-max band."""
    fig, axes = new_figure()
    ax = axes[0, 0]
    drawn = 0
    for i, (label, runs) in enumerate(groups.items()):
        traces = [t for t in (kappa_trace(r, window) for r in runs) if t is not None]
        if traces:
            draw_band(ax, traces, f"C{i}", label, log=True)
            drawn += 1
    if not drawn:
        return "no run has kappa estimates"
    ax.axhline(1.0, color="k", ls="--", lw=1, label="balanced (kappa = 1)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("kappa_bar")
    ax.set_title("balance coefficient: median over seeds, band = min-max")
    legend(ax)
    save_figure(fig, path)
    return None
