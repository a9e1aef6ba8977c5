"""Plots of one training run and comparisons across runs (the paper's Fig. 2 / Fig. 3 style).

A run folder, as the trainer writes it, holds ``metrics.jsonl`` (one record per optimizer
step), optionally ``eval.jsonl``, ``summary.json`` and ``config.yaml``. :func:`~.runs.load_run`
reads it into a :class:`~.runs.Run`; :func:`plot_run` draws its balance diagnostics and
:func:`plot_compare` overlays several strategies, each over several seeds.

matplotlib and numpy are imported inside the functions, so importing these modules stays
cheap and works without them. Figures are drawn on an explicit Agg canvas
(:class:`matplotlib.figure.Figure` + ``FigureCanvasAgg``), never through ``pyplot``: the
global backend, the open-figure registry and the rcParams of the caller stay untouched.

One module per concept: :mod:`.runs` (reading), :mod:`.smoothing`, :mod:`.figures` (shared
drawing), and one per plotted quantity (:mod:`.plot_kappa`, :mod:`.plot_loss`,
:mod:`.plot_rates`, :mod:`.plot_grad_norms`, :mod:`.plot_significance`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .plot_grad_norms import plot_compare_grad_norms, plot_run_grad_norms
from .plot_kappa import plot_compare_kappa, plot_run_kappa
from .plot_loss import plot_compare_loss, plot_run_loss
from .plot_rates import plot_compare_lr, plot_run_lr
from .plot_significance import plot_run_d
from .runs import Groups, Run, as_runs, group_runs, load_run
from .smoothing import auto_window

__all__ = ["PlotFiles", "plot_compare", "plot_run"]


logger = logging.getLogger(__name__)


class PlotFiles(list):
    """The written PNG paths (a ``list[Path]``) plus the plots that were skipped and why.

    Attributes:
        skipped: File name -> reason, for each plot that had no data to draw.
    """

    def __init__(self, paths: Iterable[Path] = (), skipped: Mapping[str, str] | None = None):
        super().__init__(paths)
        self.skipped: dict[str, str] = dict(skipped or {})


# A plot function draws into ``path`` and returns None, or returns why it had nothing to draw.
_PlotFn = Callable[[Run, Path, int], "str | None"]


_RUN_PLOTS: dict[str, _PlotFn] = {
    "kappa.png": plot_run_kappa,
    "lr.png": plot_run_lr,
    "loss.png": plot_run_loss,
    "grad_norms.png": plot_run_grad_norms,
    "D.png": plot_run_d,
}


def _draw_all(
    plots: Mapping[str, Callable[[Any, Path, int], str | None]],
    data: Any,
    out: Path,
    window: int,
    where: str,
) -> PlotFiles:
    """Call each plot function; collect the written paths and the reasons for skips."""
    out.mkdir(parents=True, exist_ok=True)
    files = PlotFiles()
    for name, draw in plots.items():
        reason = draw(data, out / name, window)
        if reason is None:
            files.append(out / name)
        else:
            files.skipped[name] = reason
            logger.warning("%s: skipped %s: %s", where, name, reason)
    return files


def plot_run(
    run_dir: str | Path | Run, out_dir: str | Path | None = None, *, smooth: int | None = None
) -> PlotFiles:
    """Draw the diagnostics of one run as PNGs.

    Files: ``kappa.png`` (raw kappa and kappa_bar, log axis, kappa = 1 line, balance states
    shaded, the share of steps per state and the final state in the title), ``lr.png``
    (learning rate, and CoMMIT factor, per component), ``loss.png`` (the cross-entropy
    loss, its moving average, eval accuracy on a second axis, the regularizer's term in a
    panel of its own when it is on), ``grad_norms.png``
    (gradient norm per component over its mean in the first 5% of steps) and ``D.png``
    (D_c per component, log axis). A plot without data is skipped, logged and listed in
    the result's ``skipped``.

    Args:
        run_dir: Run folder (or a loaded :class:`Run`).
        out_dir: Where to write; default ``RUN_DIR/plots``.
        smooth: Moving-average window in records; default about 1/25 of the run.

    Returns:
        The written paths (a list, with ``.skipped``: file name -> reason).
    """
    run = run_dir if isinstance(run_dir, Run) else load_run(run_dir)
    out = Path(out_dir) if out_dir is not None else run.run_dir / "plots"
    window = smooth or auto_window(len(run.metrics))
    return _draw_all(_RUN_PLOTS, run, out, window, str(run.run_dir))


_COMPARE_PLOTS: dict[str, Callable[[Groups, Path, int], str | None]] = {
    "compare_kappa.png": plot_compare_kappa,
    "compare_loss.png": plot_compare_loss,
    "compare_grad_norms.png": plot_compare_grad_norms,
    "compare_lr.png": plot_compare_lr,
}


def plot_compare(
    run_dirs: Sequence[str | Path | Run],
    out_dir: str | Path,
    labels: Sequence[str] | None = None,
    *,
    smooth: int | None = None,
) -> PlotFiles:
    """Overlay several runs, grouped by label (several seeds per label).

    Files: ``compare_kappa.png`` (kappa_bar per label, median over seeds, min-max band),
    ``compare_loss.png`` (smoothed cross-entropy loss per label with seed band; eval
    accuracy beside it),
    ``compare_grad_norms.png`` (normalized gradient norm per component, one subplot per
    label) and ``compare_lr.png`` (learning rate, one subplot per component, one line per
    label). A plot without data is skipped, logged and listed in ``skipped``.

    Args:
        run_dirs: Run folders (or loaded :class:`Run` objects).
        out_dir: Where to write the PNGs.
        labels: One label per run; default each run's strategy (from ``summary.json``).
        smooth: Moving-average window in records; default about 1/25 of the longest run.

    Returns:
        The written paths (a list, with ``.skipped``: file name -> reason).

    Raises:
        ValueError: No runs, or ``labels`` has the wrong length.
    """
    runs = as_runs(run_dirs)
    if not runs:
        raise ValueError("plot_compare needs at least one run")
    groups = group_runs(runs, labels)
    window = smooth or auto_window(max(len(r.metrics) for r in runs))
    return _draw_all(_COMPARE_PLOTS, groups, Path(out_dir), window, str(out_dir))
