"""What a resumed run may change: its config against the one its checkpoint was trained with.

``--resume`` builds the run from the config given now. Each setting that differs from the
checkpoint's (``state.pt`` holds the config; a checkpoint without one is compared with the
run folder's ``config.yaml``) is one of:

* **an error** when it cannot take effect on a checkpoint: the model and what trains
  (``model.*``, ``projector_side``, ``components``, ``train.freeze_*``), the optimizer
  (``train.optimizer``: its saved state is another algorithm's), the strategy
  (``commit.strategy``: its saved state is another strategy's), and the samples per optimizer
  step (``train.batch_size x train.grad_accum x processes``: the step is the data
  position, so changing it would skip or repeat data). Splitting the same samples per step
  differently (``batch_size`` 4 -> 2 with ``grad_accum`` 1 -> 2) is allowed;
* **ignored** when it does not change what is computed (``run.output_dir``,
  ``run.progress``, ``run.cache_dir``, ``train.cpu``, ``train.num_threads``,
  ``data.num_workers``, ``train.cache_frozen_features``, ``train.feature_cache_max_mb``);
* **taken into account, with one warning line** listing them: everything else (steps,
  evaluation / save / log cadence, schedule, the CoMMIT settings other than the strategy,
  data, seed of the data order, precision ...). Learning rates and weight decay are among
  them: the optimizer's saved groups would otherwise win, so the trainer writes the new
  base rates into them (:func:`apply_group_settings`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "apply_group_settings",
    "changed_settings",
    "check_resume_config",
    "suspect_changes",
]

# Longest matching prefix wins. Values: None = ignored; a string = why it is an error.
_FIXED = "the checkpoint's weights belong to the model and trainable set it was built with"
RULES: dict[str, str | None] = {
    "model": _FIXED,
    "projector_side": _FIXED,
    "components": _FIXED,
    "train.freeze_encoder": _FIXED,
    "train.freeze_projector": _FIXED,
    "train.freeze_llm": _FIXED,
    "train.optimizer": "the checkpoint's optimizer state belongs to the optimizer it used",
    "commit.strategy": "the checkpoint's CoMMIT state belongs to the strategy it used",
    "run.output_dir": None,
    "run.progress": None,
    "run.cache_dir": None,
    "train.cpu": None,
    "train.num_threads": None,
    "train.cache_frozen_features": None,
    "train.feature_cache_max_mb": None,
    "data.num_workers": None,
}
# Applied to the optimizer's groups by apply_group_settings (reported from there).
GROUP_KEYS = (
    "train.lr",
    "train.encoder_lr",
    "train.projector_lr",
    "train.llm_lr",
    "train.component_lrs",
    "train.weight_decay",
)


# How long or how often a run goes, or where it reports: none of them changes a step.
_BOOKKEEPING = (
    "train.steps",
    "train.eval_every",
    "train.save_every",
    "train.keep_last",
    "train.log_every",
    "train.max_bad_steps",
    "train.max_dead_steps",
    "train.eval_batch_size",
    "train.max_new_tokens",
    "run.tensorboard",
    "run.wandb",
)


def suspect_changes(state: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key old -> new`` for each setting changed at resume that can change what a step does.

    What a non-finite abort after a resume names as its likely cause (rates included;
    cadences, lengths and ignored settings left out).
    """
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        return []
    a, b = _flat(saved), _flat(now)
    out = []
    for key in sorted(set(a) | set(b)):
        rule = _rule(key)
        ignored = rule is not None and rule[1] is None
        if a.get(key) != b.get(key) and key not in _BOOKKEEPING and not ignored:
            out.append(f"{key} {a.get(key)!r} -> {b.get(key)!r}")
    return out


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping) and d:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(d) if isinstance(d, tuple) else d}


def _rule(key: str) -> tuple[str, str | None] | None:
    best = None
    for prefix, why in RULES.items():
        if (key == prefix or key.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best[0])
        ):
            best = (prefix, why)
    return best


def _group_key(key: str) -> bool:
    return any(key == g or key.startswith(g + ".") for g in GROUP_KEYS)


def changed_settings(saved: Mapping, now: Mapping) -> tuple[list[str], list[str]]:
    """Differences between two config dicts, split into errors and settings that apply.

    Learning rates and weight decay are left out (see :func:`apply_group_settings`).

    Returns:
        ``(errors, applied)``: lines ``key: old -> new (why)`` and ``key old -> new``.
    """
    a, b = _flat(saved), _flat(now)
    errors, applied = [], []
    for key in sorted(set(a) | set(b)):
        old, new = a.get(key), b.get(key)
        if old == new or _group_key(key):
            continue
        rule = _rule(key)
        if rule is not None and rule[1] is None:
            continue
        if rule is not None:
            errors.append(f"{key}: {old!r} -> {new!r} ({rule[1]})")
        else:
            applied.append(f"{key} {old!r} -> {new!r}")
    return errors, applied


def _samples(cfg: Mapping, processes: int) -> int:
    t = cfg.get("train", {})
    return int(t.get("batch_size", 1)) * int(t.get("grad_accum", 1)) * processes


