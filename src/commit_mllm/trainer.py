"""The training loop: one readable function on accelerate.

Per optimizer step: forward -> loss -> backward (per micro-batch) -> clip -> step -> kappa ->
LRs -> log, then evaluation and checkpoints when due. Everything else (building the model
and data, the batch order, the summary) lives in small helpers below it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from . import sharding
from .assembly import Assembly, assemble
from .balance import supervised_mask
from .checkpoint import (
    fault_point,
    latest_checkpoint,
    load_resume_state,
    load_trainable,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .config import RunConfig, resolve_num_threads, to_dict
from .coordinator import CoMMIT
from .diagnostics import state_shares
from .evaluation import evaluate
from .tracking import RunLogger, read_jsonl

__all__ = ["BatchOrder", "Session", "setup", "summarize", "train"]

logger = logging.getLogger(__name__)


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    log: Callable[[str], None] = print,
    session: Session | None = None,
) -> dict:
    """Train (or resume) a run and return its summary (also written to summary.json).

    Args:
        cfg: The run config.
        resume: Continue from the newest complete checkpoint in ``cfg.run.output_dir``.
        log: Where startup lines go (the main process only).
        session: A session from :func:`setup` to train (to inspect its model afterwards).

    Returns:
        The run summary (final loss, accuracy per question type, kappa statistics, time).
    """
    s = session or setup(cfg, resume, log)
    acc, commit, opt, t = s.accelerator, s.commit, s.optimizer, cfg.train
    bar = s.progress_bar()
    start = time.perf_counter()
    for step in range(s.start_step, t.steps):
        # ---- forward -> loss -> backward, per micro-batch --------------------------------
        ce_sum = aux_sum = 0.0
        for micro in range(t.grad_accum):
            batch = s.next_batch()
            sync = micro == t.grad_accum - 1 or s.ddp is None
            with contextlib.nullcontext() if sync else acc.no_sync(s.ddp), acc.autocast():
                logits = commit.forward(batch, via=s.ddp)
                ce = F.cross_entropy(logits.float(), _targets(batch))
                aux = commit.aux_loss(logits)
                weight, ce_value, aux_value = _token_weight(acc, logits.shape[0], ce, aux)
                commit.backward(ce, aux, weight / t.grad_accum, acc.backward)
            ce_sum, aux_sum = ce_sum + ce_value, aux_sum + aux_value
        # ---- per-component gradient norms; strategy gating (CD) / modulation (OGM-GE) ----
        acc.unscale_gradients()
        commit.after_backward()
        # ---- clip; a non-finite loss or gradient skips the step ---------------------------
        total_norm = s.clip_gradients()
        if not _finite(ce_sum + aux_sum, total_norm):
            s.skip_step(step)
            bar.update(1)
            continue
        s.bad_in_a_row = 0
        # ---- step ------------------------------------------------------------------------
        commit.before_step()
        opt.step()
        # ---- kappa -> kappa_bar -> factors -> the next step's LRs -------------------------
        report = commit.after_step()
        opt.zero_grad(set_to_none=True)
        # ---- log -------------------------------------------------------------------------
        ce_mean, aux_mean = ce_sum / t.grad_accum, aux_sum / t.grad_accum
        # "loss" is the CE everywhere (logs, plots, tables); the regularizer's term apart.
        record = {"step": step, "loss": ce_mean, "ce": ce_mean, "aux_loss": aux_mean}
        record["total_loss"] = ce_mean + aux_mean
        record["grad_norm"] = None if total_norm is None else float(total_norm)
        record.update(report.as_log())
        if step % t.log_every == 0 or step == t.steps - 1:
            s.logger.log_step(record)
        bar.update(1)
        bar.set_postfix(
            loss=f"{ce_mean:.3f}", kappa=_fmt(record.get("kappa")), state=record["state"]
        )
        fault_point(f"step:{step}")
        # ---- evaluate and save when due ---------------------------------------------------
        s.end_of_step(step + 1)
    bar.close()
    final_eval = s.evaluate(t.steps)
    s.save(t.steps)
    return s.finish(final_eval, time.perf_counter() - start)


def _token_weight(acc: Any, tokens: int, ce: torch.Tensor, aux: torch.Tensor) -> tuple:
    """Loss weight so that several processes average over the *global* token count.

    DDP averages gradients over ranks; scaling each rank's token-mean loss by
    ``world * local_tokens / global_tokens`` makes the update equal to a single process's
    on the same global batch. Returns the weight and the global mean CE and aux loss.
    """
    if acc.num_processes == 1:
        return 1.0, float(ce.detach()), float(aux.detach())
    sums = torch.tensor(
        [tokens, float(ce.detach()) * tokens, float(aux.detach()) * tokens],
        dtype=torch.float64,
        device=acc.device,
    )
    _all_reduce(sums)
    n = max(float(sums[0]), 1.0)
    return acc.num_processes * tokens / n, float(sums[1]) / n, float(sums[2]) / n


def _finite(loss: float, grad_norm: torch.Tensor | None) -> bool:
    return math.isfinite(loss) and (grad_norm is None or bool(torch.isfinite(grad_norm)))


def _targets(batch: dict[str, Any]) -> torch.Tensor:
    labels = batch["labels"]
    return labels[:, 1:][supervised_mask(labels)]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


# ---- batch order ------------------------------------------------------------------------
class BatchOrder:
    """Deterministic data order: the step is the exact data position.

    Positions run over an endless concatenation of per-epoch permutations (seed + epoch).
    Micro-batch ``i`` covers positions ``[i G, (i + 1) G)`` of the global batch ``G``; rank
    ``r`` takes its ``r``-th slice of ``batch_size``.

    Args:
        n: Dataset size.
        batch_size: Per-process micro-batch size.
        seed: Seed of the permutations.
        rank: This process's rank.
        world: Number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, one order object per run
    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def indices(self, micro: int) -> list[int]:
        """Dataset indices of micro-batch ``micro`` on this rank."""
        start = (micro * self.world + self.rank) * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


