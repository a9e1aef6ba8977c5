"""The training loop: one readable function on accelerate.

Per optimizer step: forward -> loss -> backward (per micro-batch) -> clip -> step -> kappa ->
LRs -> log, then evaluation and checkpoints when due, and a stop after a checkpoint when
SIGTERM / SIGINT asked for one. Everything else (building the model and data, the batch
order, resuming, the summary) lives in small helpers below it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

from ..evaluation.generate import evaluate
from ..method.balance import supervised_mask
from ..method.coordinator import CoMMIT
from ..method.diagnostics import state_shares
from . import preemption, sharding
from .assembly import Assembly, assemble
from .batches import BatchOrder, MicroBatches
from .checkpoint import (
    PREFIX,
    drop_later_checkpoints,
    fault_point,
    latest_checkpoint,
    load_trainable,
    rng_state,
    save_checkpoint,
)
from .config import RunConfig, resolve_num_threads, to_dict
from .errors import DeadRunError, NonFiniteError, Preempted
from .resume import find_checkpoint, restore, suspect_changes
from .tracking import RunLogger, read_jsonl, rewind, start_over, write_atomic

__all__ = ["BatchOrder", "Session", "setup", "summarize", "train"]

logger = logging.getLogger(__name__)


@preemption.stop_on_signals
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
        resume: Continue from the newest verified checkpoint in ``cfg.run.output_dir``
            (without it, an earlier run's files in that folder are replaced).
        log: Where startup lines go (the main process only).
        session: A session from :func:`setup` to train (to inspect its model afterwards).

    Returns:
        The run summary (final loss, accuracy per question type, kappa statistics, time).

    Raises:
        Preempted: SIGTERM or SIGINT stopped the run; a checkpoint of its last step is
            written (the handlers are installed while ``train`` runs, from the main thread).
        NonFiniteError: ``train.max_bad_steps`` non-finite steps in a row.
        ValueError: A config that cannot resume the checkpoint, bad data (one line each).
    """
    s = session or setup(cfg, resume, log)
    with s.undone_on_failure():
        return _train_loop(s)


def _train_loop(s: Session) -> dict:
    """The steps of :func:`train`, then the final evaluation, checkpoint and summary."""
    cfg = s.cfg
    acc, commit, opt, t = s.accelerator, s.commit, s.optimizer, cfg.train
    bar = s.progress_bar()
    start, bounds_said = time.perf_counter(), set()
    for step in s.steps():  # SIGTERM / SIGINT: stop after a step, with its checkpoint
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
            s.end_of_step(step + 1)
            continue
        s.bad_in_a_row = 0
        # ---- step ------------------------------------------------------------------------
        commit.before_step()
        opt.step()
        # ---- kappa -> kappa_bar -> factors -> the next step's LRs -------------------------
        # (strategy progress: measured on the next batch, which this step did not train on)
        heldout = s.peek_batch() if commit.heldout and step + 1 < t.steps else None
        report = commit.after_step(heldout)
        opt.zero_grad(set_to_none=True)
        # ---- log -------------------------------------------------------------------------
        ce_mean, aux_mean = ce_sum / t.grad_accum, aux_sum / t.grad_accum
        # "loss" is the CE everywhere (logs, plots, tables); the regularizer's term apart.
        record = {"step": step, "loss": ce_mean, "ce": ce_mean, "aux_loss": aux_mean}
        record["total_loss"] = ce_mean + aux_mean
        record["grad_norm"] = None if total_norm is None else float(total_norm)
        record.update(report.as_log())
        _say_bounds(report.at_bound, bounds_said, step, acc.is_main_process)
        if step % t.log_every == 0 or step == t.steps - 1:
            s.logger.log_step(record)
        s.check_alive(step, ce_mean, total_norm)
        bar.update(1)
        bar.set_postfix(  # kappa_bar: held between the estimates taken every K steps
            loss=f"{ce_mean:.3f}", kappa_bar=_fmt(record.get("kappa_bar")), state=record["state"]
        )
        fault_point(f"step:{step}")
        # ---- evaluate and save when due ---------------------------------------------------
        s.end_of_step(step + 1)
    bar.close()
    final_eval = s.final_evaluation()
    s.save(t.steps)
    return s.finish(final_eval, time.perf_counter() - start)


