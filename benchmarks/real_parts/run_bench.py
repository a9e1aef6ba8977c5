"""Constant LR vs CoMMIT on the SALMONN-like model with real parts; writes the results JSON.

Runs ``commit-mllm train --config benchmarks/real_parts/salmonn_like.yaml`` once per
strategy (same seed, data, steps), one run at a time, with one CPU thread per run
(``OMP_NUM_THREADS=1``: on a shared 2-core machine two threads were ~2x slower per step),
then summarizes ``metrics.jsonl`` / ``summary.json`` of each run.

    commit-mllm prepare whisper gemma3
    python benchmarks/real_parts/make_digits.py --out runs/real_parts/digits
    python benchmarks/real_parts/run_bench.py --steps 100 \
        --out benchmarks/results/real_parts.json [key=value overrides for both runs]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(records: list[dict], key: str, bucket: int) -> list[dict]:
    """Mean of ``key`` per bucket of steps (finite values only)."""
    out = []
    for start in range(0, len(records), bucket):
        vals = [
            r[key]
            for r in records[start : start + bucket]
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
        ]
        if vals:
            out.append(
                {
                    "steps": f"{start}-{start + len(records[start : start + bucket]) - 1}",
                    key: round(sum(vals) / len(vals), 4),
                }
            )
    return out


def summarize_run(run_dir: Path, bucket: int) -> dict:
    """Loss/kappa curves, accuracy, state shares and timing of one run folder."""
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    summary = json.loads((run_dir / "summary.json").read_text())
    log_k = [
        math.log(r["kappa"])
        for r in metrics
        if isinstance(r.get("kappa"), (int, float)) and r["kappa"] > 0 and r["step"] > 0
    ]
    q = max(1, len(log_k) // 4)
    states: dict[str, int] = {}
    for r in metrics:
        states[r.get("state", "?")] = states.get(r.get("state", "?"), 0) + 1
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    keep = (
        "final_loss",
        "accuracy",
        "n",
        "mean_log_kappa",
        "final_kappa_bar",
        "final_state",
        "seconds",
        "ms_per_step",
        "skipped_steps",
    )
    out = {k: summary.get(k) for k in keep}
    out.update({k: v for k, v in summary.items() if k.startswith("accuracy/")})
    out.update(
        {
            "loss_curve": curve(metrics, "ce", bucket),
            "kappa_bar_curve": curve(metrics, "kappa_bar", bucket),
            "factor_encoder_curve": curve(metrics, "factor/encoder", bucket),
            "median_log_kappa_first_quarter": med(log_k[:q]),
            "median_log_kappa_last_quarter": med(log_k[-q:]),
            "state_counts": states,
            "final_lr": {k: metrics[-1][k] for k in metrics[-1] if k.startswith("lr/")},
        }
    )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--strategies", default="constant,commit")
    ap.add_argument("--runs", default="runs/real_parts", help="parent of the run folders")
    ap.add_argument("--out", default="benchmarks/results/real_parts.json")
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bucket", type=int, default=10, help="steps per curve point")
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args(argv)
    from commit_mllm.parts import part_folder, require_part

    for name in ("whisper", "gemma3"):
        require_part(name, args.cache)  # a one-line error naming `commit-mllm prepare ...`
    paths = [f"run.cache_dir={args.cache}"] if args.cache else []
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    cli = [
        sys.executable,
        "-m",
        "commit_mllm.cli",
        "train",
        "--config",
        str(HERE / "salmonn_like.yaml"),
    ]
    results: dict = {
        "steps": args.steps,
        "threads": args.threads,
        "overrides": args.overrides,
        "runs": {},
    }
    results["prepare_report"] = {
        name: json.loads((part_folder(name, args.cache) / "report.json").read_text())
        for name in ("whisper", "gemma3")
    }
    data_summary = ROOT / "runs/real_parts/digits/summary.json"
    if data_summary.exists():
        results["data"] = json.loads(data_summary.read_text())
    for strategy in args.strategies.split(","):
        run_dir = Path(args.runs) / strategy
        cmd = [
            *cli,
            *paths,
            f"commit.strategy={strategy}",
            f"train.steps={args.steps}",
            f"run.output_dir={run_dir}",
            *args.overrides,
        ]
        print("$", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        (Path(ROOT / run_dir) if not run_dir.is_absolute() else run_dir).mkdir(
            parents=True, exist_ok=True
        )
        (ROOT / run_dir / "stdout.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode != 0:
            results["runs"][strategy] = {"error": (proc.stdout + proc.stderr)[-3000:]}
            print(proc.stderr[-3000:], flush=True)
            continue
        res = summarize_run(ROOT / run_dir, args.bucket)
        res["wall_s"] = round(wall, 1)
        results["runs"][strategy] = res
        print(json.dumps({k: v for k, v in res.items() if not k.endswith("curve")}), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
