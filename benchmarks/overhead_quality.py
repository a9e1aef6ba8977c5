"""Does the cheap default decide what the exact estimate decides? (issue 13, part 2).

Two measurements, used by ``benchmarks/overhead.py``:

(a) **Open loop, same run.** One training run of a model on easy-VQA, driven by the exact
    estimate (every step, all rows). At every step the exact estimate and the row-subset
    estimates of the same update are all taken. A setting (K, rows) is the subsequence of
    its estimates at the steps it would take (``(t + 1) % K == 0``). At each of the
    setting's estimate steps T, over the span of steps (T - N, T] the tracker's window
    covers, we compare:

    * ``error``: |mean log kappa of the setting's estimates - mean log kappa of the exact
      estimates at every step| (what the controller's smoothed kappa_bar differs by);
    * ``floor``: |mean of the exact estimates at the setting's steps - mean of the exact
      estimates at the steps K/2 later| : two disjoint exact samplings at the setting's
      density over the same span (for K = 1: even vs odd steps); the criterion is
      ``error <= floor``;
    * ``sampling``: |exact at the setting's steps - exact at every step| (the part of the
      error that skipping steps alone makes; error - sampling is the rows' share).

(b) **Closed loop.** The demo's easy-VQA config (tiny pretrained parts, window 10, gamma
    0.03, encoder factor cap 2), encoder/LLM learning-rate ratio in {0.1, 1, 10} with
    eta_llm = 1e-3, strategy ``commit``, seeds {0, 1, 2}: each cell trained through the
    project's trainer with the default estimator and with ``commit.exact=true``. Per ratio:
    mean and std over seeds of the final factors, of log f_enc averaged over the run (how
    fast the controller moved) and of the held-out accuracy; a difference
    is "within seed noise" when |mean_default - mean_exact| <= 2 sqrt(s_d^2 / n + s_e^2 / n)
    (twice the standard error of a difference of two means over n seeds).
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
KS = (1, 2, 4, 8, 16)
FRACTIONS = (1.0, 0.5, 0.25)


def grid_name(k: int, frac: float) -> str:
    """Label of a setting, e.g. ``K=8 rows=0.25``."""
    return f"K={k} rows={frac:g}"


# ---- (a) open loop ------------------------------------------------------------------------
def _log_kappa(m: Any) -> float | None:
    """log kappa of a valid measurement, else None (skipped, as the tracker skips it)."""
    if m is None or not m.valid or m.kappa is None:
        return None
    return math.log(m.kappa)


def kappa_trajectory(
    bench: Any, steps: int, fractions: Sequence[float], warmup: int
) -> dict[float, list[float | None]]:
    """Train with the exact estimate and log every row fraction's estimate of each update.

    The row-subset meters measure the same update as the exact one: they are handed the
    training forward's recorded reference and take their own snapshot of theta_t. Every
    meter restores the parameters and buffers bitwise and forks the RNG, so the extra meters
    do not change the run.

    Args:
        bench: ``overhead_setup.Bench`` (model, components, optimizer, batches).
        steps: Training steps.
        fractions: Row fractions (1.0 = the exact estimate that drives the run).
        warmup: Warmup steps of the shared schedule.

    Returns:
        Fraction -> [log kappa_t or None] per step.
    """
    from commit_mllm import BalanceMeter, CoMMIT, CoMMITConfig

    cfg = CoMMITConfig(exact=True)
    commit = CoMMIT(
        bench.model, bench.optimizer, bench.components, cfg, total_steps=steps, warmup_steps=warmup
    )
    extra = {f: BalanceMeter(bench.model, bench.components, rows=f) for f in fractions if f < 1}
    logs: dict[float, list[float | None]] = {f: [] for f in fractions}
    for t in range(steps):
        batch = bench.batches[t % len(bench.batches)]
        logits = commit.forward(batch)
        ce = F.cross_entropy(logits.float(), _targets(batch))
        commit.backward(ce, commit.aux_loss(logits))
        commit.after_backward()
        torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
        for meter in extra.values():  # the same recorded forward, the same theta_t
            meter._ref, meter.epoch = commit.meter.reference, commit.meter.epoch
            meter.snapshot(t)
        commit.before_step()
        bench.optimizer.step()
        for f, meter in extra.items():
            logs[f].append(_log_kappa(meter.measure(t)))
        logs[1.0].append(_log_kappa(commit.after_step().measurement))
        bench.optimizer.zero_grad(set_to_none=True)
    return logs


def _targets(batch: dict[str, Any]) -> torch.Tensor:
    labels = batch["labels"]
    return labels[:, 1:][labels[:, 1:] != -100]


def _span_mean(logk: Sequence[float | None], steps: range | Sequence[int]) -> float | None:
    vals = [logk[t] for t in steps if 0 <= t < len(logk) and logk[t] is not None]
    return statistics.fmean(vals) if vals else None


def _samplings(span: range, k: int) -> tuple[list[int], list[int]]:
    """Two disjoint samplings of ``span`` at density 1/K: the setting's steps and K/2 later.

    For K = 1 (no sparser disjoint pair exists): even and odd steps.
    """
    if k == 1:
        return [s for s in span if s % 2 == 0], [s for s in span if s % 2]
    shift = k // 2
    return [s for s in span if (s + 1) % k == 0], [s for s in span if (s + 1 + shift) % k == 0]


def window_errors(
    logs: dict[float, list[float | None]], k: int, frac: float, window: int
) -> dict[str, Any]:
    """``error``, ``floor`` and ``sampling`` of setting (K, rows) for a window of N steps.

    Evaluated at each of the setting's estimate steps T >= N (see the module docstring).
    """
    exact, est = logs[1.0], logs[frac]
    err, floor, samp = [], [], []
    for t in range(window, len(exact)):
        if (t + 1) % k:
            continue
        span = range(t - window + 1, t + 1)
        mine, other = _samplings(span, k)
        d = _span_mean(est, [s for s in span if (s + 1) % k == 0])
        e, a, b = _span_mean(exact, span), _span_mean(exact, mine), _span_mean(exact, other)
        if d is not None and e is not None:
            err.append(abs(d - e))
        if a is not None and b is not None:
            floor.append(abs(a - b))
        if k > 1 and a is not None and e is not None:
            samp.append(abs(a - e))
    error, noise = _mean_or_none(err), _mean_or_none(floor)
    return {
        "every": k,
        "rows": frac,
        "window": window,
        "error": error,
        "floor": noise,
        "sampling": _mean_or_none(samp) if k > 1 else 0.0,
        "n": len(err),
        "meets": error is not None and noise is not None and error <= noise,
    }


def _mean_or_none(xs: Sequence[float]) -> float | None:
    return statistics.fmean(xs) if xs else None


def open_loop_errors(
    logs: dict[float, list[float | None]], windows: Sequence[int], ks: Sequence[int] = KS
) -> dict[str, Any]:
    """Every (K, rows) setting's :func:`window_errors` for each window N, and noise stats."""
    out: dict[str, Any] = {}
    for n in windows:
        out[f"N={n}"] = {
            grid_name(k, f): window_errors(logs, k, f, n) for k in ks for f in sorted(logs)[::-1]
        }
    exact = logs[1.0]
    diffs = [b - a for a, b in itertools.pairwise(exact) if a is not None and b is not None]
    single = {
        "exact_step_noise_std": statistics.stdev(diffs) / math.sqrt(2) if len(diffs) > 2 else None,
        "exact_median_log_kappa": statistics.median(v for v in exact if v is not None),
    }
    for f, vals in logs.items():
        if f != 1.0:
            d = [abs(a - b) for a, b in zip(vals, exact) if a is not None and b is not None]
            single[f"mean_abs_step_error_rows={f:g}"] = statistics.fmean(d) if d else None
    out["single_estimate"] = single
    return out


