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
images. The first visit of an image costs what an uncached step costs (plus hashing).

    python benchmarks/real_parts/speed.py configs/testbed/vision-A-real.yaml --feature-cache \
        --steps 5 --out benchmarks/results/speed_real.json
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

    from commit_mllm.assembly import assemble

    a = assemble(cfg, log=lambda _m: None)
    model = a.model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    bsz, walls, cpus, lengths, supervised = cfg.train.batch_size, [], [], [], []
    for step in range(steps + 1):  # the first step warms up (allocations) and is dropped
        rows = [a.train_set[(step * bsz + j) % len(a.train_set)] for j in range(bsz)]
        batch = {k: v for k, v in a.collator(rows).items() if isinstance(v, torch.Tensor)}
        w0, c0 = _clock()
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        w1, c1 = _clock()
        if step:
            walls.append(w1 - w0)
            cpus.append(c1 - c0)
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


def plain_steps_cached(cfg, steps: int) -> dict:
    """:func:`plain_steps` with and without the feature cache, step by step interleaved."""
    import torch

    from commit_mllm.assembly import assemble

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
            w0, c0 = _clock()
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            w1, c1 = _clock()
            if step:
                times[arm]["wall"].append(w1 - w0)
                times[arm]["cpu"].append(c1 - c0)
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


def trainer_steps_cached(config: str, overrides: list[str], steps: int, bsz: int) -> dict:
    """:func:`trainer_steps` with and without the cache, runs interleaved, warm cache."""
    from commit_mllm.config import load_config
    from commit_mllm.trainer import train

    out: dict[str, dict[int, tuple[float, float]]] = {"uncached": {}, "cached": {}}
    stats = None
    for i, n in enumerate((1, steps + 1)):
        arms = ("uncached", "cached") if i % 2 == 0 else ("cached", "uncached")
        for arm in arms:
            with tempfile.TemporaryDirectory() as tmp:
                extra = [f"train.steps={n}", f"run.output_dir={tmp}", "data.max_eval_samples=8"]
                extra += ["train.num_threads=1", "train.warmup_steps=0"]
                extra += ["run.progress=false", "run.tensorboard=false", "train.save_every=0"]
                # One step's samples: every later step revisits the same images (warm cache).
                extra += [f"data.max_train_samples={bsz}"]
                extra += [f"train.cache_frozen_features={str(arm == 'cached').lower()}"]
                cfg = load_config(config, [*overrides, *extra])
                w0, c0 = _clock()
                summary = train(cfg)
                w1, c1 = _clock()
            out[arm][n] = (w1 - w0, c1 - c0)
            if arm == "cached" and n == steps + 1:
                stats = summary.get("feature_cache")
    result: dict = {}
    for arm, runs in out.items():
        (w_a, c_a), (w_b, c_b) = runs[1], runs[steps + 1]
        result[arm] = {
            "wall_s": round((w_b - w_a) / steps, 3),
            "cpu_s": round((c_b - c_a) / steps, 3),
        }
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
    from commit_mllm.config import load_config
    from commit_mllm.trainer import train

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
    ap.add_argument(
        "--feature-cache",
        action="store_true",
        help="with and without train.cache_frozen_features, interleaved (<config>+feature_cache)",
    )
    args = ap.parse_args()
    import torch

    from commit_mllm.config import load_config

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
                config, args.overrides, args.steps, cfg.train.batch_size
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
