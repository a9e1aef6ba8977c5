"""What the balance meter measures: the KL sum behind D_c, and one estimate of the balance.

:func:`kl_sum` is sum_t KL(p_t || q_t) over supervised tokens, in float64;
:class:`BalanceMeasurement` holds D_c, kappa, kappa_c and the shares of one step
(METHOD.md, "Update significance D_c and kappa").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def kl_sum(
    ref_logits: torch.Tensor,
    new_logits: torch.Tensor,
    chunk: int = 64,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sum over tokens of KL(p || q), p = softmax(ref_logits), q = softmax(new_logits).

    Log-softmax and KL run in ``dtype`` (float64 by default: D_c goes down to 1e-10,
    far below bf16/fp16 and float32 resolution), ``chunk`` tokens at a time to bound memory.

    Args:
        ref_logits: [T, V] logits of p.
        new_logits: [T, V] logits of q.
        chunk: Tokens per chunk.
        dtype: Computation dtype (float32 or float64).

    Returns:
        A float64 scalar tensor on the logits' device: sum_t KL(p_t || q_t) in nats.
    """
    total = torch.zeros((), dtype=torch.float64, device=ref_logits.device)
    for i in range(0, ref_logits.shape[0], chunk):
        lp = torch.log_softmax(ref_logits[i : i + chunk].to(dtype), dim=-1)
        lq = torch.log_softmax(new_logits[i : i + chunk].to(dtype), dim=-1)
        total += (lp.exp() * (lp - lq)).sum(dtype=torch.float64)
    return total


@dataclass
class BalanceMeasurement:
    """One estimate of the balance between components (METHOD.md symbols in brackets).

    Attributes:
        step: Optimizer step t whose update was measured.
        D: Component -> update significance D_c in nats (unfloored; 0 for frozen parts).
        kappa: D_num / D_den for two components [kappa_t], clipped to ``kappa_clip``;
            None for n != 2 components or when no token was supervised.
        kappa_c: Component -> D_c / geometric_mean(D) [kappa_c], D floored at eps.
        shares: Component -> D_c / sum(D).
        flags: Component -> ``"frozen"`` (no trainable parameter) or ``"zero_update"``
            (its update was exactly zero); such a component's D_c is 0.
        tokens: Supervised tokens the estimate averaged over (all ranks).
        update_norms: Component -> ||Delta_c||_2, for the components whose theta_t was kept.
        pair: The (numerator, denominator) components of ``kappa``.
    """

    step: int
    D: dict[str, float]
    kappa: float | None
    kappa_c: dict[str, float]
    shares: dict[str, float]
    flags: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    update_norms: dict[str, float] = field(default_factory=dict)
    pair: tuple[str, str] | None = None

    @property
    def valid(self) -> bool:
        """True when the estimate covers supervised tokens and no component is flagged."""
        return self.tokens > 0 and not self.flags

    def log_kappa_c(self) -> dict[str, float]:
        """Component -> log kappa_c."""
        return {c: math.log(v) for c, v in self.kappa_c.items()}
