"""The auxiliary regularizer of full CoMMIT (METHOD.md, "Auxiliary regularization").

An entropy bonus (confidence penalty) on the supervised tokens' output distribution,
weighted by the current imbalance so it vanishes when learning is balanced:

    L   = L_CE - alpha * w_t * H(p_theta)
    w_t = min(1, |log kappa_bar_t| / log tau)
    H   = mean over supervised tokens of -sum_v p_theta(v) log p_theta(v)

It keeps the output distribution moving, against the gradient diminishing of the lagging
component. With ``lagging_only`` the bonus's gradient reaches only the lagging component's
parameters (one extra backward). alpha = 0 disables it (CoMMIT-CLR).

Symbols -> variables: alpha -> ``alpha``; tau -> ``tau``; w_t -> :meth:`EntropyRegularizer.weight`;
|log kappa_bar_t| -> the tracker's bias index; H -> :func:`mean_entropy`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

__all__ = ["EntropyRegularizer", "mean_entropy"]


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of softmax(logits) over tokens, in nats, computed in float32.

    Args:
        logits: [T, V] logits at the supervised positions.

    Returns:
        A scalar (0 when T = 0).
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


class EntropyRegularizer:
    """The imbalance-weighted entropy bonus.

    Args:
        alpha: Strength; 0 disables the regularizer.
        tau: Imbalance (as a kappa ratio) at which the weight saturates to 1; > 1.
        lagging_only: Apply the bonus's gradient only to the lagging component.
    """

    def __init__(self, alpha: float = 0.0, tau: float = 10.0, lagging_only: bool = False):
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        if tau <= 1:
            raise ValueError(f"tau must be > 1, got {tau}")
        self.alpha, self.tau, self.lagging_only = alpha, tau, lagging_only

    @property
    def enabled(self) -> bool:
        """False when alpha = 0."""
        return self.alpha > 0

    def weight(self, bias_index: float) -> float:
        """w_t = min(1, |log kappa_bar_t| / log tau)."""
        return min(1.0, abs(bias_index) / math.log(self.tau))

    def loss(self, logits: torch.Tensor, bias_index: float) -> torch.Tensor:
        """The auxiliary term -alpha * w_t * H(p_theta), to add to the CE loss.

        Args:
            logits: [T, V] logits at the supervised positions (with grad).
            bias_index: |log kappa_bar_t| from the tracker (0 before any estimate).

        Returns:
            A scalar tensor (exactly 0, still attached to the graph, when disabled).
        """
        w = self.weight(bias_index) if self.enabled else 0.0
        if w == 0.0:
            return logits.sum() * 0.0
        return -self.alpha * w * mean_entropy(logits)

    def backward(
        self,
        ce: torch.Tensor,
        aux: torch.Tensor,
        lagging: Sequence[nn.Parameter] | None = None,
        scale: float = 1.0,
        backward_fn: Callable[..., None] | None = None,
    ) -> None:
        """Backward of CE + aux; with ``lagging_only`` aux reaches only ``lagging``.

        Args:
            ce: The task loss.
            aux: The value of :meth:`loss`.
            lagging: Parameters of the lagging component (required with ``lagging_only``).
            scale: Multiplier of both terms (e.g. 1 / gradient-accumulation steps).
            backward_fn: ``backward_fn(loss, **kwargs)`` instead of ``loss.backward()``
                (e.g. ``accelerator.backward``, which applies fp16 loss scaling).
        """
        backward_fn = backward_fn or (lambda loss, **kw: loss.backward(**kw))
        if not (self.lagging_only and aux.requires_grad and lagging):
            backward_fn((ce + aux) * scale)
            return
        backward_fn(ce * scale, retain_graph=True)
        grads = torch.autograd.grad(aux * scale, list(lagging), allow_unused=True)
        for p, g in zip(lagging, grads):
            if g is None:
                continue
            p.grad = g if p.grad is None else p.grad + g
