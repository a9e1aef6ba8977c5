"""CoMMIT for any PyTorch loop: the meter, tracker, scheduler, regularizer and strategy wired.

One training step, in order (METHOD.md, "Update significance" and "Coordinated scheduler")::

    logits = commit.forward(batch)                 # training forward, [T, V] supervised logits
    ce = F.cross_entropy(logits, targets)
    aux = commit.aux_loss(logits)                  # -alpha w_t H (0 unless strategy=commit)
    commit.backward(ce, aux)                       # (lagging_only needs its own backward)
    grad_norms = commit.after_backward()           # CD gating / OGM-GE modulation
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    commit.before_step()                           # snapshot theta_t when kappa is due
    optimizer.step()
    report = commit.after_step()                   # kappa -> kappa_bar -> factors -> next LRs
    optimizer.zero_grad()

kappa is estimated at the last step of every block of K steps (``config.effective_every``;
0 = never). An estimate stands for the dt training steps since the previous one: the
integral controller moves by gamma * dt * e_t, and the tracker's window spans N steps, so
K does not change the controller's dynamics (METHOD.md, "Coordinated scheduler").
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .balance import BalanceMeter
from .components import Components, check_param_groups, component_grad_norms
from .diagnostics import BalanceState, BalanceTracker
from .efficiency import EfficiencyController
from .linesearch import LineSearchController, LineSearchMeasurement, PathSnapshot, measure_paths
from .lookahead import ForwardFn
from .measurement import BalanceMeasurement
from .progress import ProgressMeasurement, measure_progress
from .regularizer import EntropyRegularizer
from .scheduler import CoordinatedLR, FactorController
from .strategies import CoMMITConfig, Strategy

__all__ = ["CoMMIT", "StepReport"]


@dataclass
class StepReport:
    """What one optimizer step did, for logging.

    Attributes:
        step: The step t that was taken.
        lrs: Component -> learning rate used at step t.
        factors: Component -> CoMMIT factor f_c after this step's update.
        measurement: The balance estimate of step t, or None when not due.
        balance: The smoothed state after this step.
        grad_norms: Component -> ||g_c|| after backward (before gating and clipping), on
            the steps that estimate kappa.
        grad_coeffs: Component -> gradient coefficient of the strategy (CD, OGM-GE).
        aux_weight: w_t of the regularizer at this step.
    """

    step: int
    lrs: dict[str, float]
    factors: dict[str, float]
    measurement: BalanceMeasurement | None
    balance: BalanceState
    grad_norms: dict[str, float] = field(default_factory=dict)
    grad_coeffs: dict[str, float] = field(default_factory=dict)
    aux_weight: float = 0.0
    progress: ProgressMeasurement | None = None
    efficiency: dict[str, float] = field(default_factory=dict)
    efficiency_z: dict[str, float] = field(default_factory=dict)
    line_search: LineSearchMeasurement | None = None
    search_alpha: dict[str, float] = field(default_factory=dict)
    at_bound: dict[str, str] = field(default_factory=dict)

    def as_log(self) -> dict[str, Any]:
        """Flat ``{key: scalar or str}`` record (``kappa``, ``D/<c>``, ``lr/<c>`` ...)."""
        m, b = self.measurement, self.balance
        rec: dict[str, Any] = {
            "step": self.step,
            "kappa_bar": b.kappa_bar,
            "state": b.state,
            "bias_index": b.bias_index,
            "oscillation_index": b.oscillation_index,
            "flip_rate": b.flip_rate,
            "collapse": b.collapse,
            "aux_weight": self.aux_weight,
        }
        rec.update({f"lr/{c}": v for c, v in self.lrs.items()})
        rec.update({f"factor/{c}": v for c, v in self.factors.items()})
        rec.update({f"grad_norm/{c}": v for c, v in self.grad_norms.items()})
        rec.update({f"grad_coeff/{c}": v for c, v in self.grad_coeffs.items()})
        if m is not None:
            rec["kappa"] = m.kappa
            rec["tokens"] = m.tokens
            rec.update({f"D/{c}": v for c, v in m.D.items()})
            rec.update({f"kappa_c/{c}": v for c, v in m.kappa_c.items()})
            rec.update({f"share/{c}": v for c, v in m.shares.items()})
            rec.update({f"update_norm/{c}": v for c, v in m.update_norms.items()})
            rec.update({f"flag/{c}": v for c, v in m.flags.items()})
        if self.progress is not None:
            rec["heldout_ce"] = self.progress.ce
            rec.update({f"dL/{c}": v for c, v in self.progress.dL.items()})
        rec.update({f"efficiency/{c}": v for c, v in self.efficiency.items()})
        rec.update({f"efficiency_z/{c}": v for c, v in self.efficiency_z.items()})
        if self.line_search is not None and self.line_search.losses:
            ls = self.line_search
            rec["heldout_ce"] = next(iter(ls.losses.values()))[ls.alphas.index(1.0)]
            rec.update({f"alpha_raw/{c}": v for c, v in ls.best_alpha.items()})
            rec.update({f"alpha_star/{c}": v for c, v in self.search_alpha.items()})
        rec.update({f"at_bound/{c}": v for c, v in self.at_bound.items()})
        return rec


class CoMMIT:
    """Coordinated multimodal instruction tuning for a plain PyTorch loop.

    Args:
        model: The model (ideally a :class:`~commit_mllm.method.lookahead.CachedEncoderModel`).
        optimizer: Built from ``components.param_groups()`` (checked).
        components: The model's components.
        config: The method's settings (strategy by name).
        total_steps: Optimizer steps of the run (for the shared schedule).
        warmup_steps: Warmup steps of the shared schedule.
        schedule: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: Floor of the decay.
        forward_fn: ``forward_fn(model, batch) -> [T, V]`` supervised logits; default: the
            model's encode/decode, else ``model(**batch).logits`` at supervised positions.
        autocast: Context-manager factory of the training forward (reused by the meter).
        all_reduce: In-place SUM all-reduce for multi-process training.
        sharded: Parameters and gradients are FSDP shards (``use_orig_params``): gradient
            and update norms are summed over ranks; pass the FSDP-wrapped model and a
            ``forward_fn`` that calls it, so every lookahead gathers the parameters.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        components: Components,
        config: CoMMITConfig | None = None,
        *,
        total_steps: int,
        warmup_steps: int = 0,
        schedule: str = "cosine",
        min_lr_ratio: float = 0.0,
        forward_fn: ForwardFn | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        all_reduce: Callable[[torch.Tensor], Any] | None = None,
        sharded: bool = False,
    ):
        check_param_groups(optimizer, components)
        cfg = config or CoMMITConfig()
        if sharded and cfg.lagging_only:
            raise ValueError("lagging_only is not supported with sharded (FSDP) parameters")
        self.config, self.model, self.optimizer, self.components = cfg, model, optimizer, components
        every = cfg.effective_every
        self.meter = BalanceMeter(
            model,
            components,
            forward_fn,
            every=every,
            rows=cfg.effective_rows,
            autocast=autocast,
            dropout=cfg.dropout,
            kl_dtype=getattr(torch, cfg.kl_dtype),
            all_reduce=all_reduce,
            sharded=sharded,
            snapshot=cfg.effective_snapshot,
            offload=cfg.offload,
            reference=cfg.reference,
            keep_snapshot=cfg.effective_keep_snapshot,
            dense_steps=cfg.effective_dense_steps,
        )
        self._norm_reduce = all_reduce if sharded else None
        self.tracker = BalanceTracker(
            components.names,
            self.meter.pair,
            window=cfg.window,
            every=max(1, every),
            span=cfg.span,
            kappa_target=cfg.kappa_target,
            component_targets=cfg.component_targets,
            bias_threshold=cfg.bias_threshold,
            oscillation_threshold=cfg.oscillation_threshold,
            flip_threshold=cfg.flip_threshold,
            collapse_log_kappa=cfg.collapse_log_kappa,
        )
        self.paths: PathSnapshot | None = None
        controller = self._controller(cfg, components, every, sharded)
        self.scheduler = CoordinatedLR(
            optimizer, total_steps, warmup_steps, schedule, min_lr_ratio, controller, cfg.hold_steps
        )
        self.regularizer = EntropyRegularizer(cfg.effective_alpha, cfg.tau, cfg.lagging_only)
        self.strategy = Strategy(cfg, components)
        self.step = 0
        self.heldout = cfg.strategy in ("progress", "line_search")  # the trainer peeks ahead
        self._warmup = warmup_steps
        self._pending: int | None = None  # step whose held-out measurement is due
        self._line_search: LineSearchMeasurement | None = None
        self._bound_said: set[str] = set()
        self._last_estimate = -1  # step of the previous estimate (dt of the next one)
        self._progress: ProgressMeasurement | None = None
        self._measurement: BalanceMeasurement | None = None
        self._grad_norms: dict[str, float] = {}
        self._coeffs: dict[str, float] = {}
        self._aux_weight = 0.0

    def _controller(
        self, cfg: CoMMITConfig, components: Components, every: int, sharded: bool
    ) -> Any:
        """The factor controller of the strategy (line search also keeps its paths)."""
        names = [c.name for c in components.trainable]
        if cfg.strategy == "line_search":
            if sharded:
                raise ValueError(
                    "strategy line_search is not supported with sharded (FSDP) parameters; "
                    "use strategy=progress or constant"
                )
            controller = LineSearchController(
                names,
                _anchor(cfg),
                gain=cfg.linesearch_gain,
                cut_gain=cfg.linesearch_cut_gain,
                max_cut=cfg.linesearch_max_cut,
                max_raise=cfg.linesearch_max_raise,
                factor_caps=dict(cfg.factor_caps),
                smoothing=cfg.linesearch_smoothing,
            )
            self.paths = PathSnapshot(components, controller.steered, cfg.offload)
            return controller
        if cfg.strategy == "progress":
            return EfficiencyController(
                names,
                _anchor(cfg),
                gamma=cfg.progress_gain,
                cut_gain=cfg.progress_cut_gain,
                horizon=cfg.progress_horizon,
                confidence=cfg.progress_confidence,
                max_cut=cfg.progress_max_cut,
                max_raise=cfg.progress_max_raise,
                guard=cfg.progress_guard,
                factor_caps=cfg.factor_caps,
            )
        return FactorController(
            names,
            cfg.effective_control,
            gamma=cfg.gamma,
            max_factor=cfg.max_factor,
            factor_caps=cfg.factor_caps,
            min_estimates=math.ceil(cfg.window / max(1, every)),
            replay=cfg.replay,
        )

    def forward(self, batch: Mapping[str, Any], via: nn.Module | None = None) -> torch.Tensor:
        """Training forward through the meter; returns [T, V] supervised logits.

        Args:
            batch: The micro-batch.
            via: Optional wrapper (DDP) to run the forward through (see the meter).
        """
        if self._pending is not None:  # held-out progress of the last step, before training
            if self.paths is not None:
                self._search_paths(batch)
            else:
                self._measure_heldout(batch)
        return self.meter.forward(batch, via)

    def _search_paths(self, batch: Mapping[str, Any]) -> None:
        """Line search along the steered components' paths on ``batch`` (held out)."""
        step, self._pending = self._pending, None
        la = self.meter.lookahead
        with la.preserved(), la.autocast():
            m = measure_paths(
                self.meter.model,
                la.forward_fn,
                batch,
                self.paths,
                self.config.linesearch_alphas,
                step,
                self.meter.all_reduce,
            )
        self.paths.mark()  # the next path starts here
        adjusting = step >= max(self._warmup, self.config.hold_steps)
        self.scheduler.controller.observe(m, adjusting=adjusting)
        self.scheduler.refresh()
        self._line_search = m

    def _measure_heldout(self, batch: Mapping[str, Any]) -> None:
        """Held-out progress of the pending step on ``batch``; the controller acts at once."""
        step, self._pending = self._pending, None
        pm = measure_progress(self.meter, batch, step, self.config.progress_rows)
        self.meter.discard()
        if pm is None:
            return
        m = self.meter.summarize(step, pm.D, pm.flags, pm.tokens, pm.update_norms)
        self.tracker.update(m)
        since, self._last_estimate = step - self._last_estimate, step
        controller = self.scheduler.controller
        controller.observe(pm, since, adjusting=step >= self.config.hold_steps)
        self.scheduler.refresh()
        self._progress, self._measurement = pm, m

    def aux_loss(self, logits: torch.Tensor) -> torch.Tensor:
        """The regularizer term for this step's logits (0 unless the strategy uses it)."""
        bias = self.tracker.state.bias_index if self.tracker.estimates else 0.0
        self._aux_weight = self.regularizer.weight(bias) if self.regularizer.enabled else 0.0
        return self.regularizer.loss(logits, bias)

    def backward(
        self,
        ce: torch.Tensor,
        aux: torch.Tensor,
        scale: float = 1.0,
        backward_fn: Callable[..., None] | None = None,
    ) -> None:
        """Backward of ce + aux (aux reaches only the lagging component with lagging_only).

        Args:
            ce: Task loss.
            aux: Regularizer term from :meth:`aux_loss`.
            scale: Multiplier (1 / gradient-accumulation steps).
            backward_fn: E.g. ``accelerator.backward`` (fp16 loss scaling).
        """
        lagging = None
        if self.regularizer.lagging_only and self.tracker.z_bar:
            z = self.tracker.z_bar
            lagging = self.components[min(z, key=z.get)].params
        self.regularizer.backward(ce, aux, lagging, scale, backward_fn)

    def after_backward(self, grad_norms: Mapping[str, float] | None = None) -> dict[str, float]:
        """Record per-component gradient norms, then apply CD gating / OGM-GE modulation.

        The norms are a diagnostic sampled with kappa: on the steps kappa is estimated (every
        step with ``exact``), so the per-step bookkeeping stays small.

        Args:
            grad_norms: Norms computed by the caller where gradients are not in ``p.grad``
                (DeepSpeed ZeRO keeps them in partitioned buffers); default: from ``p.grad``.

        Returns:
            Component -> ||g_c||_2 before the strategy touched the gradients; empty on the
            steps that do not estimate kappa.
        """
        due = self.meter.due(self.step)
        if grad_norms is None and due:
            grad_norms = component_grad_norms(self.components, self._norm_reduce)
        self._grad_norms = dict(grad_norms) if due and grad_norms is not None else {}
        self._coeffs = self.strategy.apply(self.step, self.tracker.z_bar)
        return self._grad_norms

    def before_step(self) -> None:
        """Snapshot theta_t when kappa is due (call right before every optimizer.step)."""
        if self.paths is not None and not self.paths.alive:
            self.paths.mark()  # the first path starts at the first step (or the resume)
        self.meter.snapshot(self.step)

    def after_step(self, heldout: Mapping[str, Any] | None = None) -> StepReport:
        """Measure kappa, update the tracker and factors, apply the next step's rates.

        Args:
            heldout: For strategy ``progress``: the next micro-batch, not yet trained on, to
                measure this step's held-out progress on (the trainer passes it). Without
                it the next :meth:`forward` measures on its own batch before training, and
                the measurement is reported with that step.
        """
        lrs = self.scheduler.get_last_lr()
        if self.paths is not None:
            m = self.meter.measure(self.step)
            if m is not None:
                self._last_estimate = self.step
                self.tracker.update(m)
                if self.paths.alive:
                    self._pending = self.step
                    if heldout is not None:
                        self._search_paths(heldout)
        elif self.heldout:
            if self.meter.saved.alive:
                self._pending = self.step
                if heldout is not None:
                    self._measure_heldout(heldout)
            m, self._measurement = self._measurement, None
        else:
            m = self.meter.measure(self.step)
            if m is not None:
                dt, self._last_estimate = self.step - self._last_estimate, self.step
        if m is not None and not self.heldout and self.paths is None:
            state = self.tracker.update(m)
            if self.tracker.last_z is not None:
                z, n = self.tracker.last_z, self.tracker.estimates
                self.scheduler.observe(z, state.z_bar, n, dt)
        report = StepReport(
            self.step,
            lrs,
            self.scheduler.controller.factors,
            m,
            self.tracker.state,
            self._grad_norms,
            self._coeffs,
            self._aux_weight,
        )
        if self.paths is not None:
            report.line_search, self._line_search = self._line_search, None
            report.at_bound = dict(self.scheduler.controller.at_bound)
            if report.line_search is not None:
                report.search_alpha = dict(self.scheduler.controller.alpha)
        elif self.heldout:
            report.progress, self._progress = self._progress, None
            ctl = self.scheduler.controller
            report.efficiency, report.efficiency_z = ctl.efficiency(), dict(ctl.last_z)
        self.scheduler.step()
        self.step += 1
        return report

    def skip_step(self) -> None:
        """Account for a dropped step (e.g. a non-finite loss): no update, no kappa.

        The shared schedule still advances, so the data position and the LR schedule stay
        aligned with the step counter.
        """
        self.meter.discard()
        self._pending = None
        self.scheduler.step()
        self.step += 1

    def state_dict(self) -> dict:
        """Balance state to checkpoint: step, tracker window, factors, strategy RNG."""
        return {
            "step": self.step,
            "last_estimate": self._last_estimate,
            "meter": self.meter.state_dict(),
            "tracker": self.tracker.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "strategy": self.strategy.state_dict(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned (rates of the next step re-applied)."""
        self.step = int(state["step"])
        # Older states lack these: the previous estimate is then taken as one K back.
        self._last_estimate = int(state.get("last_estimate", self.step - self.meter.every))
        self.meter.load_state_dict(state.get("meter", {}))
        self.tracker.load_state_dict(state["tracker"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.strategy.load_state_dict(state["strategy"])


def _anchor(cfg: CoMMITConfig) -> str | None:
    """The efficiency controller's anchor component (None: no anchor)."""
    if cfg.progress_anchor == "none":
        return None
    return cfg.progress_anchor or cfg.llm_component
