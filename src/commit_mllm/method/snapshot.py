"""The parameter snapshot theta_t, and switching each component between theta_t and theta_{t+1}.

METHOD.md, "Update significance D_c and kappa": a lookahead forward evaluates the model at
theta_t + Delta_c, i.e. with component c at theta_{t+1} (the live parameters after
``optimizer.step()``) and every other component at theta_t. This module keeps theta_t for the
components that need it and puts each component in either state, restoring the live
parameters bitwise.

Symbols -> variables: theta_t -> :attr:`ParameterSnapshot.saved` (taken by
:meth:`ParameterSnapshot.take` right before the step); theta_{t+1} -> the parameters after the
step; Delta_c -> ``theta_{t+1} - theta_t`` on component c; ||Delta_c||_2 ->
:meth:`ParameterSnapshot.update_norms`. States: ``"old"`` = theta_t, ``"new"`` = theta_{t+1}.

Memory: the snapshot holds one copy of the chosen components' trainable parameters from just
before ``optimizer.step()`` until :meth:`ParameterSnapshot.release`. With ``offload`` the copy
lives in (pinned) host memory instead of on the accelerator, so it adds nothing to the
device's peak inside the optimizer step; putting a component at theta_t then copies its
theta_{t+1} out to the host and theta_t in, in place, so the device never holds both.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch

from .components import Components

__all__ = ["ParameterSnapshot", "owns_storage"]

OLD, NEW = "old", "new"


def owns_storage(p: torch.Tensor) -> bool:
    """True when ``p`` is the only tensor in its storage (not a view into a flat buffer)."""
    data = p.data
    return (
        data._base is None
        and data.storage_offset() == 0
        and data.untyped_storage().nbytes() == data.numel() * data.element_size()
    )


class ParameterSnapshot:
    """theta_t of chosen components and the per-component switch theta_t <-> theta_{t+1}.

    Args:
        components: The model's components.
        sharded: Parameters are shards or views (FSDP ``use_orig_params``): values are
            copied into them, never swapped by storage (the wrapper reads the flat buffer).
        offload: Keep the snapshot in host memory (pinned when CUDA is available) instead of
            on the parameters' device. Has no effect for parameters already on the CPU.
        all_reduce: In-place SUM all-reduce; with ``sharded`` the update statistics are
            summed over ranks.
    """

    def __init__(
        self,
        components: Components,
        *,
        sharded: bool = False,
        offload: bool = False,
        all_reduce: Callable[[torch.Tensor], Any] | None = None,
    ):
        self.components, self.sharded, self.offload = components, sharded, offload
        self.all_reduce = all_reduce
        self.saved: dict[str, list[torch.Tensor]] = {}
        self.state: dict[str, str] = {}
        self.no_grad: set[str] = set()
        self.epoch = -1
        self._held: dict[str, list[torch.Tensor | None]] = {}
        self._swap: dict[str, list[bool]] = {}

    @property
    def alive(self) -> bool:
        """True between :meth:`take` and :meth:`release`."""
        return self.epoch >= 0

    # ---- take / release -------------------------------------------------------------------
    @torch.no_grad()
    def take(self, names: Iterable[str], epoch: int) -> None:
        """Copy theta_t of the named components (call right before ``optimizer.step()``).

        Also records which trainable components have no gradient at all: torch optimizers
        skip such parameters, so their update is exactly zero.

        Args:
            names: Components whose theta_t is kept (frozen ones are ignored).
            epoch: The parameter version theta_t belongs to (see the balance meter).
        """
        self.release()
        wanted = set(names)
        for c in self.components.trainable:
            if all(p.grad is None for p in c.params):
                self.no_grad.add(c.name)
            if c.name not in wanted:
                continue
            self.saved[c.name] = [self._copy(p) for p in c.params]
            self._swap[c.name] = [not self.sharded and owns_storage(p) for p in c.params]
            self._held[c.name] = [None] * len(c.params)
        self.state = {c.name: NEW for c in self.components}
        self.epoch = epoch

    def _copy(self, p: torch.Tensor) -> torch.Tensor:
        src = p.detach()
        if not self.offload or src.device.type == "cpu":
            return src.clone()
        pinned = torch.cuda.is_available()
        out = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=pinned)
        # Same stream as the optimizer step that follows: the step waits for the copy.
        out.copy_(src, non_blocking=pinned)
        return out

    def release(self) -> None:
        """Put every component back at theta_{t+1} and drop the snapshot."""
        if self.alive:
            self.set({})
        self.saved, self._held, self._swap = {}, {}, {}
        self.state, self.no_grad, self.epoch = {}, set(), -1

    # ---- switching ------------------------------------------------------------------------
    def set(self, target: Mapping[str, str]) -> None:
        """Put each component at theta_t (``"old"``) or theta_{t+1} (``"new"``, the default).

        A parameter that owns its whole storage is pointed at the snapshot's storage (no
        copy; the live storage is held and handed back). A view into a larger buffer (FSDP /
        ZeRO flat parameters, always when ``sharded``) gets the values copied in, and back.

        Raises:
            KeyError: A component asked to be at theta_t has no snapshot.
        """
        for c in self.components:
            want = target.get(c.name, NEW)
            have = self.state.get(c.name, NEW)
            if want == have or c.frozen:
                continue
            if c.name not in self.saved:
                raise KeyError(
                    f"no theta_t kept for component '{c.name}' (kept: {sorted(self.saved)})"
                )
            self._switch(c.name, c.params, to_old=want == OLD)
            self.state[c.name] = want

    @torch.no_grad()
    def _switch(self, name: str, params: list[torch.nn.Parameter], to_old: bool) -> None:
        saved, held, swap = self.saved[name], self._held[name], self._swap[name]
        for i, p in enumerate(params):
            staged = saved[i].device != p.device  # offloaded: swap values through the host
            if to_old:
                if swap[i] and not staged:
                    held[i], p.data = p.data, saved[i]
                else:
                    held[i] = self._copy(p) if staged else p.detach().clone()
                    p.detach().copy_(saved[i], non_blocking=staged)
            else:
                if swap[i] and not staged:
                    p.data = held[i]
                else:
                    p.detach().copy_(held[i], non_blocking=staged)
                held[i] = None

    @contextlib.contextmanager
    def at(self, old: Iterable[str]) -> Iterator[None]:
        """Within the block the named components are at theta_t, every other at theta_{t+1}.

        The previous states come back on exit, also after an exception.
        """
        before = dict(self.state)
        self.set({n: OLD for n in old})
        try:
            yield
        finally:
            self.set(before)

    # ---- update statistics ------------------------------------------------------------------
    @torch.no_grad()
    def update_norms(self) -> tuple[dict[str, float], set[str]]:
        """||Delta_c||_2 of every snapshotted component, and those whose update is zero.

        Call with every component at theta_{t+1}. One host synchronisation for all norms; an
        exact parameter comparison only runs for a component whose norm is 0 (a sub-normal
        difference can square to 0).

        Returns:
            (component -> ||Delta_c||_2, names of snapshotted components with Delta_c == 0).
        """
        names = [c.name for c in self.components.trainable if c.name in self.saved]
        if not names:
            return {}, set()
        sums = []
        for name in names:
            parts = [
                self._sq_diff(p, o) for p, o in zip(self.components[name].params, self.saved[name])
            ]
            sums.append(torch.stack(parts).sum() if parts else torch.zeros(()))
        stats = torch.stack([s.double().cpu() for s in sums])
        if self.sharded and self.all_reduce is not None:
            device = next(p.device for n in names for p in self.components[n].params)
            stats = stats.to(device)
            self.all_reduce(stats)
            stats = stats.cpu()
        values = stats.tolist()
        norms = {n: math.sqrt(v) for n, v in zip(names, values)}
        zero = {n for n, v in zip(names, values) if v == 0.0 and self._unchanged(n)}
        return norms, zero

    @staticmethod
    def _sq_diff(p: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
        if old.device != p.device:
            old = old.to(p.device, non_blocking=True)
        diff = p.detach().float() - old.float()
        return torch.linalg.vector_norm(diff).double().square()

    def _unchanged(self, name: str) -> bool:
        same = all(
            torch.equal(p.detach(), o.to(p.device))
            for p, o in zip(self.components[name].params, self.saved[name])
        )
        if self.sharded and self.all_reduce is not None:
            flag = torch.tensor([0.0 if same else 1.0], dtype=torch.float64)
            device = self.components[name].params[0].device
            flag = flag.to(device)
            self.all_reduce(flag)
            same = float(flag) == 0.0
        return same
