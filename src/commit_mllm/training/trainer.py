"""The training loop: one readable function on accelerate.

Per optimizer step: forward -> loss -> backward (per micro-batch) -> clip -> step -> kappa ->
LRs -> log, then evaluation and checkpoints when due, and a stop after a checkpoint when
SIGTERM / SIGINT asked for one. Starting a run (model, data, optimizer, a
checkpoint restored) is :func:`.startup.setup`; the run's state between steps (batches,
clipping, evaluation, checkpoints, summary) is :class:`.session.Session`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..method.lookahead import supervised_mask
from . import preemption
from .checkpoint import (
    fault_point,
)
from .config import RunConfig
from .session import Session, all_reduce
from .startup import setup

__all__ = ["train"]


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
        session: A session from :func:`.startup.setup` to train (to inspect its model afterwards).

    Returns:
        The run summary (final loss, accuracy per question type, kappa statistics, time).

    Raises:
        Preempted: SIGTERM or SIGINT stopped the run; a checkpoint of its last step is
            written (the handlers are installed while ``train`` runs, from the main thread).
        NonFiniteError: ``train.max_bad_steps`` non-finite steps in a row.
        ValueError: A config that cannot resume the checkpoint, bad data (one line each).
    """
    s = session or setup(cfg, resume, log)
    with s.undone_on_failure():  # a failed resume leaves its folder as found
        acc, commit, opt, t = s.accelerator, s.commit, s.optimizer, s.cfg.train
        bar = s.progress_bar()
        start, bounds_said = time.perf_counter(), set()
        for step in s.steps():  # SIGTERM / SIGINT: stop after a step, with its checkpoint
            # ---- forward -> loss -> backward, per micro-batch ----------------------------
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
            # ---- per-component gradient norms; strategy gating (CD) / modulation (OGM-GE)
            acc.unscale_gradients()
            commit.after_backward()
            # ---- clip; a non-finite loss or gradient skips the step -----------------------
            total_norm = s.clip_gradients()
            if not _finite(ce_sum + aux_sum, total_norm):
                s.skip_step(step)
                bar.update(1)
                s.end_of_step(step + 1)
                continue
            s.bad_in_a_row = 0
            # ---- step --------------------------------------------------------------------
            commit.before_step()
            opt.step()
            # ---- kappa -> kappa_bar -> factors -> the next step's LRs ---------------------
            # (strategy progress: measured on the next batch, which this step did not train on)
            heldout = s.peek_batch() if commit.heldout and step + 1 < t.steps else None
            report = commit.after_step(heldout)
            opt.zero_grad(set_to_none=True)
            # ---- log ---------------------------------------------------------------------
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
                loss=f"{ce_mean:.3f}",
                kappa_bar=_fmt(record.get("kappa_bar")),
                state=record["state"],
            )
            fault_point(f"step:{step}")
            # ---- evaluate and save when due -----------------------------------------------
            s.end_of_step(step + 1)
        bar.close()
        final_eval = s.final_evaluation()
        s.save(t.steps)
        return s.finish(final_eval, time.perf_counter() - start)


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
    all_reduce(sums)
    n = max(float(sums[0]), 1.0)
    return acc.num_processes * tokens / n, float(sums[1]) / n, float(sums[2]) / n


def _finite(loss: float, grad_norm: torch.Tensor | None) -> bool:
    return math.isfinite(loss) and (grad_norm is None or bool(torch.isfinite(grad_norm)))


def _targets(batch: dict[str, Any]) -> torch.Tensor:
    labels = batch["labels"]
    return labels[:, 1:][supervised_mask(labels)]


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"
