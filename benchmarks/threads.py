"""CPU threads per process on a busy machine: torch's default vs one thread vs ``auto``.

Each measurement trains the tiny test model (``configs/tiny.yaml``, batch 16) in a fresh
process with ``train.num_threads`` set to ``0`` (torch's own default: one thread per core),
``1`` or ``auto`` (the default: the cores left free by the load at start-up), while
``--load`` busy-loop processes compete for the cores (the situation of several engineers or
jobs sharing a small machine). Settings are interleaved and repeated; the median step time
of each is reported. The busy processes are started and stopped by this script.

Usage::

    python benchmarks/threads.py --loads 0,2 --repeats 3 --steps 30 \
        --out benchmarks/results/threads.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
BUSY = "import time\nend = time.time() + {s}\nwhile time.time() < end: pass\n"


def _train(threads: str, steps: int, out: Path) -> dict:
    """Train once in a fresh process; return its summary (seconds, ms per step)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["HF_HUB_OFFLINE"] = "1"
    args = [
        sys.executable,
        "-m",
        "commit_mllm.cli",
        "train",
        "--config",
        str(TINY),
        f"run.output_dir={out}",
        f"train.steps={steps}",
        "train.batch_size=16",
        "train.save_every=0",
        "data.max_train_samples=256",
        "data.max_eval_samples=0",
        "run.tensorboard=false",
        f"train.num_threads={threads}",
    ]
    start = time.perf_counter()
    proc = subprocess.run(args, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"train failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    chosen = [ln for ln in proc.stdout.splitlines() if ln.startswith("threads:")]
    return {
        "train_seconds": summary["seconds"],
        "ms_per_step": summary["ms_per_step"],
        "wall_seconds": wall,
        "threads_line": chosen[0] if chosen else None,
        "final_loss": summary["final_loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loads", default="0,2", help="busy processes per measurement, comma-separated")
    p.add_argument("--settings", default="0,1,auto", help="train.num_threads values")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default="benchmarks/results/threads.json")
    args = p.parse_args()
    loads = [int(x) for x in args.loads.split(",")]
    settings = args.settings.split(",")
    results: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for load in loads:
            busy = [
                subprocess.Popen([sys.executable, "-c", BUSY.format(s=3600)]) for _ in range(load)
            ]
            try:
                time.sleep(2 if load else 0)  # let the load average see them
                for rep in range(args.repeats):
                    for threads in settings:  # interleaved: drifting load hits all alike
                        run = _train(threads, args.steps, Path(tmp) / f"l{load}-{threads}-{rep}")
                        results.setdefault(str(load), {}).setdefault(threads, []).append(run)
                        print(f"load {load} threads {threads} rep {rep}: {run}", flush=True)
            finally:
                for proc in busy:
                    proc.kill()
                    proc.wait()
    table = {
        load: {
            t: {
                "median_ms_per_step": statistics.median(r["ms_per_step"] for r in runs),
                "runs": runs,
            }
            for t, runs in by_setting.items()
        }
        for load, by_setting in results.items()
    }
    payload = {
        "meta": {
            "cpus": os.cpu_count(),
            "loadavg_at_end": os.getloadavg(),
            "python": platform.python_version(),
            "steps": args.steps,
            "batch_size": 16,
            "model": "configs/tiny.yaml (tiny-random CLIP + Llama, hidden 64)",
            "note": "load = extra busy-loop processes started by the benchmark; other users' "
            "processes on the machine come on top",
        },
        "results": table,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=2) + "\n")
    for load, by_setting in table.items():
        cells = ", ".join(f"{t}: {v['median_ms_per_step']:.0f} ms" for t, v in by_setting.items())
        print(f"load {load}: {cells}")


if __name__ == "__main__":
    main()
