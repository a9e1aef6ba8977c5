"""DeepSpeed ZeRO-3 under ``transformers.Trainer``: the balance meter on partitioned parameters.

Under ZeRO stage 3 each rank holds only its partition of every parameter (``p.ds_tensor``, a
flat 1/world slice in the training dtype); between forwards ``p.data`` is empty and the full
shape is ``p.ds_shape``. Every module's forward gathers its parameters through the engine's
hooks and releases them after, so the whole model is never resident on one rank.

How the lookahead theta_t + Delta_c is measured here (exact, and the cheapest we found):

* theta_t is kept as each rank's *partition* of the components a branch reads at theta_t
  (:class:`Zero3Snapshot`): a copy of 1/world of their parameters, taken in the engine's step
  hook right before the update, no communication;
* a branch puts a component at theta_t or theta_{t+1} by copying values into its partitions
  (local, in place) and then runs an ordinary no-grad forward of the model. The engine's
  hooks gather the full parameters of each module as the forward reaches it, from the
  partitions just written, so each module is read at its full shape with exactly the values
  the step left (theta_{t+1}) or found (theta_t);
* before each switch every gathered parameter is released back to its partition (the
  engine's own ``release_and_reset_all``): ZeRO-3 keeps small parameters (below
  ``stage3_param_persistence_threshold``) and parameters it expects to reuse gathered
  between forwards, and such a full copy would hide the values written into the partition.

Hence the meter's peak memory over a plain ZeRO-3 step is the snapshot (1/world of the
measured components, in the training dtype) plus what a ZeRO-3 no-grad forward gathers at
once (the engine's own bound: ``stage3_max_live_parameters``, prefetch bucket and reuse
distance), never the whole model and never a whole component at once. Update norms and the
zero-update test are summed over ranks from the partitions; gradient norms come from each
rank's fp32 gradient partition, summed over ranks (:func:`zero3_grad_norms`).

Not exact, and by how much: nothing on the measured quantities. The branches run the full
forward (no cached encoder outputs: the training forward runs through the engine), as under
ZeRO-2. Cost: every branch pays a gather of the parameters it reads (one all-gather of the
model per branch, as a forward does) and persistent parameters are gathered again after each
branch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ..method.components import Components, norms_from_squares
from ..method.snapshot import NEW, ParameterSnapshot

__all__ = ["Zero3Snapshot", "install_zero3", "is_zero3_param", "partition", "zero3_grad_norms"]

logger = logging.getLogger(__name__)

START_LINE = (
    "CoMMIT under ZeRO-3: theta_t kept as each rank's partition of the measured components "
    "(exact, no extra gather); every lookahead branch is a full no-grad forward that gathers "
    "parameters module by module through the engine's hooks"
)


def is_zero3_param(p: torch.Tensor) -> bool:
    """True for a parameter that ZeRO-3 partitioned (it carries ``ds_tensor``)."""
    return getattr(p, "ds_tensor", None) is not None


def partition(p: torch.Tensor) -> torch.Tensor:
    """This rank's flat partition of a ZeRO-3 parameter (its own data otherwise)."""
    return p.ds_tensor.data if is_zero3_param(p) else p.data


