"""Streaming partition: ranks x workers cover every (sample_id, view) exactly once per epoch."""

import itertools
from collections import Counter

import numpy as np
import pytest
from conftest import write_toy

from storage import open_soft_labels
from storage.partition import partition_segments


def _epoch(ds, *, epoch, world_size, num_workers, batch_size, shuffle=True):
    """{rank: [batches]} for one epoch, each rank's workers interleaved as a DataLoader would."""
    per_rank = {}
    for rank in range(world_size):
        per_worker = [
            list(
                ds.iter_batches(
                    batch_size,
                    shuffle=shuffle,
                    seed=3,
                    epoch=epoch,
                    rank=rank,
                    world_size=world_size,
                    worker=w,
                    num_workers=num_workers,
                )
            )
            for w in range(num_workers)
        ]
        per_rank[rank] = [b for group in itertools.zip_longest(*per_worker) for b in group if b is not None]
    return per_rank


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_two_ranks_two_workers_cover_each_row_once_per_epoch(tmp_path, backend):
    uri = str(tmp_path / "ds")
    n, V = 257, 2  # 514 rows: not divisible by 4 partitions or the batch
    write_toy(uri, backend=backend, n=n, views=V, shards=5)
    ds = open_soft_labels(uri)
    orders = []
    for epoch in range(3):
        per_rank = _epoch(ds, epoch=epoch, world_size=2, num_workers=2, batch_size=16)
        counts = {r: len(b) for r, b in per_rank.items()}
        assert len(set(counts.values())) == 1, counts  # equal batch counts per rank
        assert counts[0] == ds.num_batches(16, world_size=2, num_workers=2)
        real = Counter()
        pads = 0
        for batches in per_rank.values():
            for b in batches:
                assert len(b["sample_id"]) <= 16
                for s, v, p in zip(b["sample_id"], b["view"], b["pad"]):
                    if p:
                        pads += 1
                    else:
                        real[(int(s), int(v))] += 1
        assert set(real) == {(s, v) for s in range(n) for v in range(V)}
        assert set(real.values()) == {1}  # exactly once
        assert pads == 4 * int(np.ceil(n * V / 4)) - n * V  # only the documented padding
        orders.append([int(s) for b in per_rank[0] for s in b["sample_id"]])
    assert orders[0] != orders[1] != orders[2]  # epochs differ


def test_same_seed_and_epoch_is_reproducible(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=300, shards=3)
    ds = open_soft_labels(uri)
    a = [b["sample_id"].tolist() for b in ds.iter_batches(32, seed=1, epoch=4)]
    b = [b["sample_id"].tolist() for b in ds.iter_batches(32, seed=1, epoch=4)]
    c = [b["sample_id"].tolist() for b in ds.iter_batches(32, seed=2, epoch=4)]
    assert a == b and a != c
    unshuffled = np.concatenate([b["sample_id"] for b in ds.iter_batches(32, shuffle=False)])
    assert unshuffled.tolist() == list(range(300))


def test_drop_last_gives_full_batches_only(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=100, shards=2)
    ds = open_soft_labels(uri)
    batches = list(ds.iter_batches(16, drop_last=True, world_size=2, rank=1))
    assert [len(b["sample_id"]) for b in batches] == [16, 16, 16]
    assert ds.num_batches(16, world_size=2, drop_last=True) == 3


def test_partition_arithmetic_exhaustively():
    """Pure arithmetic over many shapes, including more partitions than rows."""
    rng = np.random.default_rng(0)
    for _ in range(200):
        shard_rows = rng.integers(1, 40, size=rng.integers(1, 7)).tolist()
        world, workers = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        n = sum(shard_rows)
        seen, sizes = Counter(), set()
        for r in range(world):
            for w in range(workers):
                segs = partition_segments(
                    shard_rows,
                    seed=0,
                    epoch=int(rng.integers(5)) * 0 + 1,
                    shuffle=True,
                    rank=r,
                    world_size=world,
                    worker=w,
                    num_workers=workers,
                )
                sizes.add(sum(s.stop - s.start for s in segs))
                for s in segs:
                    assert 0 <= s.start < s.stop <= shard_rows[s.shard]
                    if not s.pad:
                        for i in range(s.start, s.stop):
                            seen[(s.shard, i)] += 1
        assert len(sizes) == 1
        assert len(seen) == n and set(seen.values()) == {1}


