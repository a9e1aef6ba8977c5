"""Checkpoints that no kill can break: written aside, hashed, published by a rename.

A checkpoint ``RUN_DIR/checkpoints/step-NNNNNNNN/`` holds the trainable weights
(``trainable.safetensors``), the optimizer state (``optimizer.pt``), the rest of the run's
state (``state.pt``: step, CoMMIT state, RNG states, counters, the run's config) and
``manifest.json``, which lists every other file with its size and SHA-256. The data order is
a function of the seed and the step, so the step is the exact data position.

Publication (:func:`save_checkpoint`): the files go to a hidden temp folder and are fsynced,
the manifest is written and fsynced last, and one ``rename`` publishes the folder. Saving a
step that already has a folder first renames the old one aside (``.old-step-...``), then
publishes, then deletes the old copy: at every instant one complete copy exists.

Choice (:func:`latest_checkpoint`): the newest folder whose manifest verifies (every listed
file present, with its size and hash); a broken one is skipped with a warning naming what is
wrong, and the next older one is used.

Loading (:func:`load_state`, :func:`load_optimizer_state`): ``torch.load(...,
weights_only=True)`` with nothing added to torch's allow-list, because ``state.pt`` and
``optimizer.pt`` hold only tensors and plain Python data (RNG states are stored as tensors
and numbers). A file holding any other object is refused with a
:class:`~commit_mllm.training.errors.CheckpointError`; nothing in it runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

__all__ = [
    "CheckpointError",
    "checkpoint_step",
    "drop_later_checkpoints",
    "fault_point",
    "latest_checkpoint",
    "load_optimizer_state",
    "load_state",
    "load_trainable",
    "non_finite_streak",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
    "verify_checkpoint",
]

logger = logging.getLogger(__name__)
MANIFEST = "manifest.json"
PREFIX = "step-"
FORMAT = 2  # manifest version: files with size and sha256
_STEP = re.compile(r"^(?:\.old-)?step-(\d+)(?:-\d+)?$")


# ---- RNG state as tensors and plain numbers (loadable with weights_only=True) ------------
def rng_state() -> dict[str, Any]:
    """States of every generator a run uses: torch (CPU, CUDA), Python, NumPy.

    NumPy's state is stored as a tensor of its 624 key words plus numbers, so the whole
    state loads with ``torch.load(weights_only=True)``.
    """
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))


# ---- test hooks ---------------------------------------------------------------------------
def fault_point(name: str) -> None:
    """Test hook: die, or signal this process, at a named point of a run.

    ``COMMIT_MLLM_KILL_AT=<point>`` sends SIGKILL; ``COMMIT_MLLM_SIGNAL_AT=<point>`` sends
    ``COMMIT_MLLM_SIGNAL`` (``TERM`` or ``INT``, default ``TERM``) ``COMMIT_MLLM_SIGNAL_COUNT``
    times (default 1), through the run's real handler (to the whole process group, as Ctrl-C
    in a terminal does, with ``COMMIT_MLLM_SIGNAL_GROUP=1``). ``COMMIT_MLLM_FAULT_RANK=<r>``
    limits either to the process whose ``RANK`` is r. Nothing happens otherwise.

    Points: ``step:<i>`` (step index i done and logged, before its eval / save),
    ``eval:<n>`` (the evaluation after n steps written, before the checkpoint of step n),
    ``save:<n>:weights`` (checkpoint n half written), ``save:<n>:manifest`` (complete, not
    yet published), ``save:<n>:aside`` (re-saving step n: the old copy renamed aside, the new
    one not yet in place), ``save:<n>:published`` (renamed into place, old copies not yet
    removed), ``finish`` (the run's last checkpoint is published, summary.json not yet
    written).
    """
    env = os.environ
    rank = env.get("COMMIT_MLLM_FAULT_RANK")
    if rank is not None and env.get("RANK", "0") != rank:
        return
    if env.get("COMMIT_MLLM_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if env.get("COMMIT_MLLM_SIGNAL_AT") == name:
        sig = getattr(signal, "SIG" + env.get("COMMIT_MLLM_SIGNAL", "TERM"))
        group = env.get("COMMIT_MLLM_SIGNAL_GROUP") == "1"
        for _ in range(int(env.get("COMMIT_MLLM_SIGNAL_COUNT", "1"))):
            if group:
                os.killpg(os.getpgid(0), sig)
            else:
                os.kill(os.getpid(), sig)


# ---- writing -------------------------------------------------------------------------------
def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


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
    """Write and publish checkpoint ``step`` (the number of optimizer steps done).

    Args:
        run_dir: The run folder; checkpoints go to ``run_dir/checkpoints``.
        step: Optimizer steps completed.
        model: Its trainable parameters are saved by name.
        optimizer: Its state dict is saved.
        state: Anything else (CoMMIT state, RNG states, counters): tensors and plain Python
            data only (what ``torch.load(weights_only=True)`` reads back).
        keep_last: Published checkpoints to keep (older ones are removed after publishing;
            0 keeps all).
        weights: Trainable weights by name, instead of reading ``model`` (gathered from
            FSDP shards, see :func:`commit_mllm.training.sharding.full_state`).
        optimizer_state: Optimizer state instead of ``optimizer.state_dict()`` (every FSDP
            rank's shard); recorded as ``optimizer_format: fsdp`` in ``state.pt``.

    Returns:
        The published checkpoint folder.
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{PREFIX}{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
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
    files = {}
    for name in ("trainable.safetensors", "optimizer.pt", "state.pt"):
        _fsync(tmp / name)
        files[name] = {"size": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
    fault_point(f"save:{step}:weights")
    # Steps skipped as non-finite just before this one: such a checkpoint does not count
    # against keep_last, so it never rotates out the last one from before the streak.
    streak = int(state.get("counters", {}).get("bad_in_a_row", 0))
    manifest = {"format": FORMAT, "step": step, "files": files, "non_finite_streak": streak}
    (tmp / MANIFEST).write_text(json.dumps(manifest))
    _fsync(tmp / MANIFEST)
    fault_point(f"save:{step}:manifest")
    final = _publish(tmp, root / f"{PREFIX}{step:08d}", step)
    _prune(root, final, keep_last)
    return final


def _publish(tmp: Path, final: Path, step: int) -> Path:
    """Rename ``tmp`` to ``final``; an existing ``final`` is moved aside first, then removed."""
    aside = None
    if final.exists():
        aside = final.parent / f".old-{final.name}-{os.getpid()}"
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(final, aside)
        fault_point(f"save:{step}:aside")
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    fault_point(f"save:{step}:published")
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return final


def _prune(root: Path, keep: Path, keep_last: int) -> None:
    """Remove leftovers of killed saves, later steps, and all but the newest ``keep_last``.

    A published step later than ``keep`` belongs to a timeline the run has left (a resume
    skipped it as broken, or it was written before a resume from an earlier step), so it is
    removed: otherwise a later ``--resume`` could pick it, and keep_last would count it.
    Only checkpoints taken outside a non-finite streak count against ``keep_last``; one taken
    inside a streak goes once it is older than every checkpoint kept.
    """
    for leftover in [*root.glob(f".tmp-{PREFIX}*"), *root.glob(f".old-{PREFIX}*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    step = checkpoint_step(keep)
    published = sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir())
    for later in [p for p in published if (checkpoint_step(p) or 0) > step]:
        shutil.rmtree(later, ignore_errors=True)
    earlier = [p for p in published if (checkpoint_step(p) or 0) < step]
    if keep_last <= 0:
        return
    clean = [p for p in earlier if not non_finite_streak(p)]
    wanted = keep_last - (0 if non_finite_streak(keep) else 1)
    kept = clean[-wanted:] if wanted > 0 else []
    oldest = checkpoint_step(kept[0]) if kept else step
    for old in earlier:
        in_streak = old not in clean
        superseded = (checkpoint_step(old) or 0) < (oldest or 0)
        if (in_streak and superseded) or (not in_streak and old not in kept):
            shutil.rmtree(old, ignore_errors=True)


def non_finite_streak(folder: str | Path) -> int:
    """Non-finite steps in a row just before a checkpoint was taken (0: outside a streak)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return 0
    return int(manifest.get("non_finite_streak", 0)) if isinstance(manifest, dict) else 0


def drop_later_checkpoints(run_dir: str | Path, keep: Path | None) -> list[Path]:
    """Remove the published checkpoints after ``keep`` (all of them when None).

    Returns:
        The folders removed.
    """
    root = Path(run_dir) / "checkpoints"
    step = -1 if keep is None else checkpoint_step(keep) or 0
    later = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and (checkpoint_step(p) or 0) > step]
    for folder in later:
        shutil.rmtree(folder, ignore_errors=True)
    return sorted(later)


# ---- choosing and verifying ----------------------------------------------------------------
def checkpoint_step(folder: str | Path) -> int | None:
    """The step in a checkpoint folder's name (``step-00000040`` -> 40), or None."""
    m = _STEP.match(Path(folder).name)
    return int(m.group(1)) if m else None


def verify_checkpoint(folder: str | Path) -> dict[str, Any]:
    """Check that a checkpoint is complete: every file its manifest lists, size and hash.

    Returns:
        The manifest.

    Raises:
        CheckpointError: What is missing or wrong (the message names the folder and file).
    """
    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no {MANIFEST} (the save was cut short)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}/{MANIFEST}: unreadable ({e})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise CheckpointError(
            f"{folder}: its manifest has no file sizes and hashes (written by an older "
            "commit-mllm), so it cannot be verified"
        )
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{folder}: {name} is missing")
        size = path.stat().st_size
        if size != meta.get("size"):
            raise CheckpointError(
                f"{folder}: {name} has {size} bytes, the manifest says {meta.get('size')}"
            )
        if _sha256(path) != meta.get("sha256"):
            raise CheckpointError(f"{folder}: {name} does not match its SHA-256 in the manifest")
    return manifest


def _candidates(root: Path) -> list[Path]:
    """Published folders and copies moved aside by a cut re-save, newest step first."""
    found = []
    for p in root.iterdir():
        step = checkpoint_step(p)
        if step is not None and p.is_dir():
            found.append((step, p.name.startswith(".old-"), p.name, p))
    return [p for *_, p in sorted(found, key=lambda x: (-x[0], x[1], x[2]))]


def latest_checkpoint(run_dir: str | Path, before_streak: bool = False) -> Path | None:
    """The newest checkpoint of a run that verifies (:func:`verify_checkpoint`), or None.

    A broken one is skipped with a warning that says what is wrong; the next older one is
    tried. A copy moved aside by a re-save that was cut short is used when its step has no
    good published folder. Unpublished temp folders are ignored with a warning. With
    ``before_streak`` only checkpoints taken outside a non-finite streak are considered.
    """
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    for tmp in root.glob(f".tmp-{PREFIX}*"):
        logger.warning("ignoring partial checkpoint %s (never published)", tmp)
    for folder in _candidates(root):
        if before_streak and non_finite_streak(folder):
            continue
        try:
            verify_checkpoint(folder)
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
            continue
        return folder
    return None


# ---- loading -------------------------------------------------------------------------------
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


def _load_plain(path: Path) -> Any:
    """``torch.load(weights_only=True)``; anything else than tensors and plain data is refused.

    Raises:
        CheckpointError: The file holds other objects (named), or cannot be read.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else "an object that is not a tensor or plain data"
        raise CheckpointError(
            f"{path}: refused to load: it holds {what}, not only tensors and plain data, so "
            "it may run code; use checkpoints written by commit-mllm from a source you trust"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: unreadable ({str(e).splitlines()[0]})") from None


def load_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's ``state.pt``: ``step``, ``optimizer_format`` and what the run saved.

    Read with ``weights_only=True`` (see :func:`_load_plain`); the folder is expected to be
    verified already (:func:`latest_checkpoint` does).

    Raises:
        CheckpointError: The file holds objects other than tensors and plain data, or
            cannot be read.
    """
    return _load_plain(Path(path) / "state.pt")


def load_optimizer_state(path: str | Path, state: dict[str, Any], fsdp: bool) -> dict[str, Any]:
    """A checkpoint's optimizer state, checked against how the resuming run is sharded.

    Args:
        path: The checkpoint folder.
        state: Its :func:`load_state` (says how the optimizer state was written).
        fsdp: Whether the resuming run uses FSDP (its optimizer state is per rank).

    Raises:
        CheckpointError: ``optimizer.pt`` holds objects other than tensors and plain data, or
            cannot be read.
        ValueError: The checkpoint was written with the other FSDP setting (says which).
    """
    path = Path(path)
    fmt = state.get("optimizer_format", "torch")
    if (fmt == "fsdp") != fsdp:
        written, now = ("with", "without") if fmt == "fsdp" else ("without", "with")
        raise ValueError(
            f"{path}: the optimizer state was written {written} FSDP but this run is {now} it "
            "(FSDP = train.fsdp with more than one process): resume the way it was written"
        )
    return _load_plain(path / "optimizer.pt")
