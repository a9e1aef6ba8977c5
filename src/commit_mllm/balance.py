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

Symbols -> variables: theta_t -> the snapshot taken by :meth:`BalanceMeter.snapshot`;
theta_{t+1} -> the model's parameters after ``optimizer.step()``; p_t -> ``ref_logits``;
p_t^(c) -> the lookahead logits of branch c; D_c -> ``BalanceMeasurement.D[c]``; kappa_t ->
``BalanceMeasurement.kappa``; kappa_c -> ``BalanceMeasurement.kappa_c[c]``.

Cost: one no-grad forward per moving component. A branch whose component does not touch
the encoder pathway reuses the encoder outputs cached from the training forward through the
:class:`CachedEncoderModel` protocol, so it skips the encoder. Dropout masks are replayed:
the RNG state captured before the training forward (and before the LLM, for the cached
branch) is restored before every lookahead, so p_t and every p_t^(c) see the same masks.
The meter restores the parameters bitwise and never touches gradients or optimizer state.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .components import Components

__all__ = [
    "BalanceMeasurement",
    "BalanceMeter",
    "CachedEncoderModel",
    "ForwardFn",
    "causal_lm_forward",
    "kl_sum",
    "select_rows",
    "supervised_mask",
]

logger = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
"""``forward_fn(model, batch) -> logits [T, V]`` at the supervised positions.

Row-major order: row ``k`` of the result is the prediction for the ``k``-th ``True`` entry
of :func:`supervised_mask` (``labels[:, 1:] != -100``) read row by row.
"""


@runtime_checkable
class CachedEncoderModel(Protocol):
    """The model side of the meter's cached-encoder branch (a structural protocol).

    A model that implements these methods lets every branch whose component owns no
    parameter of the encoder pathway skip the encoder: it reuses the features cached from
    the training forward. Without them the meter falls back to a full forward per branch.

    ``decode(batch, encode(batch))`` must equal the model's full supervised-logits forward.
    """

    def encode(self, batch: Mapping[str, Any]) -> Any:
        """Run the modality pathway only; return features (tensors, first dim = rows)."""

    def decode(self, batch: Mapping[str, Any], features: Any) -> torch.Tensor:
        """Run the rest of the model; return logits [T, V] at the supervised positions."""

    def encoder_parameters(self) -> Iterable[nn.Parameter]:
        """Every parameter that :meth:`encode` reads."""


def supervised_mask(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Positions whose next token is supervised.

    Args:
        labels: [B, L] token labels, ``ignore_index`` where unsupervised.
        ignore_index: The label value that marks unsupervised tokens.

    Returns:
        [B, L-1] bool mask; ``logits[:, :-1][mask]`` pairs with ``labels[:, 1:][mask]``.
    """
    return labels[:, 1:] != ignore_index


def causal_lm_forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    """Default :data:`ForwardFn` for any model returning ``.logits`` [B, L, V].

    Calls ``model(**inputs)`` with every tensor of ``batch`` except ``labels`` and keeps the
    logits at the supervised positions. Models that can compute logits at chosen positions
    only (much cheaper with a large vocabulary) should pass their own forward function.

    Returns:
        [T, V] logits in the row-major order of :func:`supervised_mask`.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}
    logits = model(**inputs).logits
    return logits[:, :-1][supervised_mask(batch["labels"])]


def select_rows(batch: Mapping[str, Any], n_rows: int) -> dict[str, Any]:
    """The first ``n_rows`` rows of a batch: every tensor or list whose length is the batch size.

    Args:
        batch: A batch with ``labels`` [B, L].
        n_rows: Rows to keep.

    Returns:
        A new dict; entries without a batch dimension are kept whole.
    """
    size = batch["labels"].shape[0]
    out = {}
    for k, v in batch.items():
        if (torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size) or (
            isinstance(v, (list, tuple)) and len(v) == size
        ):
            out[k] = v[:n_rows]
        else:
            out[k] = v
    return out


