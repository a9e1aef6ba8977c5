"""Frozen-tower feature cache: each media item's encoder output computed once, then reused.

In regime A (a pretrained encoder tower frozen; the projector and the LLM's adapters train)
the tower computes the same features for an image every time it sees it. With the cache on
(``train.cache_frozen_features``, or :meth:`~commit_mllm.models.MultimodalLM.enable_feature_cache`)
:meth:`MultimodalLM.encode <commit_mllm.models.MultimodalLM.encode>` looks each row's tower
output up by the *content* of its input (a BLAKE2b digest of the row's input tensor bytes,
shape and dtype, and of the autocast state): a row seen before is not run through the tower;
the rest of a batch is, once per distinct item. The projector, which trains, still runs on
every row at every step. The training forward, the balance meter's lookaheads (whose encoder
did not move, so a cached output is exactly what a recompute gives) and evaluation all go
through ``encode`` and share the cache.

Keys are contents, not ids: two different images under one id get two entries, the same
image twice (in a batch or across steps, training or evaluation) gets one. An audio clip's
key is its whole padded row (mel frames and frame mask): the tower's output at a batch's
padded length is what the projector reads, so a clip padded to another length is another
entry (exact, but fewer hits than images).

Refused, in one line naming the setting, when a tower is not frozen (any parameter that
requires grad, LoRA included) or would not give the same output twice in the mode it runs in
(training mode: dropout, drop-path or LayerDrop above 0, BatchNorm batch statistics).

Memory: per item, the tower's output row (tokens x width x bytes per value), kept on the
device the tower runs on; :attr:`FeatureCache.max_bytes` caps the total. At the cap new items
are no longer stored (they are recomputed at each visit; stored ones keep being hit), and one
log line says so.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["CACHE_KEY", "FeatureCache", "check_cacheable"]

logger = logging.getLogger(__name__)

CACHE_KEY = "train.cache_frozen_features"
"""The config key that turns the cache on (named in every refusal)."""

# Batch keys of a modality's tower inputs (a row of each is the item).
INPUTS = {"vision": ("pixel_values",), "audio": ("input_features", "feature_attention_mask")}
# Config entries that are off-switches, not randomness of the tower (Whisper's decoder is not
# built; a classifier head is not run).
_NOT_THE_TOWER = ("decoder_", "classifier_")

EncoderFn = Callable[[str, Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor | None]]


def check_cacheable(modality: str, tower: nn.Module) -> str | None:
    """Why the tower's output cannot be cached, or None when it can.

    A tower can be cached when every parameter is frozen and, in training mode (the mode a
    frozen tower runs in during training: freezing does not switch it to eval), it draws no
    random numbers and uses no batch statistics: no dropout / drop-path / LayerDrop rate
    above 0 in its ``transformers`` config, no dropout module with ``p > 0`` and no
    BatchNorm.

    Args:
        modality: ``vision`` or ``audio`` (for the message).
        tower: The encoder module (:class:`~commit_mllm.models.VisionEncoder` /
            :class:`~commit_mllm.models.AudioEncoder`).

    Returns:
        A one-line reason (naming :data:`CACHE_KEY`), or None.
    """
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    if trainable:
        return (
            f"{CACHE_KEY} = true is invalid: the {modality} tower is not frozen "
            f"({len(trainable)} trainable tensors, e.g. {trainable[0]}); freeze it "
            f"(train.freeze_encoder=true or model.mllm.{modality}.freeze=true, no LoRA on it) "
            "or turn the cache off"
        )
    random = []
    hf = getattr(tower, "hf_model", tower)
    config = getattr(hf, "config", None)
    if config is not None:
        for key, value in sorted(config.to_dict().items()):
            if "drop" not in key or key.startswith(_NOT_THE_TOWER):
                continue
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                random.append(f"{key}={value}")
    for name, module in tower.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            random.append(f"{name or type(module).__name__} p={module.p}")
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            random.append(f"{name} (BatchNorm: batch statistics in training)")
    if random:
        return (
            f"{CACHE_KEY} = true is invalid: the frozen {modality} tower is not deterministic "
            f"in training mode ({', '.join(dict.fromkeys(random))}); a cached output would "
            "differ from a recomputed one: use a tower without dropout or turn the cache off"
        )
    return None


class FeatureCache:
    """Tower outputs by input content, for the modalities whose tower is frozen.

    Args:
        modalities: The cached modalities (``vision`` / ``audio``).
        max_bytes: Cap on the stored outputs' bytes (None = no cap).

    Counters (over the cache's life): :attr:`hits` rows served from the cache,
    :attr:`computed` items run through the tower, :attr:`not_stored` items computed while the
    cache was full.
    """

    def __init__(self, modalities: list[str], max_bytes: int | None = None) -> None:
        self.modalities = list(modalities)
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.computed = 0
        self.not_stored = 0
        self._store: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._full_said = False

    def __len__(self) -> int:
        return len(self._store)

    def clear(self) -> None:
        """Drops every stored output (the counters are kept)."""
        self._store.clear()
        self.bytes = 0

    def stats(self) -> dict[str, Any]:
        """Items, MiB, hits, computed, not_stored (for logs and the run summary)."""
        return {
            "items": len(self._store),
            "mib": round(self.bytes / 2**20, 2),
            "hits": self.hits,
            "computed": self.computed,
            "not_stored": self.not_stored,
        }

    # ---- lookup ---------------------------------------------------------------------------
    def encode(
        self, modality: str, batch: Mapping[str, Any], run: EncoderFn
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The tower's output for ``batch``: stored rows reused, the others computed once.

        Args:
            modality: ``vision`` or ``audio``.
            batch: The collated batch (its tower inputs are read).
            run: ``run(modality, sub_batch) -> (features [b, N, d], lengths [b] or None)``,
                the uncached tower.

        Returns:
            ``(features [B, N, d], lengths [B] or None)``, as ``run`` on the whole batch.
        """
        inputs = {k: batch[k] for k in INPUTS[modality] if batch.get(k) is not None}
        keys = self._keys(modality, inputs)
        first: dict[tuple, int] = {}
        for i, key in enumerate(keys):
            if key not in self._store:
                first.setdefault(key, i)
        fresh: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        if first:
            rows = list(first.values())
            sub = inputs if len(rows) == len(keys) else {k: v[rows] for k, v in inputs.items()}
            with torch.no_grad():  # frozen: no gradient reaches the tower
                feats, lengths = run(modality, sub)
            self.computed += len(rows)
            for j, key in enumerate(first):
                entry = (
                    feats[j].detach().clone(),
                    None if lengths is None else lengths[j].detach().clone(),
                )
                fresh[key] = entry
                self._put(key, entry)
        self.hits += len(keys) - len(first)
        got = [fresh.get(k) or self._store[k] for k in keys]
        feats = torch.stack([f for f, _ in got])
        lengths = None if got[0][1] is None else torch.stack([n for _, n in got])
        return feats, lengths

    def _keys(self, modality: str, inputs: Mapping[str, torch.Tensor]) -> list[tuple]:
        """One key per row: the modality, the autocast state and a digest of the row's inputs."""
        names = sorted(inputs)
        host = {k: inputs[k].detach().contiguous().cpu() for k in names}
        bsz = host[names[0]].shape[0]
        device = inputs[names[0]].device.type
        amp = str(torch.get_autocast_dtype(device)) if torch.is_autocast_enabled(device) else None
        keys = []
        for i in range(bsz):
            h = hashlib.blake2b(digest_size=16)
            for k in names:
                row = host[k][i]
                h.update(f"{k}|{tuple(row.shape)}|{row.dtype}|".encode())
                h.update(row.reshape(-1).view(torch.uint8).numpy().tobytes())
            keys.append((modality, amp, h.digest()))
        return keys

    def _put(self, key: tuple, entry: tuple[torch.Tensor, torch.Tensor | None]) -> None:
        size = sum(t.numel() * t.element_size() for t in entry if t is not None)
        if self.max_bytes is not None and self.bytes + size > self.max_bytes:
            self.not_stored += 1
            if not self._full_said:
                self._full_said = True
                logger.warning(
                    "feature cache full: %d items, %.1f MiB (train.feature_cache_max_mb = "
                    "%g); items not yet stored are recomputed at each visit",
                    len(self._store),
                    self.bytes / 2**20,
                    self.max_bytes / 2**20,
                )
            return
        self._store[key] = entry
        self.bytes += size