def check_resume_config(
    state: Mapping[str, Any], now: Mapping[str, Any], processes: int, run_dir: Path
) -> list[str]:
    """Refuse a resume whose config cannot continue the checkpoint; list what changes.

    Args:
        state: The checkpoint's ``state.pt`` (``config``, ``processes``, ``step``).
        now: The resuming run's config as a dict.
        processes: Processes of the resuming run.
        run_dir: The run folder (its ``config.yaml`` is the fallback).

    Returns:
        ``key old -> new`` for each changed setting that takes effect.

    Raises:
        ValueError: A setting that cannot take effect changed, or the samples per step did
            (one line naming the key(s), their values and what to do).
    """
    import yaml

    saved = state.get("config")
    if saved is None and (run_dir / "config.yaml").is_file():
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    if not isinstance(saved, Mapping):
        return []
    errors, applied = changed_settings(saved, now)
    step = state.get("step")
    if errors:
        raise ValueError(
            f"--resume from step {step}: {'; '.join(errors)}: resume with the checkpoint's "
            "value, or start a new run in another run.output_dir"
        )
    before = _samples(saved, int(state.get("processes", 1)))
    after = _samples(now, processes)
    if before != after:
        raise ValueError(
            f"--resume from step {step}: samples per optimizer step (train.batch_size x "
            f"train.grad_accum x processes) would go from {before} to {after}, which moves "
            f"the data position of step {step}: keep the product at {before} (e.g. halve "
            "batch_size and double grad_accum) or start a new run in another run.output_dir"
        )
    return applied


def apply_group_settings(optimizer: Any, fresh: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Write the config's base rate and weight decay into the restored optimizer groups.

    ``optimizer.load_state_dict`` restores each group's saved ``base_lr`` and
    ``weight_decay``, which would silently override a changed ``train.*lr`` or
    ``train.weight_decay``; the config given on resume wins instead.

    Args:
        optimizer: The optimizer after ``load_state_dict``.
        fresh: Group name -> the values it was built with from the config
            (``base_lr``, ``weight_decay``).

    Returns:
        ``component key old -> new`` for each value that changed.
    """
    changes = []
    for group in optimizer.param_groups:
        for key, value in fresh.get(group["name"], {}).items():
            if key in group and group[key] != value:
                changes.append(f"{group['name']} {key} {group[key]!r} -> {value!r}")
                group[key] = value
    return changes


def find_checkpoint(
    run_dir: Path,
    resume: bool,
    config: Mapping[str, Any],
    processes: int,
    say: Callable[[str], None],
    warn: Callable[..., None],
) -> tuple[Path | None, dict[str, Any] | None]:
    """The checkpoint to resume from and its state, checked against the config given now.

    Args:
        run_dir: The run folder.
        resume: Whether ``--resume`` was asked for (else nothing is read).
        config: The resuming run's config as a dict.
        processes: Processes of the resuming run.
        say: Progress lines (main process).
        warn: Warning lines (main process), ``logging`` style.

    Returns:
        ``(folder, state)``, or ``(None, None)`` when there is nothing to resume.

    Raises:
        ValueError: ``train.steps`` below the checkpoint's step, or a setting that cannot
            take effect changed (one line each).
        CheckpointError: ``state.pt`` holds objects other than tensors and plain data.
    """
    from .checkpoint import latest_checkpoint, load_state

    if not resume:
        return None, None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        say(f"resume: no usable checkpoint in {run_dir}/checkpoints; starting from step 0")
        return None, None
    state = load_state(ckpt)
    step, steps = int(state["step"]), int(config["train"]["steps"])
    if steps < step:
        raise ValueError(
            f"train.steps = {steps} is below the step of {ckpt} ({step}): set train.steps "
            f">= {step} to resume it"
        )
    applied = check_resume_config(state, config, processes, run_dir)
    if applied:
        warn("resume: changed settings take effect from step %d: %s", step, "; ".join(applied))
    return ckpt, state


def restore(
    ckpt: Path | None,
    state: dict[str, Any] | None,
    optimizer: Any,
    commit: Any,
    fsdp: Any,
    say: Callable[[str], None],
    warn: Callable[..., None],
) -> int:
    """Load the optimizer, CoMMIT and RNG state of ``ckpt`` (its weights are already in).

    The config's base learning rates and weight decay replace the saved groups' values
    (:func:`apply_group_settings`), with a warning when they differ.

    Returns:
        The step to start from (0 without a checkpoint).
    """
    from . import sharding
    from .checkpoint import load_optimizer_state, set_rng_state

    if ckpt is None or state is None:
        return 0
    step = int(state["step"])
    fresh = {
        g["name"]: {k: g[k] for k in ("base_lr", "weight_decay") if k in g}
        for g in optimizer.param_groups
    }
    optim = load_optimizer_state(ckpt, state, fsdp is not None)
    if fsdp is not None:
        sharding.load_optimizer_state(optimizer, optim)
    else:
        optimizer.load_state_dict(optim)
    changed = apply_group_settings(optimizer, fresh)
    if changed:
        warn(
            "resume: the config's optimizer settings replace the checkpoint's from step %d: %s",
            step,
            "; ".join(changed),
        )
    commit.load_state_dict(state["commit"])  # re-applies the rates from the groups' base_lr
    set_rng_state(state["rng"])
    say(f"resume: from {ckpt} (step {step})")
    return step
