"""The testbed grid: does a balance strategy pay off against what users really run?

Grid: regime (A: tower frozen + fresh projector + LoRA LLM; B: everything trained; C: from
scratch) x task x strategy x LR ratio eta_enc / eta_llm (eta_llm fixed by the config) x seed,
each run through the project's CLI (`commit-mllm train`) as its own process with one torch
thread. Beside them, once per cell and seed: the text-only baseline (`data.blind=true`) and
the frameworks' recipes (:data:`testbed_summary.BASELINES`: ``frozen``, ``llava-ov``,
``ldog``); the ``cap`` rule is read off constant's cells. Tasks (:data:`TASKS`): ``vision``
(easy-vqa) and ``audio`` (tones-aqa), where a frozen pretrained encoder already sees what the
questions need, and the must-learn ``vision-ml`` / ``audio-ml`` (the same questions, an
encoder pretrained blind to colour / pitch: :data:`commit_mllm.tasks.VARIANTS`). Configs:
``configs/testbed/<task>-<regime>-<parts>.yaml``.

What is computed per cell (best baseline, gaps, the goal): :mod:`testbed_summary`.

Usage::

    python benchmarks/testbed.py --quick                 # < 15 min on 2 cores
    python benchmarks/testbed.py --quick-ml              # the must-learn quick grid
    python benchmarks/testbed.py --jobs 2                # the full tiny grid (hours)
    python benchmarks/testbed.py --regimes A --tasks vision --parts real --seeds 0,1 \
        --strategies constant --ratios 0.1,1,10 --baselines frozen --tag real  # real parts

Finished runs (their ``summary.json``) are reused, so an interrupted grid resumes. Results:
``benchmarks/results/testbed-<tag>.json``, ``testbed-<tag>.md`` (tables), plots
``testbed-<tag>_<task>-<regime>.png``; ``--headline`` also writes the ``payoff`` entries of
``benchmarks/results/headline.json`` (other keys and other grids' cells kept; real parts
under ``payoff.real``; ``--headline-section NAME``: under ``payoff.NAME``, e.g. a longer run
of cells the main grid already has).
"""

from __future__ import annotations

import argparse
import copy
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import testbed_summary as ts
from testbed_plots import plot, plot_factors

ROOT = Path(__file__).resolve().parents[1]


RESULTS = ts.RESULTS


TASKS = {
    "vision": "easy-vqa",
    "audio": "tones-aqa",
    "vision-ml": "easy-vqa-colourblind",
    "audio-ml": "tones-aqa-pitchblind",
}


"""Grid task -> built-in task (the data.task its configs set)."""


MUST_LEARN = frozenset({"vision-ml", "audio-ml"})


"""Tasks whose pretrained encoder lacks a feature the questions need."""


STRATEGIES = ("constant", "commit_clr", "commit", "progress", "feature_cd", "language_cd", "ogm_ge")


RECOMMENDED = "progress"


TEXT_ONLY = ts.TEXT_ONLY


SPLIT = "+split"


"""A strategy name ending in this runs with the projector as its own component at the LLM's
rate, the ratio setting the pretrained tower's rate alone (``constant+split`` at 0.2 is
LLaVA-OneVision's recipe)."""


BASELINE_REGIMES = {"frozen": "BC", "llava-ov": "BC", "ldog": "ABC"}


"""Where each recipe is run. Regime A's tower is frozen anyway: there ``llava-ov`` is the same
recipe as ``frozen``, and ``frozen`` is constant's run at ratio 1 (:func:`frozen_in_a`)."""


@dataclass
class Grid:
    """One grid of the testbed (see the module docstring)."""

    regimes: tuple[str, ...] = ("A", "B", "C")
    tasks: tuple[str, ...] = ("vision", "audio")
    parts: str = "tiny"
    strategies: tuple[str, ...] = STRATEGIES
    ratios: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 100.0)
    baselines: tuple[str, ...] = ts.BASELINES
    seeds: tuple[int, ...] = (0, 1, 2)
    steps: int | None = None  # None = the config's
    llm_lr: float | None = None  # None = the config's eta_llm
    text_only: bool = True
    curve_seeds: tuple[int, ...] = (0,)  # seeds evaluated during the run (learning curves)
    overrides: tuple[str, ...] = ()
    run_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)


