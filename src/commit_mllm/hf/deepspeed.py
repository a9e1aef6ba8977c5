"""DeepSpeed under ``transformers.Trainer``: where CoMMIT hooks in and what it refuses.

Under DeepSpeed the update does not happen at the Trainer's ``optimizer.step()`` (a no-op
there): ``accelerator.backward`` runs the engine's ``backward`` and then, on the last
micro-batch of the step, the engine's ``step()``, which clips, updates and zeroes the
gradients. By the time the Trainer calls ``on_pre_optimizer_step`` the parameters are
theta_{t+1} already. CoMMIT therefore does its pre-step work (per-component gradient norms,
the snapshot of theta_t when kappa is due) in a hook on the engine's ``step``
(:class:`EngineStepHook`), between the last backward and the update.

What each ZeRO stage means for the measurement:

* stage 0, 1, 2: after the step every rank holds the full updated parameters (stage 1/2
  all-gather them into the model's flat buffers), so the lookahead theta_t + Delta_c is
  exact; each rank measures its own micro-batch and the KL sums are summed over ranks, so
  every rank gets the kappa of the global batch. Stage 1/2 keep each rank's share of the
  gradient as fp32 fragments; the per-component gradient norms sum their squares over
  ranks (:func:`zero_grad_norms`).
* stage 3 partitions the parameters themselves: theta_t is kept as each rank's partition
  and every lookahead is a forward that gathers through the engine's hooks (:mod:`.zero3`);
  exact as well. Parameter offload to NVMe is refused (:func:`check_deepspeed`).

Strategies that edit gradients between backward and the update (``feature_cd``,
``language_cd``, ``ogm_ge``, ``lagging_only``) are refused under DeepSpeed: the engine owns
the gradients there. So are a DeepSpeed ``optimizer`` or ``scheduler`` section: CoMMIT needs
the Trainer's optimizer (one named group per component) and the Trainer's schedule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, MutableMapping, Sequence
from typing import Any

import torch

from ..method.components import Components, norms_from_squares
from ..method.strategies import CoMMITConfig

__all__ = [
    "GRADIENT_STRATEGIES",
    "ComponentGroups",
    "DeepSpeedSetupError",
    "EngineStepHook",
    "check_deepspeed",
    "deepspeed_config",
    "zero_grad_norms",
]

GRADIENT_STRATEGIES = ("feature_cd", "language_cd", "ogm_ge")


class DeepSpeedSetupError(ValueError):
    """A DeepSpeed setting CoMMIT cannot measure or schedule correctly."""


def deepspeed_config(accelerator: Any) -> dict | None:
    """The DeepSpeed config dict the Trainer's accelerator runs with, or None without DeepSpeed.

    Covers ``TrainingArguments(deepspeed=...)`` and ``accelerate launch`` with a DeepSpeed
    config (both end up in the accelerator state's DeepSpeed plugin).
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return None
    hf_config = getattr(plugin, "hf_ds_config", None)
    config = getattr(hf_config, "config", None) or getattr(plugin, "deepspeed_config", None)
    return dict(config or {})


def zero_stage(config: dict) -> int:
    """``zero_optimization.stage`` (0 when absent)."""
    stage = (config.get("zero_optimization") or {}).get("stage", 0)
    return int(stage) if str(stage).isdigit() else 0


def check_deepspeed(config: dict, commit: CoMMITConfig) -> None:
    """Refuse, in one line, the DeepSpeed settings under which kappa would be wrong.

    Args:
        config: The DeepSpeed config dict.
        commit: The method's settings.

    Raises:
        DeepSpeedSetupError: ZeRO-3 parameters offloaded to NVMe; an ``optimizer`` or
            ``scheduler`` section; a strategy or setting that edits gradients between
            backward and the update.
    """
    offload = ((config.get("zero_optimization") or {}).get("offload_param") or {}).get("device")
    if zero_stage(config) >= 3 and offload == "nvme":
        raise DeepSpeedSetupError(
            "CoMMIT under ZeRO-3 reads and writes the parameter partitions in memory: set "
            "zero_optimization.offload_param.device to 'cpu' or 'none' (not 'nvme')"
        )
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise DeepSpeedSetupError(
                f"remove the '{section}' section from the DeepSpeed config: CoMMIT needs the "
                "Trainer's optimizer (one named group per component) and its schedule "
                "(set them in TrainingArguments: optim, learning_rate, lr_scheduler_type)"
            )
    if commit.strategy in GRADIENT_STRATEGIES or commit.lagging_only:
        what = "lagging_only" if commit.lagging_only else f"strategy '{commit.strategy}'"
        raise DeepSpeedSetupError(
            f"{what} edits gradients between backward and the update, which DeepSpeed does "
            "inside its engine: use DDP for it, or commit / commit_clr / constant / replay "
            "under DeepSpeed"
        )
    if commit.strategy == "line_search" and zero_stage(config) >= 3:
        raise DeepSpeedSetupError(
            "strategy 'line_search' keeps and moves whole parameters along their path, which "
            "ZeRO-3 partitions: use ZeRO-2 or DDP for it, or progress / commit / constant "
            "under ZeRO-3"
        )


class _GroupView(MutableMapping):
    """One optimizer group, seen with the component parameters it was built from.

    Every key but ``params`` reads and writes the real group (so rates set through it reach
    the optimizer); ``params`` is the list the group held before DeepSpeed replaced it with a
    flat partition.
    """

    def __init__(self, group: dict, params: list[torch.nn.Parameter]):
        self._group, self._params = group, params

    def __getitem__(self, key: str) -> Any:
        return self._params if key == "params" else self._group[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key == "params":
            raise KeyError("the parameters of a DeepSpeed group are the engine's")
        self._group[key] = value

    def __delitem__(self, key: str) -> None:
        del self._group[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._group)

    def __len__(self) -> int:
        return len(self._group)


class ComponentGroups:
    """The optimizer as CoMMIT sees it under DeepSpeed: real groups, original parameters.

    ZeRO stage 1/2 replace each group's ``params`` by one flat fp32 partition; every other key
    (``name``, ``lr``, ``base_lr``) stays and is what the engine reads at its step.

    Args:
        optimizer: The (wrapped) optimizer whose ``param_groups`` the engine steps.
        params: Per group, the parameters it was built with (same order).
    """

    def __init__(self, optimizer: Any, params: Sequence[list[torch.nn.Parameter]]):
        groups = optimizer.param_groups
        if len(groups) != len(params):
            raise DeepSpeedSetupError(
                f"the optimizer has {len(groups)} groups but was built with {len(params)}"
            )
        self.param_groups = [_GroupView(g, list(p)) for g, p in zip(groups, params)]


class EngineStepHook:
    """Calls ``fn`` right before a DeepSpeed engine's optimizer step (at the step boundary).

    Installed as the engine's ``step`` attribute (what ``accelerator.backward`` calls after
    the last micro-batch's backward); :meth:`remove` puts the engine's own method back.

    Args:
        engine: The ``deepspeed.DeepSpeedEngine``.
        fn: Called with no arguments before each boundary step.
    """

    def __init__(self, engine: Any, fn: Callable[[], None]):
        self.engine, self.fn = engine, fn
        self._step = engine.step
        engine.step = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The engine's step, after ``fn`` when it is a step boundary."""
        if self.engine.is_gradient_accumulation_boundary():
            self.fn()
        return self._step(*args, **kwargs)

    def remove(self) -> None:
        """Restore the engine's own ``step``."""
        if self.engine.__dict__.get("step") is self:
            del self.engine.step


def zero_grad_norms(
    components: Components, all_reduce: Callable[[torch.Tensor], Any] | None
) -> dict[str, float]:
    """Per-component L2 norms of the gradient about to be applied, under DeepSpeed.

    A parameter with ``.grad`` (ZeRO stage 0, or a replicated gradient) counts once; under
    ZeRO stage 1/2 each rank holds an fp32 fragment of the parameter's reduced gradient
    (its partition), whose squares are summed over ranks. Call between the last backward and
    the engine's step.

    Args:
        components: The components.
        all_reduce: In-place SUM all-reduce over the data-parallel ranks (None: one process).

    Returns:
        Component -> ||g_c||_2 (float32 squares, summed in float64).
    """
    shared, parts = [], []
    for c in components:
        rep, frag = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for p in c.params:
            if p.grad is not None:
                rep += p.grad.detach().float().pow(2).sum().double().cpu()
            elif getattr(p, "_hp_mapping", None) is not None:
                g = p._hp_mapping.get_lp_grad_fragment(p._index_in_param_group)
                frag += g.detach().float().pow(2).sum().double().cpu()
        shared.append(rep)
        parts.append(frag)
    return norms_from_squares(components, parts, all_reduce, replicated=shared)
