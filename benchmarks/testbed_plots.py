"""The testbed grid's plots: accuracy against the rate ratio, and the factors the rules chose."""

from __future__ import annotations

import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testbed_summary as ts


def plot(rows: list[dict[str, Any]], tag: str, out: Path = ts.RESULTS) -> list[Path]:
    """Per (task, regime): accuracy vs ratio per strategy, and eval curves per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ok = [r for r in rows if r.get("accuracy") is not None]
    for task, regime in sorted({(r["task"], r["regime"]) for r in ok}):
        rs = [r for r in ok if (r["task"], r["regime"]) == (task, regime)]
        ratios = sorted(
            {r["ratio"] for r in rs if r["strategy"] not in (ts.TEXT_ONLY, *ts.BASELINES)}
        )
        fig, grid = plt.subplots(
            1, 1 + len(ratios), figsize=(4.2 * (1 + len(ratios)), 3.6), squeeze=False
        )
        axes = list(grid[0])  # a grid of recipes only has no ratio panels
        text = [r["accuracy"] for r in rs if r["strategy"] == ts.TEXT_ONLY]
        for ax in axes:
            if text:
                ax.axhline(statistics.fmean(text), color="gray", ls=":", label="text-only")
        for i, b in enumerate(sorted({r["strategy"] for r in rs} & set(ts.BASELINES))):
            acc = statistics.fmean(r["accuracy"] for r in rs if r["strategy"] == b)
            axes[0].axhline(acc, color=f"C{7 + i}", ls="--", lw=1, label=f"{b} (recipe)")
            curve = _mean_curve([r["eval_curve"] for r in rs if r["strategy"] == b])
            if curve:  # a recipe has no ratio: its learning curve in every panel
                for ax in axes[1:]:
                    ax.plot(*curve, color=f"C{7 + i}", ls="--", marker=".", label=f"{b} (recipe)")
        strategies = sorted({r["strategy"] for r in rs} - {ts.TEXT_ONLY, *ts.BASELINES})
        for s in strategies:
            xs = [x for x in ratios if any(r["strategy"] == s and r["ratio"] == x for r in rs)]
            accs = [
                [r["accuracy"] for r in rs if r["strategy"] == s and r["ratio"] == x] for x in xs
            ]
            axes[0].errorbar(
                xs,
                [statistics.fmean(a) for a in accs],
                yerr=[statistics.pstdev(a) for a in accs],
                marker="o",
                capsize=3,
                label=s,
            )
            for ax, x in zip(axes[1:], ratios):
                curve = _mean_curve(
                    [r["eval_curve"] for r in rs if r["strategy"] == s and r["ratio"] == x]
                )
                if curve:
                    ax.plot(*curve, marker=".", label=s)
                ax.set(xlabel="step", ylabel="held-out accuracy", title=f"ratio {x:g}")
        axes[0].set(
            xscale="log",
            xlabel="eta_enc / eta_llm",
            ylabel="held-out accuracy",
            title=f"{task}, regime {regime}",
        )
        axes[0].legend(fontsize=7)
        if len(axes) > 1:
            axes[-1].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"testbed-{tag}_{task}-{regime}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _mean_curve(curves: list[list]) -> tuple[list, list] | None:
    """(steps, mean accuracy) over the seeds evaluated during the run (the longest curves)."""
    longest = max((len(c) for c in curves), default=0)
    curves = [c for c in curves if len(c) == longest]  # the curve seeds only
    if not longest:
        return None
    steps = [p[0] for p in curves[0]]
    return steps, [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]


def plot_factors(rows: list[dict[str, Any]], tag: str, out: Path = ts.RESULTS) -> list[Path]:
    """Per cell: each steering rule's encoder-side factors over the run (seed 0), per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    steer = [r for r in rows if r.get("factor_curve") and r["strategy"] not in ("constant",)]
    steer = [r for r in steer if r["strategy"] not in (*ts.BASELINES, ts.TEXT_ONLY)]
    for task, regime in sorted({(r["task"], r["regime"]) for r in steer}):
        rs = [r for r in steer if (r["task"], r["regime"]) == (task, regime) and r["seed"] == 0]
        strategies = sorted({r["strategy"] for r in rs})
        if not strategies:
            continue
        fig, grid = plt.subplots(
            1, len(strategies), figsize=(5 * len(strategies), 3.6), squeeze=False
        )
        axes = list(grid[0])
        for ax, s in zip(axes, strategies):
            for i, r in enumerate(sorted((r for r in rs if r["strategy"] == s), key=_ratio)):
                for c, curve in r["factor_curve"].items():
                    if c == "llm" or not curve:
                        continue
                    steps, f = zip(*curve)
                    eff = [r["ratio"] * x for x in f]  # the effective ratio eta_c / eta_llm
                    ax.plot(steps, eff, color=f"C{i}", label=f"set {r['ratio']:g} ({c})")
            ax.set(yscale="log", xlabel="step", ylabel="effective eta_c / eta_llm", title=s)
            ax.legend(fontsize=7)
        fig.suptitle(f"{task}, regime {regime}: where each rule takes the rate (seed 0)")
        fig.tight_layout()
        path = out / f"testbed-{tag}_{task}-{regime}_factors.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def _ratio(r: dict[str, Any]) -> float:
    return r["ratio"]