def kl_sum(
    ref_logits: torch.Tensor,
    new_logits: torch.Tensor,
    chunk: int = 64,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Sum over tokens of KL(p || q), p = softmax(ref_logits), q = softmax(new_logits).

    Log-softmax and KL run in ``dtype`` (float64 by default: D_c goes down to 1e-10,
    far below bf16/fp16 and float32 resolution), ``chunk`` tokens at a time to bound memory.

    Args:
        ref_logits: [T, V] logits of p.
        new_logits: [T, V] logits of q.
        chunk: Tokens per chunk.
        dtype: Computation dtype (float32 or float64).

    Returns:
        A float64 scalar tensor on the logits' device: sum_t KL(p_t || q_t) in nats.
    """
    total = torch.zeros((), dtype=torch.float64, device=ref_logits.device)
    for i in range(0, ref_logits.shape[0], chunk):
        lp = torch.log_softmax(ref_logits[i : i + chunk].to(dtype), dim=-1)
        lq = torch.log_softmax(new_logits[i : i + chunk].to(dtype), dim=-1)
        total += (lp.exp() * (lp - lq)).sum(dtype=torch.float64)
    return total


@dataclass
class BalanceMeasurement:
    """One estimate of the balance between components (METHOD.md symbols in brackets).

    Attributes:
        step: Optimizer step t whose update was measured.
        D: Component -> update significance D_c in nats (unfloored; 0 for frozen parts).
        kappa: D_num / D_den for two components [kappa_t], clipped to ``kappa_clip``;
            None for n != 2 components or when no token was supervised.
        kappa_c: Component -> D_c / geometric_mean(D) [kappa_c], D floored at eps.
        shares: Component -> D_c / sum(D).
        flags: Component -> ``"frozen"`` (no trainable parameter) or ``"zero_update"``
            (its update was exactly zero); such a component's D_c is 0.
        tokens: Supervised tokens the estimate averaged over (all ranks).
        update_norms: Component -> ||Delta_c||_2.
        pair: The (numerator, denominator) components of ``kappa``.
    """

    step: int
    D: dict[str, float]
    kappa: float | None
    kappa_c: dict[str, float]
    shares: dict[str, float]
    flags: dict[str, str] = field(default_factory=dict)
    tokens: int = 0
    update_norms: dict[str, float] = field(default_factory=dict)
    pair: tuple[str, str] | None = None

    @property
    def valid(self) -> bool:
        """True when the estimate covers supervised tokens and no component is flagged."""
        return self.tokens > 0 and not self.flags

    def log_kappa_c(self) -> dict[str, float]:
        """Component -> log kappa_c."""
        return {c: math.log(v) for c, v in self.kappa_c.items()}


@dataclass
class _Reference:
    """What the lookahead branches compare against: p_t, cached features, RNG states."""

    logits: torch.Tensor
    batch: Mapping[str, Any]
    features: Any = None
    rng_start: Any = None
    rng_decode: Any = None


def _rng_state() -> tuple:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _detach(tree: Any) -> Any:
    if torch.is_tensor(tree):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: _detach(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(v) for v in tree)
    return tree


class BalanceMeter:
    """Measures D_c and kappa after an optimizer step (see the module docstring).

    Use: ``logits = meter.forward(batch)`` for the training forward (it keeps p_t, the
    cached encoder features and the RNG states); then ``meter.snapshot(step)`` before
    ``optimizer.step()`` and ``meter.measure(step)`` after it. Both do nothing on steps
    that are not due (every ``every`` steps).

    Args:
        model: The model being trained.
        components: Its components (see :class:`~commit_mllm.components.Components`).
        forward_fn: ``forward_fn(model, batch) -> logits [T, V]``; defaults to the model's
            ``decode(batch, encode(batch))`` when it implements :class:`CachedEncoderModel`,
            else :func:`causal_lm_forward`.
        every: K, estimate every K steps (step % K == 0).
        rows: Measure on the first rows of the batch only: an int (rows) or a float in
            (0, 1] (fraction, rounded up). None = all rows.
        autocast: Context-manager factory used for the training forward, reused for every
            lookahead (e.g. ``accelerator.autocast``). None = no autocast.
        dropout: ``"replay"`` replays the training forward's RNG so every branch sees its
            dropout masks; ``"off"`` measures in eval mode (one extra reference forward).
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
            theta_{t+1} are swapped by copying values into the shards, never by swapping
            storage (the shards are views that FSDP gathers from).
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
    ):
        if sharded and all_reduce is None:
            raise ValueError("sharded parameters need all_reduce (norms are summed over ranks)")
        if every < 1:
            raise ValueError(f"every (K) must be >= 1, got {every}")
        if dropout not in ("replay", "off"):
            raise ValueError(f"dropout must be 'replay' or 'off', got {dropout!r}")
        if rows is not None and not (
            (isinstance(rows, int) and rows >= 1) or (isinstance(rows, float) and 0 < rows <= 1)
        ):
            raise ValueError(f"rows must be an int >= 1 or a fraction in (0, 1], got {rows!r}")
        self.model = model
        self.components = components
        # The cache is used only when the model's own encode/decode is the forward.
        self.cached = forward_fn is None and isinstance(model, CachedEncoderModel)
        self.forward_fn = forward_fn or (_adapter_forward if self.cached else causal_lm_forward)
        self.every, self.rows, self.dropout = every, rows, dropout
        self.autocast = autocast or contextlib.nullcontext
        self.eps, self.kappa_clip = eps, kappa_clip
        self.kl_dtype, self.kl_chunk = kl_dtype, kl_chunk
        self.skip_zero_update, self.all_reduce = skip_zero_update, all_reduce
        self.sharded = sharded
        self.pair = pair or _default_pair(components.names)
        self._cacheable = self._cacheable_components()
        self._ref: _Reference | None = None
        self._old: dict[str, list[torch.Tensor]] | None = None
        self._state: dict[str, str] = {}
        if forward_fn is None and not self.cached:
            logger.info(
                "balance meter: %s does not implement encode/decode/encoder_parameters; "
                "every branch runs a full forward (no cached encoder outputs)",
                type(model).__name__,
            )

    def _cacheable_components(self) -> set[str]:
        if not self.cached:
            return set()
        enc = {id(p) for p in self.model.encoder_parameters()}
        return {c.name for c in self.components if not any(id(p) in enc for p in c.params)}

    def due(self, step: int) -> bool:
        """True when step ``step`` is an estimation step (every K steps)."""
        return step % self.every == 0

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
        rng_start = _rng_state()
        if self.cached and via is None:
            features = self.model.encode(batch)
            rng_decode = _rng_state()
            logits = self.model.decode(batch, features)
            features = _detach(features)
        else:
            features, rng_decode = None, None
            fn = self.forward_fn if via is None or not self.cached else causal_lm_forward
            logits = fn(via or self.model, batch)
        self._ref = _Reference(logits.detach(), batch, features, rng_start, rng_decode)
        return logits

    # ---- before / after the optimizer step ----------------------------------------------
    @torch.no_grad()
    def snapshot(self, step: int) -> None:
        """Copy the trainable parameters theta_t (call right before ``optimizer.step()``)."""
        self._old = None
        if not self.due(step):
            return
        self._old = {c.name: [p.detach().clone() for p in c.params] for c in self.components}
        self._state = {c.name: "new" for c in self.components}

    def discard(self) -> None:
        """Forget the snapshot and the reference of a step that will not be measured."""
        self._old, self._ref = None, None

    @torch.no_grad()
    def measure(self, step: int) -> BalanceMeasurement | None:
        """Estimate D_c and kappa for the step just taken (call right after ``optimizer.step()``).

        Returns:
            The measurement, or None when this step was not due (or never snapshotted).
        """
        if self._old is None or self._ref is None:
            return None
        try:
            # Lookaheads replay RNG states; training randomness resumes where it was.
            with torch.random.fork_rng(devices=_cuda_devices()):
                return self._measure(step)
        finally:
            self._set_state({c: "new" for c in self._state})
            self._old = None

    def _measure(self, step: int) -> BalanceMeasurement:
        norms, flags = self._update_norms()
        ref = self._reference()
        moving = [c.name for c in self.components if c.name not in flags]
        sums = []
        for name in moving:
            self._set_state({c: ("new" if c == name else "old") for c in self._state})
            new_logits = self._branch(name, ref)
            sums.append(kl_sum(ref.logits, new_logits, self.kl_chunk, self.kl_dtype))
        device = ref.logits.device
        totals = torch.stack([*sums, torch.tensor(float(ref.logits.shape[0]), device=device)])
        totals = totals.to(torch.float64)
        if self.all_reduce is not None:
            self.all_reduce(totals)
        tokens = round(float(totals[-1]))
        D = {c.name: 0.0 for c in self.components}
        for name, s in zip(moving, totals[:-1].tolist()):
            D[name] = max(s / tokens, 0.0) if tokens else 0.0
        return self._summarize(step, D, flags, tokens, norms)

    def _update_norms(self) -> tuple[dict[str, float], dict[str, str]]:
        moving = [c for c in self.components if not c.frozen]
        # Per moving component: sum of squared update entries and the count of parameters
        # that changed at all (a zero norm can hide sub-normal differences).
        stats = torch.zeros(2 * len(moving), dtype=torch.float64)
        for i, c in enumerate(moving):
            old = self._old[c.name]
            sq = [(p.detach().float() - o.float()).pow(2).sum() for p, o in zip(c.params, old)]
            stats[2 * i] = float(torch.stack(sq).sum()) if sq else 0.0
            stats[2 * i + 1] = sum(not torch.equal(p, o) for p, o in zip(c.params, old))
        if self.sharded:
            device = next((p.device for c in moving for p in c.params), stats.device)
            stats = stats.to(device)
            self.all_reduce(stats)
            stats = stats.cpu()
        norms = {c.name: 0.0 for c in self.components}
        flags = {c.name: "frozen" for c in self.components if c.frozen}
        for i, c in enumerate(moving):
            norms[c.name] = math.sqrt(float(stats[2 * i]))
            if self.skip_zero_update and stats[2 * i + 1] == 0:
                flags[c.name] = "zero_update"
        return norms, flags

    def _reference(self) -> _Reference:
        """p_t: the training forward's logits, or a recomputation at theta_t when needed."""
        ref = self._ref
        batch = ref.batch
        subset = self._n_rows(batch)
        if subset is None and self.dropout == "replay":
            return ref
        if subset is not None:
            batch = (
                self.model.select_rows(batch, None, subset)[0]
                if hasattr(self.model, "select_rows")
                else select_rows(batch, subset)
            )
        # A row subset or dropout off changes the masks: recompute p_t at theta_t.
        self._set_state({c: "old" for c in self._state})
        rng = ref.rng_start
        with self._mode():
            _set_rng_state(rng)
            with self.autocast():
                if self.cached:
                    features = self.model.encode(batch)
                    rng_decode = _rng_state()
                    logits = self.model.decode(batch, features)
                else:
                    features, rng_decode = None, None
                    logits = self.forward_fn(self.model, batch)
        return _Reference(logits, batch, features, rng, rng_decode)

    def _n_rows(self, batch: Mapping[str, Any]) -> int | None:
        if self.rows is None:
            return None
        size = batch["labels"].shape[0]
        n = self.rows if isinstance(self.rows, int) else math.ceil(self.rows * size)
        return n if n < size else None

    def _branch(self, name: str, ref: _Reference) -> torch.Tensor:
        """p_t^(c) logits: the current parameter state has only component ``name`` moved."""
        with self._mode():
            if name in self._cacheable and ref.features is not None:
                _set_rng_state(ref.rng_decode)
                with self.autocast():
                    return self.model.decode(ref.batch, ref.features)
            _set_rng_state(ref.rng_start)
            with self.autocast():
                return self.forward_fn(self.model, ref.batch)

    @contextlib.contextmanager
    def _mode(self) -> Iterator[None]:
        """Eval mode for ``dropout='off'``; the model's own mode otherwise."""
        if self.dropout == "replay":
            yield
            return
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def _set_state(self, target: Mapping[str, str]) -> None:
        """Put each component at theta_t ("old") or theta_{t+1} ("new") by swapping buffers.

        A parameter that owns its whole storage swaps storage with its snapshot (no copy; an
        even number of swaps hands every parameter its own storage back). A parameter that is
        a view into a larger buffer (FSDP / ZeRO flat parameters, always when ``sharded``)
        swaps values by copying, so the buffer the wrapper reads sees the change.
        """
        for c in self.components:
            want = target.get(c.name, "new")
            if self._state.get(c.name) == want or c.frozen:
                self._state[c.name] = want
                continue
            old = self._old[c.name]
            for i, p in enumerate(c.params):
                if not self.sharded and _owns_storage(p) and old[i].shape == p.shape:
                    p.data, old[i] = old[i], p.data
                else:
                    tmp = p.detach().clone()
                    p.detach().copy_(old[i])
                    old[i].copy_(tmp)
            self._state[c.name] = want

    def _summarize(self, step, D, flags, tokens, norms) -> BalanceMeasurement:
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


def _owns_storage(p: torch.Tensor) -> bool:
    """True when ``p`` is the only tensor in its storage (not a view into a flat buffer)."""
    data = p.data
    return (
        data._base is None
        and data.storage_offset() == 0
        and data.untyped_storage().nbytes() == data.numel() * data.element_size()
    )


def _adapter_forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model.decode(batch, model.encode(batch))


def _default_pair(names: list[str]) -> tuple[str, str] | None:
    if len(names) != 2:
        return None
    if "llm" in names:
        other = names[0] if names[1] == "llm" else names[1]
        return "llm", other
    return names[1], names[0]


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