class _MicroBatches(torch.utils.data.Dataset):
    """Collated micro-batches from ``start`` on (a map-style dataset for DataLoader workers).

    A sample that cannot be loaded or collated is an error naming its index and id
    (``on_bad_sample: error``), or is dropped from its micro-batch and reported under the
    batch key ``_skipped`` (``on_bad_sample: skip``).
    """

    def __init__(self, data, collator, order: BatchOrder, start: int, total: int, on_bad: str):
        self.data, self.collator, self.order = data, collator, order
        self.start, self.total, self.on_bad = start, total, on_bad

    def __len__(self) -> int:
        return self.total - self.start

    def __getitem__(self, k: int) -> dict[str, Any]:
        micro = self.start + k
        indices = self.order.indices(micro)
        try:
            return self.collator([self.data[i] for i in indices])
        except (ValueError, OSError):
            pass  # find the bad rows one by one: the slow path only runs on bad data
        good, skipped = [], []
        for i in indices:
            try:
                sample = self.data[i]
                self.collator([sample])
                good.append(sample)
            except (ValueError, OSError) as e:
                sid = _sample_id(self.data, i)
                if self.on_bad == "error":
                    raise ValueError(f"train sample {i} (id {sid}): {e}") from None
                skipped.append({"micro_batch": micro, "index": i, "id": sid, "reason": str(e)})
        if not good:
            raise ValueError(f"micro-batch {micro}: every sample is bad ({skipped[0]['reason']})")
        return {**self.collator(good), "_skipped": skipped}


def _sample_id(data: Sequence[dict], i: int) -> str:
    try:
        return str(data[i].get("id", i))
    except Exception:  # the row itself may be what fails to load
        return str(i)


