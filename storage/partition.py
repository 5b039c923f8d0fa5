"""Which rows a (rank, worker) streams in an epoch. Pure arithmetic, no I/O.

The epoch's global row order is: shards permuted by rng(seed, epoch) (the same
permutation on every rank and worker; past one index part, parts permuted and shards
within each: see shard_order), rows in stored order within each shard. With
P = world_size * num_workers partitions, partition p = rank * num_workers + worker
takes global positions [p*M, (p+1)*M), M = ceil(N / P). Positions >= N wrap around to
the start of the order and are flagged `pad`: at most P-1 pad rows per epoch.

So every (sample_id, view) is yielded exactly once per epoch as a non-pad row, and
every partition yields exactly M rows -> ceil(M / batch_size) batches (the last one
short), i.e. every rank yields the same number of batches and DDP never hangs.
Trainers weight pad rows by 0. With drop_last=True each partition yields
floor(M / batch_size) full batches and the remainder is dropped (then not every row
is seen every epoch; the dropped rows change with the epoch's shard order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    shard: int  # the shard's index
    start: int  # first row within the shard
    stop: int  # one past the last row
    pad: bool


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool, group: int | None = None) -> np.ndarray:
    """The epoch's shard order. With `group` (the shard index's part size, storage/index.py)
    and more than one group, groups of consecutive shards are permuted and the shards within
    each group: a rank's stretch of the order then lies in a few index parts, so it loads
    those, not every part (10^6 shards: 2-3 of 16 parts per rank of 8)."""
    if not shuffle:
        return np.arange(num_shards)
    rng = np.random.default_rng([seed, epoch, 0x5EED])
    if group is None or num_shards <= group:
        return rng.permutation(num_shards)
    starts = np.arange(0, num_shards, group)
    return np.concatenate([a + rng.permutation(min(group, num_shards - a)) for a in rng.permutation(starts)])


def rows_per_partition(total_rows: int, partitions: int) -> int:
    return math.ceil(total_rows / partitions)


def batches_per_partition(total_rows: int, partitions: int, batch_size: int, drop_last: bool) -> int:
    m = rows_per_partition(total_rows, partitions)
    return m // batch_size if drop_last else math.ceil(m / batch_size)


class Segments:
    """A partition's segments as arrays (shard, start, stop, pad): ~25 bytes per segment
    rather than a Python object each (a rank of 8 over 10^6 shards has 125,000). Iterating
    yields Segment objects one at a time."""

    def __init__(self, shard: np.ndarray, start: np.ndarray, stop: np.ndarray, pad: np.ndarray):
        self.shard, self.start, self.stop, self.pad = shard, start, stop, pad

    def __len__(self) -> int:
        return len(self.shard)

    def __getitem__(self, i: int) -> Segment:
        return Segment(int(self.shard[i]), int(self.start[i]), int(self.stop[i]), bool(self.pad[i]))

    def __iter__(self):
        for i in range(len(self.shard)):
            yield self[i]

    def rows(self) -> int:
        return int((self.stop - self.start).sum())


def partition_segments(
    shard_rows,
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
    group: int | None = None,
) -> Segments:
    """Partition p's segments (see the module docstring); `shard_rows` is what each shard
    holds (rows, or sequences for token kinds)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, num_workers={num_workers}), got worker={worker}")
    rows = np.asarray(shard_rows, dtype=np.int64)
    order = shard_order(len(rows), seed=seed, epoch=epoch, shuffle=shuffle, group=group)
    bounds = np.concatenate([[0], np.cumsum(rows[order])])  # (S+1,) global positions of shard starts
    n = int(bounds[-1])
    empty = np.zeros(0, np.int64)
    if n == 0:
        return Segments(empty, empty, empty, np.zeros(0, bool))
    parts = world_size * num_workers
    p = rank * num_workers + worker
    m = rows_per_partition(n, parts)
    a, b = p * m, (p + 1) * m
    pieces = []
    pos = a
    while pos < b:  # at most a few laps: positions >= n wrap around as padding
        g = pos % n  # position in the epoch order
        take = min(b - pos, n - g)  # up to the end of the order
        pieces.append(_span(bounds, order, g, g + take, pos >= n))
        pos += take
    return Segments(*(np.concatenate([pc[k] for pc in pieces]) for k in range(4)))


def _span(bounds: np.ndarray, order: np.ndarray, g0: int, g1: int, pad: bool) -> tuple[np.ndarray, ...]:
    """The segments covering global positions [g0, g1) of the epoch order, vectorised."""
    i0 = int(np.searchsorted(bounds, g0, side="right") - 1)
    i1 = int(np.searchsorted(bounds, g1, side="left"))  # shards i0 .. i1-1 overlap [g0, g1)
    lo, hi = bounds[i0:i1], bounds[i0 + 1 : i1 + 1]
    start = np.maximum(lo, g0) - lo
    stop = np.minimum(hi, g1) - lo
    keep = stop > start
    return order[i0:i1][keep], start[keep], stop[keep], np.full(int(keep.sum()), pad)
