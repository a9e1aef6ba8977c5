"""The testbed grid: does a balance strategy pay off against a tuned constant LR?

Grid: regime (A: tower frozen + fresh projector + LoRA LLM; B: everything trained; C: from
scratch) x task (vision: easy-vqa, audio: tones-aqa) x strategy x LR ratio
eta_enc / eta_llm (eta_llm fixed by the config) x seed, each run through the project's CLI
(`commit-mllm train`) as its own process with one torch thread, plus the text-only baseline
(`data.blind=true`, constant LR at ratio 1) per regime, task and seed. Configs:
``configs/testbed/<task>-<regime>-<parts>.yaml``.

Per strategy and cell (regime, task): accuracy per ratio (mean and std over seeds), the mean
over the ratios, the spread (max - min of the per-ratio means), the best cell, collapses
(a run within ``COLLAPSE_MARGIN`` of its seed's text-only accuracy), and the goal of the
payoff issue against constant LR: mean >= constant's best cell, spread <= 1/3 of
constant's, no collapse, and mean not below constant's mean by more than one seed-std.

Usage::

    python benchmarks/testbed.py --quick                 # < 15 min on 2 cores
    python benchmarks/testbed.py --jobs 2                # the full tiny grid (hours)
    python benchmarks/testbed.py --regimes A --tasks vision --parts real --seeds 0 \
        --strategies constant,progress --tag real-A      # the real-parts confirmation

Finished runs (their ``summary.json``) are reused, so an interrupted grid resumes. Results:
``benchmarks/results/testbed-<tag>.json``, ``testbed-<tag>.md`` (tables), plots
``testbed-<tag>_<task>-<regime>.png``; ``--headline`` also writes the ``payoff`` entries of
``benchmarks/results/headline.json`` (other keys kept).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
TASKS = {"vision": "easy-vqa", "audio": "tones-aqa"}
STRATEGIES = ("constant", "commit_clr", "commit", "progress", "feature_cd", "language_cd", "ogm_ge")
COLLAPSE_MARGIN = 0.02
RECOMMENDED = "progress"
TEXT_ONLY = "text_only"


@dataclass
class Grid:
    """One grid of the testbed (see the module docstring)."""

    regimes: tuple[str, ...] = ("A", "B", "C")
    tasks: tuple[str, ...] = ("vision", "audio")
    parts: str = "tiny"
    strategies: tuple[str, ...] = STRATEGIES
    ratios: tuple[float, ...] = (0.1, 1.0, 10.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # None = the config's
    llm_lr: float | None = None  # None = the config's eta_llm
    text_only: bool = True
    curve_seeds: tuple[int, ...] = (0,)  # seeds evaluated during the run (learning curves)
    overrides: tuple[str, ...] = ()
    run_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


FULL = Grid()
QUICK = Grid(
    regimes=("A",),
    tasks=("vision",),
    strategies=("constant", "progress"),
    ratios=(0.1, 10.0),
    seeds=(0,),
    steps=300,
    text_only=True,
)


def config_path(grid: Grid, task: str, regime: str) -> Path:
    """The config of one cell."""
    return ROOT / "configs" / "testbed" / f"{task}-{regime}-{grid.parts}.yaml"


def run_dir(root: Path, task: str, regime: str, strategy: str, ratio: float, seed: int) -> Path:
    """Folder of one run."""
    return root / f"{task}-{regime}" / strategy / f"r{ratio:g}" / f"s{seed}"


def llm_lr(cfg_path: Path) -> float:
    """The config's eta_llm (the grid keeps it and sets eta_enc = ratio x eta_llm)."""
    train = _train(cfg_path)
    return float(train.get("llm_lr") or train["lr"])


