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
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead_quality as quality
from commit_mllm import CoMMIT, CoMMITConfig, Components
from commit_mllm.data import Collator, train_tiny_tokenizer
from commit_mllm.method.lookahead import supervised_mask
from commit_mllm.models import LoRASettings, component_prefixes
from commit_mllm.models.mllm import MultimodalLM
from commit_mllm.models.mllm_config import LLMConfig, MLLMConfig, VisionEncoderConfig
from commit_mllm.tasks import load_task, task_texts
from commit_mllm.training.assembly import TINY_CLIP, TINY_LLM

grid_name = quality.grid_name
MODES = ("lora", "full")
RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TIME_TARGET, MEMORY_TARGET = 1.10, 1.15

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
    "tiny": ModelSpec("tiny", dict(TINY_LLM), dict(TINY_CLIP), 32, 16, 8, 16, 16, 2, True),
    "medium": ModelSpec("medium", MEDIUM_LLM, MEDIUM_CLIP, 64, 8, 16, 8, 4, 1),
}


@dataclass(frozen=True)
class Setting:
    """One arm of the overhead benchmark.

    Attributes:
        name: Label in the tables.
        every: K (0 for the plain step); None = the config's own.
        rows: Row fraction of the estimate (None = all rows); ignored for ``default``.
        plain: A plain step without CoMMIT.
        preset: ``default`` (``CoMMITConfig()``), ``exact`` or ``grid`` (``every`` / ``rows``).
        snapshot: The meter's snapshot scope (``needed`` or ``all``).
    """

    name: str
    every: int | None = None
    rows: float | None = None
    plain: bool = False
    preset: str = "grid"
    snapshot: str = "needed"

    def config(self) -> CoMMITConfig:
        """The CoMMIT settings of this arm."""
        if self.preset == "default":
            return CoMMITConfig(snapshot=self.snapshot)
        if self.preset == "exact":
            return CoMMITConfig(exact=True, snapshot=self.snapshot)
        return CoMMITConfig(every=self.every, rows=self.rows, snapshot=self.snapshot)

    @property
    def k(self) -> int:
        """Steps between estimates (1 for the plain step)."""
        return max(1, self.config().effective_every) if not self.plain else 1


PLAIN = Setting("plain", 0, None, True)
DEFAULT = Setting("default", preset="default")
EXACT = Setting("exact", preset="exact")


def settings_for(model: str, quick: bool = False) -> list[Setting]:
    """Timing arms: plain, default, exact and (K, rows) cells that show where time goes."""
    # The default (K = 16, rows 0.25) and exact (K = 1, all rows) arms are cells of the grid too.
    if quick:
        cells = [(1, 0.25)]
    elif model == "tiny":
        cells = [(1, 0.25), (4, 1.0), (4, 0.25), (16, 1.0)]
    else:
        cells = [(1, 0.25), (4, 0.25)]
    grid = [Setting(grid_name(k, f), k, None if f == 1.0 else f) for k, f in cells]
    return [PLAIN, DEFAULT, EXACT, *grid]


MEMORY_ARMS = (
    PLAIN,
    DEFAULT,
    EXACT,
    Setting("default, snapshot all", preset="default", snapshot="all"),
)


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


def commit_step(bench: Bench, commit: CoMMIT, batch: dict[str, Any]) -> Any:
    """The README's CoMMIT step (forward through the meter ... after_step)."""
    logits = commit.forward(batch)
    ce = F.cross_entropy(logits.float(), targets_of(batch))
    commit.backward(ce, commit.aux_loss(logits))
    commit.after_backward()
    torch.nn.utils.clip_grad_norm_(bench.params, 1.0)
    commit.before_step()
    bench.optimizer.step()
    report = commit.after_step()
    bench.optimizer.zero_grad(set_to_none=True)
    return report


