"""Padding-free packing: group encoded samples into rows of at most ``max_length`` tokens.

The plan is computed from sample lengths only (encoded datasets keep a ``length`` column), so it
is cheap, deterministic and can be stored in the ``mvlm encode`` cache. The algorithm is
best-fit decreasing within windows of ``window`` samples: sort the window by length (longest
first), put each sample into the fullest row that still has room. With realistic length mixes
that fills rows to well above 95% (measured by ``bench/data.py``); windows keep memory bounded and
let streaming datasets pack as they go.

A packed row keeps each sample's images with it (the collator concatenates pixel tensors in
sample order) and each sample's own positions (see ``collate.collate_packed``).
"""
from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch.utils.data


def pack_lengths(lengths: Sequence[int], max_length: int,
                 window: int | None = 20000) -> list[list[int]]:
    """Return rows as lists of sample indices; every row sums to <= max_length."""
    n = len(lengths)
    window = window or n or 1
    packs: list[list[int]] = []
    for start in range(0, n, window):
        packs.extend(_best_fit_decreasing(lengths, range(start, min(n, start + window)),
                                          max_length))
    return packs


def _best_fit_decreasing(lengths: Sequence[int], idx: Iterable[int],
                         max_length: int) -> list[list[int]]:
    order = sorted(idx, key=lambda i: (-int(lengths[i]), i))
    bins: list[list[int]] = []
    # (remaining capacity, bin id), sorted: the first entry with remaining >= L is the best fit.
    free: list[tuple[int, int]] = []
    for i in order:
        size = int(lengths[i])
        if size > max_length:
            raise ValueError(f"sample {i} has {size} tokens > packing length {max_length}; "
                             "encode with the same --max_length")
        k = bisect.bisect_left(free, (size, -1))
        if k < len(free):
            rem, b = free.pop(k)
            bins[b].append(i)
            rem -= size
        else:
            b = len(bins)
            bins.append([i])
            rem = max_length - size
        if rem > 0:
            bisect.insort(free, (rem, b))
    for b in bins:  # keep the dataset order inside a row (stable, easier to read in dumps)
        b.sort()
    bins.sort(key=lambda b: b[0])
    return bins


def packing_efficiency(lengths: Sequence[int], packs: Sequence[Sequence[int]],
                       max_length: int) -> float:
    """Real tokens / (rows * max_length)."""
    if not packs:
        return 0.0
    return sum(int(lengths[i]) for p in packs for i in p) / (len(packs) * max_length)


@dataclass
class PackedDataset(torch.utils.data.Dataset):
    """Map-style view where item k is the list of samples in packed row k."""

    dataset: Any
    packs: list[list[int]]

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, k: int) -> list[Any]:
        return [self.dataset[i] for i in self.packs[k]]


def pack_stream(samples: Iterable[dict], max_length: int, window: int = 1000
                ) -> Iterator[list[dict]]:
    """Streaming packing: buffer ``window`` samples, emit their packed rows, repeat."""
    buf: list[dict] = []
    for s in samples:
        buf.append(s)
        if len(buf) >= window:
            yield from _emit(buf, max_length)
            buf = []
    if buf:
        yield from _emit(buf, max_length)


def _emit(buf: list[dict], max_length: int) -> Iterator[list[dict]]:
    lengths = [len(s["input_ids"]) for s in buf]
    for p in _best_fit_decreasing(lengths, range(len(buf)), max_length):
        yield [buf[i] for i in p]
