"""Deterministic, data-parallel-sharded, resumable sampling and the DataLoader around it.

Order: epoch e visits the dataset in ``randperm(N, seed + e)`` (or 0..N-1 without shuffle); the
global stream is epoch 0, epoch 1, ... Every step consumes ``micro_batch_size * dp_size`` items
of that stream; DP rank r takes the r-th contiguous micro-batch. So the item a rank sees depends
only on (seed, consumed_samples, rank), and resuming at ``consumed_samples = k`` continues
exactly where an uninterrupted run would be (tested). ``consumed_samples`` counts items of the
sampled dataset -- packed rows when packing is on.

Pipeline schedules pull ``num_microbatches`` micro-batches per step from the same iterator; with
``global_batch_size = micro_batch_size * dp_size * num_microbatches`` nothing else is needed.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.utils.data


class ResumableDistributedSampler(torch.utils.data.Sampler):
    """Yields lists of dataset indices (one micro-batch for this DP rank) forever or per epoch."""

    def __init__(self, total_samples: int, *, micro_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, consumed_samples: int = 0, shuffle: bool = True,
                 seed: int = 42, num_epochs: int | None = None):
        if total_samples <= 0:
            raise ValueError("the dataset is empty (after skipping bad samples?)")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        step = micro_batch_size * dp_size
        if consumed_samples % step:
            raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of "
                             f"micro_batch_size * dp_size = {step}")
        if total_samples < step:
            raise ValueError(f"dataset has {total_samples} items < micro_batch_size * dp_size "
                             f"= {step}")
        self.total = total_samples
        self.mbs = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.consumed = consumed_samples
        self.shuffle = shuffle
        self.seed = seed
        self.num_epochs = num_epochs
        self._perm_epoch = -1
        self._perm: list[int] = []

    def _order(self, epoch: int) -> list[int]:
        if epoch != self._perm_epoch:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                self._perm = torch.randperm(self.total, generator=g).tolist()
            else:
                self._perm = list(range(self.total))
            self._perm_epoch = epoch
        return self._perm

    def global_index(self, position: int) -> int:
        """Dataset index at position ``position`` of the global (all-rank) stream."""
        epoch, off = divmod(position, self.total)
        return self._order(epoch)[off]

    def __iter__(self) -> Iterator[list[int]]:
        step = self.mbs * self.dp_size
        pos = self.consumed
        while self.num_epochs is None or pos + step <= self.num_epochs * self.total:
            start = pos + self.dp_rank * self.mbs
            yield [self.global_index(start + i) for i in range(self.mbs)]
            pos += step
            self.consumed = pos

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("an endless sampler has no length (set num_epochs)")
        return (self.num_epochs * self.total - self.consumed) // (self.mbs * self.dp_size)

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed, "seed": self.seed}


def build_dataloader(dataset: Any, collate_fn: Any, *, micro_batch_size: int = 1,
                     dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                     shuffle: bool = True, seed: int = 42, num_workers: int = 0,
                     num_epochs: int | None = None) -> torch.utils.data.DataLoader:
    """DataLoader over a map-style dataset with the resumable DP sampler.

    ``dataset`` items are encoded samples (or lists of them when packed); ``collate_fn`` is a
    :class:`mvlm.data.collate.Collator`. With packing an item is one packed row and a micro-batch
    holds micro_batch_size of them (the collator concatenates them into one row).
    """
    sampler = ResumableDistributedSampler(
        len(dataset), micro_batch_size=micro_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        consumed_samples=consumed_samples, shuffle=shuffle, seed=seed, num_epochs=num_epochs)
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers,
        persistent_workers=num_workers > 0, pin_memory=False)