def step_fn(bench: Bench, setting: Setting) -> Callable[[int], None]:
    """A callable running step ``i`` (batch ``i`` mod the fixed batches) of an arm."""
    if setting.plain:
        return lambda i: plain_step(bench, bench.batches[i % len(bench.batches)])
    commit = CoMMIT(
        bench.model, bench.optimizer, bench.components, setting.config(), total_steps=10**6
    )
    return lambda i: commit_step(bench, commit, bench.batches[i % len(bench.batches)])


def _block_len(setting: Setting, min_block: int) -> int:
    return setting.k * math.ceil(min_block / setting.k)


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


def peak_memory(
    bench: Bench, setting: Setting, base: int | None, device: torch.device
) -> int | None:
    """Peak bytes of 2K steps of ``setting`` from a fresh coordinator (two estimates).

    Args:
        bench: The model (its optimizer state already created).
        setting: The arm.
        base: Bytes in use before the model was built (subtracted on CPU).
        device: Where the model runs.
    """
    fn = step_fn(bench, setting)
    if _memory_start(device) is None:
        return None
    run_block(fn, 2 * setting.k, device)
    peak = _memory_peak(device)
    if peak is None:
        return None
    return peak - (base if device.type == "cpu" and base is not None else 0)


def memory_arms(
    bench: Bench, settings: Sequence[Setting], base: int | None, device: torch.device
) -> dict[str, int | None]:
    """Peak memory of every arm, twice interleaved; the smaller of the two peaks."""
    run_block(step_fn(bench, PLAIN), 2, device)  # optimizer state, first-call costs
    peaks: dict[str, list[int]] = {s.name: [] for s in settings}
    for _ in range(2):
        for s in settings:
            peak = peak_memory(bench, s, base, device)
            if peak is not None:
                peaks[s.name].append(peak)
    return {name: (min(v) if v else None) for name, v in peaks.items()}


def _memory_worker(job: tuple[str, str, str, str]) -> int | None:
    """One arm's peak in a fresh process (a clean heap: no history of other arms)."""
    model, mode, arm, device_name = job
    torch.set_num_threads(1)
    device = torch.device(device_name)
    if device.type == "cpu":
        tune_malloc()
    spec = SPECS[model]
    collator = make_collator(spec.image_size)
    samples = load_task("easy-vqa", "train", seed=0, max_samples=spec.batch_size)
    setting = next(s for s in MEMORY_ARMS if s.name == arm)
    base = _memory_start(device) if device.type == "cpu" else 0
    bench = build_bench(spec, mode, collator, samples, n_batches=1, device=device)
    return memory_arms(bench, [setting], base, device)[arm]


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


