"""The learning-rate plots: one run's rate and CoMMIT factor per component; across runs."""

from __future__ import annotations

from pathlib import Path

from .figures import draw_band, legend, new_figure, run_title, save_figure
from .runs import Groups, Run, all_components


def plot_run_lr(run: Run, path: Path, window: int) -> str | None:
    """Applied learning rate per component, and the CoMMIT factor f_c below it if logged."""
    lrs = {c: run.series(f"lr/{c}") for c in run.components}
    lrs = {c: sv for c, sv in lrs.items() if sv[0].size}
    if not lrs:
        return "no lr/<component> keys"
    factors = {c: run.series(f"factor/{c}", positive=True) for c in run.components}
    factors = {c: sv for c, sv in factors.items() if sv[0].size}
    fig, axes = new_figure(2 if factors else 1, 1, sharex=True, size=(8.0, 6.0 if factors else 4.5))
    ax = axes[0, 0]
    colours = {c: f"C{i}" for i, c in enumerate(run.components)}
    for comp, (steps, lr) in lrs.items():
        ax.plot(steps, lr, color=colours[comp], label=f"lr/{comp}")
    if all(float(v.min()) > 0 for _, v in lrs.values()):
        ax.set_yscale("log")  # the rates differ by orders of magnitude between components
    ax.set_ylabel("learning rate")
    ax.set_title(run_title(run, "learning rate per component"))
    legend(ax)
    if factors:
        fax = axes[1, 0]
        for comp, (steps, fac) in factors.items():
            fax.plot(steps, fac, color=colours[comp], label=f"factor/{comp}")
        fax.axhline(1.0, color="k", ls="--", lw=1)
        fax.set_yscale("log")
        fax.set_ylabel("CoMMIT factor f_c")
        legend(fax)
    axes[-1, 0].set_xlabel("step")
    save_figure(fig, path)
    return None


def plot_compare_lr(groups: Groups, path: Path, window: int) -> str | None:
    """Learning rate per component (one subplot each), one line per label."""
    comps = [
        c
        for c in all_components(groups)
        if any(r.series(f"lr/{c}")[0].size for runs in groups.values() for r in runs)
    ]
    if not comps:
        return "no run has lr/<component> keys"
    fig, axes = new_figure(1, len(comps), size=(5.0 * len(comps), 4.0), sharey=True)
    for j, comp in enumerate(comps):
        ax = axes[0, j]
        for i, (label, runs) in enumerate(groups.items()):
            traces = [r.series(f"lr/{comp}", positive=True) for r in runs]
            traces = [t for t in traces if t[0].size]
            if traces:
                draw_band(ax, traces, f"C{i}", label, log=True)
        ax.set_yscale("log")
        ax.set(title=f"lr/{comp}", xlabel="step")
        legend(ax)
    axes[0, 0].set_ylabel("learning rate")
    save_figure(fig, path)
    return None
