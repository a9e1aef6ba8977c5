"""The optimizer CoMMIT needs inside ``transformers.Trainer``: named groups, Trainer conventions.

Per component c the optimizer gets up to two parameter groups, both named ``c`` and both
carrying the component's base rate eta_c (``lr`` and ``base_lr``):

* ``decay``: the parameters the Trainer applies weight decay to, with the component's
  ``weight_decay`` (``TrainingArguments.weight_decay`` unless the component sets its own);
* ``no_decay``: biases and normalization weights (the Trainer's own rule,
  ``Trainer.get_decay_parameter_names``), with weight decay 0.

Every trainable parameter sits in exactly one group (checked by
:func:`~commit_mllm.method.components.check_param_groups`), and the CoMMIT factor f_c multiplies
both groups of c alike.

Base rates (METHOD.md: eta_c(t) = eta_c * s(t) * f_c(t)): a component built without its own
rate (``build_components(model, lrs={"encoder": 2e-5})`` leaves ``llm`` unset) takes
``TrainingArguments.learning_rate`` when the optimizer is built.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..method.components import ComponentError, Components, check_param_groups

__all__ = ["commit_optimizer", "decay_parameter_names", "resolve_lrs", "unset_lrs"]


def unset_lrs(components: Components) -> list[str]:
    """Components whose base rate was left unset (it comes from ``learning_rate``)."""
    return [c.name for c in components if math.isnan(c.lr)]


def resolve_lrs(components: Components, learning_rate: float | None) -> list[str]:
    """Give every component without its own base rate ``learning_rate``.

    Args:
        components: The components (changed in place).
        learning_rate: ``TrainingArguments.learning_rate``.

    Returns:
        The components that took ``learning_rate``.

    Raises:
        ComponentError: Some rate is unset and ``learning_rate`` is None.
    """
    unset = unset_lrs(components)
    if unset and learning_rate is None:
        raise ComponentError(
            f"no learning rate for component(s) {unset}: pass lrs= to build_components or "
            "TrainingArguments (args=) to commit_optimizer"
        )
    for name in unset:
        components[name].lr = float(learning_rate)
    return unset


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters ``transformers.Trainer`` applies weight decay to.

    The Trainer's own rule (no decay for biases, LayerNorm / RMSNorm weights): its
    ``get_decay_parameter_names`` uses no Trainer state, so it runs without a Trainer.
    """
    return set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]


def commit_optimizer(
    components: Components,
    args: Any | None = None,
    optimizer_cls: type[torch.optim.Optimizer] | None = None,
    *,
    model: nn.Module | None = None,
    decay_names: Collection[str] | None = None,
    **kwargs: Any,
) -> torch.optim.Optimizer:
    """An optimizer with named groups per component, split by weight decay as the Trainer does.

    Args:
        components: The components (built on ``model``).
        args: ``TrainingArguments``: the optimizer class and its kwargs (``optim``,
            ``adam_beta1`` ...), ``learning_rate`` for components without their own rate,
            ``weight_decay`` for components without their own.
        optimizer_cls: Explicit class (default: from ``args``, else ``torch.optim.AdamW``).
        model: The model the components were built on; its biases and norm weights get no
            weight decay (the Trainer's rule). Needed unless ``decay_names`` is given.
        decay_names: Names of the parameters that get weight decay (overrides ``model``).
        **kwargs: Optimizer keyword arguments (override those from ``args``).

    Returns:
        The optimizer; pass it as ``Trainer(optimizers=(optimizer, None))`` to a
        :class:`~commit_mllm.hf.CoMMITTrainer`, or let the trainer build it.

    Raises:
        ComponentError: A rate is unset and there are no ``args``; neither ``model`` nor
            ``decay_names`` is given.
    """
    resolve_lrs(components, None if args is None else args.learning_rate)
    opt_kwargs: dict[str, Any] = {}
    if args is not None and optimizer_cls is None:
        optimizer_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
        opt_kwargs = {k: v for k, v in opt_kwargs.items() if k != "lr"}
    optimizer_cls = optimizer_cls or torch.optim.AdamW
    opt_kwargs.update(kwargs)
    default_wd = opt_kwargs.pop("weight_decay", None)
    if default_wd is None:
        default_wd = args.weight_decay if args is not None else 0.0
    if decay_names is None:
        if model is None:
            raise ComponentError(
                "commit_optimizer needs model= (or decay_names=) to keep weight decay off "
                "biases and norm weights, as transformers.Trainer does"
            )
        decay_names = decay_parameter_names(model)
    groups = component_groups(components, set(decay_names), default_wd)
    optimizer = optimizer_cls(groups, **opt_kwargs)
    check_param_groups(optimizer, components)
    return optimizer


def component_groups(
    components: Components, decay_names: set[str], default_wd: float
) -> list[dict[str, Any]]:
    """The groups of :func:`commit_optimizer`: per component, decay then no-decay (if any).

    Args:
        components: The components (base rates resolved).
        decay_names: Parameter names that get weight decay.
        default_wd: Weight decay of components without their own.

    Returns:
        Group dicts with ``params``, ``name``, ``lr``, ``base_lr``, ``weight_decay``.
    """
    groups = []
    for c in components.trainable:
        wd = default_wd if c.weight_decay is None else c.weight_decay
        decay = [p for n, p in zip(c.names, c.params) if n in decay_names]
        plain = [p for n, p in zip(c.names, c.params) if n not in decay_names]
        for params, rate in ((decay, wd), (plain, 0.0)):
            if params:
                group = {"params": params, "name": c.name, "lr": c.lr, "base_lr": c.lr}
                groups.append({**group, "weight_decay": rate})
    return groups
