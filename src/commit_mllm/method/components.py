"""Components: the named parts of a model whose learning CoMMIT coordinates.

METHOD.md, "Components": trainable parameters are split into named components, two by
default, ``encoder`` (S, the modality pathway: feature encoder + projector) and ``llm``
(X, the language model). Any number >= 2 works (e.g. ``vision``, ``audio``, ``llm``).
Every trainable parameter belongs to exactly one component; anything else is an error.

A component is declared by module-name patterns. A plain pattern is a prefix of the
dotted parameter name, matched on a dot boundary (``"vision_tower"`` matches
``vision_tower.blocks.0.weight`` but not ``vision_tower2.x``). A pattern that starts with
``re:`` is a regular expression searched in the name (``"re:lora_.*vision"``).

Example:
    >>> components = Components.from_model(model, {"encoder": ["encoder", "proj"],
    ...                                          "llm": ["lm"]},
    ...                                    lrs={"encoder": 1e-4, "llm": 2e-5})
    >>> optimizer = torch.optim.AdamW(components.param_groups())
    >>> print(components.table())
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "Component",
    "ComponentError",
    "Components",
    "check_param_groups",
    "component_grad_norms",
    "norms_from_squares",
]


class ComponentError(ValueError):
    """A parameter matches no component or several, or a component declaration is wrong."""


def _matcher(pattern: str):
    if pattern.startswith("re:"):
        regex = re.compile(pattern[3:])
        return lambda name: regex.search(name) is not None
    prefix = pattern.rstrip(".")
    return lambda name: name == prefix or name.startswith(prefix + ".")


@dataclass
class Component:
    """One named component and the parameters it owns.

    Attributes:
        name: Component name (e.g. ``"encoder"``, ``"llm"``).
        patterns: The prefixes / ``re:`` regexes that declared it.
        lr: Its base learning rate eta_c (METHOD.md: eta_c(t) = eta_c * s(t) * f_c(t)).
        names: Dotted names of its trainable parameters, in model order.
        params: Its trainable parameters, in model order.
        frozen_names: Names of parameters that match it but do not require grad.
        weight_decay: Optional weight decay for its optimizer group.
    """

    name: str
    patterns: list[str]
    lr: float
    names: list[str] = field(default_factory=list)
    params: list[nn.Parameter] = field(default_factory=list)
    frozen_names: list[str] = field(default_factory=list)
    weight_decay: float | None = None

    @property
    def numel(self) -> int:
        """Number of trainable scalars (full sizes also when ZeRO-3 partitioned them)."""
        return sum(getattr(p, "ds_numel", None) or p.numel() for p in self.params)

    @property
    def frozen(self) -> bool:
        """True when the component has no trainable parameter (it never moves)."""
        return not self.params


class Components:
    """The split of a model's trainable parameters into named components.

    Build it with :meth:`from_model`. Iterating yields :class:`Component` objects in
    declaration order; ``components["llm"]`` looks one up by name.

    Args:
        components: The components, in declaration order (at least two).
    """

    def __init__(self, components: Sequence[Component]):
        if len(components) < 2:
            raise ComponentError(
                f"CoMMIT needs at least two components, got {len(components)}: "
                f"{[c.name for c in components]}"
            )
        names = [c.name for c in components]
        if len(set(names)) != len(names):
            raise ComponentError(f"component names must be unique, got {names}")
        self._components = list(components)
        self._by_name = {c.name: c for c in components}

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        patterns: Mapping[str, str | Sequence[str]],
        lrs: Mapping[str, float] | float = 1e-4,
        weight_decay: Mapping[str, float] | None = None,
    ) -> Components:
        """Assign every trainable parameter of ``model`` to exactly one component.

        Args:
            model: The model; parameters are read with ``named_parameters()``.
            patterns: Component name -> prefix(es) or ``re:`` regex(es).
            lrs: Base learning rate per component, or one rate for all.
            weight_decay: Optional weight decay per component.

        Returns:
            The components, in the order of ``patterns``.

        Raises:
            ComponentError: A trainable parameter matches no component or more than one
                (the message names the parameter); a component matches no parameter at all
                (trainable or frozen), which is almost always a typo in its prefix; a
                learning rate is missing or negative.
        """
        comps = []
        for name, pats in patterns.items():
            pats = [pats] if isinstance(pats, str) else list(pats)
            if not pats:
                raise ComponentError(f"component '{name}' has no pattern")
            lr = lrs if isinstance(lrs, (int, float)) else lrs.get(name)
            if lr is None:
                raise ComponentError(f"no learning rate for component '{name}'")
            if lr < 0:
                raise ComponentError(f"learning rate of component '{name}' is negative: {lr}")
            wd = None if weight_decay is None else weight_decay.get(name)
            comps.append(Component(name, pats, float(lr), weight_decay=wd))
        matchers = [[_matcher(p) for p in c.patterns] for c in comps]
        for pname, param in model.named_parameters():
            hits = [c for c, ms in zip(comps, matchers) if any(m(pname) for m in ms)]
            if not param.requires_grad:
                if hits:
                    hits[0].frozen_names.append(pname)
                continue
            if not hits:
                raise ComponentError(
                    f"trainable parameter '{pname}' matches no component "
                    f"({_describe(comps)}); add a pattern for it or freeze it"
                )
            if len(hits) > 1:
                raise ComponentError(
                    f"trainable parameter '{pname}' matches components "
                    f"{' and '.join(repr(c.name) for c in hits)}; make the patterns disjoint"
                )
            hits[0].names.append(pname)
            hits[0].params.append(param)
        for c in comps:
            if not c.params and not c.frozen_names:
                raise ComponentError(
                    f"component '{c.name}' matches no parameter of the model "
                    f"(patterns {c.patterns}); check the module names"
                )
        return cls(comps)

    def __iter__(self) -> Iterator[Component]:
        return iter(self._components)

    def __len__(self) -> int:
        return len(self._components)

    def __getitem__(self, name: str) -> Component:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no component '{name}'; components: {self.names}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        """Component names in declaration order."""
        return [c.name for c in self._components]

    @property
    def trainable(self) -> list[Component]:
        """Components with at least one trainable parameter."""
        return [c for c in self._components if c.params]

    def param_groups(self, **extra) -> list[dict]:
        """Optimizer parameter groups, one per trainable component.

        Each group carries ``name`` (the component), ``lr`` and ``base_lr`` (the base rate
        eta_c; schedulers multiply ``base_lr`` and never overwrite it) and, when set,
        ``weight_decay``. Frozen components get no group.

        Args:
            **extra: Further keys copied into every group (e.g. ``betas``).

        Returns:
            A list usable as the first argument of any ``torch.optim`` optimizer.
        """
        groups = []
        for c in self.trainable:
            group = {"params": list(c.params), "name": c.name, "lr": c.lr, "base_lr": c.lr}
            if c.weight_decay is not None:
                group["weight_decay"] = c.weight_decay
            group.update(extra)
            groups.append(group)
        return groups

    def table(self) -> str:
        """A printable table: component, tensors, trainable parameters, base LR."""
        rows = [("component", "tensors", "trainable", "frozen tensors", "base LR")]
        for c in self._components:
            lr = "unset" if math.isnan(c.lr) else f"{c.lr:g}"  # hf: from TrainingArguments
            rows.append((c.name, str(len(c.params)), f"{c.numel:,}", str(len(c.frozen_names)), lr))
        total = sum(c.numel for c in self._components)
        tensors = sum(len(c.params) for c in self._components)
        rows.append(("total", str(tensors), f"{total:,}", "", ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = []
        for i, row in enumerate(rows):
            cells = [row[0].ljust(widths[0])] + [v.rjust(w) for v, w in zip(row[1:], widths[1:])]
            lines.append("  ".join(cells).rstrip())
            if i == 0 or i == len(rows) - 2:
                lines.append("  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def component_of(self, param: torch.Tensor) -> str | None:
        """Name of the component owning ``param`` (by identity), or None."""
        for c in self._components:
            if any(p is param for p in c.params):
                return c.name
        return None


def _describe(comps: Sequence[Component]) -> str:
    return "; ".join(f"{c.name}: {c.patterns}" for c in comps)


def check_param_groups(optimizer: torch.optim.Optimizer, components: Components) -> None:
    """Assert that the optimizer holds every trainable parameter in exactly one named group.

    Args:
        optimizer: An optimizer built from :meth:`Components.param_groups`.
        components: The components it was built from.

    Raises:
        ComponentError: A group has no ``name`` or an unknown one, a parameter sits in two
            groups or in the wrong component's group, or a trainable parameter is missing.
    """
    seen: dict[int, str] = {}
    for group in optimizer.param_groups:
        name = group.get("name")
        if name not in components:
            raise ComponentError(f"optimizer group named {name!r} is not a component")
        owned = {id(p) for p in components[name].params}
        for p in group["params"]:
            if id(p) in seen:
                raise ComponentError(f"a parameter sits in groups '{seen[id(p)]}' and '{name}'")
            if id(p) not in owned:
                raise ComponentError(f"group '{name}' holds a parameter of another component")
            seen[id(p)] = name
    for c in components:
        for pname, p in zip(c.names, c.params):
            if id(p) not in seen:
                raise ComponentError(f"trainable parameter '{pname}' is in no optimizer group")


def component_grad_norms(
    components: Components, all_reduce: Callable[[torch.Tensor], Any] | None = None
) -> dict[str, float]:
    """L2 norm of each component's current gradient (0.0 where there is none).

    Args:
        components: The components.
        all_reduce: In-place SUM all-reduce, for sharded parameters (FSDP): each rank holds
            a slice of every gradient, so the squared norms are summed over ranks. Leave it
            None when gradients are replicated (one process, DDP).

    Returns:
        Component name -> ||g_c||_2, computed in float32 over all its parameters.
    """
    sq = []
    for c in components:
        grads = [p.grad.detach() for p in c.params if p.grad is not None and p.grad.numel()]
        if not grads:
            sq.append(torch.zeros((), dtype=torch.float64))
            continue
        # One fused call per component (norms in float32), one host transfer in all.
        norms = torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32))
        sq.append(norms.double().square().sum().cpu())
    return norms_from_squares(components, sq, all_reduce)


def norms_from_squares(
    components: Components,
    squares: list[torch.Tensor],
    all_reduce: Callable[[torch.Tensor], Any] | None = None,
    replicated: list[torch.Tensor] | None = None,
) -> dict[str, float]:
    """Component -> sqrt of its summed squares, the partial sums added over ranks.

    Args:
        components: The components, in the order of ``squares``.
        squares: Per component, a scalar float64 sum of squares held by this rank.
        all_reduce: In-place SUM all-reduce over ranks (None: one process).
        replicated: Per component, a sum every rank holds whole (added once, not reduced).

    Returns:
        Component name -> the L2 norm; empty when there are no components.
    """
    if not squares:
        return {}
    total = torch.stack(squares)
    if all_reduce is not None:
        device = next((p.device for c in components for p in c.params), total.device)
        total = total.to(device)
        all_reduce(total)
        total = total.cpu()
    if replicated is not None:
        total = torch.stack(replicated) + total
    return {c.name: math.sqrt(float(v)) for c, v in zip(components, total.tolist())}
