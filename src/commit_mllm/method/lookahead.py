"""Lookahead forwards: the training forward recorded once, replayed at other parameter states.

METHOD.md, "Update significance D_c and kappa". The balance meter compares the training
forward's output distribution p_t with the distributions p_t^(c) of lookahead forwards on the
same rows. This module records what a lookahead needs and runs one:

* :meth:`Lookahead.record` runs the training forward (with grad) and keeps a
  :class:`Reference`: the detached supervised logits (p_t), the batch, the encoder outputs
  when the model implements :class:`CachedEncoderModel`, the RNG states before the forward
  and before the LLM (so a replay sees the same dropout masks), and whether the forward was
  deterministic (drew no random numbers and used no batch statistics);
* :meth:`Lookahead.run` is a no-grad forward on a reference at whatever parameters the model
  holds now, replaying its RNG states, from the cached encoder outputs when asked (skipping
  the encoder);
* a reference is restricted to its first rows by :meth:`Lookahead.slice` (p_t cut from the
  training forward, when that forward was deterministic: a row's logits do not depend on the
  other rows then), :meth:`Lookahead.redecode` (the LLM part rerun on the cut encoder
  outputs, when only the LLM drew random numbers, e.g. LoRA dropout) or
  :meth:`Lookahead.recompute` (a whole forward on the rows);
* :meth:`Lookahead.preserved` keeps the model's buffers (BatchNorm running statistics,
  counters) and the training RNG as they were, whatever lookaheads run inside it.

Symbols -> variables: p_t -> ``Reference.logits`` [T, V] (supervised positions, row-major);
the encoder outputs at theta_t -> ``Reference.features``.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from .components import Components

__all__ = [
    "CachedEncoderModel",
    "ForwardFn",
    "Lookahead",
    "Reference",
    "causal_lm_forward",
    "select_rows",
    "supervised_mask",
]

logger = logging.getLogger(__name__)

ForwardFn = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]
"""``forward_fn(model, batch) -> logits [T, V]`` at the supervised positions.

Row-major order: row ``k`` of the result is the prediction for the ``k``-th ``True`` entry
of :func:`supervised_mask` (``labels[:, 1:] != -100``) read row by row.
"""


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Dropout off and frozen normalisation statistics: the loss of the model itself."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@runtime_checkable
class CachedEncoderModel(Protocol):
    """The model side of the cached-encoder branch (a structural protocol).

    A model that implements these methods lets every branch whose component owns no
    parameter of the encoder pathway skip the encoder: it reuses the features cached from
    the training forward. Without them every branch runs a full forward. An optional
    ``select_rows(batch, features, n_rows) -> (batch, features)`` lets a row subset reuse
    the cached features too.

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


@dataclass
class Reference:
    """A recorded forward that lookaheads compare against and replay.

    Attributes:
        logits: [T, V] detached supervised logits (p_t), row-major.
        batch: The batch (or its first rows).
        features: Detached encoder outputs (cached-encoder models), else None.
        rng_start: RNG states before the forward (CPU, CUDA).
        rng_decode: RNG states between encoder and LLM (cached-encoder models).
        epoch: Parameter version the forward ran at (counted by the balance meter).
        deterministic: The forward drew no random numbers and no module normalized with
            batch statistics, so each row's logits do not depend on the other rows.
        encoder_deterministic: The same holds for the encoder pathway alone (its outputs
            can be cut to a row subset even when the LLM's dropout made the whole stochastic).
    """

    logits: torch.Tensor
    batch: Mapping[str, Any]
    features: Any = None
    rng_start: Any = None
    rng_decode: Any = None
    epoch: int = 0
    deterministic: bool = False
    encoder_deterministic: bool = False

    @property
    def rows(self) -> int:
        """Rows in :attr:`batch`."""
        return int(self.batch["labels"].shape[0])


