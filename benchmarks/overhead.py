"""What kappa costs and how well it is estimated (issue "Benchmarks", part 1).

Two measurements, both in one process:

1. **Overhead.** Step time and peak memory of a plain step (forward, CE, backward, clip,
   AdamW step; no meter) against CoMMIT steps at the default settings and over a grid of
   K (estimate every K steps) x row fraction (measure on the first rows of the batch). The
   arms are interleaved: every round runs ``plain, arm_1, plain, arm_2, ..., plain`` (the
   arm order rotates between rounds) and each arm's time is divided by the mean of the two
   plain blocks around it, so slow drifts of the machine's load cancel. Each block runs a
   multiple of K steps, so a block's mean step time is the amortized cost of the setting.
   Reported: medians over rounds of the per-step times and of these paired ratios.
2. **Estimate error.** One training run of the tiny model on easy-VQA (CoMMIT default
   strategy, exact estimate every step). At every step the exact estimate (all rows) and the
   row-subset estimates are all measured on the same update; a setting (K, rows) is the
   subsequence it would have taken (steps with t % K == 0, its row fraction). We compare
   kappa_bar (geometric mean of the last N estimates the setting took) with the exact
   every-step kappa_bar, see :func:`estimate_errors` for the two ways this is done.

Memory on CPU: peak resident set size (``VmHWM`` after resetting it through
``/proc/self/clear_refs``) minus the resident size before the model was built, with glibc's
mmap threshold fixed at 128 KiB (so freed tensors go back to the OS and RSS follows the live
tensors). On CUDA: ``torch.cuda.max_memory_allocated``. Run ``python benchmarks/overhead.py
--help`` for the options; results go to ``benchmarks/results/overhead.{json,md}``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from commit_mllm import CoMMIT, CoMMITConfig, Components
from commit_mllm.assembly import TINY_CLIP, TINY_LLM
from commit_mllm.balance import BalanceMeter, supervised_mask
from commit_mllm.data import Collator, train_tiny_tokenizer
from commit_mllm.models import LoRASettings, component_prefixes
from commit_mllm.models.mllm import LLMConfig, MLLMConfig, MultimodalLM, VisionEncoderConfig
from commit_mllm.tasks import load_task, task_texts

KS = (1, 2, 4, 8)
FRACTIONS = (1.0, 0.5, 0.25)
MODES = ("lora", "full")

# The CPU-sized "medium" model: CLIP-style ViT (hidden 384, 6 layers) + Llama (hidden 512,
# 8 layers, vocab 8192, untied head): ~44 M parameters.
MEDIUM_LLM = {
    **TINY_LLM,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "vocab_size": 8192,
    "tie_word_embeddings": False,
}
MEDIUM_CLIP = {
    **TINY_CLIP,
    "hidden_size": 384,
    "intermediate_size": 1536,
    "num_hidden_layers": 6,
    "num_attention_heads": 6,
    "patch_size": 16,
}


@dataclass(frozen=True)
class ModelSpec:
    """A model size of the benchmark.

    Attributes:
        name: ``tiny`` or ``medium``.
        llm: transformers Llama config dict.
        clip: transformers CLIP vision config dict (without ``image_size``).
        image_size: Image side in pixels.
        batch_size: Rows per batch.
        lora_r: LoRA rank on the LLM in ``lora`` mode.
        min_block: Steps per timing block (rounded up to a multiple of K).
        rounds: Timing rounds.
        quick_rounds: Timing rounds with ``--quick``.
        resize_vocab: Resize the LLM's vocabulary to the tokenizer's (tiny preset style).
    """

    name: str
    llm: dict
    clip: dict
    image_size: int
    batch_size: int
    lora_r: int
    min_block: int
    rounds: int
    quick_rounds: int
    resize_vocab: bool = False


SPECS = {
    "tiny": ModelSpec("tiny", dict(TINY_LLM), dict(TINY_CLIP), 32, 16, 8, 8, 6, 2, True),
    "medium": ModelSpec("medium", MEDIUM_LLM, MEDIUM_CLIP, 64, 8, 16, 2, 3, 1),
}


@dataclass(frozen=True)
class Setting:
    """One arm of the overhead benchmark.

    Attributes:
        name: Label in the tables.
        every: K (0 for the plain step).
        rows: Row fraction of the estimate (None = all rows).
        plain: A plain step without CoMMIT.
        free_grads: Call ``optimizer.zero_grad(set_to_none=True)`` before ``after_step``
            (the README's loop calls it after): the gradients are freed before kappa is
            measured, so theta_t's snapshot reuses their memory.
        ptr_swap: Monkeypatch the meter to swap parameter storage (``p.data``) instead of
            copying values between theta_t and theta_{t+1} (a proposed change to
            ``balance.py``, measured here; not the library's behaviour).
    """

    name: str
    every: int = 1
    rows: float | None = None
    plain: bool = False
    free_grads: bool = False
    ptr_swap: bool = False

    def config(self) -> CoMMITConfig:
        """The CoMMIT settings of this arm (the default ``CoMMITConfig`` otherwise)."""
        return CoMMITConfig(every=self.every, rows=self.rows)


def grid_name(k: int, frac: float) -> str:
    """Label of a grid cell, e.g. ``K=4 rows=0.25``."""
    return f"K={k} rows={frac:g}"


def settings_for(full_grid: bool, extras: bool = True) -> list[Setting]:
    """The arms: plain, the default, and the (K, rows) grid (or its corners).

    ``extras`` adds two variants of the default: gradients freed before the estimate, and
    the meter patched to swap parameter storage instead of copying.

    ``CoMMITConfig()`` is K=1 with all rows, i.e. the exact every-step estimate; the default
    arm is kept as its own arm so that the table shows the measurement noise (two identical
    settings) next to the grid.
    """
    out = [Setting("plain", 0, None, True), Setting("default")]
    if extras:
        out.append(Setting("default, grads freed first", free_grads=True))
        out.append(Setting("default, pointer swap (patched)", ptr_swap=True))
    cells = (
        [(k, f) for k in KS for f in FRACTIONS]
        if full_grid
        else [(1, 1.0), (1, 0.5), (1, 0.25), (4, 0.25), (8, 1.0)]
    )
    for k, f in cells:
        out.append(Setting(grid_name(k, f), k, None if f == 1.0 else f))
    return out


# ---- machine and memory helpers -----------------------------------------------------------
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_malloc() -> bool:
    """Fix glibc's mmap threshold at 128 KiB so that RSS follows the live tensors."""
    libc = _libc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 128 * 1024) == 1
    return ok and libc.mallopt(m_trim_threshold, 128 * 1024) == 1


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    libc = _libc()
    gc.collect()
    if libc is not None:
        libc.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _memory_start(device: torch.device) -> int | None:
    """Reset the peak counter; return the current (baseline) bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if not _reset_cpu_peak():
        return None
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def _memory_peak(device: torch.device) -> int | None:
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def machine_info(threads: int) -> dict[str, Any]:
    """Machine, library versions, thread count and the date."""
    import transformers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    with contextlib.suppress(ImportError):
        import peft

        info["peft"] = peft.__version__
    return info


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages (rounded)."""
    return [round(x, 2) for x in os.getloadavg()]


# ---- model and data -----------------------------------------------------------------------
@dataclass
class Bench:
    """A model with its optimizer, components and fixed batches."""

    model: MultimodalLM
    components: Components
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, Any]]
    params: list[torch.nn.Parameter]
    n_params: int
    n_trainable: int
    tokens: int = field(default=0)