def _train(cfg_path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(cfg_path.read_text())["train"]


def run_command(
    grid: Grid, task: str, regime: str, strategy: str, ratio: float, seed: int, out: Path
) -> list[str]:
    """The ``commit-mllm train`` command line of one run."""
    cfg = config_path(grid, task, regime)
    eta = grid.llm_lr or llm_lr(cfg)
    ovr = [
        f"run.output_dir={out}",
        f"run.seed={seed}",
        "run.progress=false",
        "run.tensorboard=false",
        "train.num_threads=1",
        f"train.llm_lr={eta!r}",
        f"train.encoder_lr={ratio * eta!r}",
        f"commit.seed={seed}",
    ]
    if grid.steps:
        warmup = min(_train(cfg).get("warmup_steps", 0), grid.steps // 5)  # shorter runs
        ovr += [
            f"train.steps={grid.steps}",
            f"train.eval_every={max(1, grid.steps // 4)}",
            f"train.warmup_steps={warmup}",
        ]
    if seed not in grid.curve_seeds:
        ovr.append("train.eval_every=0")  # the final evaluation only
    if strategy == TEXT_ONLY:
        ovr += ["commit.strategy=constant", "data.blind=true"]
    else:
        ovr.append(f"commit.strategy={strategy}")
    ovr += [*grid.overrides, *grid.run_overrides.get(strategy, ())]
    py = sys.executable
    return [py, "-m", "commit_mllm.cli", "train", "--config", str(cfg), *ovr]


def jobs(grid: Grid, root: Path) -> list[dict[str, Any]]:
    """Every run of the grid (text-only baseline included) as a job description."""
    out = []
    for task in grid.tasks:
        for regime in grid.regimes:
            for seed in grid.seeds:
                runs = [(s, r) for s in grid.strategies for r in grid.ratios]
                if grid.text_only:
                    runs.append((TEXT_ONLY, 1.0))
                for strategy, ratio in runs:
                    d = run_dir(root, task, regime, strategy, ratio, seed)
                    cmd = run_command(grid, task, regime, strategy, ratio, seed, d)
                    out.append(
                        {
                            "task": task,
                            "regime": regime,
                            "strategy": strategy,
                            "ratio": ratio,
                            "seed": seed,
                            "run_dir": d,
                            "cmd": cmd,
                        }
                    )
    return out


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run in its own process (or reuse it) and read its results back."""
    d: Path = job["run_dir"]
    reused = (d / "summary.json").is_file()
    if not reused:
        d.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        with open(d.parent / f"{d.name}.log", "w") as log:
            proc = subprocess.run(job["cmd"], stdout=log, stderr=subprocess.STDOUT, env=env)
        if proc.returncode != 0:
            return {**_key(job), "failed": proc.returncode, "log": str(d.parent / f"{d.name}.log")}
    return {**_key(job), "reused": reused, **read_run(d)}


def _key(job: dict[str, Any]) -> dict[str, Any]:
    return {k: job[k] for k in ("task", "regime", "strategy", "ratio", "seed")} | {
        "run_dir": str(job["run_dir"])
    }


def read_run(d: Path) -> dict[str, Any]:
    """Accuracy, CE, eval curve, kappa and factors of one finished run."""
    from commit_mllm.tracking import read_jsonl

    summary = json.loads((d / "summary.json").read_text())
    recs = [r for r in read_jsonl(d / "metrics.jsonl") if "ce" in r]
    evals = read_jsonl(d / "eval.jsonl") if (d / "eval.jsonl").is_file() else []
    last = recs[-1] if recs else {}
    return {
        **{k: v for k, v in summary.items() if k.startswith("accuracy")},
        "final_loss": summary.get("final_loss"),
        "mean_log_kappa": summary.get("mean_log_kappa"),
        "seconds": summary.get("seconds"),
        "ms_per_step": summary.get("ms_per_step"),
        "factors": {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("factor/")},
        "eval_curve": [[e["step"], e.get("accuracy")] for e in evals],
        "ce_curve": _thin([[r["step"], r["ce"]] for r in recs], 100),
    }


def _thin(points: list, n: int) -> list:
    """About ``n`` points: means of consecutive chunks (a smoothed curve)."""
    if len(points) <= n:
        return points
    k = len(points) // n
    return [
        [points[i + k - 1][0], statistics.fmean(p[1] for p in points[i : i + k])]
        for i in range(0, len(points) - k + 1, k)
    ]


def run_grid(grid: Grid, root: Path, n_jobs: int, log=print) -> list[dict[str, Any]]:
    """Run (or reuse) every job, ``n_jobs`` processes at a time; one record per run."""
    todo = jobs(grid, root)
    t0, done, lock = time.perf_counter(), [], threading.Lock()

    def go(job):
        rec = run_one(job)
        acc = rec.get("accuracy")
        with lock:  # one whole line per finished run, whichever worker finishes first
            done.append(rec)
            log(
                f"[{len(done)}/{len(todo)} {time.perf_counter() - t0:.0f}s] {job['task']}-"
                f"{job['regime']} {job['strategy']} r={job['ratio']:g} s={job['seed']}: "
                + (f"acc={acc:.3f}" if acc is not None else f"FAILED ({rec.get('log')})")
            )
            sys.stdout.flush()
        return rec

    with ThreadPoolExecutor(max_workers=n_jobs) as pool:
        return list(pool.map(go, todo))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.fmean(xs) if xs else None


def _std(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per (task, regime): text-only baseline, per-strategy cells and the payoff goal."""
    out: dict[str, Any] = {}
    ok = [r for r in rows if r.get("accuracy") is not None]
    for task, regime in sorted({(r["task"], r["regime"]) for r in ok}):
        cell_rows = [r for r in ok if (r["task"], r["regime"]) == (task, regime)]
        text = {r["seed"]: r["accuracy"] for r in cell_rows if r["strategy"] == TEXT_ONLY}
        strategies = {}
        for strategy in sorted({r["strategy"] for r in cell_rows} - {TEXT_ONLY}):
            rs = [r for r in cell_rows if r["strategy"] == strategy]
            strategies[strategy] = strategy_summary(rs, text)
        entry = {
            "text_only": {
                "mean": _mean(text.values()),
                "std": _std(text.values()),
                "seeds": sorted(text),
            },
            "strategies": strategies,
        }
        if "constant" in strategies:
            entry["goal"] = {
                s: goal(v, strategies["constant"]) for s, v in strategies.items() if s != "constant"
            }
            for s, v in strategies.items():
                v["time_vs_constant"] = _time_ratio(cell_rows, s)
        out[f"{task}-{regime}"] = entry
    return out


def _time_ratio(rows: list[dict[str, Any]], strategy: str) -> float | None:
    """Median over (ratio, seed) cells of this strategy's run time / constant's."""
    const = {(r["ratio"], r["seed"]): r.get("seconds") for r in rows if r["strategy"] == "constant"}
    ratios = [
        r["seconds"] / const[(r["ratio"], r["seed"])]
        for r in rows
        if r["strategy"] == strategy and r.get("seconds") and const.get((r["ratio"], r["seed"]))
    ]
    return statistics.median(ratios) if ratios else None


def strategy_summary(rs: list[dict[str, Any]], text: dict[int, float]) -> dict[str, Any]:
    """Accuracy by ratio (mean, std over seeds), mean over ratios, spread, best cell."""
    by_ratio = {}
    for ratio in sorted({r["ratio"] for r in rs}):
        accs = [r["accuracy"] for r in rs if r["ratio"] == ratio]
        by_ratio[f"{ratio:g}"] = {"mean": _mean(accs), "std": _std(accs), "n": len(accs)}
    means = [v["mean"] for v in by_ratio.values()]
    collapses = [
        {"ratio": r["ratio"], "seed": r["seed"]}
        for r in rs
        if r["seed"] in text and r["accuracy"] <= text[r["seed"]] + COLLAPSE_MARGIN
    ]
    return {
        "by_ratio": by_ratio,
        "mean": _mean(means),
        "spread": max(means) - min(means),
        "best_cell": max(means),
        "best_ratio": float(max(by_ratio, key=lambda k: by_ratio[k]["mean"])),
        "seed_std": _mean([v["std"] for v in by_ratio.values()]),
        "seeds": sorted({r["seed"] for r in rs}),
        "collapses": collapses,
        "final_loss": _mean([r["final_loss"] for r in rs]),
        "final_factors": _final_factors(rs),
    }


def _final_factors(rs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per ratio: the mean final factor of each component (how far the rule moved)."""
    out = {}
    for ratio in sorted({r["ratio"] for r in rs}):
        fs = [r["factors"] for r in rs if r["ratio"] == ratio and r.get("factors")]
        if fs:
            out[f"{ratio:g}"] = {c: statistics.fmean(f[c] for f in fs) for c in fs[0]}
    return out


def goal(s: dict[str, Any], const: dict[str, Any]) -> dict[str, Any]:
    """The payoff goal of a strategy against constant LR in one (task, regime)."""
    checks = {
        "mean_ge_best_constant_cell": s["mean"] >= const["best_cell"] - 1e-12,
        "spread_le_third_of_constant": s["spread"] <= const["spread"] / 3 + 1e-12,
        "no_collapse": not s["collapses"],
        "not_worse_than_constant_by_a_seed_std": s["mean"]
        >= const["mean"] - (const["seed_std"] or 0.0) - 1e-12,
    }
    return {
        **checks,
        "met": all(checks.values()),
        "mean": s["mean"],
        "constant_best_cell": const["best_cell"],
        "spread": s["spread"],
        "constant_spread": const["spread"],
    }


def _verdict(g: dict[str, Any]) -> str:
    """The goal column: met, or the checks missed (the mean's gap to the best cell)."""
    if g["met"]:
        return "**met**"
    missed = []
    for k, ok in g.items():
        if isinstance(ok, bool) and not ok and k != "met":
            gap = g["mean"] - g["constant_best_cell"]
            missed.append(f"{k} ({gap:+.3f})" if k == "mean_ge_best_constant_cell" else k)
    return "missed: " + ", ".join(missed)


def headline(summary: dict[str, Any], recommended: str = RECOMMENDED) -> dict[str, Any]:
    """``payoff.<regime>.<task>.<strategy>`` = {mean, spread, best_cell, seeds} and text_only."""
    payoff: dict[str, Any] = {"recommended": recommended}
    for key, entry in summary.items():
        task, regime = key.split("-")
        cell = payoff.setdefault(regime, {}).setdefault(task, {})
        for s, v in entry["strategies"].items():
            cell[s] = {k: v[k] for k in ("mean", "spread", "best_cell", "seeds")}
        cell["text_only"] = entry["text_only"]["mean"]
    return payoff


def write_headline(payoff: dict[str, Any]) -> Path:
    """Merge ``payoff`` into benchmarks/results/headline.json (other keys are kept)."""
    path = RESULTS / "headline.json"
    data = json.loads(path.read_text()) if path.is_file() else {}
    data["payoff"] = payoff
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


def markdown(
    summary: dict[str, Any], grid: Grid, wall: float, rows: Sequence[dict[str, Any]] = ()
) -> str:
    """Tables of the grid (what docs/results.md quotes)."""
    done = [r for r in rows if r.get("seconds")]
    reused = sum(1 for r in done if r.get("reused"))
    cost = (
        f" {len(done)} runs, {sum(r['seconds'] for r in done) / 60:.0f} min inside their "
        f"training loops ({reused} read back from an earlier invocation)."
        if done
        else ""
    )
    lines = [
        f"Grid: parts `{grid.parts}`, ratios {', '.join(f'{r:g}' for r in grid.ratios)}, "
        f"seeds {', '.join(map(str, grid.seeds))}.{cost}"
        + (f" Wall time of this invocation {wall / 60:.1f} min." if reused < len(done) else ""),
        "",
        "| task | regime | strategy | acc by ratio (mean ± std) | mean | spread | best cell "
        "| collapses | time vs constant | goal vs constant |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in summary.items():
        task, regime = key.split("-")
        t = entry["text_only"]
        if t["mean"] is not None:
            lines.append(
                f"| {task} | {regime} | text-only | {t['mean']:.3f} ± {t['std']:.3f} | | | | | | |"
            )
        for s, v in entry["strategies"].items():
            accs = " / ".join(f"{x['mean']:.3f} ± {x['std']:.3f}" for x in v["by_ratio"].values())
            g = entry.get("goal", {}).get(s)
            verdict = "" if g is None else _verdict(g)
            tr = v.get("time_vs_constant")
            lines.append(
                f"| {task} | {regime} | {s} | {accs} | {v['mean']:.3f} | {v['spread']:.3f} | "
                f"{v['best_cell']:.3f} (r={v['best_ratio']:g}) | {len(v['collapses'])} | "
                f"{'' if tr is None else f'{tr:.2f}x'} | {verdict} |"
            )
    lines += [
        "",
        "Accuracy: exact match on the held-out questions, mean ± std over the seeds, at each LR "
        "ratio eta_enc / eta_llm (ascending). Spread: max - min of the per-ratio means. "
        "Collapses: runs within the margin of their seed's text-only accuracy. Time vs "
        "constant: median over the (ratio, seed) cells of the run's training-loop seconds "
        "(its periodic evaluations included) over constant's, runs sharing the machine. "
        "Goal (the payoff issue): mean over ratios >= constant's best cell, spread <= 1/3 of "
        "constant's, no collapse, mean not below constant's by more than a seed-std.",
    ]
    return "\n".join(lines) + "\n"


def update_docs(path: Path, tag: str, table: str) -> Path:
    """Put ``table`` between ``<!-- testbed:TAG -->`` and ``<!-- /testbed:TAG -->`` in ``path``."""
    start, end = f"<!-- testbed:{tag} -->", f"<!-- /testbed:{tag} -->"
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path}: add the markers {start} and {end} where the table goes")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{table}{end}{tail}")
    return path


def docs_block(path: Path, tag: str) -> str:
    """The generated block of ``path`` for ``tag`` (what :func:`update_docs` wrote)."""
    start, end = f"<!-- testbed:{tag} -->", f"<!-- /testbed:{tag} -->"
    return path.read_text().split(start, 1)[1].split(end, 1)[0].lstrip("\n")


def plot(rows: list[dict[str, Any]], tag: str, out: Path = RESULTS) -> list[Path]:
    """Per (task, regime): accuracy vs ratio per strategy, and eval curves per ratio."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    ok = [r for r in rows if r.get("accuracy") is not None]
    for task, regime in sorted({(r["task"], r["regime"]) for r in ok}):
        rs = [r for r in ok if (r["task"], r["regime"]) == (task, regime)]
        ratios = sorted({r["ratio"] for r in rs if r["strategy"] != TEXT_ONLY})
        fig, axes = plt.subplots(1, 1 + len(ratios), figsize=(4.2 * (1 + len(ratios)), 3.6))
        text = [r["accuracy"] for r in rs if r["strategy"] == TEXT_ONLY]
        for ax in axes:
            if text:
                ax.axhline(statistics.fmean(text), color="gray", ls=":", label="text-only")
        strategies = sorted({r["strategy"] for r in rs} - {TEXT_ONLY})
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
                curves = [r["eval_curve"] for r in rs if r["strategy"] == s and r["ratio"] == x]
                longest = max((len(c) for c in curves), default=0)
                curves = [c for c in curves if len(c) == longest]  # the curve seeds only
                if curves and curves[0]:
                    steps = [p[0] for p in curves[0]]
                    mean = [statistics.fmean(c[i][1] for c in curves) for i in range(len(steps))]
                    ax.plot(steps, mean, marker=".", label=s)
                ax.set(xlabel="step", ylabel="held-out accuracy", title=f"ratio {x:g}")
        axes[0].set(
            xscale="log",
            xlabel="eta_enc / eta_llm",
            ylabel="held-out accuracy",
            title=f"{task}, regime {regime}",
        )
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = out / f"testbed-{tag}_{task}-{regime}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    args = _parse(argv)
    grid = QUICK if args.quick else FULL
    for name in ("regimes", "tasks", "strategies"):
        if getattr(args, name):
            setattr(grid, name, tuple(getattr(args, name).split(",")))
    if args.ratios:
        grid.ratios = tuple(float(x) for x in args.ratios.split(","))
    if args.seeds:
        grid.seeds = tuple(int(x) for x in args.seeds.split(","))
    grid.parts, grid.steps = args.parts or grid.parts, args.steps or grid.steps
    grid.llm_lr = args.llm_lr or grid.llm_lr
    grid.text_only = not args.no_text_only
    grid.overrides = tuple(args.set)
    tag = args.tag or ("quick" if args.quick else f"{grid.parts}")
    root = Path(args.runs) / tag
    t0 = time.perf_counter()
    rows = run_grid(grid, root, args.jobs)
    wall = time.perf_counter() - t0
    summary = summarize(rows)
    result = {
        "grid": {**grid.__dict__},
        "wall_seconds": wall,
        "summary": summary,
        "runs": [{k: v for k, v in r.items()} for r in rows],
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"testbed-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"testbed-{tag}.md").write_text(markdown(summary, grid, wall, rows))
    plot(rows, tag, out)
    if args.headline:
        print(f"wrote {write_headline(headline(summary))}")
    if args.docs:
        print(f"wrote {update_docs(Path(args.docs), tag, markdown(summary, grid, wall, rows))}")
    print(markdown(summary, grid, wall, rows))
    failed = [r for r in rows if r.get("failed")]
    return 1 if failed else 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the QUICK grid (< 15 min on 2 cores)")
    p.add_argument("--regimes", help="comma-separated subset of A,B,C")
    p.add_argument("--tasks", help="comma-separated subset of vision,audio")
    p.add_argument("--parts", help="tiny (default) or real (configs/testbed/*-real.yaml)")
    p.add_argument("--strategies", help="comma-separated strategies")
    p.add_argument("--ratios", help="comma-separated eta_enc / eta_llm ratios")
    p.add_argument("--seeds", help="comma-separated seeds")
    p.add_argument("--steps", type=int, help="steps of every run (default: the config's)")
    p.add_argument("--llm-lr", type=float, help="eta_llm of every run (default: the config's)")
    p.add_argument("--no-text-only", action="store_true", help="skip the text-only baseline")
    p.add_argument("--set", action="append", default=[], help="extra KEY=VALUE for every run")
    p.add_argument("--jobs", type=int, default=2, help="runs in parallel (1 thread each)")
    p.add_argument("--tag", help="name of the results files and runs folder")
    p.add_argument("--runs", default=str(ROOT / "runs" / "testbed"), help="runs root")
    p.add_argument("--headline", action="store_true", help="write payoff to headline.json")
    p.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    p.add_argument("--docs", help="a Markdown file whose testbed:TAG block gets the tables")
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
