"""Step time and peak memory of a LLaVA-1.5-7B-shaped model, with and without CoMMIT (GPU).

Opt-in, needs a CUDA device: the model is built from configs (random weights, nothing
downloaded): the CLIP ViT-L/14-336 vision tower (hidden 1024, 24 layers, 577 tokens, the
penultimate layer's 576 patch tokens are used), the LLaVA-1.5 MLP projector and a
Llama-2-7B-shaped LLM (hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000) in
bf16 with LoRA r=128 (alpha 256, all linear layers; peft keeps the adapters in float32) on
the LLM, as in
``configs/llava15_7b_lora.yaml``. Batches are synthetic: ``batch`` rows of ``text_tokens``
text tokens (one image placeholder, the last ``answer_tokens`` supervised) + 576 image
tokens, i.e. 600 tokens per row by default.

Arms, interleaved per round (``plain, A, plain, B, plain``; each arm's time over the mean of
its two neighbouring plain blocks): a plain step (forward, CE, backward, clip, AdamW), CoMMIT
at its defaults (``CoMMITConfig()``: K=16, a quarter of the rows, theta_t offloaded to host
memory on CUDA) and the exact estimate (K=1, all rows). Peak memory is
``torch.cuda.max_memory_allocated`` over 2K steps of each arm from a fresh coordinator (two
estimates included).

    python benchmarks/gpu_step.py                  # GPU; writes benchmarks/results/gpu_step.json
    python benchmarks/gpu_step.py --tiny           # small shapes, any device, 2K steps per arm
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead as ov
import overhead_memory as ovm
import overhead_setup as ovs
from commit_mllm import Components
from commit_mllm.models import LoRASettings, ProjectorConfig, component_prefixes
from commit_mllm.models.mllm import MultimodalLM
from commit_mllm.models.mllm_config import LLMConfig, MLLMConfig, VisionEncoderConfig

CLIP_L14_336 = {
    "model_type": "clip_vision_model",
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "patch_size": 14,
    "image_size": 336,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
LLAMA2_7B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}
TINY_OVERRIDE = {
    "clip": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4, "image_size": 56},
    "llm": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 512},
    "lora_r": 8,
}  # fmt: skip
ARMS = (ovs.PLAIN, ovs.DEFAULT, ovs.EXACT)


def model_config(tiny: bool, dtype: str | None, freeze_encoder: bool) -> tuple[MLLMConfig, int]:
    """The LLaVA-1.5-7B-shaped config (or its tiny override) and its image token count."""
    clip, llm, r = dict(CLIP_L14_336), dict(LLAMA2_7B), 128
    if tiny:
        clip.update(TINY_OVERRIDE["clip"])
        llm.update(TINY_OVERRIDE["llm"])
        r = TINY_OVERRIDE["lora_r"]
    if dtype is not None:
        llm["dtype"] = clip["dtype"] = dtype  # build directly in this dtype
    cfg = MLLMConfig(
        llm=LLMConfig(config=llm, dtype=dtype, lora=LoRASettings(r=r, alpha=2.0 * r)),
        vision=VisionEncoderConfig(config=clip, dtype=dtype, freeze=freeze_encoder),
        vision_projector=ProjectorConfig(type="mlp"),
        image_token_id=llm["vocab_size"] - 1,
    )
    return cfg, (clip["image_size"] // clip["patch_size"]) ** 2


@contextlib.contextmanager
def default_device(device: torch.device) -> Iterator[None]:
    """Build parameters directly on ``device`` (no 7B init on the CPU)."""
    with torch.device(device):
        yield


def synthetic_batches(
    cfg: MLLMConfig, n: int, rows: int, text_tokens: int, answer_tokens: int, device: Any
) -> list[dict[str, Any]]:
    """``n`` batches: one placeholder at position 1, the last ``answer_tokens`` supervised."""
    vocab, side = cfg.llm.config["vocab_size"], cfg.vision.config["image_size"]
    dtype = ov_dtype(cfg.vision.dtype)
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab - 1, (rows, text_tokens), generator=g)
        ids[:, 1] = cfg.image_token_id
        labels = torch.full_like(ids, -100)
        labels[:, -answer_tokens:] = ids[:, -answer_tokens:]
        pixels = torch.randn(rows, 3, side, side, generator=g).to(dtype)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
        batch["pixel_values"] = pixels
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def ov_dtype(name: str | None) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; None -> float32."""
    return getattr(torch, name) if name else torch.float32


