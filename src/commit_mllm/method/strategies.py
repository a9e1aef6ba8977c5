"""Strategies: CoMMIT, its variant and the baselines behind one interface, chosen by name.

METHOD.md, "Coordinated scheduler", "Auxiliary regularization" and "Baselines":

==============  ===================================================================
``constant``    fixed eta_enc, eta_llm (any ratio) with the shared schedule
``commit_clr``  the coordinated scheduler only (integral control by default)
``commit``      the coordinated scheduler + the imbalance-weighted entropy bonus
``feature_cd``  coordinate descent: blocks of B steps updating only one side, the
                feature (non-LLM) block first; the other side's optimizer state untouched
``language_cd`` the same with the LLM block first
``ogm_ge``      on-the-fly gradient modulation: g_c <- k_c g_c (+ Gaussian noise when
                k_c < 1), k_c = 1 - tanh(rho * max(0, log kappa_bar_c - log kappa*_c))
``replay``      factors f(t) recorded in an earlier run, applied open loop
==============  ===================================================================

Every strategy measures kappa the same way, so all can be compared on one plot. Strategies
that steer by kappa (``commit``, ``commit_clr``, ``ogm_ge``) measure every K steps
(``every``); the others measure only for the diagnostics (``diagnostics_every``; 0 = never).

Measuring costs: by default kappa is estimated every K = 16 steps on the first quarter of the
batch's rows (``every: 16``, ``rows: 0.25``), which keeps a step within 1.10x a plain step
(benchmarks/results/overhead.md). The controller's gain and window are defined per training
step, so K does not change its dynamics. ``exact: true`` is the exact estimate: every step,
all rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

import torch

from .components import Components

__all__ = [
    "DEFAULT_EVERY",
    "DEFAULT_ROWS",
    "STEERING",
    "STRATEGIES",
    "CoMMITConfig",
    "Strategy",
]

STRATEGIES = (
    "commit",
    "commit_clr",
    "progress",
    "line_search",
    "constant",
    "feature_cd",
    "language_cd",
    "ogm_ge",
    "replay",
)
_CONTROLLED = ("commit", "commit_clr")
#: Strategies whose decisions read kappa (the factor controller, OGM-GE's modulation).
STEERING = ("commit", "commit_clr", "ogm_ge", "progress")
#: K of ``CoMMITConfig()`` (measured: benchmarks/results/overhead.md).
DEFAULT_EVERY = 16
#: Row fraction of ``CoMMITConfig()``.
DEFAULT_ROWS = 0.25


def _float_values(cfg: object) -> Iterator[tuple[str, float]]:
    """(dotted key, value) of every float in a config's fields, inside mappings too."""
    stack = [(f.name, getattr(cfg, f.name)) for f in fields(cfg)]
    while stack:
        key, value = stack.pop()
        if isinstance(value, float):
            yield key, value
        elif isinstance(value, Mapping):
            stack += [(f"{key}.{k}", v) for k, v in value.items()]


