"""Three components (vision encoder + audio encoder + LLM) on tones-shapes: kappa_c per component.

The model: the tiny pretrained CLIP encoder of ``prepare_tiny_parts('easy-vqa')``, the tiny
pretrained Whisper encoder of ``prepare_tiny_parts('tones-aqa')`` (both parts share one
tokenizer: checked, the script stops otherwise), the easy-vqa tiny Llama, and two fresh
MLP projectors. Components (``component_prefixes``): ``vision``, ``audio``, ``llm``; each
projector with its encoder. For each strategy (constant, commit) the same seeds train with
the :class:`~commit_mllm.CoMMIT` facade in a plain loop (the trainer's ``assemble`` builds
one modality only), logging the trainer's record format, so the run folders work with
``commit_mllm.reporting.report`` and ``commit_mllm.reporting.plotting``.

Usage::

    python benchmarks/three_component.py                 # 250 steps, seed 0
    python benchmarks/three_component.py --steps 100 --seeds 0,1

Results: ``benchmarks/results/three_component.json``, ``three_component_kappa.png`` and the
compare plots ``three_component_compare_*.png`` (report: ``runs/three_component/compare``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
COMMIT_SETTINGS = {"window": 10, "gamma": 0.03, "factor_caps": {"vision": 2.0, "audio": 2.0}}


@dataclass
class Parts:
    """Everything needed to build and feed a vision + audio + LLM model.

    Attributes:
        mcfg: The model config (both encoders and projectors, the LLM).
        collator: Collator with an image processor and a feature extractor.
        train: Training samples.
        test: Held-out samples.
    """

    mcfg: Any
    collator: Any
    train: Any
    test: Any


def pretrained_parts(cache_dir: str | None, n_train: int, n_test: int, seed: int) -> Parts:
    """Tiny pretrained parts from the cache; stops when the two tokenizers differ."""
    from commit_mllm.parts import load_media_processor, prepare_tiny_parts, tiny_mllm_config

    vis = prepare_tiny_parts("easy-vqa", cache_dir, log=None)
    aud = prepare_tiny_parts("tones-aqa", cache_dir, log=None)
    tv, ta = (p / "tokenizer" / "tokenizer.json" for p in (vis, aud))
    if tv.read_bytes() != ta.read_bytes():
        raise RuntimeError(f"the easy-vqa and tones-aqa parts use different tokenizers: {tv} {ta}")
    mcfg = tiny_mllm_config(vis)
    mcfg.audio = tiny_mllm_config(aud).audio
    mcfg.audio_projector = tiny_mllm_config(aud).audio_projector
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(vis / "tokenizer"))
    return _finish(
        mcfg, tok, load_media_processor(vis), load_media_processor(aud), n_train, n_test, seed
    )


def random_parts(n_train: int, n_test: int, seed: int) -> Parts:
    """Tiny random parts from configs (the test): CLIP + Whisper encoders, a 2-layer Llama."""
    import transformers
    from transformers import WhisperFeatureExtractor

    from commit_mllm.data import train_tiny_tokenizer
    from commit_mllm.tasks import task_texts
    from commit_mllm.tasks.tones_shapes import texts
    from commit_mllm.training.model_spec import tiny_random_mllm

    mcfg = tiny_random_mllm("image")
    mcfg.audio = tiny_random_mllm("audio").audio
    tok = train_tiny_tokenizer([*task_texts("all"), *texts()])
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    image_processor = cls(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    fe = WhisperFeatureExtractor(feature_size=80)
    return _finish(mcfg, tok, image_processor, fe, n_train, n_test, seed)


def _finish(mcfg, tok, image_processor, fe, n_train: int, n_test: int, seed: int) -> Parts:
    from commit_mllm.data import Collator
    from commit_mllm.tasks.tones_shapes import load_tones_shapes

    collator = Collator(tok, image_processor, fe, max_length=64)
    mcfg.image_token_id, mcfg.audio_token_id = collator.image_token_id, collator.audio_token_id
    mcfg.projector_side = "encoder"
    mcfg.llm.vocab_size = len(tok)
    train = load_tones_shapes("train", seed, max_samples=n_train)
    test = load_tones_shapes("test", seed, max_samples=n_test)
    return Parts(mcfg, collator, train, test)


def build_model(parts: Parts, strategy: str, steps: int, seed: int, lr: float, **commit_kw):
    """Model, optimizer, components and CoMMIT facade for one run (seeded)."""
    from commit_mllm import CoMMIT, CoMMITConfig, Components
    from commit_mllm.models import MultimodalLM, component_prefixes

    torch.manual_seed(seed)
    model = MultimodalLM(copy.deepcopy(parts.mcfg))
    patterns = component_prefixes(model, "encoder")
    components = Components.from_model(model, patterns, {c: lr for c in patterns})
    optimizer = torch.optim.AdamW(components.param_groups())
    kw = dict(COMMIT_SETTINGS) if strategy in ("commit", "commit_clr") else {}
    cfg = CoMMITConfig(strategy=strategy, seed=seed, **{**kw, **commit_kw})
    commit = CoMMIT(model, optimizer, components, cfg, total_steps=steps, warmup_steps=steps // 20)
    return model, optimizer, components, commit


def train_run(
    parts: Parts,
    strategy: str,
    steps: int,
    seed: int,
    out: Path | None = None,
    batch_size: int = 16,
    lr: float = 1e-3,
    log: Callable[[str], None] = print,
    **commit_kw: Any,
) -> dict[str, Any]:
    """Train one run; write metrics.jsonl / summary.json to ``out`` (when given).

    Returns:
        The summary, with ``records`` (the per-step logs) attached.
    """
    from commit_mllm.method.lookahead import supervised_mask
    from commit_mllm.training.batches import BatchOrder

    model, optimizer, components, commit = build_model(
        parts, strategy, steps, seed, lr, **commit_kw
    )
    params = [p for c in components for p in c.params]
    order = BatchOrder(len(parts.train), batch_size, seed)
    records, t0 = [], time.perf_counter()
    for step in range(steps):
        batch = parts.collator([parts.train[i] for i in order.indices(step)])
        labels = batch["labels"]
        logits = commit.forward(batch)
        ce = F.cross_entropy(logits.float(), labels[:, 1:][supervised_mask(labels)])
        aux = commit.aux_loss(logits)
        commit.backward(ce, aux)
        commit.after_backward()
        norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        commit.before_step()
        optimizer.step()
        report = commit.after_step()
        optimizer.zero_grad(set_to_none=True)
        ce_v, aux_v = float(ce.detach()), float(aux.detach())
        rec = {"step": step, "loss": ce_v + aux_v, "ce": ce_v, "aux_loss": aux_v}
        rec |= {"grad_norm": float(norm)} | report.as_log()
        records.append(rec)
        if step % 50 == 0:
            log(f"  {strategy} step {step}: ce={ce_v:.3f} kappa_bar={rec['kappa_bar']}")
    seconds = time.perf_counter() - t0
    summary = _summary(parts, model, strategy, seed, steps, records, seconds)
    if out is not None:
        _write_run(out, records, summary)
    return {**summary, "records": records}


def _summary(parts, model, strategy, seed, steps, records, seconds) -> dict[str, Any]:
    from commit_mllm.evaluation.generate import evaluate

    result, _ = evaluate(model, parts.collator, parts.test, 64, 4, "cpu")
    tail = records[-max(1, len(records) // 10) :]
    half = records[len(records) // 2 :]
    comps = [k.split("/", 1)[1] for k in records[-1] if k.startswith("kappa_c/")]
    summary = {
        "strategy": strategy,
        "label": strategy,
        "seed": seed,
        "steps": steps,
        "final_loss": statistics.fmean(r["ce"] for r in tail),
        "loss_auc": statistics.fmean(r["ce"] for r in records),
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / steps,
        "final_state": records[-1].get("state"),
        "final_kappa_bar": records[-1].get("kappa_bar"),
    }
    for c in comps:
        logs = [math.log(r[f"kappa_c/{c}"]) for r in half if r.get(f"kappa_c/{c}")]
        summary[f"kappa_c/{c}_geomean_2nd_half"] = math.exp(statistics.fmean(logs))
        summary[f"share/{c}_mean_2nd_half"] = statistics.fmean(r[f"share/{c}"] for r in half)
        summary[f"factor/{c}_final"] = records[-1].get(f"factor/{c}")
        finite = all(math.isfinite(r[f"kappa_c/{c}"]) for r in records if f"kappa_c/{c}" in r)
        summary[f"kappa_c/{c}_all_finite"] = finite
    summary.update(result)
    return summary


def _write_run(out: Path, records: list[dict], summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.json").write_text(json.dumps({**summary, "run_dir": str(out)}, indent=2))


def plot_kappa_c(runs: dict[str, list[dict]], path: Path, window: int = 15) -> None:
    """kappa_c per component (geometric moving average) and D-shares, one column per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(2, len(runs), figsize=(5 * len(runs), 6.5), squeeze=False)
    for col, (strategy, summaries) in enumerate(runs.items()):
        recs = summaries[0]["records"]
        comps = [k.split("/", 1)[1] for k in recs[-1] if k.startswith("kappa_c/")]
        for c in comps:
            logk = np.log([r[f"kappa_c/{c}"] for r in recs])
            ker = np.ones(window) / window
            axes[0, col].plot(np.exp(np.convolve(logk, ker, mode="valid")), label=c)
            share = np.array([r[f"share/{c}"] for r in recs])
            axes[1, col].plot(np.convolve(share, ker, mode="valid"), label=c)
        axes[0, col].axhline(1.0, color="k", lw=0.6, ls="--")
        axes[0, col].set(yscale="log", title=f"{strategy}: kappa_c (seed 0, MA {window})")
        axes[1, col].set(title=f"{strategy}: share D_c / sum D", xlabel="step", ylim=(0, 1))
        axes[0, col].legend()
        axes[1, col].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--seeds", default="0")
    p.add_argument("--strategies", default="constant,commit")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", default=str(ROOT / "runs" / "three_component"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    parts = pretrained_parts(None, n_train=3000, n_test=300, seed=0)
    runs: dict[str, list[dict]] = {}
    for strategy in args.strategies.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            out = Path(args.runs) / strategy / f"s{seed}"
            print(f"== {strategy} seed {seed}: {args.steps} steps -> {out}")
            runs.setdefault(strategy, []).append(train_run(parts, strategy, args.steps, seed, out))
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot_kappa_c(runs, RESULTS / "three_component_kappa.png")
    from commit_mllm.reporting.report import write_compare_report

    dirs = [Path(args.runs) / st / f"s{s['seed']}" for st, v in runs.items() for s in v]
    report = write_compare_report(dirs, Path(args.runs) / "compare")
    for png in report.parent.glob("compare_*.png"):  # the plots beside the results JSON
        shutil.copyfile(png, RESULTS / f"three_component_{png.name}")
    payload = {
        "steps": args.steps,
        "wall_seconds": time.perf_counter() - t0,
        "commit_settings": COMMIT_SETTINGS,
        "runs": [{k: v for k, v in s.items() if k != "records"} for v in runs.values() for s in v],
    }
    (RESULTS / "three_component.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(json.dumps(payload["runs"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
