"""The coordinated learning-rate scheduler (CoMMIT-CLR), METHOD.md "Coordinated scheduler".

Each component c has a base rate eta_c and the shared schedule s(t); the applied rate is

    eta_c(t) = eta_c * s(t) * f_c(t)

where f_c is the CoMMIT factor, driven by the imbalance z_c = 2 (log kappa_c - log kappa*_c)
(see :mod:`commit_mllm.method.diagnostics`; two components: z_llm = log kappa - log kappa_target,
z_enc = -z_llm):

* ``integral`` (default), on each raw estimate:   log f_c <- log f_c - g(dt) * z_c
  (two components: log f_enc += g e_t, log f_llm -= g e_t, e_t = log kappa_t -
  log kappa_target), dt = training steps since the previous estimate (K when estimating
  every K steps). gamma is a gain per training step and g(dt) is that per-step controller
  compounded over the dt steps the estimate stands for:

      g(dt) = (1 - (1 - 4 gamma)^dt) / 4        (= gamma for dt = 1; ~ gamma dt when small)

  log kappa responds to log(eta_llm / eta_enc) with slope ~2 (METHOD.md), so one update
  moves e by -4 g e: the per-step controller shrinks e by (1 - 4 gamma) per step, and g(dt)
  shrinks it by the same (1 - 4 gamma)^dt per estimate. The plain product gamma * dt would
  overshoot (and oscillate) once 4 gamma dt > 1, so K would change the dynamics; g(dt) keeps
  them (for 4 gamma >= 1, where the per-step controller itself overshoots, g = gamma * dt);
* ``proportional``, on the window mean:            log f_c  = -gamma * z_bar_c
  (two components: f_enc = (kappa_bar / kappa_target)^gamma, f_llm = 1 / f_enc);
* ``none``: f_c = 1 (constant-LR baselines); ``replay``: f(t) read from a recorded run.

After each update the log-factors are projected onto {sum_c log f_c = 0, |log f_c| <= log m_c}
(the total step budget is held fixed: balancing moves budget between components). No
adjustment happens before the smoothing window (N steps) is first full (``min_estimates`` =
ceil(N / K) estimates), during warmup, or during ``hold_steps``.

Symbols -> variables: eta_c -> group ``base_lr``; s(t) -> :func:`shared_schedule`;
f_c -> :attr:`FactorController.factors`; gamma -> ``gamma``; dt -> ``dt``; g(dt) ->
:func:`integral_gain`; m ->
``max_factor``; ceil(N / K) -> ``min_estimates``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "CONTROLS",
    "RESPONSE_SLOPE",
    "SCHEDULES",
    "CoordinatedLR",
    "FactorController",
    "ObservedFactors",
    "integral_gain",
    "project_log_factors",
    "shared_schedule",
]

SCHEDULES = ("cosine", "linear", "constant")
CONTROLS = ("integral", "proportional", "none", "replay")
#: d e / d (log f_enc): log kappa moves with slope ~2 in log(eta_llm / eta_enc), which moves
#: by 2 per unit of log f_enc (log f_llm = -log f_enc) - METHOD.md, "Coordinated scheduler".
RESPONSE_SLOPE = 4.0


def integral_gain(gamma: float, dt: float = 1.0) -> float:
    """g(dt): the per-step integral gain ``gamma`` compounded over ``dt`` training steps.

    g = (1 - (1 - a gamma)^dt) / a with a = :data:`RESPONSE_SLOPE`: an estimate that stands for
    dt steps shrinks the error as much as dt per-step updates would (under log kappa's slope
    ~2 response). g(1) = gamma; for a gamma >= 1 (a per-step controller that overshoots
    already) g = gamma * dt.
    """
    a = RESPONSE_SLOPE
    if dt <= 1 or a * gamma >= 1:
        return gamma * dt
    return (1.0 - (1.0 - a * gamma) ** dt) / a


def shared_schedule(
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    kind: str = "cosine",
    min_ratio: float = 0.0,
) -> float:
    """s(t): linear warmup, then cosine / linear decay or constant.

    Follows the transformers convention (``get_cosine_schedule_with_warmup``):
    s(t) = t / warmup during warmup; then with progress p = (t - warmup) / (total - warmup),
    cosine: r + (1 - r) * 0.5 (1 + cos(pi p)); linear: r + (1 - r)(1 - p); r = ``min_ratio``.

    Args:
        step: Step t (0-based).
        total_steps: Total optimizer steps of the run.
        warmup_steps: Warmup steps.
        kind: ``cosine``, ``linear`` or ``constant``.
        min_ratio: Floor r of the decay as a fraction of the base rate.

    Returns:
        The multiplier s(t) in [0, 1].
    """
    if kind not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    if kind == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def project_log_factors(
    log_f: Mapping[str, float], limits: Mapping[str, float]
) -> dict[str, float]:
    """Euclidean projection onto {sum_c x_c = 0, |x_c| <= limits_c}.

    Finds the shift s with sum_c clip(x_c - s, -L_c, L_c) = 0 by bisection (the sum is
    monotone in s), so clipping never breaks the fixed total budget.
    """
    names = list(log_f)

    def total(s: float) -> float:
        return sum(min(max(log_f[c] - s, -limits[c]), limits[c]) for c in names)

    lo = min(log_f.values()) - max(limits.values())
    hi = max(log_f.values()) + max(limits.values())
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if total(mid) > 0:
            lo = mid
        else:
            hi = mid
    s = 0.5 * (lo + hi)
    return {c: min(max(log_f[c] - s, -limits[c]), limits[c]) for c in names}


class ObservedFactors:
    """What :class:`CoordinatedLR` reads of a controller whose measurements arrive on their own.

    The held-out rules (``progress``, ``line_search``) keep ``log_f`` (component -> log f_c)
    and move it in their ``observe``; kappa-driven updates and replay do not apply to them.
    """

    log_f: dict[str, float]

    @property
    def factors(self) -> dict[str, float]:
        """Component -> f_c."""
        return {c: math.exp(v) for c, v in self.log_f.items()}

    def update(self, *_args, **_kwargs) -> dict[str, float]:
        """Kappa-driven updates do not apply: measurements arrive through ``observe``."""
        return self.factors

    def replay_at(self, step: int) -> None:
        """No recorded trajectory: nothing to replay."""


class FactorController:
    """The CoMMIT factors f_c, independent of any optimizer (reusable under HF Trainer).

    Args:
        names: Components that get a factor (the trainable ones).
        control: ``integral``, ``proportional``, ``none`` or ``replay``.
        gamma: Controller gain per training step (an estimate covering dt steps moves the
            integral by :func:`integral_gain` (gamma, dt) * z).
        max_factor: m; every factor stays in [1/m, m].
        factor_caps: Optional tighter cap per component (e.g. ``{"encoder": 2.0}`` keeps a
            pretrained encoder within [1/2, 2]).
        min_estimates: No adjustment before this many valid estimates (ceil(N / K)).
        replay: For ``replay``: step -> {component: factor}, applied open loop; a step that
            is missing keeps the previous factors.
    """

    def __init__(
        self,
        names: Sequence[str],
        control: str = "integral",
        *,
        gamma: float = 0.02,
        max_factor: float = 10.0,
        factor_caps: Mapping[str, float] | None = None,
        min_estimates: int = 20,
        replay: Mapping[int, Mapping[str, float]] | None = None,
    ):
        if control not in CONTROLS:
            raise ValueError(f"control must be one of {CONTROLS}, got {control!r}")
        if max_factor < 1:
            raise ValueError(f"max_factor (m) must be >= 1, got {max_factor}")
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        if control == "replay" and not replay:
            raise ValueError("control 'replay' needs a recorded factor trajectory")
        caps = dict(factor_caps or {})
        unknown = sorted(set(caps) - set(names))
        if unknown:
            raise ValueError(f"factor_caps names unknown components {unknown}; known: {names}")
        self.names, self.control, self.gamma = list(names), control, gamma
        self.min_estimates = min_estimates
        self.limits = {c: math.log(min(max_factor, caps.get(c, max_factor))) for c in names}
        self.replay = {int(k): dict(v) for k, v in (replay or {}).items()}
        self.log_f = {c: 0.0 for c in self.names}

    @property
    def factors(self) -> dict[str, float]:
        """Component -> f_c."""
        return {c: math.exp(v) for c, v in self.log_f.items()}

    def update(
        self,
        z: Mapping[str, float],
        z_bar: Mapping[str, float],
        estimates: int,
        adjusting: bool = True,
        dt: float = 1.0,
    ) -> dict[str, float]:
        """Feed one valid estimate.

        Args:
            z: Component -> imbalance z_c of this estimate.
            z_bar: Component -> z_c averaged over the window.
            estimates: Valid estimates so far (this one included).
            adjusting: False during warmup / hold steps: estimates are taken, not acted on.
            dt: Training steps this estimate stands for (since the previous one).

        Returns:
            The factors after the update.
        """
        if self.control in ("none", "replay") or not adjusting:
            return self.factors
        if estimates < self.min_estimates:
            return self.factors
        if self.control == "integral":
            gain = integral_gain(self.gamma, dt)
            log_f = {c: self.log_f[c] - gain * z.get(c, 0.0) for c in self.names}
        else:
            log_f = {c: -self.gamma * z_bar.get(c, 0.0) for c in self.names}
        self.log_f = project_log_factors(log_f, self.limits)
        return self.factors

    def replay_at(self, step: int) -> None:
        """For ``replay``: take the recorded factors of ``step`` when there are some."""
        if self.control == "replay" and step in self.replay:
            rec = self.replay[step]
            self.log_f = {c: math.log(rec.get(c, 1.0)) for c in self.names}

    def state_dict(self) -> dict:
        """Log-factors (the replay table is configuration, not state)."""
        return {"log_f": dict(self.log_f)}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.log_f = {c: float(state["log_f"][c]) for c in self.names}


class CoordinatedLR:
    """Applies eta_c(t) = base_lr_c * s(t) * f_c(t) to named optimizer groups.

    Construction applies the rates of step 0. In the loop, after the optimizer step and the
    balance estimate of step t, call :meth:`observe` (when there is an estimate) and then
    :meth:`step`, which sets the rates of step t + 1 (kappa of step t sets the rates of
    step t + 1). Group ``base_lr`` is never overwritten.

    Args:
        optimizer: Optimizer whose groups carry ``name`` (a component) and ``base_lr``
            (or ``lr``, copied to ``base_lr`` on construction).
        total_steps: Total optimizer steps.
        warmup_steps: Warmup steps of the shared schedule (no factor adjustment then).
        schedule: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: Floor of the decay.
        controller: The factor controller (default: no factors, f_c = 1).
        hold_steps: Further steps without adjustment (e.g. while a fresh projector fits).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        total_steps: int,
        warmup_steps: int = 0,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
        controller: FactorController | None = None,
        hold_steps: int = 0,
    ):
        for i, group in enumerate(optimizer.param_groups):
            if "name" not in group:
                raise ValueError(f"optimizer group {i} has no 'name' (build it from Components)")
            group.setdefault("base_lr", group["lr"])
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        names = [g["name"] for g in optimizer.param_groups]
        self.optimizer = optimizer
        self.total_steps, self.warmup_steps = total_steps, warmup_steps
        self.schedule, self.min_lr_ratio, self.hold_steps = schedule, min_lr_ratio, hold_steps
        self.controller = controller or FactorController(names, "none")
        self.t = 0
        self._apply()

    @property
    def adjusting(self) -> bool:
        """Whether factor updates are allowed at the current step."""
        return self.t >= max(self.warmup_steps, self.hold_steps)

    def observe(
        self,
        z: Mapping[str, float],
        z_bar: Mapping[str, float],
        estimates: int,
        dt: float = 1.0,
    ) -> dict[str, float]:
        """Feed the estimate of the current step (standing for ``dt`` steps); returns f_c."""
        return self.controller.update(z, z_bar, estimates, self.adjusting, dt)

    def refresh(self) -> None:
        """Re-apply the current step's rates (after the controller changed its factors)."""
        self._apply()

    def step(self) -> None:
        """Advance to the next step and apply its rates."""
        self.t += 1
        self._apply()

    def _apply(self) -> None:
        self.controller.replay_at(self.t)
        s = shared_schedule(
            self.t, self.total_steps, self.warmup_steps, self.schedule, self.min_lr_ratio
        )
        factors = self.controller.factors
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * s * factors.get(group["name"], 1.0)

    def get_last_lr(self) -> dict[str, float]:
        """Component -> the rate now applied."""
        return {g["name"]: g["lr"] for g in self.optimizer.param_groups}

    def state_dict(self) -> dict:
        """Step counter and controller state."""
        return {"t": self.t, "controller": self.controller.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned and re-apply the rates."""
        self.t = int(state["t"])
        self.controller.load_state_dict(state["controller"])
        self._apply()
