"""Robustness of CoMMIT to the encoder / LLM learning-rate ratio (issue "Benchmarks", part 2).

Grid: ratio eta_enc / eta_llm in {0.1, 1, 10} (eta_llm fixed at the demo's 1e-3) x strategies
{constant, feature_cd, language_cd, ogm_ge, commit_clr, commit} x seeds {0, 1, 2}, on the
built-in vision task (easy-vqa, ``configs/demo_vision.yaml``) and the built-in audio task
(tones-aqa, ``configs/demo_audio.yaml``), each run through the project's trainer.

Per run: final held-out accuracy (overall and per question type), loss AUC (mean CE over
all steps), and the steps the smoothed CE needs to reach the *best constant run's* final
loss (same task and seed). Per task and strategy: the accuracy spread across the ratios
(max - min of the per-ratio seed means) and the mean over ratios. Targets checked: CoMMIT's
spread <= 1/3 of constant's, its mean >= the best constant cell, and it reaches the target
loss in <= 0.7x the steps of the best constant run.

Usage::

    python benchmarks/robustness.py --quick          # < 10 min on 2 cores (see QUICK)
    python benchmarks/robustness.py                  # the full grid (FULL)
    python benchmarks/robustness.py --quick --tasks easy-vqa --strategies constant,commit \
        --ratios 0.1,1 --commit-set factor_caps.encoder=10 --tag tune-cap10

Runs are skipped when their ``summary.json`` exists, so an interrupted grid resumes.
Results: ``benchmarks/results/robustness[-<tag>].json``, plots ``robustness*_*.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CONFIGS = {"easy-vqa": "configs/demo_vision.yaml", "tones-aqa": "configs/demo_audio.yaml"}
STRATEGIES = ("constant", "feature_cd", "language_cd", "ogm_ge", "commit_clr", "commit")
LLM_LR = 1.0e-3
# CoMMIT defaults used by this benchmark (tuned on easy-vqa only; see docs/results.md).
COMMIT_DEFAULTS = ("commit.window=10", "commit.gamma=0.03", "commit.factor_caps.encoder=2.0")


@dataclass
class Grid:
    """One benchmark grid.

    Attributes:
        tasks: Built-in tasks.
        ratios: eta_enc / eta_llm values.
        strategies: Strategy names.
        seeds: Seeds.
        steps: Training steps per task.
        eval_samples: Held-out questions per run.
        commit_set: Extra ``commit.*`` overrides for commit / commit_clr.
    """

    tasks: tuple[str, ...] = ("easy-vqa", "tones-aqa")
    ratios: tuple[float, ...] = (0.1, 1.0, 10.0)
    strategies: tuple[str, ...] = STRATEGIES
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: dict[str, int] = field(default_factory=lambda: {"easy-vqa": 250, "tones-aqa": 160})
    eval_samples: int = 200
    commit_set: tuple[str, ...] = ()


FULL = Grid()
QUICK = Grid(
    strategies=("constant", "commit"),
    seeds=(0,),
    steps={"easy-vqa": 200, "tones-aqa": 120},
    eval_samples=200,
)


def run_overrides(grid: Grid, task: str, strategy: str, ratio: float, seed: int, out: Path):
    """The dotted overrides of one run of the grid."""
    ovr = [
        f"run.output_dir={out}",
        f"run.seed={seed}",
        "run.progress=false",
        "run.tensorboard=false",
        f"train.steps={grid.steps[task]}",
        f"train.llm_lr={LLM_LR}",
        f"train.encoder_lr={ratio * LLM_LR}",
        "train.eval_every=0",
        "train.save_every=0",
        f"data.max_eval_samples={grid.eval_samples}",
        f"commit.strategy={strategy}",
        f"commit.seed={seed}",
    ]
    if strategy in ("commit", "commit_clr"):
        ovr += [*COMMIT_DEFAULTS, *(f"commit.{s}" for s in grid.commit_set)]
    return ovr


def run_dir(root: Path, task: str, strategy: str, ratio: float, seed: int) -> Path:
    """Folder of one run."""
    return root / task / strategy / f"r{ratio:g}" / f"s{seed}"


def train_one(task: str, overrides: Sequence[str], out: Path) -> dict[str, Any]:
    """Train one run (or read it back when ``summary.json`` exists)."""
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    from commit_mllm.training.config import load_config
    from commit_mllm.training.trainer import train

    cfg = load_config(ROOT / CONFIGS[task], list(overrides))
    return train(cfg, log=lambda _msg: None)


def smoothed(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average (the first points average what exists)."""
    x = np.asarray(values, dtype=float)
    c = np.cumsum(np.insert(x, 0, 0.0))
    idx = np.arange(1, len(x) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def run_metrics(out: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """Accuracy, loss AUC, CE curve and kappa statistics of one finished run."""
    from commit_mllm.training.tracking import read_jsonl

    recs = [r for r in read_jsonl(out / "metrics.jsonl") if "ce" in r]
    ce = [r["ce"] for r in recs]
    logk = [math.log(r["kappa"]) for r in recs if r.get("kappa")]
    acc = {k: v for k, v in summary.items() if k.startswith("accuracy")}
    return {
        **acc,
        "final_loss": summary.get("final_loss"),
        "loss_auc": float(np.mean(ce)) if ce else None,
        "mean_log_kappa": statistics.fmean(logk) if logk else None,
        "final_factor_encoder": recs[-1].get("factor/encoder") if recs else None,
        "seconds": summary.get("seconds"),
        "ms_per_step": summary.get("ms_per_step"),
        "ce": ce,
    }


def steps_to(ce: Sequence[float], target: float, window: int) -> int | None:
    """First step (1-based count) at which the smoothed CE is <= ``target``; None if never."""
    hit = np.nonzero(smoothed(ce, window) <= target)[0]
    return int(hit[0]) + 1 if len(hit) else None


def run_grid(grid: Grid, root: Path, log=print) -> list[dict[str, Any]]:
    """Train every run of ``grid`` (sequentially) and return one record per run."""
    rows = []
    total = len(grid.tasks) * len(grid.ratios) * len(grid.strategies) * len(grid.seeds)
    t0 = time.perf_counter()
    for task in grid.tasks:
        for seed in grid.seeds:
            for ratio in grid.ratios:
                for strategy in grid.strategies:
                    out = run_dir(root, task, strategy, ratio, seed)
                    ovr = run_overrides(grid, task, strategy, ratio, seed, out)
                    reused = (out / "summary.json").is_file()
                    summary = train_one(task, ovr, out)
                    m = run_metrics(out, summary)
                    rows.append(
                        {"task": task, "strategy": strategy, "ratio": ratio, "seed": seed}
                        | {"run_dir": str(out), "reused": reused}
                        | m
                    )
                    log(
                        f"[{len(rows)}/{total} {time.perf_counter() - t0:.0f}s] {task} "
                        f"{strategy} r={ratio:g} s={seed}: acc={m.get('accuracy', 0):.3f} "
                        f"loss={m['final_loss']:.3f} auc={m['loss_auc']:.3f} "
                        f"({m['seconds']:.0f}s)"
                    )
    return rows


def _mean(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs: Sequence[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def add_steps_to_target(rows: list[dict[str, Any]], grid: Grid) -> None:
    """Per task and seed: the best constant run's final loss, and each run's steps to it."""
    for task in grid.tasks:
        window = max(5, grid.steps[task] // 20)
        for seed in grid.seeds:
            group = [r for r in rows if r["task"] == task and r["seed"] == seed]
            const = [r for r in group if r["strategy"] == "constant"]
            if not const:
                continue
            best = min(const, key=lambda r: r["final_loss"])
            for r in group:
                r["target_loss"] = best["final_loss"]
                r["target_from_ratio"] = best["ratio"]
                r["steps_to_target"] = steps_to(r["ce"], best["final_loss"], window)
                r["best_constant_steps"] = steps_to(best["ce"], best["final_loss"], window)


def cell_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean / std over seeds per (task, strategy, ratio)."""
    keys = sorted({(r["task"], r["strategy"], r["ratio"]) for r in rows})
    cells = []
    for task, strategy, ratio in keys:
        rs = [r for r in rows if (r["task"], r["strategy"], r["ratio"]) == (task, strategy, ratio)]
        metric_keys = sorted({k for r in rs for k in r if k.startswith("accuracy")})
        cell = {"task": task, "strategy": strategy, "ratio": ratio, "seeds": len(rs)}
        for k in [*metric_keys, "final_loss", "loss_auc", "mean_log_kappa", "steps_to_target"]:
            vals = [r.get(k) for r in rs]
            cell[k], cell[f"{k}_std"] = _mean(vals), _std(vals)
        cell["reached_target"] = sum(r.get("steps_to_target") is not None for r in rs)
        cell["best_constant_steps"] = _mean([r.get("best_constant_steps") for r in rs])
        cells.append(cell)
    return cells


def strategy_table(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (task, strategy): accuracy spread and mean across ratios, worst and best cell."""
    out = []
    for task, strategy in sorted({(c["task"], c["strategy"]) for c in cells}):
        cs = [c for c in cells if c["task"] == task and c["strategy"] == strategy]
        accs = [c["accuracy"] for c in cs if c.get("accuracy") is not None]
        out.append(
            {
                "task": task,
                "strategy": strategy,
                "ratios": [c["ratio"] for c in cs],
                "accuracy_by_ratio": accs,
                "accuracy_mean": _mean(accs),
                "accuracy_spread": max(accs) - min(accs) if accs else None,
                "accuracy_worst": min(accs) if accs else None,
                "loss_auc_mean": _mean([c["loss_auc"] for c in cs]),
                "steps_to_target_mean": _mean([c["steps_to_target"] for c in cs]),
                "best_constant_steps": _mean([c["best_constant_steps"] for c in cs]),
            }
        )
    return out


def targets(strategies: list[dict[str, Any]], cells: list[dict[str, Any]]) -> list[dict]:
    """The three targets of the issue for commit (and commit_clr), per task."""
    res = []
    for task in sorted({s["task"] for s in strategies}):
        by = {s["strategy"]: s for s in strategies if s["task"] == task}
        const = by.get("constant")
        if const is None:
            continue
        const_cells = [c for c in cells if c["task"] == task and c["strategy"] == "constant"]
        best_cell = max(const_cells, key=lambda c: c["accuracy"])
        for name in ("commit", "commit_clr"):
            s = by.get(name)
            if s is None:
                continue
            steps = [
                c["steps_to_target"]
                for c in cells
                if c["task"] == task and c["strategy"] == name and c["steps_to_target"] is not None
            ]
            n_cells = sum(1 for c in cells if c["task"] == task and c["strategy"] == name)
            best_steps = best_cell_steps(cells, task)
            ratio = min(steps) / best_steps if steps and best_steps else None
            worst = (
                max(steps) / best_steps if best_steps and steps and len(steps) == n_cells else None
            )
            res.append(
                {
                    "task": task,
                    "strategy": name,
                    "spread": s["accuracy_spread"],
                    "constant_spread": const["accuracy_spread"],
                    "spread_ok": _le(s["accuracy_spread"], const["accuracy_spread"] / 3),
                    "mean_accuracy": s["accuracy_mean"],
                    "best_constant_cell": best_cell["accuracy"],
                    "best_constant_ratio": best_cell["ratio"],
                    "mean_ok": _le(best_cell["accuracy"], s["accuracy_mean"]),
                    "fastest_steps_to_target": min(steps) if steps else None,
                    "best_constant_steps": best_steps,
                    "steps_ratio_fastest_ratio": ratio,
                    "steps_ratio_worst_ratio": worst,
                    "ratios_reaching_target": f"{len(steps)}/{n_cells}",
                    "steps_ok_at_every_ratio": worst is not None and worst <= 0.7,
                }
            )
    return res


def best_cell_steps(cells: list[dict[str, Any]], task: str) -> float | None:
    """Steps of the best-final-loss constant run to its own final loss (mean over seeds)."""
    vals = [c["best_constant_steps"] for c in cells if c["task"] == task]
    return _mean(vals)


def _le(a: float | None, b: float | None) -> bool:
    return a is not None and b is not None and a <= b + 1e-12


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    args = _parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    grid = _grid_from_args(args)
    tag = args.tag or ("quick" if args.quick else "full")
    root = Path(args.runs) / tag
    t0 = time.perf_counter()
    rows = run_grid(grid, root)
    wall = time.perf_counter() - t0
    add_steps_to_target(rows, grid)
    cells = cell_table(rows)
    strategies = strategy_table(cells)
    result = {
        "grid": {**grid.__dict__, "llm_lr": LLM_LR, "commit_defaults": list(COMMIT_DEFAULTS)},
        "threads": args.threads,
        "wall_seconds": wall,
        "run_seconds_total": sum(r["seconds"] or 0.0 for r in rows),
        "runs_reused": sum(r["reused"] for r in rows),
        "full_grid_estimate_minutes": estimate_full(rows, grid),
        "targets": targets(strategies, cells),
        "strategies": strategies,
        "cells": cells,
        "runs": [{k: v for k, v in r.items() if k != "ce"} for r in rows],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"robustness-{tag}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    plot_results(rows, cells, grid, tag)
    compare_reports(rows, grid, tag, root)
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {path} ({wall:.0f} s)")
    return 0


def estimate_full(rows: list[dict[str, Any]], grid: Grid) -> float:
    """Minutes the FULL grid would take at the per-step cost measured here (per task)."""
    total = 0.0
    for task in FULL.tasks:
        rs = [r for r in rows if r["task"] == task and r.get("ms_per_step")]
        if not rs:
            continue
        ms = statistics.fmean(r["ms_per_step"] for r in rs)
        overhead = statistics.fmean(
            r["seconds"] - r["ms_per_step"] * grid.steps[task] / 1000 for r in rs
        )
        n = len(FULL.ratios) * len(FULL.strategies) * len(FULL.seeds)
        total += n * (ms * FULL.steps[task] / 1000 + max(0.0, overhead) + 5.0)
    return total / 60


def plot_results(rows: list[dict], cells: list[dict], grid: Grid, tag: str) -> None:
    """Accuracy vs ratio per strategy, and smoothed CE curves per ratio, for each task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for task in grid.tasks:
        fig, axes = plt.subplots(
            1, 1 + len(grid.ratios), figsize=(4.2 * (1 + len(grid.ratios)), 3.6)
        )
        ax = axes[0]
        for strategy in grid.strategies:
            cs = sorted(
                (c for c in cells if c["task"] == task and c["strategy"] == strategy),
                key=lambda c: c["ratio"],
            )
            ax.errorbar(
                [c["ratio"] for c in cs],
                [c["accuracy"] for c in cs],
                yerr=[c["accuracy_std"] or 0 for c in cs],
                marker="o",
                capsize=3,
                label=strategy,
            )
        ax.set(xscale="log", xlabel="eta_enc / eta_llm", ylabel="held-out accuracy", title=task)
        ax.legend(fontsize=7)
        window = max(5, grid.steps[task] // 20)
        for ax, ratio in zip(axes[1:], grid.ratios):
            for strategy in grid.strategies:
                curves = [
                    smoothed(r["ce"], window)
                    for r in rows
                    if (r["task"], r["strategy"], r["ratio"]) == (task, strategy, ratio)
                ]
                if not curves:
                    continue
                arr = np.vstack(curves)
                x = np.arange(1, arr.shape[1] + 1)
                line = ax.plot(x, arr.mean(0), label=strategy)[0]
                ax.fill_between(x, arr.min(0), arr.max(0), color=line.get_color(), alpha=0.2)
            ax.set(yscale="log", xlabel="step", ylabel="CE (smoothed)", title=f"ratio {ratio:g}")
        fig.tight_layout()
        fig.savefig(RESULTS / f"robustness-{tag}_{task}.png", dpi=110)
        plt.close(fig)


def compare_reports(rows: list[dict], grid: Grid, tag: str, root: Path) -> None:
    """Per task and ratio: the library's compare report (in the runs folder) and its plots.

    kappa_bar per strategy (the paper's Fig. 2), normalized per-component gradient norms
    (its Fig. 3) and loss curves with seed bands are copied to ``benchmarks/results``.
    """
    import shutil

    from commit_mllm.reporting.report import write_compare_report

    for task in grid.tasks:
        for ratio in grid.ratios:
            dirs = [r["run_dir"] for r in rows if r["task"] == task and r["ratio"] == ratio]
            if not dirs:
                continue
            report = write_compare_report(dirs, root / "compare" / f"{task}-r{ratio:g}")
            for kind in ("kappa", "grad_norms", "loss"):
                png = report.parent / f"compare_{kind}.png"
                if png.is_file():
                    name = f"robustness-{tag}_{task}_r{ratio:g}_{kind}.png"
                    shutil.copyfile(png, RESULTS / name)


def _grid_from_args(args: argparse.Namespace) -> Grid:
    grid = QUICK if args.quick else FULL
    if args.tasks:
        grid = replace(grid, tasks=tuple(args.tasks.split(",")))
    if args.strategies:
        grid = replace(grid, strategies=tuple(args.strategies.split(",")))
    if args.ratios:
        grid = replace(grid, ratios=tuple(float(x) for x in args.ratios.split(",")))
    if args.seeds:
        grid = replace(grid, seeds=tuple(int(x) for x in args.seeds.split(",")))
    if args.steps:
        grid = replace(grid, steps={t: args.steps for t in grid.steps})
    return replace(grid, commit_set=tuple(args.commit_set))


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the QUICK grid (< 10 min, 2 cores)")
    p.add_argument("--tasks", help="comma-separated subset of tasks")
    p.add_argument("--strategies", help="comma-separated strategies")
    p.add_argument("--ratios", help="comma-separated eta_enc / eta_llm ratios")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="steps for every task")
    p.add_argument(
        "--commit-set", action="append", default=[], help="extra commit.KEY=VALUE (repeatable)"
    )
    p.add_argument("--tag", help="name of the results file and runs folder")
    p.add_argument("--runs", default=str(ROOT / "runs" / "robustness"), help="runs root")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared box)")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