def make_collator(image_size: int, max_length: int = 48) -> Collator:
    """The tiny byte-level tokenizer (easy-VQA + tones-AQA texts) and a CLIP processor."""
    import transformers

    tok = train_tiny_tokenizer(task_texts("all"))
    cls = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    size = {"height": image_size, "width": image_size}
    proc = cls(size={"shortest_edge": image_size}, crop_size=size)
    return Collator(tok, proc, None, max_length=max_length)


def build_model(spec: ModelSpec, mode: str, collator: Collator, seed: int = 0) -> MultimodalLM:
    """The MultimodalLM of a spec: encoder + projector full, LLM with LoRA or full."""
    llm = LLMConfig(config=dict(spec.llm))
    if spec.resize_vocab:
        llm.vocab_size = len(collator.tokenizer)
    if mode == "lora":
        llm.lora = LoRASettings(r=spec.lora_r, alpha=2.0 * spec.lora_r)
    vision = VisionEncoderConfig(config={**spec.clip, "image_size": spec.image_size})
    cfg = MLLMConfig(llm=llm, vision=vision, image_token_id=collator.image_token_id)
    torch.manual_seed(seed)
    return MultimodalLM(cfg)


def build_bench(
    spec: ModelSpec,
    mode: str,
    collator: Collator,
    samples: Sequence[dict],
    n_batches: int,
    lr: float = 1e-4,
    device: torch.device | None = None,
) -> Bench:
    """Model, components (projector with the encoder), AdamW and ``n_batches`` batches."""
    device = device or torch.device("cpu")
    model = build_model(spec, mode, collator).to(device)
    comps = Components.from_model(model, component_prefixes(model), {"encoder": lr, "llm": lr})
    opt = torch.optim.AdamW(comps.param_groups())
    b = spec.batch_size
    batches = [_to(collator(samples[i * b : (i + 1) * b]), device) for i in range(n_batches)]
    params = [p for p in model.parameters() if p.requires_grad]
    n_all = sum(p.numel() for p in model.parameters())
    tokens = int(batches[0]["attention_mask"].sum())
    return Bench(model, comps, opt, batches, params, n_all, sum(p.numel() for p in params), tokens)


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}