def bench_memory(model: str, mode: str, settings: Sequence[Setting], device: torch.device) -> dict:
    """Peak memory of every arm for one (model, mode), each arm in its own fresh process.

    Returns:
        Arm -> ``{"peak_bytes", "ratio"}`` (ratio against the plain step's peak).
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    jobs = [(model, mode, s.name, str(device)) for s in settings]
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, max_tasks_per_child=1) as pool:
        peaks = dict(zip([s.name for s in settings], pool.map(_memory_worker, jobs)))
    plain = peaks.get("plain")
    return {
        name: {"peak_bytes": v, "ratio": (v / plain) if (v is not None and plain) else None}
        for name, v in peaks.items()
    }


def cost_model(timing: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any] | None:
    """Least-squares fit of ratio(K, rows) = 1 + b + m_rows / K over every timed CoMMIT arm.

    b is the bookkeeping paid every step (the regularizer, RNG capture, the scheduler), m_rows
    the cost of one estimate on that row fraction, both in plain steps.
    """
    cells = []
    for name, v in timing.items():
        d = settings.get(name, {})
        if d.get("every"):
            rows = f"{d['rows'] or 1.0:g}"
            cells.append((d["every"], rows, v["ratio_paired_median"] - 1.0))
    fracs = sorted({r for _, r, _ in cells})
    if len(cells) < len(fracs) + 1 or len({k for k, _, _ in cells}) < 2:
        return None
    import numpy as np

    a = np.zeros((len(cells), 1 + len(fracs)))
    y = np.array([c[2] for c in cells])
    for i, (k, rows, _) in enumerate(cells):
        a[i, 0], a[i, 1 + fracs.index(rows)] = 1.0, 1.0 / k
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    return {"bookkeeping": float(coef[0]), "estimate_cost": dict(zip(fracs, map(float, coef[1:])))}


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


# ---- verdicts and the headline file ------------------------------------------------------------
def headline(results: dict[str, Any]) -> dict[str, Any]:
    """``overhead.{default,exact}.<model>_<mode>`` and ``memory.{default,exact}.medium_<mode>``."""
    out: dict[str, Any] = {"overhead": {"default": {}, "exact": {}}, "memory": {}}
    for e in results["overhead"]:
        key = f"{e['model']}_{e['mode']}"
        for arm in ("default", "exact"):
            if arm in e["timing"]:
                out["overhead"][arm][key] = round(e["timing"][arm]["ratio_paired_median"], 3)
            ratio = e.get("memory", {}).get(arm, {}).get("ratio")
            if ratio is not None and e["model"] == "medium":
                out["memory"].setdefault(arm, {})[key] = round(ratio, 3)
    return out


def merge_headline(path: Path, new: dict[str, Any], source: dict[str, Any]) -> Path:
    """Merge ``new`` into the JSON file at ``path``, keeping every other key it holds."""
    data = json.loads(path.read_text()) if path.exists() else {}
    for section, arms in new.items():
        for arm, vals in arms.items():
            data.setdefault(section, {}).setdefault(arm, {}).update(vals)
    data["overhead_source"] = source
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def verdicts(results: dict[str, Any], closed: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """The issue's targets against the measured numbers (None where not measured)."""
    times = [e["timing"]["default"]["ratio_paired_median"] for e in results["overhead"]]
    mems = [
        e["memory"]["default"]["ratio"]
        for e in results["overhead"]
        if e["model"] == "medium" and e.get("memory", {}).get("default", {}).get("ratio")
    ]
    cfg = CoMMITConfig()
    name = grid_name(cfg.effective_every, cfg.effective_rows or 1.0)
    quality_a = {}
    for run in results["estimate_error"]:
        for n in run["windows"]:
            cell = run[f"N={n}"].get(name)
            if cell:
                quality_a[f"{run['model']}_{run['mode']}_N{n}"] = cell["meets"]
    return {
        "default_setting": name,
        "time_default_worst": max(times) if times else None,
        "time_ok": bool(times) and max(times) <= TIME_TARGET,
        "memory_default_worst": max(mems) if mems else None,
        "memory_ok": bool(mems) and max(mems) <= MEMORY_TARGET,
        "criterion_a": quality_a,
        "criterion_a_ok": bool(quality_a) and all(quality_a.values()),
        "criterion_b_ok": all(c["all_within_noise"] for c in closed) if closed else None,
    }


# ---- report ---------------------------------------------------------------------------------
def _f(x: float | None, fmt: str = ".2f") -> str:
    return "n/a" if x is None else format(x, fmt)


def markdown(results: dict[str, Any], closed: Sequence[dict[str, Any]] = ()) -> str:
    """Tables of the results (the discussion is written by hand above them)."""
    meta = results["meta"]
    v = verdicts(results, closed)
    lines = [
        "# Measured tables",
        "",
        f"Date {meta['date']}; {meta['platform']}; {meta['cpu_count']} CPUs, "
        f"torch threads {meta['torch_threads']}; torch {meta['torch']}, "
        f"transformers {meta['transformers']}, peft {meta.get('peft')}. "
        f"Load averages (1/5/15 min) at start {meta['load_start']}, end {meta['load_end']}. "
        f"`CoMMITConfig()` estimates {v['default_setting']}.",
        "",
        f"Targets: default <= {TIME_TARGET}x a plain step: **{_ok(v['time_ok'])}** (worst "
        f"{_f(v['time_default_worst'], '.3f')}); peak memory <= {MEMORY_TARGET}x on the medium "
        f"model: **{_ok(v['memory_ok'])}** (worst {_f(v['memory_default_worst'], '.3f')}); "
        f"criterion (a): **{_ok(v['criterion_a_ok'])}**; criterion (b): "
        f"**{_ok(v['criterion_b_ok'])}**.",
        "",
    ]
    lines += _summary_table(results)
    for e in results["overhead"]:
        lines += _overhead_table(e)
    for run in results["estimate_error"]:
        lines += _error_table(run, v["default_setting"])
    for run in closed:
        lines += _closed_table(run)
    return "\n".join(lines)