class Zero3Snapshot(ParameterSnapshot):
    """theta_t of chosen components as this rank's ZeRO-3 partitions, and the switch.

    Same interface as :class:`~commit_mllm.method.snapshot.ParameterSnapshot` (the balance meter
    uses it unchanged). Values are always copied into the partitions (never swapped by
    storage: the engine's flat buffers own them); before a switch every gathered parameter
    of the model is released, so the next forward gathers from the partitions.

    Args:
        components: The model's components.
        release: Releases every gathered parameter of the model back to its partition
            (the engine's ``release_and_reset_all``); called before every switch.
        all_reduce: In-place SUM all-reduce over the data-parallel ranks (None: one
            process); update statistics are summed over ranks.
    """

    def __init__(
        self,
        components: Components,
        release: Callable[[], None],
        all_reduce: Callable[[torch.Tensor], Any] | None = None,
    ):
        super().__init__(components, sharded=True, offload=False, all_reduce=all_reduce)
        self._release_gathered = release

    @torch.no_grad()
    def take(self, names: Iterable[str], epoch: int) -> None:
        """Copy this rank's partition of theta_t of the named components.

        ZeRO-3 keeps gradients in its own partitions (``p.grad`` stays None), so no
        component is taken as gradient-free here; a component the step left unchanged is
        found by its update norm.
        """
        self.release()
        wanted = set(names)
        for c in self.components.trainable:
            if c.name in wanted:
                self.saved[c.name] = [partition(p).clone() for p in c.params]
                self._swap[c.name] = [False] * len(c.params)
                self._held[c.name] = [None] * len(c.params)
        self.state = {c.name: NEW for c in self.components}
        self.epoch = epoch

    def set(self, target: dict[str, str]) -> None:
        """Release gathered parameters, then put each component at theta_t or theta_{t+1}."""
        if any(target.get(c.name, NEW) != self.state.get(c.name, NEW) for c in self.components):
            self._release_gathered()
        super().set(target)

    @torch.no_grad()
    def _switch(self, name: str, params: list[nn.Parameter], to_old: bool) -> None:
        saved, held = self.saved[name], self._held[name]
        for i, p in enumerate(params):
            part = partition(p)
            if to_old:
                held[i] = part.clone()
                part.copy_(saved[i])
            else:
                part.copy_(held[i])
                held[i] = None

    @staticmethod
    def _sq_diff(p: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        diff = partition(p).float() - old.float()
        return torch.linalg.vector_norm(diff).double().square()

    def _unchanged(self, name: str) -> bool:
        same = all(
            torch.equal(partition(p), o)
            for p, o in zip(self.components[name].params, self.saved[name])
        )
        if self.all_reduce is not None:
            flag = torch.tensor([0.0 if same else 1.0], dtype=torch.float64)
            flag = flag.to(self.components[name].params[0].device)
            self.all_reduce(flag)
            same = float(flag) == 0.0
        return same


def zero3_grad_norms(
    components: Components, all_reduce: Callable[[torch.Tensor], Any] | None
) -> dict[str, float]:
    """Per-component L2 norms of the gradient about to be applied, under ZeRO-3.

    Each rank holds the fp32 partition of every parameter's reduced gradient (DeepSpeed's
    ``safe_get_local_grad``); their squares are summed over ranks. Call between the last
    backward and the engine's step.

    Args:
        components: The components.
        all_reduce: In-place SUM all-reduce over the data-parallel ranks (None: one process).

    Returns:
        Component -> ||g_c||_2 (float32 squares, summed in float64).
    """
    from deepspeed.utils import safe_get_local_grad

    sums = []
    for c in components:
        total = torch.zeros((), dtype=torch.float64)
        for p in c.params:
            g = safe_get_local_grad(p) if is_zero3_param(p) else p.grad
            if g is not None:
                total += g.detach().float().pow(2).sum().double().cpu()
        sums.append(total)
    return norms_from_squares(components, sums, all_reduce)


def install_zero3(
    commit: Any, engine: Any, all_reduce: Callable[[torch.Tensor], Any] | None
) -> None:
    """Make a :class:`~commit_mllm.method.coordinator.CoMMIT` measure on ZeRO-3 partitions.

    Replaces its meter's snapshot with a :class:`Zero3Snapshot` bound to the engine's
    parameter coordinator, and logs :data:`START_LINE` once.

    Args:
        commit: The CoMMIT engine (built on the bare model, full forward per branch).
        engine: The ``deepspeed.DeepSpeedEngine`` (ZeRO stage 3).
        all_reduce: In-place SUM all-reduce over ranks (None: one process).
    """
    offload = engine.optimizer.parameter_offload
    module = engine.module

    def release() -> None:
        offload.get_param_coordinator().release_and_reset_all(module)

    commit.meter.saved = Zero3Snapshot(commit.components, release, all_reduce)
    logger.warning(START_LINE)