def targets_of(batch: dict[str, Any]) -> torch.Tensor:
    """Supervised next-token targets [T], row-major."""
    labels = batch["labels"]
    return labels[:, 1:][supervised_mask(labels)]


# ---- one step -----------------------------------------------------------------------------
def plain_step(bench: Bench, batch: dict[str, Any]) -> None:
    """Forward, CE, backward, clip, AdamW step: no meter."""
    logits, targets = bench.model.supervised_logits(batch)
    F.cross_entropy(logits.float(), targets).backward()
    torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
    bench.optimizer.step()
    bench.optimizer.zero_grad(set_to_none=True)


def commit_step(
    bench: Bench, commit: CoMMIT, batch: dict[str, Any], free_grads: bool = False
) -> Any:
    """The README's CoMMIT step (forward through the meter ... after_step).

    Args:
        bench: The model and optimizer.
        commit: The coordinator.
        batch: The batch.
        free_grads: Free the gradients before ``after_step`` instead of after it.
    """
    logits = commit.forward(batch)
    ce = F.cross_entropy(logits.float(), targets_of(batch))
    commit.backward(ce, commit.aux_loss(logits))
    commit.after_backward()
    torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
    commit.before_step()
    bench.optimizer.step()
    if free_grads:
        bench.optimizer.zero_grad(set_to_none=True)
    report = commit.after_step()
    bench.optimizer.zero_grad(set_to_none=True)
    return report


def _pointer_swap_set_state(self: BalanceMeter, target: dict[str, str]) -> None:
    """``BalanceMeter._set_state`` swapping storages (O(1) per parameter) instead of copying.

    Bitwise exact (the very tensors are exchanged back); valid when no two parameters share
    storage through views (flat-parameter wrappers such as FSDP would break).
    """
    for c in self.components:
        want = target.get(c.name, "new")
        if self._state.get(c.name) != want and not c.frozen:
            old = self._old[c.name]
            for i, p in enumerate(c.params):
                p.data, old[i] = old[i], p.data
        self._state[c.name] = want


def step_fn(bench: Bench, setting: Setting) -> Callable[[int], None]:
    """A callable running step ``i`` (batch ``i`` mod the fixed batches) of an arm."""
    if setting.plain:
        return lambda i: plain_step(bench, bench.batches[i % len(bench.batches)])
    commit = CoMMIT(
        bench.model, bench.optimizer, bench.components, setting.config(), total_steps=10**6
    )
    if setting.ptr_swap:
        commit.meter._set_state = types.MethodType(_pointer_swap_set_state, commit.meter)
    free = setting.free_grads
    return lambda i: commit_step(bench, commit, bench.batches[i % len(bench.batches)], free)


def _block_len(setting: Setting, min_block: int) -> int:
    k = max(setting.every, 1)
    return k * math.ceil(min_block / k)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_block(fn: Callable[[int], None], n: int, device: torch.device) -> float:
    """Mean seconds per step over ``n`` steps."""
    _sync(device)
    t0 = time.perf_counter()
    for i in range(n):
        fn(i)
    _sync(device)
    return (time.perf_counter() - t0) / n


# ---- timing and memory ----------------------------------------------------------------------
def time_arms(
    bench: Bench, settings: Sequence[Setting], rounds: int, min_block: int, device: torch.device
) -> dict[str, Any]:
    """Interleaved timing: each round runs ``P A1 P A2 ... P`` (rotating arm order).

    Returns:
        ``{arm: {"times": [s/step per round], "ratios": [paired ratio per round]}}`` plus
        ``"_load"``: the load averages at the start of every round.
    """
    plain = next(s for s in settings if s.plain)
    arms = [s for s in settings if not s.plain]
    fns = {s.name: step_fn(bench, s) for s in settings}
    n_plain = _block_len(plain, min_block)
    for s in settings:  # warm-up: optimizer state, allocator, first-call costs
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


