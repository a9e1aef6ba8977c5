"""What measuring kappa costs, and whether the cheap default decides what the exact one does.

Issue 13 ("Cheap by default"). Three measurements, in one process (the closed loop in two):

1. **Overhead.** Step time and peak memory of a plain step (forward, CE, backward, clip,
   AdamW step; no meter) against CoMMIT steps: ``default`` (``CoMMITConfig()`` as a user
   gets it), ``exact`` (``CoMMITConfig(exact=True)``: every step, all rows) and a few
   (K, rows) cells. The arms are interleaved: every round runs ``plain, arm_1, plain, arm_2,
   ..., plain`` (the order rotates between rounds) and each arm's time is divided by the
   mean of the two plain blocks around it, so drifts of the machine's load cancel. A block
   runs a multiple of K steps, so its mean step time is the setting's amortized cost.
   Reported: medians over rounds. Peak memory: the highest point of 2K steps from a fresh
   coordinator (its first two estimates included).
2. **Estimate quality, open loop** (criterion (a)): see :mod:`overhead_quality`.
3. **Estimate quality, closed loop** (criterion (b), ``--closed-loop``): see
   :mod:`overhead_quality`.

Memory on CPU: peak resident set size (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident size before the model was built, with glibc's
mmap threshold fixed at 128 KiB (so freed tensors go back to the OS and RSS follows the live
tensors). On CUDA: ``torch.cuda.max_memory_allocated``. ``python benchmarks/overhead.py
--help`` lists the options; results go to ``benchmarks/results/overhead.{json,md}``, the
headline ratios are merged into ``benchmarks/results/headline.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import overhead_quality as quality
from commit_mllm import CoMMITConfig
from commit_mllm.data import Collator
from commit_mllm.tasks import load_task
from overhead_memory import MEMORY_ARMS, bench_memory, loadavg, machine_info, tune_malloc
from overhead_report import closed_table, markdown, write_results
from overhead_setup import (
    MODES,
    SPECS,
    Bench,
    ModelSpec,
    Setting,
    build_bench,
    make_collator,
    run_block,
    settings_for,
    step_fn,
)

grid_name = quality.grid_name


RESULTS = Path(__file__).resolve().parent / "results"


ROOT = Path(__file__).resolve().parents[1]


def _block_len(setting: Setting, min_block: int) -> int:
    return setting.k * math.ceil(min_block / setting.k)


# ---- timing and memory ----------------------------------------------------------------------
def time_arms(
    bench: Bench, settings: Sequence[Setting], rounds: int, min_block: int, device: torch.device
) -> dict[str, Any]:
    """Interleaved timing: each round runs ``P A1 P A2 ... P`` (rotating arm order).

    Every arm first runs one block of warm-up (optimizer state, allocator, one-time costs
    such as the meter's first-estimate check), which is not timed.

    Returns:
        ``{arm: {"times": [s/step per round], "ratios": [paired ratio per round]}}`` plus
        ``"_load"``: the load averages at the start of every round.
    """
    plain = next(s for s in settings if s.plain)
    arms = [s for s in settings if not s.plain]
    fns = {s.name: step_fn(bench, s) for s in settings}
    n_plain = _block_len(plain, min_block)
    for s in settings:
        run_block(fns[s.name], _block_len(s, 1), device)
    out: dict[str, Any] = {s.name: {"times": [], "ratios": []} for s in settings}
    out["_load"] = []
    for r in range(rounds):
        out["_load"].append(loadavg())
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        before = run_block(fns[plain.name], n_plain, device)
        out[plain.name]["times"].append(before)
        for s in order:
            t = run_block(fns[s.name], _block_len(s, min_block), device)
            after = run_block(fns[plain.name], n_plain, device)
            out[plain.name]["times"].append(after)
            out[s.name]["times"].append(t)
            out[s.name]["ratios"].append(t / (0.5 * (before + after)))
            before = after
    return out


def summarize_timing(raw: dict[str, Any]) -> dict[str, Any]:
    """Medians of the per-step times and of the paired ratios per arm."""
    out = {}
    plain_med = statistics.median(raw["plain"]["times"])
    for name, v in raw.items():
        if name.startswith("_"):
            continue
        med = statistics.median(v["times"])
        ratios = v["ratios"] or [1.0]
        out[name] = {
            "median_s": med,
            "ratio_paired_median": statistics.median(ratios),
            "ratio_of_medians": med / plain_med,
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "rounds": len(v["ratios"]) or len(v["times"]),
            "times_s": v["times"],
            "ratios": v["ratios"],
        }
    return out


def bench_model(
    spec: ModelSpec,
    mode: str,
    collator: Collator,
    samples: Sequence[dict],
    settings: Sequence[Setting],
    rounds: int,
    device: torch.device,
) -> dict[str, Any]:
    """Timing of every arm for one (model, mode)."""
    bench = build_bench(spec, mode, collator, samples, n_batches=4, device=device)
    load0, t0 = loadavg(), time.perf_counter()
    raw = time_arms(bench, settings, rounds, spec.min_block, device)
    res = {
        "model": spec.name,
        "mode": mode,
        "params": bench.n_params,
        "trainable": bench.n_trainable,
        "trainable_by_component": {c.name: c.numel for c in bench.components},
        "batch_size": spec.batch_size,
        "tokens_per_batch": bench.tokens,
        "settings": {s.name: _describe(s) for s in settings},
        "block_steps": {s.name: _block_len(s, spec.min_block) for s in settings},
        "load_start": load0,
        "load_rounds": raw.pop("_load"),
        "load_end": loadavg(),
        "seconds": round(time.perf_counter() - t0, 1),
        "timing": summarize_timing(raw),
    }
    del bench
    gc.collect()
    return res


def _describe(s: Setting) -> dict[str, Any]:
    if s.plain:
        return {"plain": True}
    cfg = s.config()
    return {"every": cfg.effective_every, "rows": cfg.effective_rows, "snapshot": cfg.snapshot}


# ---- estimate quality (open loop) -----------------------------------------------------------
def error_run(
    spec: ModelSpec,
    mode: str,
    collator: Collator,
    steps: int,
    windows: Sequence[int],
    lr: float = 1e-3,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """One training run of ``spec`` on easy-VQA; criterion (a) for every (K, rows) setting."""
    b = spec.batch_size
    samples = load_task("easy-vqa", "train", seed=0, max_samples=steps * b)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    samples = [samples[i] for i in order]
    load0, t0 = loadavg(), time.perf_counter()
    bench = build_bench(spec, mode, collator, samples, steps, lr=lr, device=device)
    logs = quality.kappa_trajectory(bench, steps, quality.FRACTIONS, warmup=max(1, steps // 20))
    res = quality.open_loop_errors(logs, windows)
    res.update(
        model=spec.name, mode=mode, steps=steps, batch_size=b, lr=lr, windows=list(windows),
        load_start=load0, load_end=loadavg(), seconds=round(time.perf_counter() - t0, 1),
        log_kappa={f"{f:g}": v for f, v in logs.items()},
    )  # fmt: skip
    return res


# ---- driver ---------------------------------------------------------------------------------
@dataclass
class Options:
    """What :func:`run_benchmark` runs.

    Attributes:
        models: Model sizes (``tiny``, ``medium``).
        modes: ``lora`` (LoRA on the LLM, encoder + projector full) and/or ``full``.
        rounds: Timing rounds per model (None = the spec's).
        quick: Fewer rounds and arms (a functional check).
        error_steps: Steps of each criterion-(a) run (0 = skip).
        error_modes: Modes of the tiny model's criterion-(a) runs.
        windows: Windows N (steps) at which criterion (a) is evaluated.
        memory: Measure peak memory.
        min_block: Override of the spec's steps per timing block.
        threads: torch intra-op threads.
    """

    models: Sequence[str] = ("tiny", "medium")
    modes: Sequence[str] = MODES
    rounds: int | None = None
    quick: bool = False
    error_steps: int = 400
    error_modes: Sequence[str] = MODES
    windows: Sequence[int] = (20, 10)
    memory: bool = True
    min_block: int | None = None
    threads: int = 1


def run_benchmark(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Timing, criterion (a), memory; returns the results dict."""
    torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CoMMITConfig()
    meta = machine_info(opts.threads)
    meta.update(
        options=asdict(opts), device=str(device), load_start=loadavg(),
        default_config={"every": cfg.effective_every, "rows": cfg.effective_rows,
                        "strategy": cfg.strategy, "snapshot": cfg.snapshot},
    )  # fmt: skip
    results: dict[str, Any] = {"meta": meta, "overhead": [], "estimate_error": []}
    samples = load_task("easy-vqa", "train", seed=0, max_samples=256)
    collators = {m: make_collator(SPECS[m].image_size) for m in opts.models}
    for name in opts.models:
        spec = _spec(name, opts)
        for mode in opts.modes:
            log(f"timing {name}/{mode} (load {loadavg()})")
            arms = settings_for(name, opts.quick)
            entry = bench_model(spec, mode, collators[name], samples, arms, spec.rounds, device)
            results["overhead"].append(entry)
    if opts.error_steps:
        tiny = _spec("tiny", opts)
        coll = collators.get("tiny") or make_collator(tiny.image_size)
        for mode in opts.error_modes:
            log(f"criterion (a) tiny/{mode}, {opts.error_steps} steps (load {loadavg()})")
            run = error_run(tiny, mode, coll, opts.error_steps, opts.windows, device=device)
            results["estimate_error"].append(run)
    if opts.memory:
        meta["malloc_tuned"] = tune_malloc() if device.type == "cpu" else None
        for entry in results["overhead"]:
            log(f"memory {entry['model']}/{entry['mode']}")
            entry["memory"] = bench_memory(entry["model"], entry["mode"], MEMORY_ARMS, device)
    meta["load_end"] = loadavg()
    return results


def _spec(name: str, opts: Options) -> ModelSpec:
    spec = SPECS[name]
    changes: dict[str, Any] = {}
    if opts.rounds is not None or opts.quick:
        changes["rounds"] = opts.rounds or spec.quick_rounds
    if opts.min_block is not None:
        changes["min_block"] = opts.min_block
    return ModelSpec(**{**asdict(spec), **changes}) if changes else spec


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a few-minute functional check")
    p.add_argument("--models", default="tiny,medium", help="comma list of tiny, medium")
    p.add_argument("--modes", default=None, help="comma list of lora, full")
    p.add_argument("--out", default=RESULTS, type=Path)
    p.add_argument("--stem", default=None, help="output name (default overhead[_quick])")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--error-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--closed-loop", action="store_true", help="run criterion (b) only")
    p.add_argument("--closed-loop-steps", type=int, default=250)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--procs", type=int, default=2, help="closed-loop processes")
    p.add_argument("--closed-loop-set", action="append", default=[], help="KEY=VALUE override")
    p.add_argument("--closed-loop-tag", default=None, help="name of a closed-loop variant")
    p.add_argument("--zero3", action="store_true", help="the ZeRO-3 cost only (2 processes)")
    p.add_argument("--zero3-steps", type=int, default=32, help="timed steps per launch")
    return p.parse_args(argv)


def run_zero3(a: argparse.Namespace) -> int:
    """``--zero3``: a default estimate against a plain ZeRO-3 step (see overhead_zero3)."""
    import overhead_zero3 as zero3

    modes = tuple(a.modes.split(",")) if a.modes else MODES
    rounds = a.rounds or 2
    t0 = time.time()
    results = zero3.run(modes, rounds, 16, a.zero3_steps, ROOT / "runs" / "overhead-zero3")
    results["meta"] = machine_info(1) | {"load_end": loadavg(), "wall_s": time.time() - t0}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "overhead_zero3.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    source = {"file": "benchmarks/results/overhead_zero3.json", "date": results["meta"]["date"],
              "load_end": results["meta"]["load_end"]}  # fmt: skip
    zero3.merge_headline(a.out / "headline.json", results, source)
    for mode, s in results["modes"].items():
        print(
            f"zero3 {mode}: estimate step x{s['estimate_step_ratio_median']:.3f}, amortized "
            f"x{s['time_ratio_paired_median']:.3f}, peak memory x{s['memory_ratio']:.3f}"
        )
    print(f"wrote {path}")
    return 0


def options_from_args(a: argparse.Namespace) -> Options:
    """Options of a CLI call (``--quick``: LoRA only, fewer rounds and arms, 200 error steps)."""
    models = tuple(a.models.split(","))
    modes = tuple(a.modes.split(",")) if a.modes else (("lora",) if a.quick else MODES)
    unknown = (set(models) - set(SPECS)) | (set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown model or mode: {sorted(unknown)}")
    error_steps = a.error_steps if a.error_steps is not None else (200 if a.quick else 400)
    return Options(
        models=models, modes=modes, rounds=a.rounds, quick=a.quick, error_steps=error_steps,
        error_modes=("lora",) if a.quick else MODES, memory=not a.no_memory, threads=a.threads,
    )  # fmt: skip


def closed_loop_files(out: Path) -> list[Path]:
    """The closed-loop results in ``out``: the demo grid first, then tagged variants."""
    files = out.glob("overhead_closed_loop*.json")
    return sorted(files, key=lambda p: (p.stem != "overhead_closed_loop", p.stem))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or the closed loop) and write its results."""
    a = parse_args(argv)
    if a.zero3:
        return run_zero3(a)
    if a.closed_loop:
        tag = f"-{a.closed_loop_tag}" if a.closed_loop_tag else ""
        seeds = tuple(int(s) for s in a.seeds.split(","))
        root = ROOT / "runs" / f"overhead-closed-loop{tag}"
        closed = quality.closed_loop(
            seeds=seeds, steps=a.closed_loop_steps, procs=a.procs, root=root,
            extra=[f"commit.{kv}" for kv in a.closed_loop_set],
        )  # fmt: skip
        closed["meta"] = machine_info(1) | {"load_end": loadavg()}
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"overhead_closed_loop{tag}.json"
        path.write_text(json.dumps(closed, indent=1) + "\n")
        print("\n".join(closed_table(closed)))
        main_json = a.out / "overhead.json"
        results = json.loads(main_json.read_text()) if main_json.exists() else {}
        if "snapshot" in results.get("meta", {}).get("default_config", {}):
            loops = [json.loads(p.read_text()) for p in closed_loop_files(a.out)]
            write_results(results, a.out, "overhead", loops)  # the tables with (b) included
        print(f"wrote {path}")
        return 0
    results = run_benchmark(options_from_args(a))
    stem = a.stem or ("overhead_quick" if a.quick else "overhead")
    loops = [] if a.quick else [json.loads(p.read_text()) for p in closed_loop_files(a.out)]
    headline_path = None if a.quick or a.stem else a.out / "headline.json"
    path = write_results(results, a.out, stem, loops, headline_path)
    print(markdown(results, loops))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