# ---- (b) closed loop ---------------------------------------------------------------------
ARMS = {"default": (), "exact": ("commit.exact=true",)}
#: The metrics criterion (b) is judged on; the run-averaged log f_enc is reported beside them
#: (it shows the lag of sampling every K steps: the first adjustment after warmup comes up to
#: K steps later).
CRITERION = ("log_factor_encoder", "accuracy")


def _closed_loop_run(job: tuple[str, float, int, int, str, tuple[str, ...]]) -> dict[str, Any]:
    """One trainer run of the grid (in a worker process, one torch thread)."""
    arm, ratio, seed, steps, root, extra = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import robustness as rb

    grid = rb.Grid(tasks=("easy-vqa",), steps={"easy-vqa": steps})
    out = Path(root) / arm / f"r{ratio:g}" / f"s{seed}"
    ovr = [*rb.run_overrides(grid, "easy-vqa", "commit", ratio, seed, out), *extra, *ARMS[arm]]
    ovr.append("train.num_threads=1")
    t0 = time.perf_counter()
    reused = (out / "summary.json").is_file()
    summary = rb.train_one("easy-vqa", ovr, out)
    m = rb.run_metrics(out, summary)
    recs = _records(out)
    last = recs[-1]
    return {
        "arm": arm,
        "ratio": ratio,
        "seed": seed,
        "accuracy": summary.get("accuracy"),
        "factor_encoder": last.get("factor/encoder"),
        "factor_llm": last.get("factor/llm"),
        "mean_log_factor_encoder": statistics.fmean(
            math.log(r["factor/encoder"]) for r in recs if r.get("factor/encoder")
        ),
        "final_kappa_bar": last.get("kappa_bar"),
        "estimates": sum(1 for r in recs if r.get("kappa") is not None),
        "mean_log_kappa": m.get("mean_log_kappa"),
        "final_loss": m.get("final_loss"),
        "ms_per_step": summary.get("ms_per_step"),
        "train_seconds": summary.get("seconds"),
        "reused": reused,
        "seconds": round(time.perf_counter() - t0, 1),
        "run_dir": str(out),
    }