def test_bad_partition_arguments(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=20, shards=1)
    ds = open_soft_labels(uri)
    with pytest.raises(ValueError, match="rank must be in"):
        next(ds.iter_batches(4, rank=2, world_size=2))
    with pytest.raises(ValueError, match="worker must be in"):
        next(ds.iter_batches(4, worker=1, num_workers=1))
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.iter_batches(0))
    with pytest.raises(Exception, match="unknown column"):
        next(ds.iter_batches(4, columns=["nope"]))


def test_default_shuffle_mixes_class_sorted_shards(tmp_path):
    """Labelled data often arrives in class order; batches must still mix classes."""
    uri = str(tmp_path / "ds")
    write_toy(uri, n=2000, shards=10)  # "class" = sample_id // 200: one class per shard
    ds = open_soft_labels(uri)
    first = next(ds.iter_batches(64, seed=0))
    assert len(np.unique(first["sample_id"] // 200)) >= 8
    small = next(ds.iter_batches(64, seed=0, shuffle_buffer=256))  # an explicit small window stays local
    assert len(np.unique(small["sample_id"] // 200)) <= 3


@pytest.mark.parametrize("buffer", [None, 300, 64])
def test_shuffled_rows_keep_their_columns_together(tmp_path, buffer):
    """The shuffle moves whole rows: eviction from a full buffer and the final in-place
    shuffle give every (sample_id, view) its own logits, each exactly once per epoch."""
    uri = str(tmp_path / "ds")
    write_toy(uri, n=700, shards=3, views=2)
    ds = open_soft_labels(uri)
    seen = []
    for b in ds.iter_batches(50, seed=3, epoch=1, shuffle_buffer=buffer):
        ref = ds.take(b["sample_id"], b["view"])
        assert np.array_equal(b["logits"], ref["logits"])
        seen += list(zip(b["sample_id"].tolist(), b["view"].tolist()))
    assert sorted(seen) == [(s, v) for s in range(700) for v in range(2)]
    assert seen[:20] != sorted(seen)[:20]


def test_grouped_order_covers_every_row_once_and_keeps_a_rank_in_few_groups():
    """Past one index part (format 3), the epoch order permutes groups of consecutive shards
    and the shards within each: still every row exactly once per epoch over the ranks, and
    a rank's shards come from ~groups/ranks groups, not all of them (so it loads a few
    index parts, not every one)."""
    from storage.partition import shard_order

    shard_rows = np.random.default_rng(1).integers(1, 5, size=1000).tolist()
    group, world = 64, 4
    order = shard_order(1000, seed=3, epoch=2, shuffle=True, group=group)
    assert sorted(order.tolist()) == list(range(1000))
    assert not np.array_equal(order, shard_order(1000, seed=3, epoch=3, shuffle=True, group=group))
    # each stretch of the order stays within one group
    runs = np.flatnonzero(np.diff(order // group) != 0)
    assert len(runs) == -(-1000 // group) - 1
    seen = Counter()
    for r in range(world):
        segs = partition_segments(
            shard_rows, seed=3, epoch=2, shuffle=True, rank=r, world_size=world, worker=0, num_workers=1, group=group
        )
        groups = {s.shard // group for s in segs}
        assert len(groups) <= -(-1000 // group) // world + 2
        for s in segs:
            if not s.pad:
                for i in range(s.start, s.stop):
                    seen[(s.shard, i)] += 1
    assert len(seen) == sum(shard_rows) and set(seen.values()) == {1}
    # one group (every dataset below PART_SHARDS shards): the plain permutation, as before
    assert np.array_equal(
        shard_order(50, seed=3, epoch=2, shuffle=True, group=group),
        np.random.default_rng([3, 2, 0x5EED]).permutation(50),
    )
