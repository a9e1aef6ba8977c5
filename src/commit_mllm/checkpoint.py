"""Checkpoints written atomically: a temp folder, fsynced files, a manifest last, a rename.

A checkpoint holds the trainable weights (safetensors), the optimizer, the CoMMIT state
(meter window, factors), the RNG states and the step (the data order is a function of the
seed and the step, so the step is the exact data position). ``latest_checkpoint`` returns the
newest *complete* one (with its manifest); partial folders are ignored with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "fault_point",
    "latest_checkpoint",
    "load_resume_state",
    "load_trainable",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    """States of every generator a run uses: torch (CPU, CUDA), Python, NumPy."""
    import numpy as np

    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process at the named point when COMMIT_MLLM_KILL_AT == name.

    Points: ``step:<n>`` (after step n is logged), ``save:<n>:weights`` (checkpoint n half
    written), ``save:<n>:manifest`` (complete but not yet renamed). The kill/resume tests use
    it to die exactly there; it does nothing otherwise.
    """
    if os.environ.get("COMMIT_MLLM_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep_last: int = 2,
    *,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write checkpoint ``step`` (the number of optimizer steps done) atomically.

    Args:
        run_dir: The run folder; checkpoints go to ``run_dir/checkpoints``.
        step: Optimizer steps completed.
        model: Its trainable parameters are saved by name.
        optimizer: Its state dict is saved.
        state: Anything else (CoMMIT state, RNG states, counters), saved with torch.save.
        keep_last: Complete checkpoints to keep (older ones are removed after the rename).
        weights: Trainable weights by name, instead of reading ``model`` (gathered from
            FSDP shards, see :func:`commit_mllm.sharding.full_state`).
        optimizer_state: Optimizer state instead of ``optimizer.state_dict()`` (every FSDP
            rank's shard); recorded as ``optimizer_format: fsdp`` in ``state.pt``.

    Returns:
        The checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    for stale in root.glob(f".tmp-{PREFIX}{step:08d}-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    tmp.mkdir()
    if weights is None:
        weights = {
            n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
        }
    save_file(weights, str(tmp / "trainable.safetensors"))
    fmt = "torch" if optimizer_state is None else "fsdp"
    if optimizer_state is None:
        optimizer_state = optimizer.state_dict()
    torch.save(optimizer_state, tmp / "optimizer.pt")
    torch.save({"step": step, "optimizer_format": fmt, **state}, tmp / "state.pt")
    for name in ("trainable.safetensors", "optimizer.pt", "state.pt"):
        _fsync(tmp / name)
    fault_point(f"save:{step}:weights")
    manifest = {"step": step, "files": sorted(p.name for p in tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    _fsync(tmp / MANIFEST)
    fault_point(f"save:{step}:manifest")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in _complete(root)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _complete(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.glob(f"{PREFIX}*")):
        if (p / MANIFEST).is_file():
            out.append(p)
        else:
            logger.warning("ignoring incomplete checkpoint %s (no manifest)", p)
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for tmp in root.glob(f".tmp-{PREFIX}*"):
        logger.warning("ignoring partial checkpoint %s", tmp)
    done = _complete(root)
    return done[-1] if done else None


def load_trainable(model: torch.nn.Module, folder: str | Path) -> None:
    """Load a checkpoint's trainable weights into ``model`` by parameter name.

    Raises:
        ValueError: The checkpoint lacks a trainable parameter of the model, has extra ones,
            or a shape differs (the message names the folder and the tensors).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / "trainable.safetensors"))
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or extra:
        raise ValueError(
            f"{folder}: checkpoint does not match the model built from the config "
            f"(missing {missing[:3]}, extra {extra[:3]})"
        )
    with torch.no_grad():
        for name, param in params.items():
            if weights[name].shape != param.shape:
                raise ValueError(
                    f"{folder}: '{name}' has shape {tuple(weights[name].shape)} in the "
                    f"checkpoint but {tuple(param.shape)} in the model"
                )
            param.copy_(weights[name])


def load_resume_state(path: str | Path, fsdp: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """A checkpoint's saved state and optimizer state, checked against how the run is sharded.

    The trainable weights are loaded separately (:func:`load_trainable`), before any wrapper.

    Args:
        path: The checkpoint folder.
        fsdp: Whether the resuming run uses FSDP (its optimizer state is per rank).

    Returns:
        ``(state, optimizer_state)``: what ``save_checkpoint`` got as ``state`` (plus ``step``
        and ``optimizer_format``), and the optimizer state as written.

    Raises:
        ValueError: The checkpoint was written with the other setting (says which).
    """
    path = Path(path)
    state = torch.load(path / "state.pt", weights_only=False)
    fmt = state.get("optimizer_format", "torch")
    if (fmt == "fsdp") != fsdp:
        written, now = ("with", "without") if fmt == "fsdp" else ("without", "with")
        raise ValueError(
            f"{path}: the optimizer state was written {written} FSDP but this run is {now} it "
            "(FSDP = train.fsdp with more than one process): resume the way it was written"
        )
    return state, torch.load(path / "optimizer.pt", weights_only=False)
