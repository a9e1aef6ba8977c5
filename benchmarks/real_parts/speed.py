"""Seconds per training step of the SALMONN-like model on this machine (no kappa, then with).

python benchmarks/real_parts/speed.py --threads 1 --steps 3 [key=value overrides]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--cache", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(args.threads)
    from commit_mllm.assembly import assemble
    from commit_mllm.config import load_config

    ov = subprocess.run(
        [sys.executable, str(HERE / "prepare.py"), "--overrides"]
        + (["--cache", args.cache] if args.cache else []),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    cfg = load_config(HERE / "salmonn_like.yaml", ov + args.overrides)
    a = assemble(cfg)
    model = a.model.train()
    batch = a.collator([a.train_set[i] for i in range(cfg.train.batch_size)])
    batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    out = {
        "threads": args.threads,
        "seq_len": int(batch["input_ids"].shape[1]),
        "mel_frames": int(batch["input_features"].shape[-1]),
    }
    times = {"encode": [], "decode": [], "backward": [], "step": []}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        feats = model.encode(batch)
        t1 = time.perf_counter()
        logits, targets = model._decode(batch, feats)
        loss = F.cross_entropy(logits.float(), targets)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        opt.step()
        opt.zero_grad()
        t4 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t0), strict=True):
            times[k].append(round(v, 3))
    with torch.no_grad():
        t0 = time.perf_counter()
        model.decode(batch, model.encode(batch))
        out["no_grad_forward_s"] = round(time.perf_counter() - t0, 3)
    out.update(times)
    out["s_per_step_median"] = sorted(times["step"])[len(times["step"]) // 2]
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
