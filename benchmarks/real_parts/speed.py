"""Seconds per optimizer step of a run config on this machine, one thread, real batches.

Two figures per config, both as wall and CPU (process) seconds; on a machine shared with
other jobs the CPU seconds are what an idle core would take:

* ``plain``: forward + backward + AdamW of the model the config builds (no kappa), on
  consecutive batches of the config's own training data (its real token lengths);
* ``trainer``: ``commit-mllm train`` itself for ``--steps`` steps (kappa measurement, logging
  and the strategy included; its set-up and a final evaluation on 8 samples subtracted).

    python benchmarks/real_parts/speed.py configs/testbed/vision-A-real.yaml \
        --steps 5 --out benchmarks/results/speed_real.json [--set key=value ...]

``--feature-cache`` measures instead both figures with and without
``train.cache_frozen_features`` (the frozen tower's outputs reused), the two arms interleaved
in the same process (alternating which goes first) so that the machine's load falls on both
alike, and writes them under ``<config>+feature_cache``. Both arms measure a *warm* cache,
the steady state once every image of a step has been seen: ``plain`` encodes each batch once
with the cache before timing it; ``trainer`` trains on ``batch_size`` samples
(``data.max_train_samples``) in both arms, so every step after the first revisits the same
images; ``--rounds`` repeats the trainer arms (median). The first visit of an image costs
what an uncached step costs (plus hashing).

    python benchmarks/real_parts/speed.py configs/testbed/vision-A-real.yaml --feature-cache \
        --steps 12 --rounds 3 --out benchmarks/results/speed_real.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def plain_steps(cfg, steps: int) -> dict:
    """Forward + backward + AdamW on the config's model and data (no kappa)."""
    import torch

    from commit_mllm.training.assembly import assemble

    a = assemble(cfg, log=lambda _m: None)
    model = a.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    bsz, walls, cpus, lengths, supervised = cfg.train.batch_size, [], [], [], []
    for step in range(steps + 1):  # the first step warms up (allocations) and is dropped
        rows = [a.train_set[(step * bsz + j) % len(a.train_set)] for j in range(bsz)]
        batch = {k: v for k, v in a.collator(rows).items() if isinstance(v, torch.Tensor)}
        wall, cpu = _timed_step(model, batch, opt)
        if step:
            walls.append(wall)
            cpus.append(cpu)
            lengths.append(int(batch["attention_mask"].sum(1).float().mean()))
            supervised.append(int((batch["labels"] != -100).sum()))
    with torch.no_grad():
        feats = model.encode(batch)
    media = {k: int(v.shape[1]) for k, v in feats.items() if v.dim() == 3}
    return {
        "wall_s": round(statistics.median(walls), 2),
        "cpu_s": round(statistics.median(cpus), 2),
        "mean_text_tokens": round(statistics.mean(lengths), 1),
        "media_tokens_per_sample": media,
        "supervised_tokens_per_batch": round(statistics.mean(supervised), 1),
    }


def _timed_step(model, batch: dict, opt) -> tuple[float, float]:
    """One forward + backward + AdamW step; its (wall, CPU) seconds."""
    w0, c0 = _clock()
    loss = model(**batch).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    w1, c1 = _clock()
    return w1 - w0, c1 - c0


def plain_steps_cached(cfg, steps: int) -> dict:
    """:func:`plain_steps` with and without the feature cache, step by step interleaved."""
    import torch

    from commit_mllm.training.assembly import assemble

    a = assemble(cfg, log=lambda _m: None)
    model = a.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    cache = model.enable_feature_cache()
    model.feature_cache = None
    bsz = cfg.train.batch_size
    times: dict[str, dict[str, list[float]]] = {
        arm: {"wall": [], "cpu": []} for arm in ("uncached", "cached")
    }
    for step in range(steps + 1):  # the first step warms up (allocations) and is dropped
        rows = [a.train_set[(step * bsz + j) % len(a.train_set)] for j in range(bsz)]
        batch = {k: v for k, v in a.collator(rows).items() if isinstance(v, torch.Tensor)}
        model.feature_cache = cache
        with torch.no_grad():
            model.encode(batch)  # warm: the images were seen before
        arms = ("uncached", "cached") if step % 2 == 0 else ("cached", "uncached")
        for arm in arms:
            model.feature_cache = cache if arm == "cached" else None
            wall, cpu = _timed_step(model, batch, opt)
            if step:
                times[arm]["wall"].append(wall)
                times[arm]["cpu"].append(cpu)
    out = {
        arm: {
            "wall_s": round(statistics.median(t["wall"]), 3),
            "cpu_s": round(statistics.median(t["cpu"]), 3),
        }
        for arm, t in times.items()
    }
    out["feature_cache"] = cache.stats()
    out["bytes_per_item"] = cache.bytes // max(1, len(cache))
    return out


