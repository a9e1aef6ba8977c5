"""Held-out line search along each component's recent path (this project's rule, not the paper's).

``progress`` judges one step by what it buys on the next batch. One step of a component is
mostly noise, and the noise of a step costs held-out loss at once while its signal pays off
only after the other components adapt to it (short-horizon bias: greedy one-step signals
prefer rates that are too small, Wu et al., ICLR 2018). This rule judges the path a
component travelled over the last H optimizer steps instead, where the signal has added up
(~H) and the noise has partly cancelled (~sqrt(H)), and asks the question a learning rate
answers: would that path have been better shorter or longer?

Every K steps (the estimate steps, H = K), on the next batch before it is trained on (rows
the path never trained on), with dropout off, for each steered component c:

    P_c          = theta_c(now) - theta_c(H steps ago)         (its path; others stay put)
    L_c(alpha)   = CE(theta_c(H steps ago) + alpha P_c)       alpha in {1/2, 1, 2} (settable)
    Lbar_c       = EMA over estimates of the curve L_c, weight 1/h     (h = ``smoothing``)
    Lbar_c(alpha) ~= a + b alpha + q alpha^2                  (least squares)
    alpha*_c     = -b / (2 q) if q > 0, else the best alpha tried; clipped to [1/4, 4]
    log f_c     += g_- log alpha*_c  if alpha*_c < 1 (cut)    g_+ log alpha*_c otherwise (raise)
    log f_c      clipped to [-log m_-, log m_+]

With Adam the path's length is about proportional to the rate (its steps are normalised), so
a path best at alpha* times its length asks for alpha* times the rate. One estimate's curve is
fitted on one small batch and its alpha* jumps between the clip limits; averaging the curves
(least squares is linear in the losses, so this averages the fits' coefficients) before taking
the vertex gives a stable alpha*. The gains are equal by default: with unequal ones a noisy
alpha* that is symmetric in log drifts the factor towards the side with the larger gain (a
measured failure: with g_- = 2 g_+ and no averaging every run ended at the floor).
The anchor component (the LLM) keeps f = 1: its rate is the one the user set, and every other
component's rate is found relative to it, within the range [1/m_-, m_+] around the set rate.
A factor the rule wanted to move past its bound is held there and reported
(:attr:`LineSearchController.at_bound`).

Cost per estimate: one reference forward plus ``len(alphas) - 1`` forwards per steered
component on the held-out rows, and one copy of the steered components' parameters (the
path's start). Kept as an estimate every K = 16 steps, that is about a tenth of a step's cost.

Symbols -> variables: P_c -> :meth:`PathSnapshot.at`; L_c(alpha) ->
``LineSearchMeasurement.losses[c]``; alpha*_c -> ``LineSearchMeasurement.best_alpha[c]``;
g_+ / g_- -> ``gain`` / ``cut_gain``; m_- / m_+ -> ``max_cut`` / ``max_raise``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .components import Components
from .lookahead import eval_mode
from .progress import ce_sum, supervised_targets
from .scheduler import ObservedFactors

__all__ = ["LineSearchController", "LineSearchMeasurement", "PathSnapshot", "best_alpha"]

ALPHA_RANGE = (0.25, 4.0)
"""alpha* is clipped to this range: one estimate moves a rate by at most 4x (times the gain)."""


@dataclass
class LineSearchMeasurement:
    """Held-out losses along each steered component's path from one estimate.

    Attributes:
        step: The optimizer step after which the losses were measured.
        alphas: The path lengths tried (1 = where the component is now).
        losses: Component -> held-out CE per supervised token at each alpha.
        best_alpha: Component -> alpha*_c of the quadratic fit.
        tokens: Supervised tokens measured (all ranks).
    """

    step: int
    alphas: tuple[float, ...]
    losses: dict[str, list[float]]
    best_alpha: dict[str, float]
    tokens: int


def best_alpha(alphas: Sequence[float], losses: Sequence[float]) -> float:
    """alpha* of the least-squares quadratic through (alpha, loss), clipped to ALPHA_RANGE.

    A convex fit gives its minimum; a flat or concave one the best alpha tried.

    Args:
        alphas: At least three distinct path lengths.
        losses: Held-out loss at each.

    Returns:
        The path length the fit prefers.
    """
    x = torch.tensor(list(alphas), dtype=torch.float64)
    y = torch.tensor(list(losses), dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x, x * x], dim=1)
    _a, b, q = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1).tolist()
    lo, hi = ALPHA_RANGE
    if q > 1e-15:
        return min(max(-b / (2 * q), lo), hi)
    return float(x[int(torch.argmin(y))])


class PathSnapshot:
    """The steered components' parameters at the start of their current path.

    Args:
        components: The model's components.
        names: The components whose path is kept.
        offload: Keep the copy in host memory (pinned when on CUDA).
    """

    def __init__(self, components: Components, names: Sequence[str], offload: bool = False):
        self.components, self.names, self.offload = components, list(names), offload
        self.start: dict[str, list[torch.Tensor]] = {}

    @property
    def alive(self) -> bool:
        """Whether a path start is kept."""
        return bool(self.start)

    @torch.no_grad()
    def mark(self) -> None:
        """The current parameters become the start of the next path."""
        for name in self.names:
            params = self.components[name].params
            if self.offload:
                self.start[name] = [p.detach().to("cpu", copy=True) for p in params]
            else:
                self.start[name] = [p.detach().clone() for p in params]

    @contextlib.contextmanager
    @torch.no_grad()
    def at(self, name: str, alpha: float) -> Iterator[None]:
        """Component ``name`` at start + alpha (now - start) inside the context.

        The parameters are restored bitwise on exit (the current values are copied aside).
        """
        params = self.components[name].params
        now = [p.detach().clone() for p in params]
        try:
            for p, s, n in zip(params, self.start[name], now):
                s = s.to(p.device, non_blocking=True)
                p.copy_(s + alpha * (n - s))
            yield
        finally:
            for p, n in zip(params, now):
                p.copy_(n)


def _ce_and_tokens(
    model: nn.Module, forward_fn: Callable, batch: Mapping[str, Any]
) -> torch.Tensor:
    """[sum of CE over the supervised tokens, token count] in float64."""
    targets = supervised_targets(batch)
    ce = ce_sum(forward_fn(model, batch), targets, torch.float32)
    return torch.stack([ce, torch.tensor(float(targets.numel()), dtype=torch.float64)])


@torch.no_grad()
def measure_paths(
    model: nn.Module,
    forward_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor],
    batch: Mapping[str, Any],
    path: PathSnapshot,
    alphas: Sequence[float],
    step: int,
    all_reduce: Callable[[torch.Tensor], Any] | None = None,
) -> LineSearchMeasurement:
    """Held-out CE along each kept path, in eval mode (see the module docstring).

    Args:
        model: The model at its current parameters.
        forward_fn: ``forward_fn(model, batch) -> [T, V]`` logits at the supervised positions.
        batch: Rows not trained on yet (the next batch).
        path: The paths' starts.
        alphas: Path lengths to try (1 is the current parameters).
        step: The step just taken.
        all_reduce: In-place SUM all-reduce for multi-process training.

    Returns:
        The measurement; parameters, buffers and the training mode are left as they were.
    """
    with eval_mode(model):
        ref = _ce_and_tokens(model, forward_fn, batch)
        sums = [ref]
        for name in path.names:
            for alpha in alphas:
                if alpha != 1.0:
                    with path.at(name, alpha):
                        sums.append(_ce_and_tokens(model, forward_fn, batch))
    flat = torch.stack([s.to(ref.device) for s in sums])  # [n, 2]
    if all_reduce is not None:
        all_reduce(flat)
    tokens = float(flat[0, 1])
    ce = (flat[:, 0] / max(tokens, 1.0)).tolist()
    losses, i = {}, 1
    for name in path.names:
        row = []
        for alpha in alphas:
            if alpha == 1.0:
                row.append(ce[0])
            else:
                row.append(ce[i])
                i += 1
        losses[name] = row
    best = {c: best_alpha(alphas, v) for c, v in losses.items()} if tokens else {}
    return LineSearchMeasurement(step, tuple(alphas), losses, best, round(tokens))


@dataclass
class LineSearchController(ObservedFactors):
    """Factors f_c moved by log alpha*_c of each held-out line search.

    It has the interface :class:`~commit_mllm.method.scheduler.CoordinatedLR` expects of a
    controller (``factors``, ``update``, ``replay_at``, state dicts); measurements arrive
    through :meth:`observe`.

    Args:
        names: Trainable components.
        anchor: The component whose factor stays 1 (the LLM); None steers every component.
        gain: g_+, the share of log alpha* a raise moves log f_c by.
        cut_gain: g_-, the same for cuts.
        max_cut: m_-; no factor goes below 1 / m_-.
        max_raise: m_+; no factor goes above m_+.
        factor_caps: A lower ceiling m_+ per component (never a limit on cuts).
        smoothing: Time constant h, in estimates, of the average of the loss curves that
            alpha* is fitted to (1 = each estimate on its own).
    """

    names: list[str]
    anchor: str | None = "llm"
    gain: float = 0.3
    cut_gain: float = 0.3
    max_cut: float = 100.0
    max_raise: float = 100.0
    factor_caps: dict[str, float] = field(default_factory=dict)
    smoothing: float = 4.0
    log_f: dict[str, float] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    alpha: dict[str, float] = field(default_factory=dict)
    at_bound: dict[str, str] = field(default_factory=dict)
    estimates: int = 0

    def __post_init__(self) -> None:
        if self.anchor is not None and self.anchor not in self.names:
            raise ValueError(f"anchor component {self.anchor!r} is not trainable: {self.names}")
        self.log_f = {c: self.log_f.get(c, 0.0) for c in self.names}

    @property
    def steered(self) -> list[str]:
        """The components whose factor the rule moves."""
        return [c for c in self.names if c != self.anchor]

    def observe(self, m: LineSearchMeasurement, adjusting: bool = True) -> None:
        """Average the loss curves, fit alpha*, move each steered factor within its range.

        Args:
            m: The measurement.
            adjusting: False while the factors must hold still (warmup; curves still count).
        """
        if not m.tokens:
            return
        self.estimates += 1
        w = 1.0 / max(1.0, self.smoothing)
        for c, losses in m.losses.items():
            old = self.curves.get(c)
            self.curves[c] = (
                list(losses) if old is None else [o + w * (x - o) for o, x in zip(old, losses)]
            )
            self.alpha[c] = best_alpha(m.alphas, self.curves[c])
        if not adjusting:
            return
        lo = -math.log(self.max_cut)
        for c, alpha in self.alpha.items():
            hi = math.log(min(self.max_raise, self.factor_caps.get(c, self.max_raise)))
            move = math.log(alpha) * (self.cut_gain if alpha < 1 else self.gain)
            wanted = self.log_f[c] + move
            self.log_f[c] = min(max(wanted, lo), hi)
            if wanted < lo - 1e-12:
                self.at_bound[c] = "floor"
            elif wanted > hi + 1e-12:
                self.at_bound[c] = "ceiling"
            else:
                self.at_bound.pop(c, None)

    def state_dict(self) -> dict:
        """Factors, bound flags and the estimate count."""
        return {
            "log_f": dict(self.log_f),
            "at_bound": dict(self.at_bound),
            "estimates": self.estimates,
            "curves": {c: list(v) for c, v in self.curves.items()},
            "alpha": dict(self.alpha),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.log_f = {c: float(state["log_f"][c]) for c in self.names}
        self.at_bound = dict(state.get("at_bound", {}))
        self.estimates = int(state["estimates"])
        self.curves = {c: [float(x) for x in v] for c, v in state.get("curves", {}).items()}
        self.alpha = {c: float(v) for c, v in state.get("alpha", {}).items()}
