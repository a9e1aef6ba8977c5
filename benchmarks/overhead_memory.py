"""Peak memory of the overhead benchmark's arms (each in a fresh process); the machine."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import os
import platform
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from commit_mllm.tasks import load_task
from overhead_setup import (
    DEFAULT,
    EXACT,
    PLAIN,
    SPECS,
    Bench,
    Setting,
    build_bench,
    make_collator,
    run_block,
    step_fn,
)

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


def memory_start(device: torch.device) -> int | None:
    """Reset the peak counter; return the current (baseline) bytes."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    if not _reset_cpu_peak():
        return None
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def memory_peak(device: torch.device) -> int | None:
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
    if memory_start(device) is None:
        return None
    run_block(fn, 2 * setting.k, device)
    peak = memory_peak(device)
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
    base = memory_start(device) if device.type == "cpu" else 0
    bench = build_bench(spec, mode, collator, samples, n_batches=1, device=device)
    return memory_arms(bench, [setting], base, device)[arm]


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
