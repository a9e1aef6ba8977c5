"""Efficiency control: learning-rate factors from held-out progress (ours, beyond the paper).

Each component's step is judged by what it buys on rows it was not trained on
(:mod:`commit_mllm.method.progress`): its efficiency e_c = -dL_c / D_c, the held-out loss decrease
per nat of output change. For cross-entropy, a quadratic model of the held-out loss along
component c's own step, with the KL D_c standing in for the curvature term, gives the
derivative of the loss with respect to log eta_c, normalised by D_c, as 1 - e_c: raising a
component's rate pays exactly when its efficiency is high. Moving rate towards the more
efficient component until the efficiencies are equal is the allocation of a fixed output
change that lowers the held-out loss most (to second order).

Rule, per estimate (K = steps since the previous estimate):

    x_c = EMA_h(-dL_c / S), y_c = EMA_h(D_c / S)   S = sum_c D_c of the estimate;
                                                    smoothed over ``horizon`` h steps
    e_c = x_c / y_c,     se_c^2 = delta-method variance of the ratio of means
    z_c = (e_c - e_a) / sqrt(se_c^2 + se_a^2)       a = the anchor component (the LLM)
    log f_c += gamma_+ K g(z_c) if z_c > 0 else gamma_- K g(z_c)
    g(z) = sign(z) clip((|z| - z0) / 2, 0, 1)

(dividing by S makes every estimate count alike: step sizes span orders of magnitude over
a run, and raw sums would be the efficiency of the few largest steps); then each log f_c is
clipped to [-log m_-, log m_+] (``factor_caps`` lowers m_+ per component; it never
limits a cut). Without an anchor (``anchor=None``) every component is
steered on its own towards e_c = 1, where the quadratic model says its step size is
right: z_c = (e_c - 1) / se_c (a per-component hypergradient on log eta_c).

Guard: a component whose step moved the output more than ``guard`` times the anchor's step
did (D_c > guard * D_a, this estimate) while its smoothed efficiency is below the anchor's is
cut at once, from the first estimate on, without waiting for a significant z-score:

    log f_c -= log(D_c / (guard D_a)) / 2            (D grows with the square of the step)

which is the rate that would have brought its output change back to ``guard`` times the
anchor's. Efficiencies of single steps are noisy; output changes are not, and an encoder that
moves the output many times more than the LLM for less return is the signature of a rate
set far too high: Adam's first steps at such a rate wipe out a pretrained encoder's features
within a few steps, so the guard cannot wait for evidence to accumulate.

Cuts are faster than raises (gamma_- > gamma_+): a component whose steps buy little of
what they cost can wreck what it knew within tens of steps (a pretrained encoder at a rate
far too high), while one that is too slow only loses time. The anchor keeps f_a = 1: its
rate is the one the user set (LLM rates are well known from recipes); every other
component's rate is found relative to it. There is no kappa target and no fixed total
budget. The dead zone z0 (``confidence``) keeps the factors still while the evidence is
within noise. :class:`~commit_mllm.method.strategies.CoMMITConfig` sets m_+ = 1 by default: the rule
only cuts (raising a pretrained encoder on its efficiency lost accuracy in every grid we ran).

Symbols -> variables: e_c -> :meth:`EfficiencyController.efficiency`; z_c ->
``EfficiencyController.last_z``; h -> ``horizon``; z0 -> ``confidence``; m_- / m_+ ->
``max_cut`` / ``max_raise`` (and ``factor_caps``); gamma_+ / gamma_- -> ``gamma`` /
``cut_gain``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from .progress import ProgressMeasurement
from .scheduler import ObservedFactors

__all__ = ["EfficiencyController"]

_MOMENTS = ("x", "y", "xx", "yy", "xy")


class EfficiencyController(ObservedFactors):
    """Factors f_c from smoothed held-out efficiencies (see the module docstring).

    It has the interface :class:`~commit_mllm.method.scheduler.CoordinatedLR` expects of a
    controller (``factors``, ``update``, ``replay_at``, state dicts); estimates arrive
    through :meth:`observe`.

    Args:
        names: Trainable components (each gets a factor).
        anchor: The component whose factor stays 1 (default ``llm``); None steers every
            component on its own towards e_c = 1.
        gamma: Gain of raises: the most log f_c grows per step of training.
        cut_gain: Gain of cuts: the most log f_c falls per step of training.
        horizon: Time constant h of the smoothing, in steps of training.
        confidence: Dead zone z0 of the z-score.
        max_cut: m_-; no factor goes below 1/m_-.
        max_raise: m_+; no factor goes above m_+.
        factor_caps: Tighter ceiling per component (raises only; cuts go to 1 / max_cut).
        min_estimates: No efficiency-driven adjustment before this many estimates.
        guard: Cut at once a component whose step moved the output more than ``guard``
            times the anchor's while its smoothed efficiency is below the anchor's, by
            log(D_c / (guard D_a)) / 2 (from the first estimate: a pretrained encoder at a
            rate far too high is wrecked within a few steps); None turns the guard off.
    """

    def __init__(
        self,
        names: Sequence[str],
        anchor: str | None = "llm",
        *,
        gamma: float = 0.05,
        cut_gain: float = 0.3,
        horizon: float = 50.0,
        confidence: float = 1.0,
        max_cut: float = 100.0,
        max_raise: float = 100.0,
        factor_caps: Mapping[str, float] | None = None,
        min_estimates: int = 5,
        guard: float | None = 1.0,
    ):
        if anchor is not None and anchor not in names:
            raise ValueError(f"anchor component {anchor!r} is not trainable; components: {names}")
        caps = dict(factor_caps or {})
        self.names, self.anchor = list(names), anchor
        self.gamma, self.cut_gain = gamma, cut_gain
        self.horizon, self.confidence = horizon, confidence
        self.min_estimates, self.guard = min_estimates, guard
        # A factor cap limits raises only: a cap set for a kappa-driven strategy's raises
        # must not stop this rule from cutting a rate set far too high.
        self.limits = {
            c: (-math.log(max_cut), math.log(min(max_raise, caps.get(c, max_raise)))) for c in names
        }
        self.log_f = {c: 0.0 for c in self.names}
        self.moments = {c: dict.fromkeys(_MOMENTS, 0.0) for c in self.names}
        self.weight = 0.0  # sum of the EMA weights (1 - prod(1 - alpha))
        self.weight_sq = 0.0  # sum of their squares: effective sample size weight^2 / weight_sq
        self.estimates = 0
        self.last_z: dict[str, float] = {}

    def observe(self, m: ProgressMeasurement, steps: int, adjusting: bool = True) -> None:
        """Feed one held-out measurement taken ``steps`` training steps after the last one.

        Each estimate's -dL_c and D_c are divided by the estimate's total output change
        sum_c D_c: step sizes span orders of magnitude over a run (Adam's first steps,
        warmup, a cut, the decay), and without it the smoothed efficiency would be the
        efficiency of the few largest steps.

        Args:
            m: The measurement.
            steps: Training steps since the previous measurement (K).
            adjusting: False while the factors must hold still (estimates still count).
        """
        if m.tokens == 0 or (self.anchor is not None and self.anchor in m.flags):
            return
        alpha = 1.0 - math.exp(-max(1, steps) / self.horizon)
        total = sum(m.D[c] for c in self.names if c not in m.flags)
        if total <= 0:
            return
        self.weight = alpha + (1 - alpha) * self.weight
        self.weight_sq = alpha * alpha + (1 - alpha) ** 2 * self.weight_sq
        for c in self.names:
            x, y = (-m.dL[c] / total, m.D[c] / total) if c not in m.flags else (0.0, 0.0)
            new = {"x": x, "y": y, "xx": x * x, "yy": y * y, "xy": x * y}
            for k, v in new.items():
                self.moments[c][k] += alpha * (v - self.moments[c][k])
        self.estimates += 1
        self.last_z = self._z_scores()
        if not adjusting:
            return
        cuts = self._guard(m) if self.guard is not None else {}
        for c in self.names:
            if c == self.anchor:
                continue
            lo, hi = self.limits[c]
            if c in cuts:
                self.log_f[c] = min(max(self.log_f[c] + cuts[c], lo), hi)
                continue
            if self.estimates < self.min_estimates:
                continue
            z = self.last_z.get(c, 0.0)
            g = math.copysign(min(max((abs(z) - self.confidence) / 2.0, 0.0), 1.0), z)
            gain = (self.gamma if g > 0 else self.cut_gain) * max(1, steps)
            self.log_f[c] = min(max(self.log_f[c] + gain * g, lo), hi)

    def _guard(self, m: ProgressMeasurement) -> dict[str, float]:
        """Component -> the guard's cut of log f_c on this estimate (< 0).

        A component gets one when this step moved the output more than ``guard`` x the
        anchor's step did while its smoothed efficiency is below the anchor's. The cut is
        the rate change that brings its output change back to ``guard`` x the anchor's:
        D_c grows with the square of its step (the KL is quadratic in a small update), so
        log f_c -= log(D_c / (guard D_a)) / 2.
        """
        if self.anchor is None or self.anchor in m.flags:
            return {}
        da = m.D[self.anchor]
        ea = self._stats(self.anchor)[0]
        out = {}
        for c in self.names:
            if c == self.anchor or c in m.flags or da <= 0 or m.D[c] <= self.guard * da:
                continue
            if self._stats(c)[0] < ea:
                out[c] = -0.5 * math.log(m.D[c] / (self.guard * da))
        return out

    def _stats(self, c: str) -> tuple[float, float]:
        """(e_c, se_c^2) from the bias-corrected EMA moments (delta method)."""
        mo = {k: v / max(self.weight, 1e-12) for k, v in self.moments[c].items()}
        x, y = mo["x"], mo["y"]
        if y <= 0:
            return 0.0, math.inf
        e = x / y
        var = mo["xx"] - x * x - 2 * e * (mo["xy"] - x * y) + e * e * (mo["yy"] - y * y)
        n = max(self.weight**2 / max(self.weight_sq, 1e-300), 1.0)  # effective sample size
        return e, max(var, 0.0) / (n * y * y)

    def _z_scores(self) -> dict[str, float]:
        ea, va = self._stats(self.anchor) if self.anchor is not None else (1.0, 0.0)
        out = {}
        for c in self.names:
            if c == self.anchor:
                continue
            e, v = self._stats(c)
            se = math.sqrt(v + va)
            if not math.isfinite(se) or e == ea:
                out[c] = 0.0
            else:  # no spread at all: the difference is certain
                out[c] = (e - ea) / se if se > 0 else math.copysign(math.inf, e - ea)
        return out

    def efficiency(self) -> dict[str, float]:
        """Component -> smoothed e_c."""
        return {c: self._stats(c)[0] for c in self.names}

    def state_dict(self) -> dict:
        """Factors and smoothing state."""
        return {
            "log_f": dict(self.log_f),
            "moments": {c: dict(v) for c, v in self.moments.items()},
            "weight": self.weight,
            "weight_sq": self.weight_sq,
            "estimates": self.estimates,
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.log_f = {c: float(state["log_f"][c]) for c in self.names}
        self.moments = {c: dict(state["moments"][c]) for c in self.names}
        self.weight, self.weight_sq = float(state["weight"]), float(state["weight_sq"])
        self.estimates = int(state["estimates"])
