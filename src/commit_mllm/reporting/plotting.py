"""Plots of one training run and comparisons across runs (the paper's Fig. 2 / Fig. 3 style).

A run folder, as the trainer writes it, holds ``metrics.jsonl`` (one record per optimizer
step), optionally ``eval.jsonl``, ``summary.json`` and ``config.yaml``. :func:`load_run`
reads it into a :class:`Run`; :func:`plot_run` draws its balance diagnostics and
:func:`plot_compare` overlays several strategies, each over several seeds.

matplotlib and numpy are imported inside the functions, so ``import commit_mllm.reporting.plotting``
stays cheap and works without them. Figures are drawn on an explicit Agg canvas
(:class:`matplotlib.figure.Figure` + ``FigureCanvasAgg``), never through ``pyplot``: the
global backend, the open-figure registry and the rcParams of the caller stay untouched.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..method.diagnostics import describe_states, state_shares
from ..training.tracking import RunFormatError, read_jsonl

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "PlotFiles",
    "Run",
    "RunFormatError",
    "group_runs",
    "load_run",
    "moving_average",
    "normalized",
    "plot_compare",
    "plot_run",
    "read_jsonl",
]

logger = logging.getLogger(__name__)

# Per-component metric prefixes, in the order the trainer writes them; a component is any
# name that appears after one of these.
COMPONENT_PREFIXES = (
    "lr/",
    "factor/",
    "grad_norm/",
    "update_norm/",
    "D/",
    "kappa_c/",
    "share/",
    "grad_coeff/",
    "flag/",
)

# Fixed state colours, so the same state reads the same on every plot.
_STATE_COLOURS = {"warming_up": "#bdbdbd", "balanced": "#2ca02c", "oscillating": "#9467bd"}
_BIASED_COLOURS = ("#ff7f0e", "#d62728", "#8c564b", "#e377c2")

# Share of the first steps whose mean normalizes a gradient norm (the paper's Fig. 3).
GRAD_NORM_REFERENCE_FRACTION = 0.05


class PlotFiles(list):
    """The written PNG paths (a ``list[Path]``) plus the plots that were skipped and why.

    Attributes:
        skipped: File name -> reason, for each plot that had no data to draw.
    """

    def __init__(self, paths: Iterable[Path] = (), skipped: Mapping[str, str] | None = None):
        super().__init__(paths)
        self.skipped: dict[str, str] = dict(skipped or {})


@dataclass
class Run:
    """One run folder, loaded.

    Attributes:
        run_dir: The folder.
        metrics: One record per optimizer step (``metrics.jsonl``).
        evals: One record per evaluation (``eval.jsonl``; empty when absent).
        summary: ``summary.json`` (empty when absent).
        config: The resolved ``config.yaml`` (None when absent or unreadable).
    """

    run_dir: Path
    metrics: list[dict[str, Any]]
    evals: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None

    @property
    def strategy(self) -> str | None:
        """The strategy name from the summary, else from the config (``commit.strategy``)."""
        strat = self.summary.get("strategy") or _config_value(self.config, "commit", "strategy")
        if isinstance(strat, Mapping):
            strat = strat.get("name")
        return str(strat) if strat else None

    @property
    def seed(self) -> int | None:
        """The seed from the summary, else from the config (``run.seed``)."""
        seed = self.summary.get("seed")
        if seed is None:
            seed = _config_value(self.config, "run", "seed")
        return int(seed) if isinstance(seed, (int, float)) else None

    @property
    def label(self) -> str:
        """Default group label: the strategy, else the summary's label, else the folder name."""
        return self.strategy or str(self.summary.get("label") or self.run_dir.name)

    @property
    def components(self) -> list[str]:
        """Component names found in the per-component keys, in order of first appearance."""
        names: dict[str, None] = {}
        for rec in self.metrics:
            for key in rec:
                for prefix in COMPONENT_PREFIXES:
                    if key.startswith(prefix):
                        names.setdefault(key[len(prefix) :], None)
        return list(names)

    def series(self, key: str, *, positive: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Steps and float values of one metric, leaving out records where it is missing.

        Args:
            key: Metric key, e.g. ``"kappa"`` or ``"grad_norm/llm"``.
            positive: Keep only values > 0 (for log axes).

        Returns:
            ``(steps, values)`` as float arrays of equal length (possibly empty).
        """
        return _series(self.metrics, key, positive=positive)

    def eval_series(self, key: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
        """Steps and values of one evaluation metric (empty arrays without evaluations)."""
        return _series(self.evals, key)

    def states(self) -> list[tuple[float, str]]:
        """``(step, state)`` for each metric record that has a balance state."""
        return [
            (float(rec.get("step", i)), str(rec["state"]))
            for i, rec in enumerate(self.metrics)
            if rec.get("state")
        ]

    def state_shares(self) -> dict[str, float]:
        """Share of the logged steps spent in each balance state, largest first."""
        return state_shares([st for _, st in self.states()])

    def final_state(self) -> str | None:
        """The balance state of the last logged step (None without states)."""
        states = self.states()
        return states[-1][1] if states else None

    def loss_series(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps and the training loss: the cross-entropy (``ce``), without the regularizer.

        Runs that logged no ``ce`` fall back to ``loss``.
        """
        steps, ce = self.series("ce")
        return (steps, ce) if steps.size else self.series("loss")

    def aux_series(self) -> tuple[np.ndarray, np.ndarray]:
        """Steps and the auxiliary regularizer's term (``aux_loss``; empty when always 0)."""
        steps, aux = self.series("aux_loss")
        return (steps, aux) if steps.size and bool((aux != 0).any()) else (steps[:0], aux[:0])


def _config_value(config: Mapping[str, Any] | None, section: str, key: str) -> Any:
    """``config[section][key]``, else a top-level ``config[key]`` (flat configs)."""
    config = config or {}
    sub = config.get(section)
    if isinstance(sub, Mapping) and sub.get(key) is not None:
        return sub[key]
    return config.get(key)


def _series(
    records: Sequence[Mapping[str, Any]], key: str, *, positive: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    steps, values = [], []
    for i, rec in enumerate(records):
        val = rec.get(key)
        # bool is an int subclass: a flag is not a measurement.
        if val is None or isinstance(val, bool) or not isinstance(val, (int, float)):
            continue
        val = float(val)
        if not math.isfinite(val) or (positive and val <= 0):
            continue
        steps.append(float(rec.get("step", i)))
        values.append(val)
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


# --------------------------------------------------------------------------------------
# Loading


def load_run(run_dir: str | Path) -> Run:
    """Load a run folder written by the trainer.

    Args:
        run_dir: Folder holding ``metrics.jsonl`` and optionally ``eval.jsonl``,
            ``summary.json`` and ``config.yaml``.

    Returns:
        The :class:`Run`.

    Raises:
        RunFormatError: ``metrics.jsonl`` is missing, or a file does not parse.
    """
    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        raise RunFormatError(f"{metrics_path}: missing (not a run folder?)")
    metrics = read_jsonl(metrics_path)
    eval_path = run_dir / "eval.jsonl"
    evals = read_jsonl(eval_path) if eval_path.is_file() else []
    summary: dict[str, Any] = {}
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise RunFormatError(f"{summary_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(summary, dict):
            raise RunFormatError(f"{summary_path}:1: expected a JSON object")
    return Run(run_dir, metrics, evals, summary, _load_config(run_dir / "config.yaml"))


def _load_config(path: Path) -> dict[str, Any] | None:
    """The resolved config, or None: plots never need it, so a bad one only warns."""
    if not path.is_file():
        return None
    try:
        import yaml

        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except Exception as exc:  # pyyaml absent or the file is unreadable: the plots go on.
        logger.warning("%s: not read (%s)", path, exc)
        return None
    return cfg if isinstance(cfg, dict) else None


def group_runs(runs: Sequence[Run], labels: Sequence[str] | None = None) -> dict[str, list[Run]]:
    """Group runs by label, in order of first appearance.

    Args:
        runs: Loaded runs.
        labels: One label per run; default each run's :attr:`Run.label` (its strategy).

    Returns:
        Label -> runs (typically the seeds of one strategy).

    Raises:
        ValueError: ``labels`` has a different length than ``runs``.
    """
    if labels is not None and len(labels) != len(runs):
        raise ValueError(f"got {len(labels)} labels for {len(runs)} runs")
    groups: dict[str, list[Run]] = {}
    for i, run in enumerate(runs):
        groups.setdefault(str(labels[i]) if labels is not None else run.label, []).append(run)
    return groups


def _as_runs(run_dirs: Iterable[str | Path | Run]) -> list[Run]:
    return [r if isinstance(r, Run) else load_run(r) for r in run_dirs]


# --------------------------------------------------------------------------------------
# Numerics


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


def _geo_moving_average(values: np.ndarray, window: int) -> np.ndarray:
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


def _auto_window(n: int) -> int:
    # About 25 windows per run: smooth enough to see trends, short enough to see swings.
    return max(1, min(100, round(n / 25)))


def _band(
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


# --------------------------------------------------------------------------------------
# Drawing helpers


def _figure(nrows: int = 1, ncols: int = 1, *, size: tuple[float, float] = (8.0, 4.5), **kw):
    """A figure on its own Agg canvas: no pyplot, so no global backend or figure registry."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=110)


def _state_colour(state: str, biased_order: dict[str, int]) -> str:
    if state in _STATE_COLOURS:
        return _STATE_COLOURS[state]
    if state.startswith("biased"):
        idx = biased_order.setdefault(state, len(biased_order))
        return _BIASED_COLOURS[idx % len(_BIASED_COLOURS)]
    return "#17becf"


def _shade_states(ax: Axes, run: Run) -> list:
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
            colour = _state_colour(current, order)
            ax.axvspan(start, step, color=colour, alpha=0.12, lw=0)
            seen.setdefault(current, colour)
            start, current = step, state
    return [
        Patch(color=c, alpha=0.3, label=f"{s}: {100 * shares[s]:.0f}% of steps")
        for s, c in seen.items()
    ]


def _legend(ax: Axes, extra: Sequence[Any] = (), **kw: Any) -> None:
    handles, labels = ax.get_legend_handles_labels()
    handles, labels = handles + list(extra), labels + [h.get_label() for h in extra]
    if handles:
        ax.legend(handles, labels, fontsize=7, **kw)


def _mark_collapse(ax: Axes, run: Run) -> None:
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


def _run_title(run: Run, what: str) -> str:
    seed = f", seed {run.seed}" if run.seed is not None else ""
    return f"{run.label}{seed}: {what}"


# --------------------------------------------------------------------------------------
# One run

# A plot function draws into ``path`` and returns None, or returns why it had nothing to draw.
_PlotFn = Callable[[Run, Path, int], "str | None"]


def _plot_kappa(run: Run, path: Path, window: int) -> str | None:
    """Raw kappa (dots) and kappa_bar (line) on a log axis, states shaded (paper's Fig. 2)."""
    steps, kappa = run.series("kappa", positive=True)
    bar_steps, kappa_bar = run.series("kappa_bar", positive=True)
    per_comp = {c: run.series(f"kappa_c/{c}", positive=True) for c in run.components}
    per_comp = {c: sv for c, sv in per_comp.items() if sv[0].size}
    if not (steps.size or bar_steps.size or per_comp):
        return "no kappa estimates"
    fig, axes = _figure()
    ax = axes[0, 0]
    states = _shade_states(ax, run)
    # Pairwise kappa when raw estimates exist; per-component kappa_c otherwise (n > 2).
    if steps.size or (bar_steps.size and not per_comp):
        ax.scatter(steps, kappa, s=6, alpha=0.3, lw=0, color="C0", label="kappa (estimate)")
        if bar_steps.size:
            ax.plot(bar_steps, kappa_bar, lw=2, color="C0", label="kappa_bar (window geo-mean)")
        ax.set_ylabel(_kappa_axis_label(run.components))
    else:
        # n components: kappa_c = D_c / geometric mean of all D, one colour per component.
        for i, (comp, (cs, cv)) in enumerate(per_comp.items()):
            ax.scatter(cs, cv, s=6, alpha=0.3, lw=0, color=f"C{i}")
            ax.plot(cs, _geo_moving_average(cv, window), lw=2, color=f"C{i}", label=comp)
        ax.set_ylabel("kappa_c = D_c / geo-mean(D)")
    ax.axhline(1.0, color="k", ls="--", lw=1, label="balanced (kappa = 1)")
    ax.set_yscale("log")
    _mark_collapse(ax, run)
    ax.set_xlabel("step")
    summary = describe_states(run.state_shares(), run.final_state()) if run.states() else "n/a"
    ax.set_title(_run_title(run, f"multimodal balance coefficient\nstates: {summary}"), fontsize=9)
    _legend(ax, states, loc="best", ncol=2)
    _save(fig, path)
    return None


def _kappa_axis_label(components: Sequence[str]) -> str:
    others = [c for c in components if c != "llm"]
    if len(components) == 2 and len(others) == 1:
        return f"kappa = D_llm / D_{others[0]}"
    return "kappa"


def _plot_lr(run: Run, path: Path, window: int) -> str | None:
    """Applied learning rate per component, and the CoMMIT factor f_c below it if logged."""
    lrs = {c: run.series(f"lr/{c}") for c in run.components}
    lrs = {c: sv for c, sv in lrs.items() if sv[0].size}
    if not lrs:
        return "no lr/<component> keys"
    factors = {c: run.series(f"factor/{c}", positive=True) for c in run.components}
    factors = {c: sv for c, sv in factors.items() if sv[0].size}
    fig, axes = _figure(2 if factors else 1, 1, sharex=True, size=(8.0, 6.0 if factors else 4.5))
    ax = axes[0, 0]
    colours = {c: f"C{i}" for i, c in enumerate(run.components)}
    for comp, (steps, lr) in lrs.items():
        ax.plot(steps, lr, color=colours[comp], label=f"lr/{comp}")
    if all(float(v.min()) > 0 for _, v in lrs.values()):
        ax.set_yscale("log")  # the rates differ by orders of magnitude between components
    ax.set_ylabel("learning rate")
    ax.set_title(_run_title(run, "learning rate per component"))
    _legend(ax)
    if factors:
        fax = axes[1, 0]
        for comp, (steps, fac) in factors.items():
            fax.plot(steps, fac, color=colours[comp], label=f"factor/{comp}")
        fax.axhline(1.0, color="k", ls="--", lw=1)
        fax.set_yscale("log")
        fax.set_ylabel("CoMMIT factor f_c")
        _legend(fax)
    axes[-1, 0].set_xlabel("step")
    _save(fig, path)
    return None


def _plot_loss(run: Run, path: Path, window: int) -> str | None:
    """Loss = cross-entropy (raw and moving average) with eval accuracy on a second axis.

    The auxiliary regularizer's term (``aux_loss``, an entropy bonus: negative) is drawn in
    its own panel below when it is not zero, never added to the loss: a run with the
    regularizer would otherwise look better than one without at the same cross-entropy.
    """
    steps, loss = run.loss_series()
    if not steps.size:
        return "no loss values"
    aux_steps, aux = run.aux_series()
    two = bool(aux_steps.size)
    fig, axes = _figure(
        2 if two else 1,
        1,
        sharex=True,
        size=(8.0, 6.0 if two else 4.5),
        **({"gridspec_kw": {"height_ratios": [3, 1]}} if two else {}),
    )
    ax = axes[0, 0]
    ax.plot(steps, loss, color="C0", alpha=0.25, lw=0.8, label="loss (CE)")
    ax.plot(steps, moving_average(loss, window), color="C0", lw=2, label=f"loss (CE, MA {window})")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(_run_title(run, "loss and evaluation accuracy"))
    handles = []
    ev_steps, acc = run.eval_series("accuracy")
    if ev_steps.size:
        acc_ax = ax.twinx()
        acc_ax.plot(ev_steps, acc, "o-", color="C3", label="eval accuracy")
        types = sorted({k for r in run.evals for k in r if k.startswith("accuracy/")})
        for i, key in enumerate(types):
            ts, tv = run.eval_series(key)
            acc_ax.plot(ts, tv, ":", marker=".", color=f"C{4 + i}", lw=1, label=key)
        acc_ax.set_ylabel("accuracy")
        handles = acc_ax.get_legend_handles_labels()[0]
    _legend(ax, handles, loc="best")
    if two:
        aux_ax = axes[1, 0]
        aux_ax.plot(aux_steps, aux, color="C1", alpha=0.25, lw=0.8)
        aux_ax.plot(aux_steps, moving_average(aux, window), color="C1", lw=2, label="aux_loss (MA)")
        aux_ax.axhline(0.0, color="k", lw=0.8)
        aux_ax.set_ylabel("regularizer term")
        _legend(aux_ax, loc="best")
    axes[-1, 0].set_xlabel("step")
    _save(fig, path)
    return None


def _plot_grad_norms(run: Run, path: Path, window: int) -> str | None:
    """Gradient norm per component over its own early mean (paper's Fig. 3: diminishing)."""
    fig, axes = _figure()
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
    ax.set_title(_run_title(run, f"normalized gradient norm (MA {window})"))
    _legend(ax)
    _save(fig, path)
    return None


def _plot_d(run: Run, path: Path, window: int) -> str | None:
    """Update significance D_c (KL of moving only component c) per component, log axis."""
    fig, axes = _figure()
    ax = axes[0, 0]
    drawn = 0
    for i, comp in enumerate(run.components):
        steps, d = run.series(f"D/{comp}", positive=True)
        if not steps.size:
            continue  # never measured, or always zero (a frozen component)
        ax.scatter(steps, d, s=6, alpha=0.3, lw=0, color=f"C{i}")
        ax.plot(steps, _geo_moving_average(d, window), lw=2, color=f"C{i}", label=f"D/{comp}")
        drawn += 1
    if not drawn:
        return "no positive D/<component> values"
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("D_c (nats, mean KL per supervised token)")
    ax.set_title(_run_title(run, f"update significance per component (geo-MA {window})"))
    _legend(ax)
    _save(fig, path)
    return None


_RUN_PLOTS: dict[str, _PlotFn] = {
    "kappa.png": _plot_kappa,
    "lr.png": _plot_lr,
    "loss.png": _plot_loss,
    "grad_norms.png": _plot_grad_norms,
    "D.png": _plot_d,
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
    window = smooth or _auto_window(len(run.metrics))
    return _draw_all(_RUN_PLOTS, run, out, window, str(run.run_dir))


# --------------------------------------------------------------------------------------
# Several runs: one colour per label, median over seeds with a min-max band

Groups = dict[str, list[Run]]


def _kappa_trace(run: Run, window: int) -> tuple[np.ndarray, np.ndarray] | None:
    """kappa_bar if logged, else a log-space moving average of the raw estimates."""
    steps, kbar = run.series("kappa_bar", positive=True)
    if steps.size:
        return steps, kbar
    steps, kappa = run.series("kappa", positive=True)
    return (steps, _geo_moving_average(kappa, window)) if steps.size else None


def _draw_band(ax: Axes, traces: list, colour: str, label: str, log: bool = False) -> None:
    steps, med, lo, hi = _band(traces, log=log)
    n = len(traces)
    ax.plot(steps, med, color=colour, lw=2, label=f"{label} (n={n})")
    if n > 1:
        ax.fill_between(steps, lo, hi, color=colour, alpha=0.2, lw=0)


def _compare_kappa(groups: Groups, path: Path, window: int) -> str | None:
    """kappa_bar per label: median over seeds (in log space) with a min-max band."""
    fig, axes = _figure()
    ax = axes[0, 0]
    drawn = 0
    for i, (label, runs) in enumerate(groups.items()):
        traces = [t for t in (_kappa_trace(r, window) for r in runs) if t is not None]
        if traces:
            _draw_band(ax, traces, f"C{i}", label, log=True)
            drawn += 1
    if not drawn:
        return "no run has kappa estimates"
    ax.axhline(1.0, color="k", ls="--", lw=1, label="balanced (kappa = 1)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("kappa_bar")
    ax.set_title("balance coefficient: median over seeds, band = min-max")
    _legend(ax)
    _save(fig, path)
    return None


def _compare_loss(groups: Groups, path: Path, window: int) -> str | None:
    """Smoothed CE loss per label with a seed band; the regularizer's term and eval beside it.

    Panels: the cross-entropy loss; the auxiliary term (``aux_loss``) when a run has one, so
    it never hides inside the loss; evaluation accuracy when logged.
    """
    all_runs = [r for runs in groups.values() for r in runs]
    has_aux = any(r.aux_series()[0].size for r in all_runs)
    has_eval = any(r.eval_series()[0].size for r in all_runs)
    panels = ["loss", *(["aux"] if has_aux else []), *(["eval"] if has_eval else [])]
    fig, axes = _figure(1, len(panels), size=(6.0 * len(panels) if len(panels) > 1 else 8.0, 4.5))
    ax = {name: axes[0, k] for k, name in enumerate(panels)}
    drawn = 0
    for i, (label, runs) in enumerate(groups.items()):
        series = {"loss": [r.loss_series() for r in runs], "aux": [r.aux_series() for r in runs]}
        for name in ("loss", "aux"):
            traces = [(st, moving_average(v, window)) for st, v in series[name] if st.size]
            if traces and name in ax:
                _draw_band(ax[name], traces, f"C{i}", label)
                drawn += name == "loss"
        evals = [t for t in (r.eval_series() for r in runs) if t[0].size]
        if has_eval and evals:
            _draw_band(ax["eval"], evals, f"C{i}", label)
    if not drawn:
        return "no run has loss values"
    ax["loss"].set(
        xlabel="step", ylabel=f"loss (CE, MA {window})", title="training loss (cross-entropy)"
    )
    if has_aux:
        ax["aux"].axhline(0.0, color="k", lw=0.8)
        ax["aux"].set(xlabel="step", ylabel=f"aux_loss (MA {window})", title="regularizer term")
    if has_eval:
        ax["eval"].set(xlabel="step", ylabel="accuracy", title="evaluation accuracy")
    for a in ax.values():
        _legend(a)
    _save(fig, path)
    return None


def _all_components(groups: Groups) -> list[str]:
    names: dict[str, None] = {}
    for runs in groups.values():
        for run in runs:
            names.update(dict.fromkeys(run.components))
    return list(names)


def _compare_grad_norms(groups: Groups, path: Path, window: int) -> str | None:
    """Normalized gradient norm per component, one subplot per label (seed band)."""
    comps = _all_components(groups)
    ncols = min(3, len(groups))
    nrows = math.ceil(len(groups) / ncols)
    fig, axes = _figure(nrows, ncols, size=(5.0 * ncols, 3.8 * nrows), sharey=True)
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
                _draw_band(ax, traces, f"C{j}", comp)
                drawn += 1
        ax.axhline(1.0, color="k", ls="--", lw=1)
        ax.set_yscale("log")
        ax.set(title=label, xlabel="step")
        _legend(ax)
    for k in range(len(groups), nrows * ncols):
        axes[k // ncols, k % ncols].set_visible(False)
    if not drawn:
        return "no run has non-zero grad_norm/<component> values"
    axes[0, 0].set_ylabel("grad norm / early mean")
    fig.suptitle(f"normalized gradient norm (MA {window}): median over seeds, band = min-max")
    _save(fig, path)
    return None


def _compare_lr(groups: Groups, path: Path, window: int) -> str | None:
    """Learning rate per component (one subplot each), one line per label."""
    comps = [
        c
        for c in _all_components(groups)
        if any(r.series(f"lr/{c}")[0].size for runs in groups.values() for r in runs)
    ]
    if not comps:
        return "no run has lr/<component> keys"
    fig, axes = _figure(1, len(comps), size=(5.0 * len(comps), 4.0), sharey=True)
    for j, comp in enumerate(comps):
        ax = axes[0, j]
        for i, (label, runs) in enumerate(groups.items()):
            traces = [r.series(f"lr/{comp}", positive=True) for r in runs]
            traces = [t for t in traces if t[0].size]
            if traces:
                _draw_band(ax, traces, f"C{i}", label, log=True)
        ax.set_yscale("log")
        ax.set(title=f"lr/{comp}", xlabel="step")
        _legend(ax)
    axes[0, 0].set_ylabel("learning rate")
    _save(fig, path)
    return None


_COMPARE_PLOTS: dict[str, Callable[[Groups, Path, int], str | None]] = {
    "compare_kappa.png": _compare_kappa,
    "compare_loss.png": _compare_loss,
    "compare_grad_norms.png": _compare_grad_norms,
    "compare_lr.png": _compare_lr,
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
    runs = _as_runs(run_dirs)
    if not runs:
        raise ValueError("plot_compare needs at least one run")
    groups = group_runs(runs, labels)
    window = smooth or _auto_window(max(len(r.metrics) for r in runs))
    return _draw_all(_COMPARE_PLOTS, groups, Path(out_dir), window, str(out_dir))
