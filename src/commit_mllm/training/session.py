"""A run in progress: its batches, clipping, skipped steps, evaluation, checkpoints, summary."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ..evaluation.generate import evaluate
from ..method.coordinator import CoMMIT
from ..method.diagnostics import state_shares
from . import preemption, sharding
from .assembly import Assembly
from .checkpoint import (
    PREFIX,
    drop_later_checkpoints,
    fault_point,
    latest_checkpoint,
    rng_state,
    save_checkpoint,
)
from .config import RunConfig
from .config_values import to_dict
from .errors import DeadRunError, NonFiniteError, Preempted
from .tracking import RunLogger, read_jsonl, rewind, write_atomic


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
        reduce = all_reduce if self.accelerator.num_processes > 1 else None
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
                write_config(self.run_dir, self.cfg)
            write_atomic(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        return summary


def write_config(run_dir: Path, cfg: RunConfig) -> None:
    """Write the run's config.yaml (atomically)."""
    write_atomic(run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))


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


def all_reduce(t: torch.Tensor) -> None:
    """Sum ``t`` over the processes, in place."""
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
