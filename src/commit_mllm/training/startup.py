"""Start a run: the accelerator, model, data, optimizer and CoMMIT; a checkpoint restored."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from ..method.coordinator import CoMMIT
from . import preemption, sharding
from .assembly import Assembly, assemble
from .batches import BatchOrder, MicroBatches
from .checkpoint import (
    PREFIX,
    load_trainable,
)
from .config import RunConfig, resolve_num_threads
from .config_values import to_dict
from .resume import find_checkpoint, restore, suspect_changes
from .session import Session, all_reduce, write_config
from .tracking import RunLogger, start_over

logger = logging.getLogger(__name__)


def _silence_library_bars() -> None:
    """``run.progress=false`` silences the libraries' bars too (loading, saving weights)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # an older huggingface_hub: transformers' switch covers its bars
        return
    disable_progress_bars()


def setup(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> Session:
    """Build the accelerator, model, data, optimizer and CoMMIT; restore a checkpoint.

    With ``resume`` the newest verified checkpoint is chosen and checked against the config
    first (:mod:`.resume`), before anything is built; without it, an earlier run's files in
    the run folder are replaced, once everything is built.
    """
    from accelerate import Accelerator

    cfg.validate()  # a config built or changed in code has not been through load_config
    t = cfg.train
    threads, why = resolve_num_threads(t.num_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    if not cfg.run.progress:
        _silence_library_bars()
    # cpu=True when there is no GPU: that is what makes torchrun start MULTI_CPU (gloo) ranks.
    cpu = t.cpu or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision=t.mixed_precision)
    say = log if acc.is_main_process else (lambda _: None)
    warn = logger.warning if acc.is_main_process else (lambda *_: None)
    run_dir = Path(cfg.run.output_dir)
    ckpt, state = find_checkpoint(run_dir, resume, to_dict(cfg), acc.num_processes, say, warn)
    parts = assemble(cfg, say)
    say(f"strategy: {cfg.commit.strategy}  device: {acc.device}  processes: {acc.num_processes}")
    say(f"threads: {why}")
    say(parts.components.table())
    _check_trainable(parts.components, cfg.commit.strategy)
    if t.cache_frozen_features:
        say(_enable_feature_cache(parts, t.feature_cache_max_mb))
    if ckpt is not None:  # weights go in before any wrapper shards or replicates them
        load_trainable(parts.model, ckpt)
    optimizer, ddp, fsdp = _wrap(acc, parts, t, say)
    wrapped = fsdp if fsdp is not None else ddp
    commit = CoMMIT(
        fsdp if fsdp is not None else parts.model,
        optimizer,
        parts.components,
        cfg.commit,
        total_steps=t.steps,
        warmup_steps=t.warmup_steps,
        schedule=t.schedule,
        min_lr_ratio=t.min_lr_ratio,
        forward_fn=(lambda m, b: m(**b).logits) if wrapped is not None else None,
        autocast=acc.autocast,
        all_reduce=all_reduce if acc.num_processes > 1 else None,
        sharded=fsdp is not None,
    )
    start = restore(ckpt, state, optimizer, commit, fsdp, say, warn)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run writes its config.yaml when it finishes
            start_over(run_dir, warn)
            write_config(run_dir, cfg)
    run_logger = RunLogger(
        run_dir,
        acc.is_main_process,
        cfg.run.tensorboard,
        cfg.run.wandb,
        resume_step=start if resume else None,
        config=to_dict(cfg),
    )
    loader = _batches(cfg, parts, acc, start)
    params = [p for c in parts.components for p in c.params]
    s = Session(
        cfg, acc, parts, optimizer, commit, run_logger, params, loader, ddp, start, run_dir, fsdp
    )
    s.resumed = resume
    s.resume_changes = suspect_changes(state, to_dict(cfg)) if state is not None else []
    if state is not None:
        _restore_counters(s, state, ckpt.name == f"{PREFIX}{start:08d}")
    return s


def _batches(cfg: RunConfig, parts: Assembly, acc: Any, start: int) -> Iterator[dict]:
    """This rank's micro-batches from step ``start`` on, through a DataLoader."""
    t = cfg.train
    order = BatchOrder(
        len(parts.train_set), t.batch_size, cfg.run.seed, acc.process_index, acc.num_processes
    )
    total = t.steps * t.grad_accum
    on_bad = cfg.data.on_bad_sample
    data = MicroBatches(
        parts.train_set, parts.collator, order, start * t.grad_accum, total, on_bad, t.grad_accum
    )
    return iter(
        torch.utils.data.DataLoader(
            data,
            batch_size=None,
            num_workers=cfg.data.num_workers,
            worker_init_fn=preemption.ignore_in_worker,
        )
    )


def _restore_counters(s: Session, state: dict, at_its_step: bool) -> None:
    """The counters a checkpoint carries; ``at_its_step``: not a copy moved aside."""
    counters = state.get("counters", {})
    s.bad_in_a_row, s.skipped_steps, s.skipped_samples, s.dead_in_a_row = (
        int(counters.get(k, 0))
        for k in ("bad_in_a_row", "skipped_steps", "skipped_samples", "dead_in_a_row")
    )
    s.last_loss = counters.get("last_loss")
    if at_its_step:  # not a copy moved aside by a cut re-save
        s.saved_step = s.start_step


def _enable_feature_cache(parts: Assembly, max_mb: float) -> str:
    """Turn the frozen-tower cache on (``train.cache_frozen_features``); its log line.

    The per-item cost is read off one tower forward on the first training sample.

    Raises:
        ValueError: A tower is not frozen or not deterministic (one line naming the key).
    """
    model = parts.model
    cache = model.enable_feature_cache(int(max_mb * 2**20))
    import numpy as np

    costs = []
    py_state, np_state = random.getstate(), np.random.get_state()
    try:  # the sizing forward must not shift any RNG the run draws from
        with torch.random.fork_rng(devices=[]):
            batch = parts.collator([parts.train_set[0]])
            device = next(model.parameters()).device
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            with torch.no_grad():
                for m in cache.modalities:
                    row = model._run_tower(m, batch)[0][0]
                    size = row.numel() * row.element_size()
                    shape = " x ".join(str(n) for n in row.shape)
                    dtype = str(row.dtype).removeprefix("torch.")
                    costs.append(f"{m} {shape} {dtype} = {size / 2**10:.1f} KiB")
    except Exception as e:  # the line is informative only: never fail the run on it
        costs.append(f"per-item cost unknown ({type(e).__name__}: {e})")
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    per = "; ".join(costs)
    what = "each clip per padded length" if "audio" in cache.modalities else "each image"
    return (
        f"feature cache: on for the frozen {'+'.join(cache.modalities)} tower "
        f"({what} runs through it once); per item {per}; cap "
        f"{max_mb:g} MiB (train.feature_cache_max_mb)"
    )


def _check_trainable(components: Any, strategy: str) -> None:
    """Balancing strategies need every component to train; say which one does not."""
    if strategy in ("constant", "replay"):
        return
    for c in components:
        if c.frozen:
            raise ValueError(
                f"component '{c.name}' has no trainable parameters (all {len(c.frozen_names)} "
                f"are frozen); strategy '{strategy}' balances components that learn: unfreeze "
                "it, move it with projector_side, or use commit.strategy=constant"
            )


def _wrap(acc: Any, parts: Assembly, t: Any, say: Callable[[str], None]) -> tuple:
    """The optimizer over the components' named groups, and the model's wrapper.

    FSDP when asked for (``train.fsdp``) or launched with accelerate's FSDP plugin, with more
    than one process; else accelerate's own preparation (DDP with several processes).

    Returns:
        ``(optimizer, ddp, fsdp)``; the wrapper that does not apply is None.
    """
    from accelerate.utils import DistributedType

    opt_cls = optimizer_class(t.optimizer)
    plugin = acc.distributed_type == DistributedType.FSDP
    if (t.fsdp or plugin) and acc.num_processes > 1:
        how = "train.fsdp" if t.fsdp else "accelerate's FSDP plugin (its options are not used)"
        fsdp = sharding.wrap(parts.model, acc.device)  # before the optimizer sees the shards
        say(f"fsdp: full shard over {acc.num_processes} processes, use_orig_params ({how})")
        return opt_cls(parts.components.param_groups()), None, fsdp
    if t.fsdp:
        say("fsdp: one process, nothing to shard; training unwrapped")
    model, optimizer = acc.prepare(parts.model, opt_cls(parts.components.param_groups()))
    # Not acc.unwrap_model: it imports DeepSpeed whenever installed, which prints a warning.
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    parts.model = model.module if ddp else model
    return optimizer, (model if acc.num_processes > 1 else None), None


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The optimizer class of ``train.optimizer``.

    ``ldog`` is layer-wise DoG (Ivgi et al., 2023, package ``dog-optimizer``): a step size per
    tensor from its distance travelled and its gradients, no learning rate to tune; a group's
    rate is then DoG's multiplier (1 = the paper's), still scaled by the schedule.
    """
    if name == "ldog":
        try:
            from dog import LDoG
        except ModuleNotFoundError:
            raise ValueError(
                "train.optimizer=ldog needs the dog-optimizer package: pip install dog-optimizer"
            ) from None
        return LDoG
    return torch.optim.AdamW if name == "adamw" else torch.optim.SGD