def _silence_library_bars() -> None:
    """``run.progress=false`` silences the libraries' bars too (loading, saving weights)."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars
    except ImportError:  # an older huggingface_hub: transformers' switch covers its bars
        return
    disable_progress_bars()


def _say_bounds(at_bound: dict[str, str], said: set, step: int, main: bool) -> None:
    """Say once per component and side that the rule wanted its factor past a bound."""
    for c, side in at_bound.items():
        if (c, side) not in said and main:
            logger.warning(
                "step %d: the rule held %s's factor at its %s (it wanted to go further); "
                "widen commit.linesearch_max_%s if that is not what you want",
                step,
                c,
                side,
                "cut" if side == "floor" else "raise",
            )
        said.add((c, side))


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
    dead_in_a_row: int = 0
    last_loss: float | None = None
    skipped_steps: int = 0
    skipped_samples: int = 0
    saved_step: int | None = None  # the step of the published checkpoint this state equals
    resumed: bool = False
    published: bool = False  # this process published a checkpoint
    resume_changes: list[str] = field(default_factory=list)
    _peeked: tuple[dict[str, Any], list[dict]] | None = None

    @contextlib.contextmanager
    def undone_on_failure(self) -> Iterator[None]:
        """A resumed run that fails before publishing a checkpoint leaves its folder as found.

        The records of the steps it ran are rewound away; ``summary.json`` and
        ``config.yaml`` are only replaced when a run finishes, and no checkpoint was written,
        so the folder is the one ``--resume`` found. A run that published a checkpoint keeps
        the records up to it (the next ``--resume`` continues from there). A stop by signal
        is not a failure: it publishes a checkpoint.
        """
        try:
            yield
        except Preempted:
            raise
        except Exception:
            self.logger.close()
            if self.resumed and not self.published and self.accelerator.is_main_process:
                micro = self.start_step * self.cfg.train.grad_accum
                rewind(self.run_dir, self.start_step, micro)
            raise

    def steps(self) -> Iterator[int]:
        """Step indices from ``start_step`` on, ending early on SIGTERM / SIGINT.

        Before each step, and after the last one, every process agrees whether a signal
        asked to stop (:func:`preemption.current`); if so the state is published as a
        checkpoint (nothing new before the first step) and :class:`Preempted` is raised.
        After the last step the final checkpoint is then written and the final evaluation
        left to ``--resume``.
        """
        try:
            for step in range(self.start_step, self.cfg.train.steps):
                self._stop_if_asked(step)
                yield step
            self._stop_if_asked(self.cfg.train.steps)
        except BaseException:
            self.logger.close()  # flush what TensorBoard holds; the checkpoint is published
            raise

    def _stop_if_asked(self, done: int) -> None:
        stop = preemption.current()
        if stop is None:
            return
        reduce = _all_reduce if self.accelerator.num_processes > 1 else None
        signum = stop.agreed(reduce, self.accelerator.device)
        if signum is None:
            return
        ckpt = None
        if done > 0:
            ckpt = self.save(done)
        elif self.saved_step is not None:
            ckpt = self.run_dir / "checkpoints" / f"{PREFIX}{self.saved_step:08d}"
        raise Preempted(signum, done, self.cfg.train.steps, ckpt, self.run_dir)

    def peek_batch(self) -> dict[str, Any]:
        """The micro-batch :meth:`next_batch` returns next (fetched now, kept for it)."""
        if self._peeked is None:
            self._peeked = self._fetch()
        return self._peeked[0]

    def next_batch(self) -> dict[str, Any]:
        """The next micro-batch, on the device; its skipped bad samples are recorded now.

        Recording when a batch is trained on (not when it is peeked at) keeps the records and
        counters of a checkpoint to the steps it holds.
        """
        batch, skipped = self._peeked if self._peeked is not None else self._fetch()
        self._peeked = None
        if skipped:
            self.skipped_samples += len(skipped)
            self.logger.log_skipped(skipped)
        return batch

    def _fetch(self) -> tuple[dict[str, Any], list[dict]]:
        batch = next(self.loader)
        skipped = batch.pop("_skipped", None) or []
        dev = self.accelerator.device
        return {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}, skipped

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
            NonFiniteError: ``train.max_bad_steps`` non-finite steps in a row. The last good
                checkpoint is left as it is.
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.commit.skip_step()
        self.bad_in_a_row += 1
        self.skipped_steps += 1
        self.logger.log_step({"step": step, "skipped": "non-finite loss or gradient"})
        limit = self.cfg.train.max_bad_steps
        if self.bad_in_a_row < limit:
            return
        # Checkpoints taken inside the streak hold the same weights as the one before it
        # (skipped steps update nothing); removing them makes --resume start from that one.
        last = latest_checkpoint(self.run_dir, before_streak=True)
        if self.accelerator.is_main_process:
            drop_later_checkpoints(self.run_dir, last)
        then = (
            f"add --resume to continue from {last.name}"
            if last is not None
            else "start again (no checkpoint was written)"
        )
        began = step - self.bad_in_a_row + 1
        if self.resume_changes and began >= self.start_step:
            changes = "; ".join(self.resume_changes)
            cause = (
                f"Likely cause: settings changed at --resume from step {self.start_step}: "
                f"{changes}; set them back, then {then}"
            )
        else:
            cause = "Lower the learning rates (train.lr, train.*_lr) or check the data, then "
            cause += then
        raise NonFiniteError(
            f"step {step}: {self.bad_in_a_row} non-finite losses or gradients in a row "
            f"(train.max_bad_steps = {limit}); aborting. Last good checkpoint: {last}. {cause}",
            step,
            last,
        )

    def check_alive(self, step: int, loss: float, grad_norm: torch.Tensor | None) -> None:
        """Fail a run that stopped learning: no gradient, or the same loss, step after step.

        Raises:
            DeadRunError: ``train.max_dead_steps`` such steps in a row.
        """
        zero = grad_norm is not None and float(grad_norm) == 0.0
        last, self.last_loss = self.last_loss, loss
        frozen = last is not None and abs(loss - last) <= 1e-7 * max(abs(loss), 1e-12)
        self.dead_in_a_row = self.dead_in_a_row + 1 if zero or frozen else 0
        limit = self.cfg.train.max_dead_steps
        if not limit or self.dead_in_a_row < limit:
            return
        what = " and ".join(
            w
            for w, on in (("every gradient exactly 0", zero), (f"the loss at {loss:.6g}", frozen))
            if on
        )
        raise DeadRunError(
            f"step {step}: {self.dead_in_a_row} steps in a row with {what} "
            f"(train.max_dead_steps = {limit}): the run has stopped learning. Likely cause: "
            "learning rates too high (a huge step saturates the model and its gradients "
            "vanish: lower train.lr, train.*_lr) or nothing left to train (every component "
            "frozen or at rate 0); fix it and start again",
            step,
        )

    def end_of_step(self, done: int) -> None:
        """Evaluate, then save, when due after ``done`` optimizer steps.

        The evaluation of step S is written before checkpoint S is published, so a
        checkpoint stands for every record up to its step (see :mod:`.tracking`).
        """
        t = self.cfg.train
        if t.eval_every and done % t.eval_every == 0 and done < t.steps:
            self.evaluate(done)
            fault_point(f"eval:{done}")
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
            self.logger.log_eval({"step": step, **result}, preds)
        self.accelerator.wait_for_everyone()
        return result

    def final_evaluation(self) -> dict | None:
        """The evaluation after the last step: run it, or read it back for a finished run.

        A finished run that is resumed (``start_step == train.steps``) wrote its final
        evaluation before its last checkpoint: it is read from eval.jsonl, not repeated. It
        runs when absent (a stop right after the last step leaves it to ``--resume``).
        """
        steps = self.cfg.train.steps
        if self.start_step == steps and self.parts.eval_set is not None:
            done = [r for r in read_jsonl(self.run_dir / "eval.jsonl") if r.get("step") == steps]
            if done:
                return {k: v for k, v in done[-1].items() if k != "step"}
        return self.evaluate(steps)

    def save(self, step: int) -> Path:
        """Publish checkpoint ``step`` (main process; under FSDP every rank gathers first).

        The run's records are synced first, so the checkpoint stands for everything written
        up to its step. Nothing is written when the state is that of the checkpoint the run
        resumed from (a finished run resumed again).

        Returns:
            The checkpoint folder (its path on every rank).
        """
        final = self.run_dir / "checkpoints" / f"{PREFIX}{step:08d}"
        if step == self.saved_step:
            return final
        weights = optim = None
        if self.fsdp is not None:
            weights, optim = sharding.full_state(self.fsdp, self.optimizer, self.parts.model)
        if self.accelerator.is_main_process:
            self.logger.sync()
            state = {
                "commit": self.commit.state_dict(),
                "rng": rng_state(),
                "counters": {
                    "bad_in_a_row": self.bad_in_a_row,
                    "skipped_steps": self.skipped_steps,
                    "skipped_samples": self.skipped_samples,
                    "dead_in_a_row": self.dead_in_a_row,
                    "last_loss": self.last_loss,
                },
                "config": to_dict(self.cfg),
                "processes": self.accelerator.num_processes,
            }
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
        self.saved_step, self.published = step, True
        self.accelerator.wait_for_everyone()
        return final

    def finish(self, final_eval: dict | None, seconds: float) -> dict:
        """Write summary.json (and a resumed run's config.yaml), each atomically; close logs.

        A resumed run replaces the finished run's description only now that it has finished.
        """
        self.logger.close()
        summary = summarize(self.run_dir, self.cfg, final_eval, seconds, self.start_step)
        summary.update(skipped_steps=self.skipped_steps, skipped_samples=self.skipped_samples)
        cache = getattr(self.parts.model, "feature_cache", None)
        if cache is not None:
            summary["feature_cache"] = cache.stats()
        fault_point("finish")
        if self.accelerator.is_main_process:
            if self.resumed:
                _write_config(self.run_dir, self.cfg)
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


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
        all_reduce=_all_reduce if acc.num_processes > 1 else None,
        sharded=fsdp is not None,
    )
    start = restore(ckpt, state, optimizer, commit, fsdp, say, warn)
    if acc.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run writes its config.yaml when it finishes
            start_over(run_dir, warn)
            _write_config(run_dir, cfg)
    run_logger = RunLogger(
        run_dir,
        acc.is_main_process,
        cfg.run.tensorboard,
        cfg.run.wandb,
        resume_step=start if resume else None,
        config=to_dict(cfg),
    )
    order = BatchOrder(
        len(parts.train_set), t.batch_size, cfg.run.seed, acc.process_index, acc.num_processes
    )
    total = t.steps * t.grad_accum
    on_bad = cfg.data.on_bad_sample
    data = MicroBatches(
        parts.train_set, parts.collator, order, start * t.grad_accum, total, on_bad, t.grad_accum
    )
    loader = iter(
        torch.utils.data.DataLoader(
            data,
            batch_size=None,
            num_workers=cfg.data.num_workers,
            worker_init_fn=preemption.ignore_in_worker,
        )
    )
    params = [p for c in parts.components for p in c.params]
    s = Session(
        cfg, acc, parts, optimizer, commit, run_logger, params, loader, ddp, start, run_dir, fsdp
    )
    s.resumed = resume
    s.resume_changes = suspect_changes(state, to_dict(cfg)) if state is not None else []
    if state is not None:
        counters = state.get("counters", {})
        s.bad_in_a_row, s.skipped_steps, s.skipped_samples, s.dead_in_a_row = (
            int(counters.get(k, 0))
            for k in ("bad_in_a_row", "skipped_steps", "skipped_samples", "dead_in_a_row")
        )
        s.last_loss = counters.get("last_loss")
        if ckpt.name == f"{PREFIX}{start:08d}":  # not a copy moved aside by a cut re-save
            s.saved_step = start
    return s


def _write_config(run_dir: Path, cfg: RunConfig) -> None:
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


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
        "steps_at_bound": {  # share of logged steps a rule held a factor at its bound
            k.split("/", 1)[1]: sum(1 for r in recs if r.get(k)) / len(recs)
            for k in sorted({k for r in recs for k in r if k.startswith("at_bound/")})
        },
        "seconds": seconds,
        "ms_per_step": 1000 * seconds / max(1, cfg.train.steps - start_step),
        "run_dir": str(run_dir),
        "label": cfg.commit.strategy,
    }
    summary.update(final_eval or {})
    return summary