def memory_arms(
    bench: Bench, settings: Sequence[Setting], base: int | None, device: torch.device
) -> dict[str, int | None]:
    """Peak memory of one estimate step of each arm, twice interleaved.

    Every arm's peak is that of a step that estimates kappa (K only changes how often that
    peak is reached, not its height).

    Args:
        bench: The model (its optimizer state already created).
        settings: The arms.
        base: Bytes in use before the model was built (subtracted on CPU).
        device: Where the model runs.

    Returns:
        Arm -> the smaller of the two peaks in bytes above ``base`` (None if unmeasurable).
    """
    plain = next(s for s in settings if s.plain)
    run_block(step_fn(bench, plain), 2, device)  # optimizer state, first-call costs
    peaks: dict[str, list[int]] = {s.name: [] for s in settings}
    for _ in range(2):
        for s in settings:
            fn = step_fn(bench, s)  # a fresh coordinator: its step 0 is an estimate step
            if _memory_start(device) is None:
                return {s.name: None for s in settings}
            run_block(fn, 1, device)
            peak = _memory_peak(device)
            if peak is not None:
                peaks[s.name].append(peak - (base if device.type == "cpu" else 0))
    return {name: (min(v) if v else None) for name, v in peaks.items()}


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
    load0 = loadavg()
    t0 = time.perf_counter()
    raw = time_arms(bench, settings, rounds, spec.min_block, device)
    res = {
        "model": spec.name,
        "mode": mode,
        "params": bench.n_params,
        "trainable": bench.n_trainable,
        "trainable_by_component": {c.name: c.numel for c in bench.components},
        "batch_size": spec.batch_size,
        "tokens_per_batch": bench.tokens,
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


def bench_memory(
    spec: ModelSpec,
    mode: str,
    collator: Collator,
    samples: Sequence[dict],
    settings: Sequence[Setting],
    device: torch.device,
) -> dict[str, Any]:
    """Peak memory of every arm for one (model, mode); ratios against the plain step."""
    base = _memory_start(device) if device.type == "cpu" else 0
    bench = build_bench(spec, mode, collator, samples, n_batches=1, device=device)
    peaks = memory_arms(bench, settings, base, device)
    del bench
    gc.collect()
    plain = peaks.get("plain")
    return {
        name: {
            "peak_bytes": v,
            "ratio": (v / plain) if (v is not None and plain) else None,
        }
        for name, v in peaks.items()
    }


# ---- estimate error -------------------------------------------------------------------------
def _log_kappa(m: Any) -> float | None:
    """log kappa of a valid measurement, else None (skipped, as the tracker skips it)."""
    if m is None or not m.valid or m.kappa is None:
        return None
    return math.log(m.kappa)


def kappa_trajectory(
    bench: Bench, steps: int, fractions: Sequence[float], warmup: int
) -> dict[float, list[float | None]]:
    """Train with CoMMIT's default (exact, every step) and log every row fraction's estimate.

    The row-subset meters measure the same update as the exact one: they share the training
    forward's reference (the meter's private ``_ref``: p_t, cached features, RNG states) and
    take their own snapshot of theta_t. Every meter restores the parameters bitwise and forks
    the RNG, so the extra meters do not change the run.

    Returns:
        Fraction -> [log kappa_t or None] per step (1.0 = exact, the estimate that drove
        the run's learning rates).
    """
    commit = CoMMIT(
        bench.model, bench.optimizer, bench.components, CoMMITConfig(),
        total_steps=steps, warmup_steps=warmup,
    )  # fmt: skip
    extra = {f: BalanceMeter(bench.model, bench.components, rows=f) for f in fractions if f < 1}
    logs: dict[float, list[float | None]] = {f: [] for f in fractions}
    for t in range(steps):
        batch = bench.batches[t % len(bench.batches)]
        logits = commit.forward(batch)
        ce = F.cross_entropy(logits.float(), targets_of(batch))
        commit.backward(ce, commit.aux_loss(logits))
        commit.after_backward()
        torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
        commit.before_step()
        for meter in extra.values():
            meter._ref = commit.meter._ref
            meter.snapshot(t)
        bench.optimizer.step()
        for f, meter in extra.items():
            logs[f].append(_log_kappa(meter.measure(t)))
        logs[1.0].append(_log_kappa(commit.after_step().measurement))
        bench.optimizer.zero_grad(set_to_none=True)
    return logs


def kbar_series(
    logk: Sequence[float | None], every: int, window: int, offset: int = 0
) -> list[tuple[float, int] | None]:
    """log kappa_bar after each step for a setting estimating at steps t % K == offset.

    Returns:
        Per step: (mean log kappa of the last ``window`` valid estimates, step of the oldest
        of them), or None before ``window`` estimates. Between estimates the value is held,
        as the tracker holds it.
    """
    est: list[tuple[int, float]] = []
    out: list[tuple[float, int] | None] = []
    for t, v in enumerate(logk):
        if t % every == offset and v is not None:
            est.append((t, v))
        if len(est) >= window:
            last = est[-window:]
            out.append((statistics.fmean(v for _, v in last), last[0][0]))
        else:
            out.append(None)
    return out


def _span_mean(logk: Sequence[float | None], start: int, end: int) -> float | None:
    vals = [v for v in logk[start : end + 1] if v is not None]
    return statistics.fmean(vals) if vals else None


def estimate_errors(
    logs: dict[float, list[float | None]], ks: Sequence[int], window: int
) -> dict[str, Any]:
    """Mean |log kappa_bar(setting) - log kappa_bar(exact)| per (K, rows).

    Two comparisons, both at every step T from the first step where every setting has a full
    window (the largest K needs N*K steps), so all settings are averaged over the same steps:

    * ``error`` (primary, what the controller sees): the setting's kappa_bar over its last N
      estimates (spanning ~N*K steps) against the exact kappa_bar over the last N steps.
    * ``error_same_span``: against the exact estimates averaged over the same steps as the
      setting's window (isolates the sampling error from the longer window's lag).

    The ``noise_floor`` is the same statistic between two disjoint exact samplings of the
    run (even steps vs odd steps, N estimates each): what a second, equally good estimator
    would disagree by.
    """
    exact_raw = logs[1.0]
    exact = kbar_series(exact_raw, 1, window)
    series = {(k, f): kbar_series(logs[f], k, window) for k in ks for f in logs}
    firsts = [next((t for t, v in enumerate(s) if v is not None), len(s)) for s in series.values()]
    start = max(firsts)
    steps = range(start, len(exact_raw))
    out: dict[str, Any] = {"eval_steps": len(steps), "first_eval_step": start, "settings": {}}
    for (k, f), s in sorted(series.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        err, span = [], []
        for t in steps:
            if s[t] is None or exact[t] is None:
                continue
            err.append(abs(s[t][0] - exact[t][0]))
            ref = _span_mean(exact_raw, s[t][1], t)
            if ref is not None:
                span.append(abs(s[t][0] - ref))
        out["settings"][grid_name(k, f)] = {
            "every": k,
            "rows": f,
            "error": statistics.fmean(err) if err else None,
            "error_same_span": statistics.fmean(span) if span else None,
            "n": len(err),
        }
    even, odd = kbar_series(exact_raw, 2, window, 0), kbar_series(exact_raw, 2, window, 1)
    floor = [abs(even[t][0] - odd[t][0]) for t in steps if even[t] and odd[t]]
    out["noise_floor"] = statistics.fmean(floor) if floor else None
    out["single_estimate"] = _single_estimate_stats(logs)
    return out


def _single_estimate_stats(logs: dict[float, list[float | None]]) -> dict[str, Any]:
    """Per-step noise: std of log kappa_t - log kappa_{t-1} / sqrt 2, subset vs exact."""
    exact = logs[1.0]
    diffs = [b - a for a, b in itertools.pairwise(exact) if a is not None and b is not None]
    out: dict[str, Any] = {
        "exact_step_noise_std": statistics.stdev(diffs) / math.sqrt(2) if len(diffs) > 2 else None,
        "exact_median_log_kappa": statistics.median(v for v in exact if v is not None),
    }
    for f, vals in logs.items():
        if f == 1.0:
            continue
        d = [abs(a - b) for a, b in zip(vals, exact) if a is not None and b is not None]
        out[f"mean_abs_step_error_rows={f:g}"] = statistics.fmean(d) if d else None
    return out


def error_run(
    spec: ModelSpec,
    mode: str,
    collator: Collator,
    steps: int,
    window: int,
    lr: float = 1e-3,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """One training run of ``spec`` on easy-VQA; errors of every (K, rows) setting."""
    b = spec.batch_size
    samples = load_task("easy-vqa", "train", seed=0, max_samples=steps * b)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    samples = [samples[i] for i in order]
    load0, t0 = loadavg(), time.perf_counter()
    bench = build_bench(spec, mode, collator, samples, steps, lr=lr, device=device)
    logs = kappa_trajectory(bench, steps, FRACTIONS, warmup=max(1, steps // 20))
    res = estimate_errors(logs, KS, window)
    res.update(
        model=spec.name, mode=mode, steps=steps, window=window, batch_size=b, lr=lr,
        load_start=load0, load_end=loadavg(), seconds=round(time.perf_counter() - t0, 1),
        log_kappa={f"{f:g}": v for f, v in logs.items()},
    )  # fmt: skip
    return res


# ---- analysis -------------------------------------------------------------------------------
def cost_model(timing: dict[str, Any]) -> dict[str, Any] | None:
    """Fit ratio(K, rows) = 1 + b + m_rows / K from the K=1 cells and the K=8, rows=1 cell.

    b is the per-step bookkeeping (RNG capture, grad norms, regularizer, scheduler) paid
    every step, m_rows the cost of one estimate on that row fraction, both in plain steps.
    Used to fill grid cells that were not timed (``--quick`` and the medium model).
    """
    r = {n: v["ratio_paired_median"] for n, v in timing.items()}
    need = [grid_name(1, 1.0), grid_name(8, 1.0)]
    if any(n not in r for n in need):
        return None
    m1 = (r[need[0]] - r[need[1]]) * 8 / 7
    b = r[need[0]] - 1 - m1
    m = {f: r[grid_name(1, f)] - 1 - b for f in FRACTIONS if grid_name(1, f) in r}
    pred = {grid_name(k, f): 1 + b + mf / k for k in KS for f, mf in m.items()}
    return {"bookkeeping": b, "estimate_cost": {f"{f:g}": v for f, v in m.items()}, "pred": pred}


def grid_ratios(timing: dict[str, Any]) -> dict[str, tuple[float, str]]:
    """Every grid cell's time ratio: measured, else from :func:`cost_model` ("derived")."""
    fit = cost_model(timing)
    out = {}
    for k in KS:
        for f in FRACTIONS:
            name = grid_name(k, f)
            if name in timing:
                out[name] = (timing[name]["ratio_paired_median"], "measured")
            elif fit and name in fit["pred"]:
                out[name] = (fit["pred"][name], "derived")
    return out


def recommend(results: dict[str, Any], time_target: float = 1.10) -> dict[str, Any]:
    """The (K, rows) meeting the time target on every model/mode with the smallest error.

    Time: the worst ratio over the timed (model, mode) pairs (measured or derived). Error:
    the worst primary error over the error runs.
    """
    worst_t: dict[str, float] = {}
    for entry in results["overhead"]:
        for name, (ratio, _) in grid_ratios(entry["timing"]).items():
            worst_t[name] = max(worst_t.get(name, 0.0), ratio)
    worst_e: dict[str, float] = {}
    for run in results["estimate_error"]:
        for name, v in run["settings"].items():
            if v["error"] is not None:
                worst_e[name] = max(worst_e.get(name, 0.0), v["error"])
    ok = [n for n in worst_t if worst_t[n] <= time_target and n in worst_e]
    table = {n: {"time_ratio_worst": worst_t[n], "error_worst": worst_e.get(n)} for n in worst_t}
    both = [n for n in worst_t if n in worst_e]
    pareto = [
        n
        for n in both
        if not any(worst_t[o] <= worst_t[n] and worst_e[o] <= worst_e[n] and o != n for o in both)
    ]
    out: dict[str, Any] = {"time_target": time_target, "table": table, "setting": None}
    out["pareto"] = sorted(pareto, key=lambda n: worst_t[n])
    out["fastest"] = min(worst_t, key=worst_t.get) if worst_t else None
    if ok:
        best = min(ok, key=lambda n: (worst_e[n], worst_t[n]))
        out.update(setting=best, time_ratio_worst=worst_t[best], error_worst=worst_e[best])
    return out


# ---- report ---------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(results: dict[str, Any]) -> str:
    """Tables of the results (the discussion is written by hand below them)."""
    meta = results["meta"]
    lines = [
        "# Measured tables",
        "",
        f"Date {meta['date']}; {meta['platform']}; {meta['cpu_count']} CPUs, "
        f"torch threads {meta['torch_threads']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta.get('peft')}. "
        f"Load averages (1/5/15 min) at start {meta['load_start']}, end {meta['load_end']}. "
        f"`CoMMITConfig()` equals the exact every-step estimate (K=1, all rows): "
        f"{meta['default_equals_exact']}.",
        "",
    ]
    for e in results["overhead"]:
        lines += _overhead_table(e)
    for run in results["estimate_error"]:
        lines += _error_table(run)
    rec = results["recommendation"]
    lines += [
        "## Recommendation (computed)",
        "",
        f"Time target {rec['time_target']}x: best setting **{rec['setting']}** "
        f"(worst time ratio {_f(rec.get('time_ratio_worst'))}, "
        f"worst estimate error {_f(rec.get('error_worst'), '.3f')}). "
        f"Fastest: {rec.get('fastest')}. Pareto front (worst time ratio, worst error): "
        + ", ".join(
            f"{n} ({rec['table'][n]['time_ratio_worst']:.2f}x, "
            f"{rec['table'][n]['error_worst']:.3f})"
            for n in rec.get("pareto", [])
        ),
        "",
    ]
    return "\n".join(lines)


def _overhead_table(e: dict[str, Any]) -> list[str]:
    t, mem = e["timing"], e.get("memory", {})
    fit = cost_model(t)
    lines = [
        f"## {e['model']} / {e['mode']}: {e['params'] / 1e6:.2f} M params, "
        f"{e['trainable'] / 1e6:.2f} M trainable {e['trainable_by_component']}, batch "
        f"{e['batch_size']} ({e['tokens_per_batch']} text tokens)",
        "",
        f"Load averages: start {e['load_start']}, end {e['load_end']}; {e['seconds']} s.",
        "",
        "| setting | s/step (median) | time ratio (paired median) | min-max | rounds "
        "| model | peak mem MB | mem ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in t.items():
        m = mem.get(name, {})
        pred = fit["pred"].get(name) if fit else None
        peak = m.get("peak_bytes")
        lines.append(
            f"| {name} | {v['median_s'] * 1e3:.1f} ms | {v['ratio_paired_median']:.3f} | "
            f"{v['ratio_min']:.2f}-{v['ratio_max']:.2f} | {v['rounds']} | {_f(pred, '.3f')} | "
            f"{_f(None if peak is None else peak / 2**20, '.1f')} | {_f(m.get('ratio'), '.3f')} |"
        )
    if fit:
        missing = [n for n in grid_ratios(t) if n not in t]
        lines += [
            "",
            f"Cost model (in plain steps): bookkeeping b = {fit['bookkeeping']:.3f} per step, "
            f"one estimate m = {fit['estimate_cost']}. Derived (not timed): "
            + (", ".join(f"{n}: {fit['pred'][n]:.3f}" for n in missing) or "none"),
        ]
    return [*lines, ""]


def _error_table(run: dict[str, Any]) -> list[str]:
    s = run["single_estimate"]
    lines = [
        f"## Estimate error: {run['model']} / {run['mode']}, {run['steps']} steps, batch "
        f"{run['batch_size']}, N = {run['window']}",
        "",
        f"Evaluated at {run['eval_steps']} steps (from step {run['first_eval_step']}); "
        f"load {run['load_start']} -> {run['load_end']}; {run['seconds']} s. "
        f"Noise floor (even vs odd steps, exact): {_f(run['noise_floor'], '.3f')}; "
        f"single-estimate log kappa noise std {_f(s['exact_step_noise_std'])}, median "
        f"log kappa {_f(s['exact_median_log_kappa'])}.",
        "",
        "| setting | error (N estimates) | error (same span) |",
        "|---|---|---|",
    ]
    for name, v in run["settings"].items():
        lines.append(f"| {name} | {_f(v['error'], '.3f')} | {_f(v['error_same_span'], '.3f')} |")
    subset = {k: v for k, v in s.items() if k.startswith("mean_abs")}
    lines += ["", f"Single-step |log kappa(rows) - log kappa(exact)|: {subset}", ""]
    return lines


# ---- driver ---------------------------------------------------------------------------------
@dataclass
class Options:
    """What :func:`run_benchmark` runs.

    Attributes:
        models: Model sizes (``tiny``, ``medium``).
        modes: ``lora`` (LoRA on the LLM, encoder + projector full) and/or ``full``.
        rounds: Timing rounds per model (None = the spec's).
        quick: Use the specs' ``quick_rounds`` (when ``rounds`` is None).
        full_grid: Time every (K, rows) cell (else the corners, the rest from the cost model).
            None = full grid for tiny, corners for medium.
        error_steps: Steps of each estimate-error run (0 = skip).
        error_modes: Modes of the tiny model's estimate-error runs.
        window: N, estimates per kappa_bar.
        memory: Measure peak memory.
        min_block: Override of the spec's steps per timing block.
        threads: torch intra-op threads.
        extras: Time the two variants of the default (see :func:`settings_for`).
    """

    models: Sequence[str] = ("tiny", "medium")
    modes: Sequence[str] = MODES
    rounds: int | None = None
    quick: bool = False
    full_grid: bool | None = None
    error_steps: int = 400
    error_modes: Sequence[str] = MODES
    window: int = 20
    memory: bool = True
    min_block: int | None = None
    threads: int = 1
    extras: bool = True


def run_benchmark(opts: Options, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The benchmark's core: timing, estimate error, memory; returns the results dict."""
    torch.set_num_threads(opts.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CoMMITConfig()
    meta = machine_info(opts.threads)
    meta.update(
        options=asdict(opts), device=str(device), load_start=loadavg(),
        default_equals_exact=cfg.every == 1 and cfg.rows is None,
        default_config={"every": cfg.every, "rows": cfg.rows, "strategy": cfg.strategy},
    )  # fmt: skip
    results: dict[str, Any] = {"meta": meta, "overhead": [], "estimate_error": []}
    samples = load_task("easy-vqa", "train", seed=0, max_samples=256)
    collators = {m: make_collator(SPECS[m].image_size) for m in opts.models}
    for name in opts.models:
        spec = _spec(name, opts)
        full = opts.full_grid if opts.full_grid is not None else name == "tiny"
        for mode in opts.modes:
            log(f"timing {name}/{mode} (load {loadavg()})")
            arms = settings_for(full, opts.extras)
            entry = bench_model(spec, mode, collators[name], samples, arms, spec.rounds, device)
            results["overhead"].append(entry)
    if opts.error_steps:
        tiny = _spec("tiny", opts)
        coll = collators.get("tiny") or make_collator(tiny.image_size)
        for mode in opts.error_modes:
            log(f"estimate error tiny/{mode}, {opts.error_steps} steps (load {loadavg()})")
            run = error_run(tiny, mode, coll, opts.error_steps, opts.window, device=device)
            results["estimate_error"].append(run)
    if opts.memory:
        meta["malloc_tuned"] = tune_malloc() if device.type == "cpu" else None
        for entry in results["overhead"]:
            log(f"memory {entry['model']}/{entry['mode']}")
            spec = _spec(entry["model"], opts)
            arms = [s for s in settings_for(True) if s.name in entry["timing"]]
            entry["memory"] = bench_memory(
                spec, entry["mode"], collators[spec.name], samples, arms, device
            )
    meta["load_end"] = loadavg()
    results["recommendation"] = recommend(results)
    return results


def _spec(name: str, opts: Options) -> ModelSpec:
    spec = SPECS[name]
    changes: dict[str, Any] = {}
    if opts.rounds is not None or opts.quick:
        changes["rounds"] = opts.rounds or spec.quick_rounds
    if opts.min_block is not None:
        changes["min_block"] = opts.min_block
    return ModelSpec(**{**asdict(spec), **changes}) if changes else spec


MARKER = "<!-- generated by benchmarks/overhead.py: everything below this line is rewritten -->"


def write_results(results: dict[str, Any], out: Path, stem: str = "overhead") -> Path:
    """Write ``<stem>.json`` (everything) and the tables into ``<stem>.md``.

    Text above :data:`MARKER` in an existing ``<stem>.md`` (the hand-written discussion)
    is kept; everything below it is replaced by the new tables.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    md = out / f"{stem}.md"
    head = md.read_text().split(MARKER)[0] if md.exists() else ""
    md.write_text(f"{head}{MARKER}\n\n{markdown(results)}\n")
    return path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a ~2 minute version")
    p.add_argument("--models", default="tiny,medium", help="comma list of tiny, medium")
    p.add_argument("--modes", default=None, help="comma list of lora, full")
    p.add_argument("--out", default="benchmarks/results", type=Path)
    p.add_argument("--stem", default=None, help="output name (default overhead[_quick])")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--error-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true")
    return p.parse_args(argv)


def options_from_args(a: argparse.Namespace) -> Options:
    """Options of a CLI call.

    ``--quick``: LoRA mode only, 2 rounds (tiny) / 1 round (medium), no variant arms, a
    200-step error run.
    """
    models = tuple(a.models.split(","))
    modes = tuple(a.modes.split(",")) if a.modes else (("lora",) if a.quick else MODES)
    unknown = (set(models) - set(SPECS)) | (set(modes) - set(MODES))
    if unknown:
        raise SystemExit(f"unknown model or mode: {sorted(unknown)}")
    error_steps = a.error_steps if a.error_steps is not None else (200 if a.quick else 400)
    return Options(
        models=models, modes=modes, rounds=a.rounds, quick=a.quick,
        error_steps=error_steps, error_modes=("lora",) if a.quick else MODES,
        memory=not a.no_memory, threads=a.threads, extras=not a.quick,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write its results."""
    a = parse_args(argv)
    results = run_benchmark(options_from_args(a))
    path = write_results(results, a.out, a.stem or ("overhead_quick" if a.quick else "overhead"))
    print(markdown(results))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
