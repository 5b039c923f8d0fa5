"""Hard-label batches: a Source's rows through its task's batch (pipeline/tasks), for the
baselines and the teacher. The stored-label stream (training/stream.py) yields the same
keys plus the teacher's labels.

Each epoch: rows are permuted by rng(seed, epoch) (the same order on every rank); rank r
takes positions [r*M, (r+1)*M) of that order, M = ceil(N / world_size), wrapping around with
pad rows (weight 0) so every rank yields ceil(M / batch_size) batches. With a transform,
each row gets a view id drawn from rng(seed, epoch): uniform in [0, num_views) if num_views
is given (e.g. the teacher's stored views), otherwise a fresh id in [1, 2**31) so every
epoch sees new augmentations.

Every batch: the task's keys (x, y; a language model's mask too), sample_id (B,) int64,
view (B,) int64, weight (B,) float32 (0 for pad rows).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pipeline.tasks import task_of

if TYPE_CHECKING:
    from pipeline.views.base import Transform


def check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size!r}), got rank={rank!r}")


class HardLabelBatches:
    def __init__(
        self,
        data: Any,
        *,
        batch_size: int,
        transform: Transform | None = None,
        num_views: int | None = None,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
    ):
        check_rank(rank, world_size, batch_size)
        if len(data) == 0:
            raise ValueError(f"dataset {data.name!r} is empty")
        if num_views is not None and (not isinstance(num_views, int) or num_views < 1):
            raise ValueError(f"num_views must be a positive int or None, got {num_views!r}")
        self.data, self.transform, self.num_views = data, transform, num_views
        self.task = task_of(data)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def num_batches(self, num_workers: int = 0) -> int:
        return math.ceil(math.ceil(len(self.data) / self.world_size) / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self):
        n = len(self.data)
        rng = np.random.default_rng([self.seed, self.epoch, 0xBA7C4])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.transform is None:
            views = np.zeros(n, np.int64)
        elif self.num_views is not None:
            views = rng.integers(0, self.num_views, n)
        else:
            views = rng.integers(1, 2**31, n)
        views = views[order]  # views[i] belongs to the row at order[i]; drawn for all ranks alike
        m = math.ceil(n / self.world_size)
        gpos = np.arange(self.rank * m, (self.rank + 1) * m)  # positions in the epoch order
        pad = gpos >= n
        pos, vws = order[gpos % n], views[gpos % n]
        for a in range(0, m, self.batch_size):
            p, v = pos[a : a + self.batch_size], vws[a : a + self.batch_size]
            v = v if self.transform is not None else np.zeros_like(v)
            batch = self.task.batch(self.data, p, v, self.transform)
            yield batch | {
                "sample_id": torch.from_numpy(self.data.sample_ids[p]),
                "view": torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)),
                "weight": torch.from_numpy((~pad[a : a + self.batch_size]).astype(np.float32)),
            }
