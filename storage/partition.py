"""Which rows a (rank, worker) streams in an epoch. Pure arithmetic, no I/O.

The epoch's global row order is: shards permuted by rng(seed, epoch) (the same
permutation on every rank and worker), rows in stored order within each shard. With
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
    shard: int  # position of the shard in manifest["shards"]
    start: int  # first row within the shard
    stop: int  # one past the last row
    pad: bool


def shard_order(num_shards: int, *, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(num_shards)
    return np.random.default_rng([seed, epoch, 0x5EED]).permutation(num_shards)


def rows_per_partition(total_rows: int, partitions: int) -> int:
    return math.ceil(total_rows / partitions)


def batches_per_partition(total_rows: int, partitions: int, batch_size: int, drop_last: bool) -> int:
    m = rows_per_partition(total_rows, partitions)
    return m // batch_size if drop_last else math.ceil(m / batch_size)


def partition_segments(
    shard_rows: list[int],
    *,
    seed: int,
    epoch: int,
    shuffle: bool,
    rank: int,
    world_size: int,
    worker: int,
    num_workers: int,
) -> list[Segment]:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got rank={rank}")
    if num_workers < 1 or not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, num_workers={num_workers}), got worker={worker}")
    order = shard_order(len(shard_rows), seed=seed, epoch=epoch, shuffle=shuffle)
    sizes = np.asarray(shard_rows, dtype=np.int64)[order]
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    n = int(bounds[-1])
    if n == 0:
        return []
    parts = world_size * num_workers
    p = rank * num_workers + worker
    m = rows_per_partition(n, parts)
    a, b = p * m, (p + 1) * m
    segs: list[Segment] = []
    pos = a
    while pos < b:
        g = pos % n  # position in the epoch order
        pad = pos >= n
        take = min(b - pos, n - g)  # up to the end of the order
        _emit(segs, bounds, order, g, g + take, pad)
        pos += take
    return segs


def _emit(segs: list[Segment], bounds: np.ndarray, order: np.ndarray, g0: int, g1: int, pad: bool) -> None:
    i = int(np.searchsorted(bounds, g0, side="right") - 1)
    while g0 < g1:
        lo, hi = int(bounds[i]), int(bounds[i + 1])
        stop = min(g1, hi)
        if stop > g0:
            segs.append(Segment(int(order[i]), g0 - lo, stop - lo, pad))
        g0 = stop
        i += 1
