"""The plots' shared drawing: figures on an Agg canvas, state shading, legends, titles."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runs import Run
from .smoothing import band

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# Fixed state colours, so the same state reads the same on every plot.
STATE_COLOURS = {"warming_up": "#bdbdbd", "balanced": "#2ca02c", "oscillating": "#9467bd"}


BIASED_COLOURS = ("#ff7f0e", "#d62728", "#8c564b", "#e377c2")


def new_figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (8.0, 4.5), **kw):
    """A figure on its own Agg canvas: no pyplot, so no global backend or figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def save_figure(fig: Figure, path: Path) -> None:
    """Write ``fig`` to ``path`` as a PNG."""
    fig.savefig(path, dpi=110)


def state_colour(state: str, biased_order: dict[str, int]) -> str:
    """The fixed colour of a balance state (a biased state: by its component's order)."""
    if state in STATE_COLOURS:
        return STATE_COLOURS[state]
    if state.startswith("biased"):
        idx = biased_order.setdefault(state, len(biased_order))
        return BIASED_COLOURS[idx % len(BIASED_COLOURS)]
    return "#17becf"


def shade_states(ax: Axes, run: Run) -> list:
    """Shade contiguous stretches of the same balance state; return legend handles for them.

    Each handle's label gives the state's share of the steps.
    """
    from matplotlib.patches import Patch

    states = run.states()
    if not states:
        return []
    shares = run.state_shares()
    order: dict[str, int] = {}
    seen: dict[str, str] = {}
    start, current = states[0]
    # Each stretch ends where the next one starts, so the shading has no gaps.
    for step, state in [*states[1:], (states[-1][0], "")]:
        if state != current or state == "":
            colour = state_colour(current, order)
            ax.axvspan(start, step, color=colour, alpha=0.12, lw=0)
            seen.setdefault(current, colour)
            start, current = step, state
    return [
        Patch(color=c, alpha=0.3, label=f"{s}: {100 * shares[s]:.0f}% of steps")
        for s, c in seen.items()
    ]


def legend(ax: Axes, extra: Sequence[Any] = (), **kw: Any) -> None:
    """A legend of the axis's labelled artists plus ``extra`` handles."""
    handles, labels = ax.get_legend_handles_labels()
    handles, labels = handles + list(extra), labels + [h.get_label() for h in extra]
    if handles:
        ax.legend(handles, labels, fontsize=7, **kw)


def mark_collapse(ax: Axes, run: Run) -> None:
    """Red ticks along the top where the trainer flagged collapse onto the language prior."""
    steps = [float(r.get("step", i)) for i, r in enumerate(run.metrics) if r.get("collapse")]
    if steps:
        ax.scatter(
            steps,
            [0.97] * len(steps),
            transform=ax.get_xaxis_transform(),
            marker="v",
            s=14,
            color="#d62728",
            label="collapse flagged",
        )


def run_title(run: Run, what: str) -> str:
    """A plot title: the run's label and seed, then ``what``."""
    seed = f", seed {run.seed}" if run.seed is not None else ""
    return f"{run.label}{seed}: {what}"


def draw_band(ax: Axes, traces: list, colour: str, label: str, log: bool = False) -> None:
    """The median of ``traces`` as a line, with their min-max band when there are several."""
    steps, med, lo, hi = band(traces, log=log)
    n = len(traces)
    ax.plot(steps, med, color=colour, lw=2, label=f"{label} (n={n})")
    if n > 1:
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)
