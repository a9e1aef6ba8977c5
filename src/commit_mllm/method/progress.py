"""Held-out progress of each component's step (this project's own signal, beyond the paper).

The paper's D_c says how much component c's update moved the output on the batch it was
trained on; it cannot say whether that move was *useful*, and the batch just trained on
cannot show harm (a pretrained encoder wiping out its features still lowers the loss of the
rows it fitted). This module measures each component's step on rows the step did **not**
train on: the next batch, before it is trained on.

After the step theta_t -> theta_{t+1}, on held-out rows (the next batch, or its first rows),
with dropout off (eval mode), the paper's lookahead (METHOD.md, "Update significance"):

    p_t      = softmax(logits at theta_t)                         (before the step)
    p_t^(c)  = softmax(logits at theta_t + Delta_c)               (only c moved)
    D_c      = mean_tokens KL(p_t || p_t^(c))                     (how far c's step moved it)
    dL_c     = mean_tokens [CE(p_t^(c)) - CE(p_t)]                (what c's step bought on its
                                                                   own; < 0 = the loss fell)
    e_c      = -dL_c / D_c                                        (efficiency, per nat moved)

Cost: one reference forward at theta_t plus one lookahead per moving component on the
held-out rows; a lookahead whose component owns no parameter of the encoder pathway reuses
the reference's encoder outputs (the :class:`~commit_mllm.method.lookahead.CachedEncoderModel`
protocol), so it runs the LLM only.

Symbols -> variables: theta_t -> the balance meter's snapshot; D_c ->
``ProgressMeasurement.D[c]``; dL_c -> ``ProgressMeasurement.dL[c]``; e_c ->
:meth:`ProgressMeasurement.efficiency`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .balance import BalanceMeter
from .lookahead import eval_mode, select_rows, supervised_mask
from .measurement import kl_sum

__all__ = ["ProgressMeasurement", "measure_progress"]


@dataclass
class ProgressMeasurement:
    """Each component's held-out loss change and output change from one step.

    Attributes:
        step: The optimizer step t whose update was measured.
        D: Component -> D_c, KL(p_t || p_t^(c)) per supervised token, nats (0 when frozen
            or not updated).
        dL: Component -> dL_c, CE(p_t^(c)) - CE(p_t) per supervised token, nats.
        tokens: Supervised tokens measured (all ranks).
        ce: CE(p_t) per supervised token on the held-out rows.
        flags: Component -> ``"frozen"`` or ``"zero_update"`` (not measured).
        update_norms: Component -> ||Delta_c||_2.
    """

    step: int
    D: dict[str, float]
    dL: dict[str, float]
    tokens: int
    ce: float
    flags: dict[str, str] = field(default_factory=dict)
    update_norms: dict[str, float] = field(default_factory=dict)

    def efficiency(self, eps: float = 1e-12) -> dict[str, float]:
        """Component -> e_c = -dL_c / D_c (one estimate; noisy, smooth it over steps)."""
        return {c: -self.dL[c] / max(d, eps) for c, d in self.D.items() if c not in self.flags}


def supervised_targets(batch: Mapping[str, Any]) -> torch.Tensor:
    """[T] the labels at the supervised positions (the order of the meter's logits)."""
    labels = batch["labels"]
    return labels[:, 1:][supervised_mask(labels)]


def ce_sum(logits: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Cross-entropy of [T, V] logits against [T] targets, summed, computed in ``dtype``."""
    return torch.nn.functional.cross_entropy(logits.to(dtype), targets, reduction="sum").double()


@torch.no_grad()
def measure_progress(
    meter: BalanceMeter,
    batch: Mapping[str, Any],
    step: int,
    rows: int | float | None = None,
) -> ProgressMeasurement | None:
    """Measure the pending step's held-out progress on ``batch`` (see the module docstring).

    Call after ``optimizer.step()`` (the parameters are theta_{t+1}) and before the batch is
    trained on, while ``meter`` still keeps theta_t of every trainable component (built with
    ``snapshot="all"`` and ``keep_snapshot=True``). The parameters, buffers, gradients,
    optimizer state and the training RNG are left exactly as they were.

    Args:
        meter: The balance meter that snapshotted theta_t before the step.
        batch: Held-out rows (usually the next training micro-batch), on the model's device.
        step: The step t whose update is measured.
        rows: Measure on the first rows only (int rows or a fraction in (0, 1]).

    Returns:
        The measurement, or None when no snapshot is kept.
    """
    if not meter.saved.alive:
        return None
    missing = [c.name for c in meter.components.trainable if c.name not in meter.saved.saved]
    if missing:
        raise ValueError(
            f"measure_progress needs theta_t of every trainable component; {missing} not kept: "
            'build the BalanceMeter with snapshot="all", keep_snapshot=True'
        )
    n = batch["labels"].shape[0]
    keep = n if rows is None else (rows if isinstance(rows, int) else math.ceil(rows * n))
    if keep < n:
        if hasattr(meter.model, "select_rows"):
            batch = meter.model.select_rows(batch, None, keep)[0]
        else:
            batch = select_rows(batch, keep)
    norms, flags = meter.update_flags(skip_zero_update=True)
    flags.update({c.name: "zero_update" for c in meter.components if c.name not in norms})
    moving = [c.name for c in meter.components if c.name not in flags]
    targets = supervised_targets(batch)
    with meter.lookahead.preserved(), eval_mode(meter.model):
        sums = _branch_sums(meter, batch, targets, moving)
    if meter.all_reduce is not None:
        meter.all_reduce(sums)
    tokens = round(float(sums[-1]))
    scale = 1.0 / tokens if tokens else 0.0
    D = {c.name: 0.0 for c in meter.components}
    dL = dict(D)
    ce_ref = float(sums[0]) * scale
    for i, name in enumerate(moving):
        D[name] = max(float(sums[1 + 2 * i]) * scale, 0.0)
        dL[name] = float(sums[2 + 2 * i]) * scale - ce_ref
    return ProgressMeasurement(step, D, dL, tokens, ce_ref, flags, norms)


def _branch_sums(
    meter: BalanceMeter, batch: Mapping[str, Any], targets: torch.Tensor, moving: list[str]
) -> torch.Tensor:
    """[CE(p_t), KL_c, CE(p_t^(c)) for each moving c, tokens] as float64 sums over tokens."""
    la, dtype = meter.lookahead, meter.kl_dtype
    everyone = list(meter.saved.saved)
    with meter.saved.at(everyone), la.autocast():
        if la.cached:
            features = meter.model.encode(batch)
            ref = meter.model.decode(batch, features)
        else:
            features = None
            ref = la.forward_fn(meter.model, batch)
    out = [ce_sum(ref, targets, dtype)]
    for name in moving:
        use_cache = features is not None and name not in la.encoder_side
        with meter.saved.at([c for c in everyone if c != name]), la.autocast():
            if use_cache:
                logits = meter.model.decode(batch, features)
            else:
                logits = la.forward_fn(meter.model, batch)
        out += [kl_sum(ref, logits, meter.kl_chunk, dtype), ce_sum(logits, targets, dtype)]
    out.append(torch.tensor(float(targets.numel()), dtype=torch.float64, device=ref.device))
    return torch.stack([x.to(ref.device, torch.float64) for x in out])