def _ok(flag: bool | None) -> str:
    return "not measured" if flag is None else ("met" if flag else "missed")


def _summary_table(results: dict[str, Any]) -> list[str]:
    lines = [
        "## Summary: time and peak memory over a plain step",
        "",
        "| model / mode | plain step | default time | exact time | default memory | exact memory |",
        "|---|---|---|---|---|---|",
    ]
    for e in results["overhead"]:
        t, m = e["timing"], e.get("memory", {})
        ratio = {arm: t[arm]["ratio_paired_median"] for arm in ("default", "exact")}
        lines.append(
            f"| {e['model']} / {e['mode']} | {t['plain']['median_s'] * 1e3:.1f} ms | "
            f"{ratio['default']:.3f} | {ratio['exact']:.3f} | "
            f"{_f(m.get('default', {}).get('ratio'), '.3f')} | "
            f"{_f(m.get('exact', {}).get('ratio'), '.3f')} |"
        )
    return [*lines, ""]


def _overhead_table(e: dict[str, Any]) -> list[str]:
    t, mem = e["timing"], e.get("memory", {})
    lines = [
        f"## {e['model']} / {e['mode']}: {e['params'] / 1e6:.2f} M params, "
        f"{e['trainable'] / 1e6:.2f} M trainable {e['trainable_by_component']}, batch "
        f"{e['batch_size']} ({e['tokens_per_batch']} text tokens)",
        "",
        f"Load averages: start {e['load_start']}, end {e['load_end']}; {e['seconds']} s.",
        "",
        "| arm | K, rows | s/step (median) | time ratio (paired median) | min-max | rounds "
        "| peak mem MB | mem ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    names = list(t) + [n for n in mem if n not in t]
    for name in names:
        v, m = t.get(name), mem.get(name, {})
        d = e["settings"].get(name, {})
        setting = "-" if d.get("plain") or not d else f"{d['every']}, {d['rows'] or 'all'}"
        peak = m.get("peak_bytes")
        timing = (
            f"{v['median_s'] * 1e3:.1f} ms | {v['ratio_paired_median']:.3f} | "
            f"{v['ratio_min']:.2f}-{v['ratio_max']:.2f} | {v['rounds']}"
            if v
            else "- | - | - | -"
        )
        lines.append(
            f"| {name} | {setting} | {timing} | "
            f"{_f(None if peak is None else peak / 2**20, '.1f')} | {_f(m.get('ratio'), '.3f')} |"
        )
    fit = cost_model(t, e["settings"])
    if fit:
        costs = ", ".join(f"rows {r}: {c:.3f}" for r, c in fit["estimate_cost"].items())
        lines += [
            "",
            f"Cost model fitted to the (K, rows) arms, in plain steps: bookkeeping "
            f"b = {fit['bookkeeping']:.3f} per step; one estimate m = {costs}.",
        ]
    return [*lines, ""]


def _error_table(run: dict[str, Any], default: str) -> list[str]:
    s = run["single_estimate"]
    lines = [
        f"## Criterion (a): {run['model']} / {run['mode']}, {run['steps']} steps, batch "
        f"{run['batch_size']}",
        "",
        f"Load {run['load_start']} -> {run['load_end']}; {run['seconds']} s. Single-estimate "
        f"log kappa noise std {_f(s['exact_step_noise_std'])}, median log kappa "
        f"{_f(s['exact_median_log_kappa'])}; mean |log kappa(rows) - log kappa(all rows)| of "
        f"one update: "
        + ", ".join(f"{k.split('=')[1]}: {_f(v, '.3f')}" for k, v in s.items() if "rows=" in k)
        + ".",
        "",
        "| setting | N | error vs exact every step | floor (two exact samplings) | "
        "sampling part | error <= floor |",
        "|---|---|---|---|---|---|",
    ]
    for n in run["windows"]:
        for name, c in run[f"N={n}"].items():
            mark = f"**{name}** (default)" if name == default else name
            lines.append(
                f"| {mark} | {n} | {_f(c['error'], '.3f')} | {_f(c['floor'], '.3f')} | "
                f"{_f(c['sampling'], '.3f')} | {'yes' if c['meets'] else 'no'} |"
            )
    return [*lines, ""]


def _closed_table(closed: dict[str, Any]) -> list[str]:
    extra = ", ".join(closed.get("extra_overrides", [])) or "none"
    lines = [
        f"## Criterion (b): closed loop, easy-VQA demo config, {closed['steps']} steps, seeds "
        f"{closed['seeds']}, extra overrides: {extra}",
        "",
        f"{len(closed['runs'])} trainer runs, {closed.get('train_seconds')} s inside their "
        f"training loops ({closed['procs']} processes, 1 torch thread each; "
        f"{closed.get('reused', 0)} read back from an earlier invocation). "
        "Within seed noise: |diff| <= 2 SE. Criterion (b) "
        "is judged on the final log f_enc and the accuracy; the run-averaged log f_enc shows "
        "how much later the sampled controller moves.",
        "",
        "| ratio | metric | default mean (std) | exact mean (std) | diff | 2 SE | within |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in closed["cells"]:
        lines.append(
            f"| {c['ratio']:g} | {c['metric']} | {c['default_mean']:.3f} ({c['default_std']:.3f}) "
            f"| {c['exact_mean']:.3f} ({c['exact_std']:.3f}) | {c['diff']:+.3f} | "
            f"{c['bound_2se']:.3f} | {'yes' if c['within_noise'] else 'no'} |"
        )
    ms = {
        a: [r["ms_per_step"] for r in closed["runs"] if r["arm"] == a] for a in ("default", "exact")
    }
    lines += [
        "",
        "Trainer ms/step (median over runs, two runs sharing the machine): default "
        f"{statistics.median(ms['default']):.0f}, exact {statistics.median(ms['exact']):.0f}.",
    ]
    return [*lines, ""]


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


MARKER = "<!-- generated by benchmarks/overhead.py: everything below this line is rewritten -->"


def write_results(
    results: dict[str, Any],
    out: Path,
    stem: str = "overhead",
    closed: Sequence[dict[str, Any]] = (),
    headline_path: Path | None = None,
) -> Path:
    """Write ``<stem>.json``, the tables into ``<stem>.md``, and merge the headline ratios.

    Text above :data:`MARKER` in an existing ``<stem>.md`` (the hand-written discussion)
    is kept; everything below it is replaced by the new tables. ``headline_path`` (when
    given) gets ``overhead.*`` / ``memory.*`` merged in, other keys kept.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    md = out / f"{stem}.md"
    head = md.read_text().split(MARKER)[0] if md.exists() else ""
    md.write_text(f"{head}{MARKER}\n\n{markdown(results, closed)}\n")
    if headline_path is not None:
        meta = results["meta"]
        source = {"file": f"benchmarks/results/{stem}.json", "date": meta["date"],
                  "load_start": meta["load_start"], "load_end": meta["load_end"]}  # fmt: skip
        merge_headline(headline_path, headline(results), source)
    return path


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
        print("\n".join(_closed_table(closed)))
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