def trainer_steps_cached(
    config: str, overrides: list[str], steps: int, bsz: int, rounds: int = 1
) -> dict:
    """:func:`trainer_steps` with and without the cache, warm cache, runs interleaved.

    Each round runs both arms for 1 and ``steps + 1`` steps, alternating which arm goes
    first; the figure per arm is the median over rounds of (long - short) / steps.
    """
    from commit_mllm.training.config import load_config
    from commit_mllm.training.trainer import train

    per_step: dict[str, dict[str, list[float]]] = {
        arm: {"wall_s": [], "cpu_s": []} for arm in ("uncached", "cached")
    }
    stats = None
    order = 0
    # An untimed 1-step run first: the process's one-off costs (lazy imports) fall on no arm.
    plan = [[(1, ("uncached",))]]
    for _ in range(rounds):
        plan.append([])
        for n in (1, steps + 1):
            plan[-1].append(
                (n, ("uncached", "cached") if order % 2 == 0 else ("cached", "uncached"))
            )
            order += 1
    for i, round_plan in enumerate(plan):
        runs: dict[str, dict[int, tuple[float, float]]] = {"uncached": {}, "cached": {}}
        for n, arms in round_plan:
            for arm in arms:
                with tempfile.TemporaryDirectory() as tmp:
                    extra = [f"train.steps={n}", f"run.output_dir={tmp}"]
                    extra += ["data.max_eval_samples=8", "train.num_threads=1"]
                    extra += ["train.warmup_steps=0", "run.progress=false"]
                    extra += ["run.tensorboard=false", "train.save_every=0"]
                    # One step's samples: every later step revisits the same images (warm).
                    extra += [f"data.max_train_samples={bsz}"]
                    extra += [f"train.cache_frozen_features={str(arm == 'cached').lower()}"]
                    cfg = load_config(config, [*overrides, *extra])
                    w0, c0 = _clock()
                    summary = train(cfg)
                    w1, c1 = _clock()
                runs[arm][n] = (w1 - w0, c1 - c0)
                if arm == "cached" and n == steps + 1:
                    stats = summary.get("feature_cache")
        if i == 0:
            continue  # the warm-up
        for arm, r in runs.items():
            (w_a, c_a), (w_b, c_b) = r[1], r[steps + 1]
            per_step[arm]["wall_s"].append((w_b - w_a) / steps)
            per_step[arm]["cpu_s"].append((c_b - c_a) / steps)
    result: dict = {
        arm: {k: round(statistics.median(v), 3) for k, v in t.items()}
        for arm, t in per_step.items()
    }
    result["rounds"] = rounds
    result["feature_cache"] = stats
    return result


def _ratios(arms: dict) -> dict:
    """uncached / cached, per clock: how many times faster a warm-cache step is."""
    return {
        k: round(arms["uncached"][k] / arms["cached"][k], 2)
        for k in ("wall_s", "cpu_s")
        if arms["cached"][k] > 0
    }


def trainer_steps(config: str, overrides: list[str], steps: int) -> dict:
    """``train()`` for ``steps`` and for 1 step; the difference per extra step."""
    from commit_mllm.training.config import load_config
    from commit_mllm.training.trainer import train

    out = {}
    for n in (1, steps + 1):
        with tempfile.TemporaryDirectory() as tmp:
            extra = [f"train.steps={n}", f"run.output_dir={tmp}", "data.max_eval_samples=8"]
            extra += ["train.num_threads=1", "train.warmup_steps=0"]
            extra += ["run.progress=false", "run.tensorboard=false", "train.save_every=0"]
            cfg = load_config(config, [*overrides, *extra])
            w0, c0 = _clock()
            train(cfg)
            w1, c1 = _clock()
        out[n] = (w1 - w0, c1 - c0)
    (w_a, c_a), (w_b, c_b) = out[1], out[steps + 1]
    return {"wall_s": round((w_b - w_a) / steps, 2), "cpu_s": round((c_b - c_a) / steps, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="run configs")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", help="write/merge the results into this JSON file")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="key=value")
    ap.add_argument("--rounds", type=int, default=1, help="--feature-cache: trainer rounds")
    ap.add_argument(
        "--feature-cache",
        action="store_true",
        help="with and without train.cache_frozen_features, interleaved (<config>+feature_cache)",
    )
    args = ap.parse_args()
    import torch

    from commit_mllm.training.config import load_config

    torch.set_num_threads(1)
    results = {}
    for config in args.configs:
        cfg = load_config(config, [*args.overrides, "train.num_threads=1"])
        entry = {"config": config, "batch_size": cfg.train.batch_size, "threads": 1}
        if args.feature_cache:
            entry["steps"] = args.steps
            entry["warm_cache"] = True
            entry["plain"] = plain_steps_cached(cfg, args.steps)
            entry["plain"]["speedup"] = _ratios(entry["plain"])
            entry["trainer"] = trainer_steps_cached(
                config, args.overrides, args.steps, cfg.train.batch_size, args.rounds
            )
            entry["trainer"]["speedup"] = _ratios(entry["trainer"])
            entry["load_average"] = [round(x, 1) for x in os.getloadavg()]
            entry["measured"] = time.strftime("%Y-%m-%d %H:%M")
            results[f"{Path(config).stem}+feature_cache"] = entry
            print(json.dumps({f"{Path(config).stem}+feature_cache": entry}), flush=True)
            continue
        entry["plain"] = plain_steps(cfg, args.steps)
        entry["trainer"] = trainer_steps(config, args.overrides, args.steps)
        entry["measured"] = time.strftime("%Y-%m-%d %H:%M")
        results[Path(config).stem] = entry
        print(json.dumps({Path(config).stem: entry}), flush=True)
    if args.out:
        path = Path(args.out)
        merged = json.loads(path.read_text()) if path.exists() else {}
        merged.update(results)
        path.write_text(json.dumps(merged, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