@dataclass
class CoMMITConfig:
    """Every setting of the method (METHOD.md symbols in brackets).

    Attributes:
        strategy: One of :data:`STRATEGIES`.
        every: [K] estimate kappa at the last step of every block of K steps; None = 16
            (:data:`DEFAULT_EVERY`). Also the K of the non-steering strategies unless
            ``diagnostics_every`` is set.
        diagnostics_every: K of the strategies that do not steer by kappa (``constant``,
            ``feature_cd``, ``language_cd``, ``replay``), which measure it only for the
            diagnostics; 0 = never measure (no snapshot, no lookahead: a plain step);
            None = the same K as ``every``.
        rows: Measure on the first rows only: int rows or a fraction in (0, 1]; None = all.
        exact: The exact estimate: every step (K = 1) on all rows (overrides ``every``,
            ``diagnostics_every`` and ``rows``).
        dropout: ``replay`` (same dropout masks in every branch) or ``off`` (eval mode).
        kl_dtype: ``float64`` or ``float32`` for log-softmax and KL.
        snapshot: ``needed`` keeps theta_t only for the components a lookahead reads at
            theta_t; ``all`` for every trainable one (then every update norm is logged).
        offload: Keep theta_t in host memory; None = when the parameters are on CUDA.
        reference: p_t on a row subset: ``auto`` (sliced from the training forward when it
            was deterministic, after a one-time numerical check), ``slice`` or ``recompute``.
        window: [N] smoothing window in training steps (kappa_bar averages the estimates of
            the last N steps); no adjustment before the window is first full.
        span: Steps of smoothed values used by the oscillation index (default 5 N).
        kappa_target: Target of kappa = D_llm / D_encoder.
        component_targets: Relative targets of D_c for n components.
        bias_threshold: Bias index (log units) above which the state is biased.
        oscillation_threshold: Std of the smoothed imbalance for "oscillating".
        flip_threshold: Sign-flip rate of the smoothed imbalance for "oscillating".
        collapse_log_kappa: log kappa_bar above which collapse onto the language prior is
            reported.
        control: ``integral`` or ``proportional`` for the CoMMIT strategies.
        gamma: [gamma] controller gain.
        max_factor: [m] factors stay in [1/m, m].
        factor_caps: Tighter cap per component: both ways for the kappa-driven ``commit`` /
            ``commit_clr`` ([1/cap, cap]); a ceiling on raises only for ``progress`` and
            ``line_search`` (their cuts go to 1 / their ``max_cut``).
        hold_steps: Steps without adjustment after warmup starts (fresh projector fitting).
        alpha: [alpha] regularizer strength; None = 0.1 for ``commit``, 0 otherwise.
        tau: [tau] imbalance at which the regularizer weight saturates.
        lagging_only: Regularizer gradient only to the lagging component.
        llm_component: Name of the language-model component (coordinate descent, OGM-GE).
        cd_named_steps: [B_named] block length of the component a CD strategy is named for.
        cd_other_steps: [B_other] block length of the other side (<= B_named).
        ogm_rho: [rho] OGM-GE modulation strength.
        ogm_noise: Add Gaussian noise (std of the gradient) to modulated gradients.
        replay: For ``replay``: step -> {component: factor}.
        seed: Seed of the strategy's own random generator (OGM-GE noise).
        progress_gain: For ``progress``: the most log f_c grows per step of training.
        progress_cut_gain: For ``progress``: the most log f_c falls per step of training.
        progress_horizon: For ``progress``: smoothing time constant, in steps of training.
        progress_confidence: For ``progress``: dead zone of the efficiency z-score.
        progress_max_cut: For ``progress``: no factor goes below 1 / this.
        progress_max_raise: For ``progress``: no factor goes above this (1 = the rule only cuts:
            raising a pretrained encoder on its efficiency lost accuracy in every grid).
        progress_guard: For ``progress``: cut a component that moves the output more than
            this times the anchor while buying less per nat (None = off).
        progress_anchor: For ``progress``: the component whose rate is kept as set (None =
            ``llm_component``; ``"none"``: every component is steered on its own towards
            efficiency 1).
        progress_rows: For ``progress``: rows of the next batch measured on (int rows or a
            fraction in (0, 1]; None = all). ``rows`` does not apply: held-out p_t cannot be
            cut from the training forward, and a few rows carry too few answer tokens.
        progress_dense_steps: For ``progress``: also measure at every step below this one
            (a rate far too high wrecks a pretrained encoder within tens of steps), then
            every K.
        linesearch_alphas: For ``line_search``: path lengths tried every K steps (1 = where
            the component is; at least three distinct values).
        linesearch_gain: For ``line_search``: share of log alpha* a raise moves log f_c by.
        linesearch_cut_gain: For ``line_search``: the same for cuts.
        linesearch_smoothing: For ``line_search``: time constant, in estimates, of the average
            of the held-out loss curves alpha* is fitted to (1 = no averaging).
        linesearch_max_cut: For ``line_search``: no factor goes below 1 / this.
        linesearch_max_raise: For ``line_search``: no factor goes above this.
    """

    strategy: str = "commit"
    every: int | None = None
    diagnostics_every: int | None = None
    rows: int | float | None = DEFAULT_ROWS
    exact: bool = False
    dropout: str = "replay"
    kl_dtype: str = "float64"
    snapshot: str = "needed"
    offload: bool | None = None
    reference: str = "auto"
    window: int = 20
    span: int | None = None
    kappa_target: float = 1.0
    component_targets: dict[str, float] | None = None
    bias_threshold: float = math.log(3.0)
    oscillation_threshold: float = 1.0
    flip_threshold: float = 0.05
    collapse_log_kappa: float = 5.0
    control: str = "integral"
    gamma: float = 0.02
    max_factor: float = 10.0
    factor_caps: dict[str, float] = field(default_factory=dict)
    hold_steps: int = 0
    alpha: float | None = None
    tau: float = 10.0
    lagging_only: bool = False
    llm_component: str = "llm"
    cd_named_steps: int = 10
    cd_other_steps: int = 10
    ogm_rho: float = 1.0
    ogm_noise: bool = True
    replay: dict[int, dict[str, float]] | None = None
    seed: int = 0
    progress_gain: float = 0.05
    progress_cut_gain: float = 0.3
    progress_horizon: float = 50.0
    progress_confidence: float = 1.0
    progress_max_cut: float = 100.0
    progress_max_raise: float = 1.0
    progress_guard: float | None = 1.0
    progress_anchor: str | None = None
    progress_rows: int | float | None = None
    progress_dense_steps: int = 48
    linesearch_alphas: tuple[float, ...] = (0.5, 1.0, 2.0)
    linesearch_gain: float = 0.3
    linesearch_cut_gain: float = 0.3
    linesearch_smoothing: float = 4.0
    linesearch_max_cut: float = 100.0
    linesearch_max_raise: float = 100.0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every setting; the error names the key and what is allowed."""
        for i, a in enumerate(self.linesearch_alphas):
            if not (isinstance(a, (int, float)) and math.isfinite(a) and a > 0):
                raise ValueError(
                    f"commit.linesearch_alphas.{i} = {a!r} is invalid: use a finite number > 0"
                )
        checks = [
            ("strategy", self.strategy in STRATEGIES, f"one of {', '.join(STRATEGIES)}"),
            ("every", self.every is None or _int_at_least(self.every, 1), "an integer >= 1"),
            (
                "diagnostics_every",
                self.diagnostics_every is None or _int_at_least(self.diagnostics_every, 0),
                "an integer >= 0 (0 = never measure)",
            ),
            ("dropout", self.dropout in ("replay", "off"), "'replay' or 'off'"),
            ("kl_dtype", self.kl_dtype in ("float64", "float32"), "'float64' or 'float32'"),
            ("snapshot", self.snapshot in ("needed", "all"), "'needed' or 'all'"),
            (
                "reference",
                self.reference in ("auto", "slice", "recompute"),
                "auto, slice, recompute",
            ),
            ("window", isinstance(self.window, int) and self.window >= 1, "an integer >= 1"),
            ("kappa_target", self.kappa_target > 0, "a number > 0"),
            ("control", self.control in ("integral", "proportional"), "integral, proportional"),
            ("gamma", self.gamma >= 0, "a number >= 0"),
            ("max_factor", self.max_factor >= 1, "a number >= 1"),
            ("hold_steps", self.hold_steps >= 0, "an integer >= 0"),
            ("alpha", self.alpha is None or self.alpha >= 0, "a number >= 0"),
            ("tau", self.tau > 1, "a number > 1"),
            ("cd_named_steps", self.cd_named_steps >= 1, "an integer >= 1"),
            (
                "cd_other_steps",
                1 <= self.cd_other_steps <= self.cd_named_steps,
                "an integer in [1, cd_named_steps]",
            ),
            ("ogm_rho", self.ogm_rho >= 0, "a number >= 0"),
            ("progress_gain", self.progress_gain >= 0, "a number >= 0"),
            ("progress_cut_gain", self.progress_cut_gain >= 0, "a number >= 0"),
            ("progress_horizon", self.progress_horizon >= 1, "a number >= 1"),
            ("progress_confidence", self.progress_confidence >= 0, "a number >= 0"),
            ("progress_max_cut", self.progress_max_cut >= 1, "a number >= 1"),
            ("progress_max_raise", self.progress_max_raise >= 1, "a number >= 1"),
            ("progress_dense_steps", self.progress_dense_steps >= 0, "an integer >= 0"),
            (
                "linesearch_alphas",
                len(set(self.linesearch_alphas)) >= 3
                and 1.0 in self.linesearch_alphas
                and all(a > 0 for a in self.linesearch_alphas),
                "at least three distinct path lengths > 0, 1 among them",
            ),
            ("linesearch_gain", 0 <= self.linesearch_gain <= 1, "a number in [0, 1]"),
            ("linesearch_cut_gain", 0 <= self.linesearch_cut_gain <= 1, "a number in [0, 1]"),
            ("linesearch_max_cut", self.linesearch_max_cut >= 1, "a number >= 1"),
            ("linesearch_smoothing", self.linesearch_smoothing >= 1, "a number >= 1"),
            ("linesearch_max_raise", self.linesearch_max_raise >= 1, "a number >= 1"),
        ]
        for key, ok, allowed in checks:
            if not ok:
                raise ValueError(f"commit.{key} = {getattr(self, key)!r} is invalid: use {allowed}")
        for key, value in _float_values(self):  # inf passes the comparisons above
            if not math.isfinite(value):
                raise ValueError(f"commit.{key} = {value!r} is invalid: use a finite number")
        for key in ("rows", "progress_rows"):
            rows = getattr(self, key)
            if rows is not None and not (
                (isinstance(rows, int) and rows >= 1) or (isinstance(rows, float) and 0 < rows <= 1)
            ):
                raise ValueError(f"commit.{key} = {rows!r} is invalid: use an int >= 1 or (0, 1]")
        if self.strategy == "commit_clr" and self.alpha:
            raise ValueError(
                "commit.alpha > 0 with strategy commit_clr: commit_clr is CoMMIT without the "
                "regularizer; use strategy=commit"
            )
        if self.strategy == "replay" and not self.replay:
            raise ValueError("strategy 'replay' needs commit.replay (step -> factors)")

    @property
    def steers_by_kappa(self) -> bool:
        """Whether this strategy's decisions read kappa (see :data:`STEERING`)."""
        return self.strategy in STEERING

    @property
    def effective_every(self) -> int:
        """K the meter uses: 0 = never measure (only for strategies that do not steer)."""
        if self.exact:
            return 1
        every = DEFAULT_EVERY if self.every is None else self.every
        searching = self.strategy == "line_search"  # its line search runs at the estimates
        if self.steers_by_kappa or searching or self.diagnostics_every is None:
            return every
        return self.diagnostics_every

    @property
    def effective_rows(self) -> int | float | None:
        """Rows the meter measures on (None = all)."""
        return None if self.exact else self.rows

    @property
    def effective_alpha(self) -> float:
        """The regularizer strength this strategy uses."""
        if self.strategy != "commit":
            return 0.0
        return 0.1 if self.alpha is None else self.alpha

    @property
    def effective_control(self) -> str:
        """The factor control this strategy uses (``none`` for the baselines)."""
        if self.strategy in _CONTROLLED:
            return self.control
        return "replay" if self.strategy == "replay" else "none"

    @property
    def effective_snapshot(self) -> str:
        """Which theta_t the meter keeps: every trainable component's for ``progress``."""
        return "all" if self.strategy == "progress" else self.snapshot

    @property
    def effective_keep_snapshot(self) -> bool:
        """Whether theta_t outlives the step (``progress`` measures it on the next batch)."""
        return self.strategy == "progress"

    @property
    def effective_dense_steps(self) -> int:
        """The first steps on which ``progress`` measures every step (0 for the others)."""
        return self.progress_dense_steps if self.strategy == "progress" else 0

    def to_dict(self) -> dict:
        """Plain-dict form (for logs and checkpoints)."""
        return dataclasses.asdict(self)