# ---- session: everything the loop uses --------------------------------------------------
@dataclass
class Session:
    """The objects of a running training job (see :func:`setup`)."""

    cfg: RunConfig
    accelerator: Any
    parts: Assembly
    optimizer: Any
    commit: CoMMIT
    logger: RunLogger
    params: list[torch.nn.Parameter]
    loader: Any
    ddp: torch.nn.Module | None
    start_step: int
    run_dir: Path
    fsdp: torch.nn.Module | None = None
    bad_in_a_row: int = 0
    skipped_steps: int = 0
    skipped_samples: int = 0

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch, on the device; skipped bad samples are recorded."""
        batch = next(self.loader)
        skipped = batch.pop("_skipped", None)
        if skipped:
            self.skipped_samples += len(skipped)
            if self.accelerator.is_main_process:
                with open(self.run_dir / "skipped_samples.jsonl", "a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in skipped)
        dev = self.accelerator.device
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}

    def clip_gradients(self) -> torch.Tensor | None:
        """Clip to ``train.max_grad_norm`` (None when 0); return the total norm before it.

        Under FSDP the norm is taken over every rank's shards.
        """
        max_norm = self.cfg.train.max_grad_norm
        if not max_norm:
            return None
        if self.fsdp is not None:
            return self.fsdp.clip_grad_norm_(max_norm)
        return self.accelerator.clip_grad_norm_(self.params, max_norm)

    def skip_step(self, step: int) -> None:
        """Drop a step whose loss or gradient is not finite; abort after too many in a row.

        Raises:
            RuntimeError: ``train.max_bad_steps`` non-finite steps in a row. The last good
                checkpoint is left as it is.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.commit.skip_step()
        self.bad_in_a_row += 1
        self.skipped_steps += 1
        self.logger.log_step({"step": step, "skipped": "non-finite loss or gradient"})
        limit = self.cfg.train.max_bad_steps
        if self.bad_in_a_row >= limit:
            last = latest_checkpoint(self.run_dir)
            raise RuntimeError(
                f"step {step}: {self.bad_in_a_row} non-finite losses or gradients in a row "
                f"(train.max_bad_steps = {limit}); aborting. Last good checkpoint: {last}"
            )

    def end_of_step(self, done: int) -> None:
        """Evaluate and save when due, after ``done`` optimizer steps."""
        t = self.cfg.train
        if t.eval_every and done % t.eval_every == 0 and done < t.steps:
            self.evaluate(done)
        if t.save_every and done % t.save_every == 0 and done < t.steps:
            self.save(done)

    def progress_bar(self) -> Any:
        """A tqdm bar (disabled off the main process or when asked)."""
        from tqdm.auto import tqdm

        on = self.cfg.run.progress and self.accelerator.is_main_process
        return tqdm(
            total=self.cfg.train.steps, initial=self.start_step, disable=not on, desc="train"
        )

    def evaluate(self, step: int) -> dict | None:
        """Evaluate on the held-out set (main process); log and write predictions.

        Under FSDP every rank generates (the gathered forward is a collective) and only the
        main process writes.
        """
        if self.parts.eval_set is None or not len(self.parts.eval_set):
            return None
        result = None
        if self.accelerator.is_main_process or self.fsdp is not None:
            t = self.cfg.train
            # Generation must not shift the training RNG.
            with torch.random.fork_rng(devices=[]), sharding.gathered(self.fsdp):
                result, preds = evaluate(
                    self.parts.model,
                    self.parts.collator,
                    self.parts.eval_set,
                    t.eval_batch_size,
                    t.max_new_tokens,
                    self.accelerator.device,
                    self.accelerator.autocast,
                )
        if self.accelerator.is_main_process:
            self.logger.log_eval({"step": step, **result})
            path = self.run_dir / "predictions" / f"step-{step:08d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(p) + "\n" for p in preds))
        self.accelerator.wait_for_everyone()
        return result

    def save(self, step: int) -> None:
        """Write checkpoint ``step`` (main process; under FSDP every rank gathers first)."""
        weights = optim = None
        if self.fsdp is not None:
            weights, optim = sharding.full_state(self.fsdp, self.optimizer, self.parts.model)
        if self.accelerator.is_main_process:
            state = {"commit": self.commit.state_dict(), "rng": rng_state()}
            save_checkpoint(
                self.run_dir,
                step,
                self.parts.model,
                self.optimizer,
                state,
                self.cfg.train.keep_last,
                weights=weights,
                optimizer_state=optim,
            )
        self.accelerator.wait_for_everyone()

    def finish(self, final_eval: dict | None, seconds: float) -> dict:
        """Write summary.json and close the logs."""
        self.logger.close()
        summary = summarize(self.run_dir, self.cfg, final_eval, seconds, self.start_step)
        summary.update(skipped_steps=self.skipped_steps, skipped_samples=self.skipped_samples)
        if self.accelerator.is_main_process:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def setup(cfg: RunConfig, resume: bool = False, log: Callable[[str], None] = print) -> Session:
    """Build the accelerator, model, data, optimizer and CoMMIT; restore a checkpoint."""
    from accelerate import Accelerator

    t = cfg.train
    threads, why = resolve_num_threads(t.num_threads)
    if threads is not None:
        torch.set_num_threads(threads)
    # cpu=True when there is no GPU: that is what makes torchrun start MULTI_CPU (gloo) ranks.
    cpu = t.cpu or not torch.cuda.is_available()
    acc = Accelerator(cpu=cpu, mixed_precision=t.mixed_precision)
    say = log if acc.is_main_process else (lambda _: None)
    run_dir = Path(cfg.run.output_dir)
    parts = assemble(cfg, say)
    say(f"strategy: {cfg.commit.strategy}  device: {acc.device}  processes: {acc.num_processes}")
    say(f"threads: {why}")
    say(parts.components.table())
    _check_trainable(parts.components, cfg.commit.strategy)
    ckpt = _checkpoint_to_resume(run_dir, resume, say)
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
        all_reduce=_all_reduce if acc.num_processes > 1 else None,
        sharded=fsdp is not None,
    )
    start = _restore(ckpt, fsdp, optimizer, commit, say)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    run_logger = RunLogger(
        run_dir,
        acc.is_main_process,
        cfg.run.tensorboard,
        cfg.run.wandb,
        resume_step=start,
        config=to_dict(cfg),
    )
    order = BatchOrder(
        len(parts.train_set), t.batch_size, cfg.run.seed, acc.process_index, acc.num_processes
    )
    total = t.steps * t.grad_accum
    data = _MicroBatches(
        parts.train_set, parts.collator, order, start * t.grad_accum, total, cfg.data.on_bad_sample
    )
    loader = iter(
        torch.utils.data.DataLoader(data, batch_size=None, num_workers=cfg.data.num_workers)
    )
    params = [p for c in parts.components for p in c.params]
    return Session(
        cfg, acc, parts, optimizer, commit, run_logger, params, loader, ddp, start, run_dir, fsdp
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

    opt_cls = torch.optim.AdamW if t.optimizer == "adamw" else torch.optim.SGD
    plugin = acc.distributed_type == DistributedType.FSDP
    if (t.fsdp or plugin) and acc.num_processes > 1:
        how = "train.fsdp" if t.fsdp else "accelerate's FSDP plugin (its options are not used)"
        fsdp = sharding.wrap(parts.model, acc.device)  # before the optimizer sees the shards
        say(f"fsdp: full shard over {acc.num_processes} processes, use_orig_params ({how})")
        return opt_cls(parts.components.param_groups()), None, fsdp
    if t.fsdp:
        say("fsdp: one process, nothing to shard; training unwrapped")
    model, optimizer = acc.prepare(parts.model, opt_cls(parts.components.param_groups()))
    parts.model = acc.unwrap_model(model)
    return optimizer, (model if acc.num_processes > 1 else None), None


def _checkpoint_to_resume(run_dir: Path, resume: bool, say: Callable[[str], None]) -> Path | None:
    if not resume:
        return None
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        say(f"resume: no complete checkpoint in {run_dir}/checkpoints; starting from step 0")
    return ckpt


def _restore(ckpt: Path | None, fsdp: Any, optimizer: Any, commit: CoMMIT, say) -> int:
    """Optimizer, CoMMIT and RNG state of ``ckpt`` (its weights are already loaded)."""
    if ckpt is None:
        return 0
    state, optim = load_resume_state(ckpt, fsdp=fsdp is not None)
    if fsdp is not None:
        sharding.load_optimizer_state(optimizer, optim)
    else:
        optimizer.load_state_dict(optim)
    commit.load_state_dict(state["commit"])
    set_rng_state(state["rng"])
    say(f"resume: from {ckpt} (step {state['step']})")
    return int(state["step"])


def _all_reduce(t: torch.Tensor) -> None:
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def summarize(
    run_dir: Path, cfg: RunConfig, final_eval: dict | None, seconds: float, start_step: int = 0
) -> dict:
    """Run summary from metrics.jsonl and the final evaluation.

    ``final_loss`` is the mean CE over the last 10% of steps; ``mean_log_kappa`` the mean of
    log kappa over every estimate; ``state_shares`` the share of steps per balance state;
    ``final_state`` the last balance state.
    """
    recs = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "ce" in r]  # not skipped
    tail = recs[-max(1, len(recs) // 10) :] if recs else []
    logk = [math.log(r["kappa"]) for r in recs if r.get("kappa")]
    last = recs[-1] if recs else {}
    summary = {
        "strategy": cfg.commit.strategy,
        "seed": cfg.run.seed,
        "steps": cfg.train.steps,
        "final_loss": sum(r["ce"] for r in tail) / len(tail) if tail else None,
        "mean_log_kappa": sum(logk) / len(logk) if logk else None,
        "final_kappa_bar": last.get("kappa_bar"),
        "final_state": last.get("state"),
        "state_shares": state_shares([r["state"] for r in recs if r.get("state")]),
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / max(1, cfg.train.steps - start_step),
        "run_dir": str(run_dir),
        "label": cfg.commit.strategy,
    }
    summary.update(final_eval or {})
    return summary