def _records(out: Path) -> list[dict[str, Any]]:
    from commit_mllm.training.tracking import read_jsonl

    return [r for r in read_jsonl(out / "metrics.jsonl") if "ce" in r]


def closed_loop(
    ratios: Sequence[float] = (0.1, 1.0, 10.0),
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 250,
    procs: int = 2,
    root: Path | None = None,
    extra: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train the grid with both estimators (``procs`` processes) and compare them.

    Args:
        ratios: eta_enc / eta_llm values.
        seeds: Seeds.
        steps: Training steps per run.
        procs: Worker processes (one torch thread each).
        root: Runs folder (a run whose ``summary.json`` exists is read back, not retrained).
        extra: Further dotted overrides for every run (e.g. ``commit.factor_caps.encoder=10``).
        log: Progress lines.
    """
    root = root or ROOT / "runs" / "overhead-closed-loop"
    jobs = [(a, r, s, steps, str(root), tuple(extra)) for s in seeds for r in ratios for a in ARMS]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    runs = []
    with ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as pool:
        for res in pool.map(_closed_loop_run, jobs):
            runs.append(res)
            log(
                f"[{len(runs)}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {res['arm']} "
                f"r={res['ratio']:g} s={res['seed']}: acc={res['accuracy']:.3f} "
                f"f_enc={res['factor_encoder']:.3f} ({res['estimates']} estimates)"
            )
    cells = compare_arms(runs, ratios)
    return {
        "task": "easy-vqa",
        "config": "configs/demo_vision.yaml + benchmarks/robustness.py overrides",
        "extra_overrides": list(extra),
        "steps": steps,
        "seeds": list(seeds),
        "ratios": list(ratios),
        "procs": procs,
        "seconds": round(time.perf_counter() - t0, 1),
        "train_seconds": round(sum(r["train_seconds"] or 0.0 for r in runs), 1),
        "reused": sum(r["reused"] for r in runs),
        "runs": runs,
        "cells": cells,
        "all_within_noise": all(c["within_noise"] for c in cells if c["metric"] in CRITERION),
    }


def _stats(xs: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0


def compare_arms(runs: Sequence[dict[str, Any]], ratios: Sequence[float]) -> list[dict]:
    """Per ratio and metric: means, seed stds, difference, 2-SE bound, verdict."""
    cells = []
    for ratio in ratios:
        for metric in ("log_factor_encoder", "mean_log_factor_encoder", "accuracy"):
            vals = {}
            for arm in ARMS:
                xs = [_metric(r, metric) for r in runs if r["arm"] == arm and r["ratio"] == ratio]
                vals[arm] = [x for x in xs if x is not None]
            if not (vals["default"] and vals["exact"]):
                continue
            (md, sd), (me, se) = _stats(vals["default"]), _stats(vals["exact"])
            n = min(len(vals["default"]), len(vals["exact"]))
            bound = 2 * math.sqrt(sd**2 / n + se**2 / n) if n else float("nan")
            diff = md - me
            cells.append(
                {
                    "ratio": ratio,
                    "metric": metric,
                    "default_mean": md,
                    "default_std": sd,
                    "exact_mean": me,
                    "exact_std": se,
                    "diff": diff,
                    "bound_2se": bound,
                    "within_noise": abs(diff) <= bound + 1e-9,  # float noise of equal runs
                    "n": n,
                }
            )
    return cells


def _metric(run: dict[str, Any], metric: str) -> float | None:
    if metric == "log_factor_encoder":
        f = run.get("factor_encoder")
        return math.log(f) if f else None
    return run.get(metric)