def _int_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


class Strategy:
    """The gradient-side behaviour of a strategy: coordinate-descent gating, OGM-GE.

    The LR side lives in :class:`~commit_mllm.method.scheduler.FactorController` and the loss side
    in :class:`~commit_mllm.method.regularizer.EntropyRegularizer`; this class only touches
    gradients, between backward and clipping.

    Args:
        config: The settings.
        components: The model's components.
    """

    def __init__(self, config: CoMMITConfig, components: Components):
        self.config, self.components = config, components
        self.name = config.strategy
        self.blocks: list[tuple[list[str], int]] = []
        if self.name in ("feature_cd", "language_cd"):
            self.blocks = self._cd_blocks()
        self.generator: torch.Generator | None = None
        if self.name == "ogm_ge" and config.ogm_noise:
            self.generator = torch.Generator().manual_seed(config.seed)

    def _cd_blocks(self) -> list[tuple[list[str], int]]:
        llm = self.config.llm_component
        if llm not in self.components:
            raise ValueError(
                f"commit.llm_component = {llm!r} is not a component; components: "
                f"{self.components.names}"
            )
        features = [n for n in self.components.names if n != llm]
        named, other = (features, [llm]) if self.name == "feature_cd" else ([llm], features)
        return [(named, self.config.cd_named_steps), (other, self.config.cd_other_steps)]

    def active(self, step: int) -> list[str]:
        """Components whose parameters update at ``step`` (all but during CD)."""
        if not self.blocks:
            return self.components.names
        period = sum(n for _, n in self.blocks)
        pos = step % period
        for names, length in self.blocks:
            if pos < length:
                return names
            pos -= length
        raise AssertionError("unreachable")

    @torch.no_grad()
    def apply(self, step: int, z_bar: Mapping[str, float]) -> dict[str, float]:
        """Gate (CD) or modulate (OGM-GE) the gradients of ``step`` in place.

        Args:
            step: Optimizer step.
            z_bar: Component -> windowed imbalance z_c (from the tracker; may be empty).

        Returns:
            Component -> gradient coefficient applied (1 = untouched, 0 = gated off).
        """
        coeffs = {n: 1.0 for n in self.components.names}
        if self.blocks:
            active = set(self.active(step))
            for c in self.components:
                if c.name not in active:
                    coeffs[c.name] = 0.0
                    # grad None: torch optimizers skip the parameter, its state untouched.
                    for p in c.params:
                        p.grad = None
        elif self.name == "ogm_ge":
            for c in self.components:
                k = 1.0 - math.tanh(self.config.ogm_rho * max(0.0, z_bar.get(c.name, 0.0) / 2))
                coeffs[c.name] = k
                if k < 1.0:
                    self._modulate(c.params, k)
        return coeffs

    def _modulate(self, params, k: float) -> None:
        for p in params:
            if p.grad is None:
                continue
            std = float(p.grad.float().std()) if p.grad.numel() > 1 else 0.0
            p.grad.mul_(k)
            if self.generator is not None and std > 0:
                noise = torch.randn(p.grad.shape, generator=self.generator, dtype=torch.float32)
                p.grad.add_(noise.to(p.grad.device, p.grad.dtype), alpha=std)

    def state_dict(self) -> dict:
        """The noise generator's state (OGM-GE)."""
        return {"generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        if self.generator is not None and state.get("generator") is not None:
            self.generator.set_state(state["generator"])