def rng_state() -> tuple:
    """The CPU and (when initialized) CUDA RNG states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def set_rng_state(state: tuple) -> None:
    """Restore what :func:`rng_state` returned."""
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _same_rng(a: tuple, b: tuple) -> bool:
    if not torch.equal(a[0], b[0]):
        return False
    if (a[1] is None) != (b[1] is None):
        return False
    return a[1] is None or all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


def _detach(tree: Any) -> Any:
    if torch.is_tensor(tree):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: _detach(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_detach(v) for v in tree)
    return tree


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []


def _adapter_forward(model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
    return model.decode(batch, model.encode(batch))


class Lookahead:
    """Records the training forward and runs lookahead forwards on it.

    Args:
        model: The model being trained.
        components: Its components.
        forward_fn: ``forward_fn(model, batch) -> logits [T, V]``; defaults to the model's
            ``decode(batch, encode(batch))`` when it implements :class:`CachedEncoderModel`,
            else :func:`causal_lm_forward`.
        autocast: Context-manager factory of the training forward, reused for lookaheads.
        dropout: ``"replay"`` replays the recorded RNG states, so lookaheads see the training
            forward's dropout masks; ``"off"`` runs lookaheads in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        components: Components,
        forward_fn: Callable[[nn.Module, Mapping[str, Any]], torch.Tensor] | None = None,
        *,
        autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
        dropout: str = "replay",
    ):
        if dropout not in ("replay", "off"):
            raise ValueError(f"dropout must be 'replay' or 'off', got {dropout!r}")
        self.model, self.components, self.dropout = model, components, dropout
        # The cache is used only when the model's own encode/decode is the forward.
        self.cached = forward_fn is None and isinstance(model, CachedEncoderModel)
        self.forward_fn = forward_fn or (_adapter_forward if self.cached else causal_lm_forward)
        self.autocast = autocast or contextlib.nullcontext
        enc = {id(p) for p in model.encoder_parameters()} if self.cached else set()
        #: Components owning a parameter that ``encode`` reads (their branch runs it).
        self.encoder_side = {c.name for c in components if any(id(p) in enc for p in c.params)}
        #: Components all of whose parameters only ``encode`` reads.
        self.encoder_only = {
            c.name for c in components if c.params and all(id(p) in enc for p in c.params)
        }
        self._batchnorms = [
            m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if forward_fn is None and not self.cached:
            logger.info(
                "lookahead: %s does not implement encode/decode/encoder_parameters; "
                "every branch runs a full forward (no cached encoder outputs)",
                type(model).__name__,
            )

    # ---- the training forward -------------------------------------------------------------
    def record(
        self, batch: Mapping[str, Any], via: nn.Module | None = None, epoch: int = 0
    ) -> tuple[torch.Tensor, Reference]:
        """Run the training forward (with grad) and keep what lookaheads need.

        Args:
            batch: The micro-batch.
            via: A wrapper of the model to run the forward through (e.g. DDP); it gets
                ``forward_fn(via, batch)`` and no encoder outputs are cached.
            epoch: The parameter version (stored in the reference).

        Returns:
            ([T, V] logits with grad, the :class:`Reference`).
        """
        start = rng_state()
        features = decode_state = None
        if self.cached and via is None:
            features = self.model.encode(batch)
            decode_state = rng_state()
            logits = self.model.decode(batch, features)
            features = _detach(features)
        else:
            fn = self.forward_fn if via is None or not self.cached else causal_lm_forward
            logits = fn(via or self.model, batch)
        rowwise = not self._batch_statistics()
        deterministic = rowwise and _same_rng(start, rng_state())
        encoder_det = rowwise and decode_state is not None and _same_rng(start, decode_state)
        ref = Reference(
            logits.detach(), batch, features, start, decode_state, epoch, deterministic, encoder_det
        )
        return logits, ref

    def _batch_statistics(self) -> bool:
        return any(m.training for m in self._batchnorms)

    # ---- lookaheads ---------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, ref: Reference, use_cache: bool) -> torch.Tensor:
        """A no-grad forward on ``ref.batch`` at the model's current parameters.

        Args:
            ref: The reference to replay (its RNG states are restored first, so dropout
                masks equal the recorded forward's for the same rows).
            use_cache: Start from ``ref.features`` (valid only when every parameter that
                ``encode`` reads is as it was when they were computed).

        Returns:
            [T, V] logits at the supervised positions.
        """
        with self.mode():
            if use_cache:
                if ref.features is None:
                    raise ValueError("the reference has no cached encoder outputs")
                set_rng_state(ref.rng_decode)
                with self.autocast():
                    return self.model.decode(ref.batch, ref.features)
            set_rng_state(ref.rng_start)
            with self.autocast():
                return self.forward_fn(self.model, ref.batch)

    def n_rows(self, ref: Reference, rows: int | float | None) -> int | None:
        """Rows a subset keeps: an int, a fraction (rounded up), None = all; None when all."""
        if rows is None:
            return None
        n = rows if isinstance(rows, int) else math.ceil(rows * ref.rows)
        return n if n < ref.rows else None

    def can_slice(self, ref: Reference) -> bool:
        """p_t on a subset can be cut from ``ref`` (deterministic forward, same mode)."""
        return ref.deterministic

    def features_sliceable(self) -> bool:
        """The model can cut cached encoder outputs to a row subset (``select_rows``)."""
        return self.cached and hasattr(self.model, "select_rows")

    def slice(self, ref: Reference, n: int) -> Reference:
        """The first ``n`` rows of ``ref``, p_t cut from its logits (no forward).

        The cached features are cut too when the model has ``select_rows``; else dropped.
        """
        if self.features_sliceable() and ref.features is not None:
            batch, features = self.model.select_rows(ref.batch, ref.features, n)
        else:
            batch, features = select_rows(ref.batch, n), None
        tokens = int(supervised_mask(ref.batch["labels"][:n]).sum())
        return replace(ref, logits=ref.logits[:tokens], batch=batch, features=features)

    def can_redecode(self, ref: Reference) -> bool:
        """p_t on a subset can be recomputed from cut cached features (LLM only)."""
        return ref.encoder_deterministic and ref.features is not None and self.features_sliceable()

    @torch.no_grad()
    def redecode(self, ref: Reference, n: int, epoch: int) -> Reference:
        """A new reference on the first ``n`` rows: the LLM part only, at the current parameters.

        For a deterministic encoder pathway: its cached outputs are cut to the rows, and the
        LLM part replays ``ref``'s RNG state between encoder and LLM (its dropout masks).
        """
        batch, features = self.model.select_rows(ref.batch, ref.features, n)
        with self.mode():
            set_rng_state(ref.rng_decode)
            with self.autocast():
                logits = self.model.decode(batch, features)
        return Reference(logits, batch, features, ref.rng_start, ref.rng_decode, epoch, False, True)

    @torch.no_grad()
    def recompute(self, ref: Reference, n: int | None, epoch: int) -> Reference:
        """A new reference on the first ``n`` rows (None = all) at the current parameters.

        The forward replays ``ref``'s starting RNG state (in eval mode with dropout off).
        """
        batch = ref.batch
        if n is not None:
            batch = (
                self.model.select_rows(batch, None, n)[0]
                if hasattr(self.model, "select_rows")
                else select_rows(batch, n)
            )
        with self.mode():
            set_rng_state(ref.rng_start)
            with self.autocast():
                if self.cached:
                    features = self.model.encode(batch)
                    decode_state = rng_state()
                    logits = self.model.decode(batch, features)
                else:
                    features, decode_state = None, None
                    logits = self.forward_fn(self.model, batch)
        return Reference(logits, batch, features, ref.rng_start, decode_state, epoch)

    # ---- modes and state --------------------------------------------------------------------
    @contextlib.contextmanager
    def mode(self) -> Iterator[None]:
        """Eval mode for ``dropout='off'``; the model's own mode otherwise."""
        if self.dropout == "replay":
            yield
            return
        with eval_mode(self.model):
            yield

    @contextlib.contextmanager
    def preserved(self) -> Iterator[None]:
        """Buffers (BatchNorm statistics, counters ...) and the training RNG as they were.

        Lookaheads run in the model's mode; in training mode BatchNorm updates its running
        statistics and batch count, which must not leak into training. Every buffer is
        copied before and written back after (bitwise, into the same tensor object, which is
        also put back if a module replaced it); the RNG is forked.
        """
        saved = [
            (mod, name, buf, buf.detach().clone())
            for mod in self.model.modules()
            for name, buf in mod._buffers.items()
            if buf is not None
        ]
        try:
            with torch.random.fork_rng(devices=_cuda_devices()):
                yield
        finally:
            with torch.no_grad():
                for mod, name, buf, copy in saved:
                    buf.copy_(copy)
                    mod._buffers[name] = buf
