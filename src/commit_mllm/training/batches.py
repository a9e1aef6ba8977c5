"""The data order of a run: the step is the exact data position.

:class:`BatchOrder` maps a micro-batch index to dataset indices (per-epoch permutations of a
seed, each rank taking its slice of the global batch); :class:`MicroBatches` collates them,
from a start position on, for a DataLoader. Resuming at step S starts at micro-batch
``S * grad_accum``, so a resumed run reads exactly the samples an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import torch

__all__ = ["BatchOrder", "MicroBatches"]


class BatchOrder:
    """Deterministic data order: the step is the exact data position.

    Positions run over an endless concatenation of per-epoch permutations (seed + epoch).
    Micro-batch ``i`` covers positions ``[i G, (i + 1) G)`` of the global batch ``G``; rank
    ``r`` takes its ``r``-th slice of ``batch_size``.

    Args:
        n: Dataset size.
        batch_size: Per-process micro-batch size.
        seed: Seed of the permutations.
        rank: This process's rank.
        world: Number of processes.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        if n < 1:
            raise ValueError("the training set is empty")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world

    @lru_cache(maxsize=4)  # noqa: B019 - a handful of epochs, one order object per run
    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def indices(self, micro: int) -> list[int]:
        """Dataset indices of micro-batch ``micro`` on this rank."""
        start = (micro * self.world + self.rank) * self.batch_size
        return [self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch_size)]


class MicroBatches(torch.utils.data.Dataset):
    """Collated micro-batches from ``start`` on (a map-style dataset for DataLoader workers).

    A sample that cannot be loaded or collated is an error naming its index and id
    (``on_bad_sample: error``), or is dropped from its micro-batch and reported under the
    batch key ``_skipped`` (``on_bad_sample: skip``).
    """

    def __init__(self, data, collator, order, start: int, total: int, on_bad: str, accum: int = 1):
        self.data, self.collator, self.order = data, collator, order
        self.start, self.total, self.on_bad = start, total, on_bad
        self.accum = accum  # micro-batches per optimizer step (a skipped row records its step)

    def __len__(self) -> int:
        return self.total - self.start

    def __getitem__(self, k: int) -> dict[str, Any]:
        micro = self.start + k
        indices = self.order.indices(micro)
        try:
            return self.collator([self.data[i] for i in indices])
        except (ValueError, OSError):
            pass  # find the bad rows one by one: the slow path only runs on bad data
        good, skipped = [], []
        for i in indices:
            try:
                sample = self.data[i]
                self.collator([sample])
                good.append(sample)
            except (ValueError, OSError) as e:
                sid = _sample_id(self.data, i)
                if self.on_bad == "error":
                    raise ValueError(f"train sample {i} (id {sid}): {e}") from None
                skipped.append(
                    {
                        "step": micro // self.accum,
                        "micro_batch": micro,
                        "index": i,
                        "id": sid,
                        "reason": str(e),
                    }
                )
        if not good:
            raise ValueError(f"micro-batch {micro}: every sample is bad ({skipped[0]['reason']})")
        return {**self.collator(good), "_skipped": skipped}


def _sample_id(data: Sequence[dict], i: int) -> str:
    try:
        return str(data[i].get("id", i))
    except Exception:  # the row itself may be what fails to load
        return str(i)
