"""The balance meter: update significance D_c and the Multimodal Balance Coefficient kappa.

METHOD.md, "Update significance D_c and kappa". At step t the optimizer moves
theta_t -> theta_{t+1}; Delta_c is the part of that step on component c. On the step's batch
(or its first rows), over the supervised tokens only (labels != -100):

    p_t      = softmax(logits at theta_t)             (the training forward, detached)
    p_t^(c)  = softmax(logits at theta_t + Delta_c)   (only component c moved)
    D_c      = mean_tokens KL(p_t || p_t^(c))          (nats)
    kappa_t  = D_llm / D_encoder                       (two components)
    kappa_c  = D_c / geometric_mean(D_1 .. D_n)        (n components)
    share_c  = D_c / sum_c' D_c'

Symbols -> variables: theta_t -> the :class:`~commit_mllm.method.snapshot.ParameterSnapshot` taken
by :meth:`BalanceMeter.snapshot`; theta_{t+1} -> the model's parameters after
``optimizer.step()``; p_t -> ``Reference.logits``; p_t^(c) -> the lookahead logits of branch
c; D_c -> ``BalanceMeasurement.D[c]``; kappa_t -> ``BalanceMeasurement.kappa``; kappa_c ->
``BalanceMeasurement.kappa_c[c]``; K -> ``every``.

Cost: one no-grad forward per moving component, every K steps, on the first rows. A branch
whose component does not touch the encoder pathway reuses the encoder outputs cached from the
training forward (:class:`~commit_mllm.method.lookahead.CachedEncoderModel`). p_t comes from the
training forward: on a row subset it is sliced from it when that forward was deterministic,
else rerun at theta_t on the subset (the LLM part only when only the LLM drew random
numbers). theta_t is kept only for the components some branch reads
at theta_t (with cached encoder outputs, an encoder-only component's theta_t is never read).
Dropout masks are replayed (the RNG states captured before the training forward and before
the LLM are restored before every lookahead), so p_t and every p_t^(c) see the same masks.
The meter restores parameters and buffers bitwise and never touches gradients or optimizer
state.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from .components import Components
from .lookahead import (
    ForwardFn,
    Lookahead,
    Reference,
    causal_lm_forward,
)
from .measurement import BalanceMeasurement, kl_sum
from .snapshot import OLD, ParameterSnapshot

__all__ = ["BalanceMeter"]


logger = logging.getLogger(__name__)


REFERENCES = ("auto", "slice", "recompute")


# ``reference="auto"``: slicing p_t is kept when its numerical noise (KL between the sliced
# and the recomputed subset logits at equal parameters) stays below this share of
# max(min D_c, SLICE_NOISE_FLOOR).
SLICE_NOISE_SHARE = 0.01


# Nats per token. Float32 rounding between two forwards gives a KL near 1e-16 per token; a
# zero-rate step (first warmup step) or a component with a tiny update has D_c at or near 0,
# and the check must not read that rounding as a slicing mismatch. A real mismatch (padding
# or batch-dependent layers) is orders of magnitude above 1% of this floor.
SLICE_NOISE_FLOOR = 1e-10


class BalanceMeter:
    """Measures D_c and kappa after an optimizer step (see the module docstring).

    Use: ``logits = meter.forward(batch)`` for the training forward (it keeps the
    :class:`~commit_mllm.method.lookahead.Reference`); ``meter.snapshot(step)`` right before every
    ``optimizer.step()`` and ``meter.measure(step)`` right after it. Steps that are not due
    cost nothing beyond the recording. The lookahead machinery is public for other
    measurements on the same step: :meth:`at_theta_t`, :meth:`replay`, :meth:`subset`,
    :attr:`reference`, and ``keep_snapshot`` to keep theta_t until the next snapshot.

    Args:
        model: The model being trained.
        components: Its components (see :class:`~commit_mllm.method.components.Components`).
        forward_fn: ``forward_fn(model, batch) -> logits [T, V]``; defaults to the model's
            ``decode(batch, encode(batch))`` when it implements the cached-encoder protocol,
            else :func:`causal_lm_forward`.
        every: K: estimate at the steps with ``(step + 1) % K == 0`` (the last step of every
            block of K); 0 never measures (the forward is then a plain forward).
        rows: Measure on the first rows of the batch only: an int (rows) or a float in
            (0, 1] (fraction, rounded up). None = all rows.
        autocast: Context-manager factory used for the training forward, reused for every
            lookahead (e.g. ``accelerator.autocast``). None = no autocast.
        dropout: ``"replay"`` replays the training forward's RNG so every branch sees its
            dropout masks; ``"off"`` measures in eval mode.
        eps: Floor of D_c before ratios.
        kappa_clip: Bounds of kappa and kappa_c.
        kl_dtype: Dtype of log-softmax and KL (float64 default; float32 halves memory).
        kl_chunk: Tokens per KL chunk.
        skip_zero_update: Skip the forward of a component whose update is exactly zero
            (its D_c is 0 by definition) and flag it.
        pair: (numerator, denominator) of kappa for two components. Default
            ``("llm", other)`` when a component is named ``llm``, else (last, first).
        all_reduce: Optional in-place SUM all-reduce of a float64 tensor, so that every rank
            gets the same D_c from the global batch (per-component KL sums and token counts).
        sharded: Parameters are shards (FSDP ``use_orig_params``): update norms and the
            zero-update test are summed over ranks (needs ``all_reduce``), and theta_t /
            theta_{t+1} are swapped by copying values into the shards.
        snapshot: ``"needed"`` keeps theta_t only for the components a branch reads at
            theta_t (unless it is offloaded, when every component's is kept); ``"all"`` for
            every trainable component (every update norm is logged, and :meth:`at_theta_t`
            works for every component).
        offload: Keep theta_t in host memory (only for parameters on CUDA); None = when the
            parameters are on CUDA.
        reference: p_t on a row subset: cut from a deterministic training forward
            (``"slice"``; ``"auto"`` checks once that this adds under 1% of the smallest D_c,
            else reruns from then on), else rerun at theta_t on the rows, the LLM part only
            when only it drew random numbers; ``"recompute"`` always reruns it whole.
        keep_snapshot: Keep theta_t after :meth:`measure` until the next :meth:`snapshot`
            or :meth:`release` (for measurements on the next batch).
        dense_steps: Also estimate at every step below this one (the first steps move the
            most: Adam's first updates, warmup), then every K.
    """

    def __init__(
        self,
        model: nn.Module,
        components: Components,
        forward_fn: ForwardFn | None = None,
        *,
        every: int = 1,
        rows: int | float | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        dropout: str = "replay",
        eps: float = 1e-12,
        kappa_clip: tuple[float, float] = (1e-6, 1e6),
        kl_dtype: torch.dtype = torch.float64,
        kl_chunk: int = 64,
        skip_zero_update: bool = True,
        pair: tuple[str, str] | None = None,
        all_reduce: Callable[[torch.Tensor], Any] | None = None,
        sharded: bool = False,
        snapshot: str = "needed",
        offload: bool | None = None,
        reference: str = "auto",
        keep_snapshot: bool = False,
        dense_steps: int = 0,
    ):
        _check_args(every, rows, snapshot, reference, sharded, all_reduce)
        self.model, self.components = model, components
        self.lookahead = Lookahead(
            model, components, forward_fn, autocast=autocast, dropout=dropout
        )
        on_cuda = any(p.is_cuda for c in components for p in c.params)
        offload = on_cuda if offload is None else offload and on_cuda
        self.saved = ParameterSnapshot(
            components, sharded=sharded, offload=offload, all_reduce=all_reduce
        )
        self.every, self.rows, self.dropout = every, rows, dropout
        self.eps, self.kappa_clip = eps, kappa_clip
        self.kl_dtype, self.kl_chunk = kl_dtype, kl_chunk
        self.skip_zero_update, self.all_reduce = skip_zero_update, all_reduce
        self.snapshot_scope, self.reference_mode = snapshot, reference
        self.keep_snapshot, self.dense_steps = keep_snapshot, dense_steps
        self.pair = pair or _default_pair(components.names)
        self.epoch = 0
        self._ref: Reference | None = None
        self._plan: str | None = None
        self._slice_ok: bool | None = None

    @property
    def cached(self) -> bool:
        """True when lookaheads can start from the cached encoder outputs."""
        return self.lookahead.cached

    @property
    def reference(self) -> Reference | None:
        """The last training forward's :class:`~commit_mllm.method.lookahead.Reference`."""
        return self._ref

    def due(self, step: int) -> bool:
        """True when ``step`` is an estimation step: the last of every block of K steps.

        Also every step below ``dense_steps``.
        """
        return self.every > 0 and (step < self.dense_steps or (step + 1) % self.every == 0)

    # ---- training forward -------------------------------------------------------------
    def forward(self, batch: Mapping[str, Any], via: nn.Module | None = None) -> torch.Tensor:
        """The training forward; keeps what the lookahead branches need.

        Call it inside the training autocast. With gradient accumulation the last call
        before the optimizer step is the micro-batch that gets measured.

        Args:
            batch: The micro-batch.
            via: A wrapper of the model to run the training forward through (e.g. DDP,
                whose forward must run for gradient synchronisation). It gets
                ``forward_fn(via, batch)``; no encoder features are cached then.

        Returns:
            [T, V] logits at the supervised positions, with grad.
        """
        if self.every == 0:
            la = self.lookahead
            fn = la.forward_fn if via is None or not la.cached else causal_lm_forward
            return fn(via or self.model, batch)
        logits, self._ref = self.lookahead.record(batch, via, self.epoch)
        return logits

    # ---- before / after the optimizer step ----------------------------------------------
    def snapshot(self, step: int) -> None:
        """Keep theta_t when ``step`` is due (call right before every ``optimizer.step()``).

        Also drops a snapshot kept from the previous step and counts the parameter version.
        """
        self.saved.release()
        self._plan = None
        ref, self.epoch = self._ref, self.epoch + 1
        if not self.due(step) or ref is None or ref.epoch != self.epoch - 1:
            return
        self._plan = self._reference_plan(ref)
        self.saved.take(self._needed(ref, self._plan), self.epoch - 1)

    def discard(self) -> None:
        """Forget the snapshot and the reference of a step that will not be measured."""
        self.saved.release()
        self._ref, self._plan = None, None

    def release(self) -> None:
        """Drop a kept snapshot (parameters stay at theta_{t+1})."""
        self.saved.release()

    def measure(self, step: int) -> BalanceMeasurement | None:
        """Estimate D_c and kappa for the step just taken (call right after ``optimizer.step()``).

        Returns:
            The measurement, or None when this step was not due (or never snapshotted).
        """
        ref = self._ref
        if not self.saved.alive or self._plan is None or ref is None:
            return None
        check = self._plan == "slice" and self.reference_mode == "auto" and self._slice_ok is None
        try:
            with self.lookahead.preserved():
                m = self._measure(step, ref)
        finally:
            self.saved.set({})
            self._plan = None
            if not self.keep_snapshot:
                self.saved.release()
        if check:  # once, after theta_t is dropped: it needs theta_{t+1} only
            with self.lookahead.preserved():
                if not self._accept_slicing(ref, m):
                    return None
        return m

    # ---- public lookahead tools (for other measurements on the same update) --------------
    @contextlib.contextmanager
    def at_theta_t(self, *names: str) -> Iterator[None]:
        """Within the block the named components (default: every kept one) are at theta_t.

        The others stay at theta_{t+1}. Needs a live snapshot (after :meth:`snapshot` of a
        due step; after :meth:`measure` only with ``keep_snapshot``). Exit the block before
        any backward through a graph built outside it.
        """
        if not self.saved.alive:
            raise RuntimeError("no theta_t is kept: call at_theta_t between snapshot and release")
        with self.saved.at(names or list(self.saved.saved)):
            yield

    def replay(self, ref: Reference | None = None) -> torch.Tensor:
        """A no-grad forward on ``ref`` (default: :attr:`reference`) at the current states.

        Replays the reference's RNG states; starts from its cached encoder outputs when every
        component of the encoder pathway is at the version those outputs were computed at.
        Buffers and the training RNG are left as they were.

        Returns:
            [T, V] logits at the supervised positions of ``ref.batch``.
        """
        ref = ref or self._require_ref()
        use_cache = ref.features is not None and all(
            self._version(c) == ref.epoch for c in self.lookahead.encoder_side
        )
        with self.lookahead.preserved():
            return self.lookahead.run(ref, use_cache)

    def subset(self, rows: int | float, ref: Reference | None = None) -> Reference:
        """``ref`` (default: :attr:`reference`) restricted to its first rows.

        Its logits are sliced from ``ref`` when that forward was deterministic; otherwise
        they are recomputed on the rows at the current states (replaying ``ref``'s RNG).
        """
        ref = ref or self._require_ref()
        n = self.lookahead.n_rows(ref, rows)
        if n is None:
            return ref
        if self.lookahead.can_slice(ref):
            return self.lookahead.slice(ref, n)
        with self.lookahead.preserved():
            return self.lookahead.recompute(ref, n, self.epoch)

    def state_dict(self) -> dict:
        """The meter's own state: the outcome of the one-time slicing check."""
        return {"slice_ok": self._slice_ok}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._slice_ok = state.get("slice_ok")

    # ---- internals -------------------------------------------------------------------------
    def _require_ref(self) -> Reference:
        if self._ref is None:
            raise RuntimeError("no training forward recorded yet (call forward first)")
        return self._ref

    def _version(self, name: str) -> int:
        if self.saved.alive and self.saved.state.get(name) == OLD:
            return self.saved.epoch
        return self.epoch

    def _reference_plan(self, ref: Reference) -> str:
        """Where p_t comes from: ``training``, ``slice``, ``redecode`` or ``recompute``.

        ``redecode`` and ``recompute`` run at theta_t; ``redecode`` only the LLM part, on the
        training forward's encoder outputs cut to the rows (deterministic encoder pathway).
        """
        n, la = self.lookahead.n_rows(ref, self.rows), self.lookahead
        if n is None:
            return "training" if self.dropout == "replay" or ref.deterministic else "recompute"
        if self.reference_mode == "recompute":
            return "recompute"
        if ref.deterministic and self._slice_ok is not False:
            return "slice"
        return "redecode" if la.can_redecode(ref) and self.dropout == "replay" else "recompute"

    def _needed(self, ref: Reference, plan: str) -> set[str]:
        """Components whose theta_t some branch reads (see the module docstring)."""
        names = {c.name for c in self.components.trainable}
        la = self.lookahead
        if self.snapshot_scope == "all" or plan == "recompute" or ref.features is None:
            return names
        if self.saved.offload:  # host memory: keeping it costs no device memory
            return names
        if plan in ("slice", "redecode") and not la.features_sliceable():
            return names
        full = [n for n in names if n in la.encoder_side]
        if len(full) == 1 and full[0] in la.encoder_only:
            names.discard(full[0])
        return names

    def _measure(self, step: int, ref: Reference) -> BalanceMeasurement:
        norms, flags = self.update_flags()
        ref = self._measured_reference(ref)
        moving = [c.name for c in self.components if c.name not in flags]
        sums = [
            kl_sum(ref.logits, self._branch(n, ref), self.kl_chunk, self.kl_dtype) for n in moving
        ]
        device = ref.logits.device
        tokens_t = torch.tensor(float(ref.logits.shape[0]), device=device)
        totals = torch.stack([*sums, tokens_t]).to(torch.float64)
        if self.all_reduce is not None:
            self.all_reduce(totals)
        values = totals.tolist()
        tokens = round(values[-1])
        D = {c.name: 0.0 for c in self.components}
        for name, s in zip(moving, values):
            D[name] = max(s / tokens, 0.0) if tokens else 0.0
            if D[name] == 0.0 and self.skip_zero_update and name not in self.saved.saved:
                flags[name] = "zero_update"  # no theta_t to compare: no measurable change
        return self.summarize(step, D, flags, tokens, norms)

    def update_flags(
        self, skip_zero_update: bool | None = None
    ) -> tuple[dict[str, float], dict[str, str]]:
        """The kept components' update norms, and the flags of those not to be measured.

        Args:
            skip_zero_update: Flag a component whose update was exactly zero (or that the
                optimizer skipped) as ``"zero_update"``; default: the meter's setting.

        Returns:
            Component -> ||Delta_c||_2 (the components whose theta_t was kept), and
            component -> ``"frozen"`` or ``"zero_update"``.
        """
        norms, zero = self.saved.update_norms()
        flags = {c.name: "frozen" for c in self.components if c.frozen}
        skip = self.skip_zero_update if skip_zero_update is None else skip_zero_update
        if skip:
            unseen = self.saved.no_grad - set(self.saved.saved)  # skipped by the optimizer
            for name in zero | unseen:
                flags[name] = "zero_update"
        return {c.name: norms.get(c.name) for c in self.components if c.name in norms}, flags

    def _measured_reference(self, ref: Reference) -> Reference:
        n = self.lookahead.n_rows(ref, self.rows)
        if self._plan == "training":
            return ref
        if self._plan == "slice":
            return self.lookahead.slice(ref, n)
        # Stochastic forward on a subset (its masks differ), or dropout off: rerun at theta_t.
        with self.saved.at(list(self.saved.saved)):
            if self._plan == "redecode":
                return self.lookahead.redecode(ref, n, self.saved.epoch)
            return self.lookahead.recompute(ref, n, self.saved.epoch)

    def _branch(self, name: str, ref: Reference) -> torch.Tensor:
        """p_t^(c) logits: component ``name`` at theta_{t+1}, the others at theta_t."""
        la = self.lookahead
        use_cache = name not in la.encoder_side and ref.features is not None
        others = [
            n for n in self.saved.saved if n != name and not (use_cache and n in la.encoder_only)
        ]
        with self.saved.at(others):
            return la.run(ref, use_cache)

    def _accept_slicing(self, full: Reference, m: BalanceMeasurement) -> bool:
        """The one-time check of ``reference="auto"`` (all ranks decide alike).

        Compares p_t cut from a full-batch forward with a forward on the rows alone, both at
        theta_{t+1}: their KL per token must stay under 1% of the smallest positive D_c, or
        of :data:`SLICE_NOISE_FLOOR` when that is larger (a zero-rate step moves nothing).
        """
        n = self.lookahead.n_rows(full, self.rows)
        rows = self.lookahead.slice(full, n)
        whole = self.lookahead.run(full, use_cache=False)[: rows.logits.shape[0]]
        sub = self.lookahead.recompute(full, n, self.epoch)
        noise = kl_sum(whole, sub.logits, self.kl_chunk, self.kl_dtype).reshape(1)
        if self.all_reduce is not None:
            self.all_reduce(noise)
        per_token = float(noise) / m.tokens if m.tokens else 0.0
        smallest = min((d for d in m.D.values() if d > 0), default=0.0)
        signal = max(smallest, SLICE_NOISE_FLOOR)
        self._slice_ok = per_token <= SLICE_NOISE_SHARE * signal
        if not self._slice_ok:
            logger.warning(
                "balance meter: p_t sliced from the training forward differs from a subset "
                "forward by KL %.3g per token (%.1f%% of max(min D_c, %.0e)): recomputing p_t "
                "on the subset from now on; this step's estimate is dropped",
                per_token,
                100 * per_token / signal,
                SLICE_NOISE_FLOOR,
            )
        return self._slice_ok

    def summarize(
        self,
        step: int,
        D: dict[str, float],
        flags: dict[str, str],
        tokens: int,
        norms: dict[str, float],
    ) -> BalanceMeasurement:
        """kappa, kappa_c and the shares from the D_c of step ``step`` (floored, clipped)."""
        lo, hi = self.kappa_clip
        logs = {c: math.log(max(d, self.eps)) for c, d in D.items()}
        mean_log = sum(logs.values()) / len(logs)
        kappa_c = {c: min(max(math.exp(v - mean_log), lo), hi) for c, v in logs.items()}
        total = sum(D.values())
        shares = {c: (d / total if total > 0 else 1.0 / len(D)) for c, d in D.items()}
        kappa = None
        if self.pair is not None and tokens > 0:
            num, den = self.pair
            kappa = min(max(math.exp(logs[num] - logs[den]), lo), hi)
        return BalanceMeasurement(step, D, kappa, kappa_c, shares, flags, tokens, norms, self.pair)


def _check_args(every, rows, snapshot, reference, sharded, all_reduce) -> None:
    if sharded and all_reduce is None:
        raise ValueError("sharded parameters need all_reduce (norms are summed over ranks)")
    if not isinstance(every, int) or every < 0:
        raise ValueError(f"every (K) must be an integer >= 0 (0 = never), got {every!r}")
    if rows is not None and not (
        (isinstance(rows, int) and rows >= 1) or (isinstance(rows, float) and 0 < rows <= 1)
    ):
        raise ValueError(f"rows must be an int >= 1 or a fraction in (0, 1], got {rows!r}")
    if snapshot not in ("needed", "all"):
        raise ValueError(f"snapshot must be 'needed' or 'all', got {snapshot!r}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")


def _default_pair(names: list[str]) -> tuple[str, str] | None:
    if len(names) != 2:
        return None
    if "llm" in names:
        other = names[0] if names[1] == "llm" else names[1]
        return "llm", other
    return names[1], names[0]