FULL = Grid(tasks=("vision", "audio"))


MUST_LEARN_GRID = Grid(regimes=("B",), tasks=("vision-ml", "audio-ml"))


QUICK = Grid(
    regimes=("A",),
    tasks=("vision",),
    strategies=("constant", "progress"),
    ratios=(0.1, 10.0),
    seeds=(0,),
    steps=300,
    baselines=("frozen",),
    text_only=True,
)


QUICK_ML = Grid(
    regimes=("B",),
    tasks=("vision-ml",),
    strategies=("constant", "progress"),
    ratios=(0.1, 10.0),
    seeds=(0,),
    steps=400,
    baselines=("frozen", "llava-ov"),
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
    elif strategy in ts.BASELINES:
        ovr += baseline_overrides(strategy, eta)
    elif strategy.endswith(SPLIT):
        # the fresh projector its own component at the LLM's rate; the ratio sets the tower's
        base = strategy.removesuffix(SPLIT)
        ovr += [f"commit.strategy={base}", "projector_side=own", f"train.projector_lr={eta!r}"]
    else:
        ovr.append(f"commit.strategy={strategy}")
    ovr += [*grid.overrides, *grid.run_overrides.get(strategy, ())]
    py = sys.executable
    return [py, "-m", "commit_mllm.cli", "train", "--config", str(cfg), *ovr]


def baseline_overrides(name: str, eta: float) -> list[str]:
    """The settings of a framework recipe, eta = the LLM's rate (constant LR, kappa logged).

    ``frozen``: the pretrained tower at rate 0, the projector at the LLM's (LLaVA-1.5,
    LLaMA-Factory, InternVL). ``llava-ov``: the tower trained at 0.2x the LLM's rate, the
    projector at 1x (LLaVA-OneVision's 2e-6 vs 1e-5). ``ldog``: layer-wise DoG for every
    group (rates = DoG's multiplier 1, the schedule kept; no weight decay, as DoG's paper).
    """
    if name == "frozen":
        return [
            "commit.strategy=constant",
            "train.freeze_encoder=true",
            f"train.encoder_lr={eta!r}",
        ]
    if name == "llava-ov":
        return [
            "commit.strategy=constant",
            "projector_side=own",
            f"train.encoder_lr={0.2 * eta!r}",
            f"train.projector_lr={eta!r}",
        ]
    if name == "ldog":
        rates = [f"train.{k}=1.0" for k in ("lr", "encoder_lr", "llm_lr")]
        return [
            "commit.strategy=constant",
            "train.optimizer=ldog",
            "train.weight_decay=0.0",
            *rates,
        ]
    raise ValueError(f"unknown baseline {name!r}; available: {', '.join(ts.BASELINES)}")


def jobs(grid: Grid, root: Path) -> list[dict[str, Any]]:
    """Every run of the grid (text-only and the recipes included) as a job description."""
    out = []
    for task in grid.tasks:
        for regime in grid.regimes:
            for seed in grid.seeds:
                runs = [(s, r) for s in grid.strategies for r in grid.ratios]
                runs += [(b, 1.0) for b in grid.baselines if regime in BASELINE_REGIMES[b]]
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
    from commit_mllm.training.tracking import read_jsonl

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
        "factor_curve": {
            k.split("/", 1)[1]: _thin([[r["step"], r[k]] for r in recs if k in r], 60)
            for k in sorted({k for r in recs for k in r if k.startswith("factor/")})
        },
        "steps_at_bound": summary.get("steps_at_bound", {}),
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


def merge_rows(rows: list[dict[str, Any]], earlier: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` plus the runs of ``earlier`` that are not in it (same cell, rule, ratio, seed)."""
    key = ("task", "regime", "strategy", "ratio", "seed")
    have = {tuple(r[k] for k in key) for r in rows}
    extra = [
        {**r, "reused": True}
        for r in earlier
        if tuple(r[k] for k in key) not in have and not r.get("alias_of")
    ]
    return rows + extra


def frozen_in_a(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Regime A's ``frozen`` recipe: constant's runs at ratio 1 (the same settings, not rerun)."""
    have = {
        (r["task"], r["seed"]) for r in rows if r["regime"] == "A" and r["strategy"] == "frozen"
    }
    return [
        {**r, "strategy": "frozen", "alias_of": "constant r=1"}
        for r in rows
        if r["regime"] == "A"
        and r["strategy"] == "constant"
        and r["ratio"] == 1.0
        and (r["task"], r["seed"]) not in have
    ]


def run_grid(
    grid: Grid, root: Path, n_jobs: int, log=print, collect: bool = False
) -> list[dict[str, Any]]:
    """Run (or reuse) every job, ``n_jobs`` processes at a time; one record per run.

    With ``collect`` nothing is trained: only the runs already finished are read.
    """
    todo = jobs(grid, root)
    if collect:
        todo = [j for j in todo if (j["run_dir"] / "summary.json").is_file()]
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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    args = _parse(argv)
    grid = copy.deepcopy(QUICK if args.quick else QUICK_ML if args.quick_ml else FULL)
    for name in ("regimes", "tasks", "strategies", "baselines"):
        value = getattr(args, name)
        if value is not None:
            setattr(grid, name, tuple(x for x in value.split(",") if x))
    if args.ratios:
        grid.ratios = tuple(float(x) for x in args.ratios.split(","))
    if args.seeds:
        grid.seeds = tuple(int(x) for x in args.seeds.split(","))
    grid.parts, grid.steps = args.parts or grid.parts, args.steps or grid.steps
    grid.llm_lr = args.llm_lr or grid.llm_lr
    grid.text_only = not args.no_text_only
    grid.overrides = tuple(args.set)
    tag = args.tag or ("quick" if args.quick else "quick-ml" if args.quick_ml else grid.parts)
    root = Path(args.runs) / tag
    t0 = time.perf_counter()
    rows = run_grid(grid, root, args.jobs, collect=args.collect)
    wall = time.perf_counter() - t0
    for path in args.extend:  # an earlier grid's runs of this grid's cells join its summary
        earlier = json.loads(Path(path).read_text())["runs"]
        mine = [r for r in earlier if r["task"] in grid.tasks and r["regime"] in grid.regimes]
        rows = merge_rows(rows, mine)
    if "frozen" in grid.baselines:
        rows += frozen_in_a(rows)
    summary = ts.summarize(rows, MUST_LEARN)
    result = {
        "grid": {**grid.__dict__},
        "wall_seconds": wall,
        "summary": summary,
        "runs": [{k: v for k, v in r.items()} for r in rows],
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"testbed-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ts.markdown(summary, grid, wall, rows)
    (out / f"testbed-{tag}.md").write_text(table)
    plot(rows, tag, out)
    plot_factors(rows, tag, out)
    if args.headline:
        section = args.headline_section or (None if grid.parts == "tiny" else grid.parts)
        print(f"wrote {ts.write_headline(ts.headline(summary, RECOMMENDED), section)}")
    if args.docs:
        print(f"wrote {ts.update_docs(Path(args.docs), tag, table)}")
    print(table)
    failed = [r for r in rows if r.get("failed")]
    return 1 if failed else 0


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the QUICK grid (< 15 min on 2 cores)")
    p.add_argument("--quick-ml", action="store_true", help="the must-learn quick grid (< 15 min)")
    p.add_argument("--regimes", help="comma-separated subset of A,B,C")
    p.add_argument("--tasks", help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--baselines", help=f"comma-separated subset of {','.join(ts.BASELINES)}")
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
    p.add_argument(
        "--headline-section",
        help="write the cells under payoff.NAME (default: the parts' name, none for tiny)",
    )
    p.add_argument("--results", default=str(RESULTS), help="folder of the results files")
    p.add_argument("--docs", help="a Markdown file whose testbed:TAG block gets the tables")
    p.add_argument("--collect", action="store_true", help="train nothing: read finished runs")
    p.add_argument(
        "--extend",
        action="append",
        default=[],
        help="a results JSON of an earlier grid whose runs join this one's summary",
    )
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