def build(args: argparse.Namespace, device: torch.device) -> tuple[ovs.Bench, int]:
    """Model (on ``device``), components, AdamW and synthetic batches."""
    dtype = None if (args.tiny and device.type == "cpu") else "bfloat16"
    cfg, n_image = model_config(args.tiny, dtype, args.freeze_encoder)
    torch.manual_seed(0)
    with default_device(device):
        model = MultimodalLM(cfg)
    if args.gradient_checkpointing:
        model.hf_llm.gradient_checkpointing_enable()
    model.train()
    lrs = {"encoder": 2e-5, "llm": 2e-4}
    comps = Components.from_model(model, component_prefixes(model), lrs)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(comps.param_groups(), **fused)
    batches = synthetic_batches(cfg, 2, args.batch, args.text_tokens, args.answer_tokens, device)
    params = [p for p in model.parameters() if p.requires_grad]
    n_all = sum(p.numel() for p in model.parameters())
    bench = ovs.Bench(model, comps, opt, batches, params, n_all, sum(p.numel() for p in params))
    bench.tokens = args.batch * (args.text_tokens - 1 + n_image)
    return bench, n_image


def measure(bench: ovs.Bench, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Interleaved timing (paired ratios) and per-arm peak memory of one estimate step.

    With ``--tiny`` (a construction check): 2K steps per arm, no rounds, no warm-up.
    """
    if args.tiny:
        raw = {
            s.name: {"times": [ovs.run_block(ovs.step_fn(bench, s), 2 * s.k, device)]} for s in ARMS
        }
        for v in raw.values():
            v["ratios"] = [v["times"][0] / raw["plain"]["times"][0]]
        raw["plain"]["ratios"] = []
        load = [ovm.loadavg()]
    else:
        raw = ov.time_arms(bench, ARMS, args.rounds, args.block, device)
        load = raw.pop("_load")
    timing = ov.summarize_timing(raw)
    memory = {s.name: {"peak_bytes": ovm.peak_memory(bench, s, 0, device)} for s in ARMS}
    plain = memory["plain"]["peak_bytes"]
    for v in memory.values():
        v["ratio"] = v["peak_bytes"] / plain if (plain and v["peak_bytes"]) else None
    return {"timing": timing, "memory": memory, "load_rounds": load}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--tiny", action="store_true", help="small shapes, any device, 2K steps per arm (a check)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=25, help="incl. the image placeholder")
    p.add_argument("--answer-tokens", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--block", type=int, default=4, help="steps per block (multiple of 4)")
    p.add_argument("--freeze-encoder", action="store_true", help="train only the projector")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    a = p.parse_args(argv)
    if a.tiny:
        a.batch, a.text_tokens, a.answer_tokens = 2, 12, 4
    return a


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build, measure, and return the results (does not write them)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bench, n_image = build(args, device)
    res = {"meta": ovm.machine_info(torch.get_num_threads()), "device": str(device)}
    res["meta"]["load_start"] = ovm.loadavg()
    res["shape"] = {
        "tiny": args.tiny,
        "batch": args.batch,
        "tokens_per_row": args.text_tokens - 1 + n_image,
        "image_tokens": n_image,
        "supervised_per_row": args.answer_tokens,
        "params": bench.n_params,
        "trainable_by_component": {c.name: c.numel for c in bench.components},
        "freeze_encoder": args.freeze_encoder,
        "gradient_checkpointing": args.gradient_checkpointing,
    }
    res.update(measure(bench, args, device))
    res["meta"]["load_end"] = ovm.loadavg()
    return res


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: exits with status 2 and a message when no CUDA device is present."""
    args = parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        print(
            "gpu_step.py needs a CUDA device (none found): the LLaVA-1.5-7B-shaped model "
            "does not fit a CPU run. Use --tiny to check the construction logic on CPU.",
            file=sys.stderr,
        )
        return 2
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("gpu_step_tiny.json" if args.tiny else "gpu_step.json")
    path.write_text(json.dumps(res, indent=1) + "\n")
    for name, v in res["timing"].items():
        mem = res["memory"][name]
        print(
            f"{name:>16}: {v['median_s'] * 1e3:8.1f} ms/step, x{v['ratio_paired_median']:.3f} "
            f"time, peak {mem['peak_bytes'] / 2**30:.2f} GiB (x{mem['ratio'] or 0:.3f})"
        )
    print(f"wrote {path}; median ratio spread over rounds: {_spread(res['timing'])}")
    return 0


def _spread(timing: dict[str, Any]) -> dict[str, float]:
    return {n: round(statistics.pstdev(v["ratios"]), 3) for n, v in timing.items() if v["ratios"]}


if __name__ == "__main__":
    sys.exit(main())
