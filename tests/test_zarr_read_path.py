"""Zarr shards are read without zarr on the hot path (storage.layout.ZarrShard parses the
metadata and decodes plain and zstd chunks itself). These tests pin that the fast path
returns exactly what zarr returns, falls back to zarr for codecs it does not decode, and
refuses bad chunks instead of guessing."""

import os

import forge
import numpy as np
import pytest
import zarr
from conftest import write_toy
from zarr.storage import LocalStore

from storage import layout, open_soft_labels
from storage.errors import CorruptShardError
from storage.layout import ZarrShard, columns_for


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Blocks (Zarr chunks) of a few dozen rows, so shards have several chunks and edge chunks."""
    monkeypatch.setattr(layout, "MIN_BLOCK_ROWS", 1)
    monkeypatch.setattr(layout, "TARGET_BLOCK_BYTES", 1500)


def _shard(uri, i=0):
    m, entries = forge.load(uri)  # format 3: the entries are in the index files
    return os.path.join(uri, entries[i]["path"]), columns_for(m)


def _open(root, spec):
    return ZarrShard(
        LocalStore(root, read_only=True),
        spec,
        name="test shard",
        raw_get=lambda k: np.fromfile(os.path.join(root, k), dtype=np.uint8),
        raw_has=lambda k: os.path.isfile(os.path.join(root, k)),
    )


@pytest.mark.parametrize("rep, k", [("dense", None), ("topk", 4)])
def test_fast_path_equals_zarr_for_every_column_and_range(tmp_path, rep, k):
    uri = str(tmp_path / "ds")
    write_toy(uri, backend="zarr", n=300, c=12, shards=2, views=2, representation=rep, k=k)
    root, spec = _shard(uri)
    shard = _open(root, spec)
    assert all(m is not None for m in shard.meta.values())  # every column takes the fast path
    assert any(m.zstd for m in shard.meta.values()) and any(not m.zstd for m in shard.meta.values())
    g = zarr.open_group(root, mode="r")
    rng = np.random.default_rng(0)
    ranges = shard.blocks() + [(0, shard.num_rows), (5, 70), (63, 65), (shard.num_rows - 1, shard.num_rows)]
    ranges += [tuple(sorted(rng.integers(0, shard.num_rows + 1, 2))) for _ in range(20)]
    for a, b in ranges:
        if a == b:
            continue
        got = shard.read(a, b, [c.name for c in spec])
        for c in spec:
            want = g[c.name][a:b]
            assert got[c.name].dtype == want.dtype and np.array_equal(got[c.name], want), (c.name, a, b)


def test_other_codecs_go_through_zarr(tmp_path):
    """A shard whose column uses a codec the fast path does not decode (gzip) is read by zarr."""
    uri = str(tmp_path / "ds")
    write_toy(uri, backend="zarr", n=100, c=6, shards=1)
    root, spec = _shard(uri)
    ref = _open(root, spec).read(0, 100, [c.name for c in spec])
    g = zarr.open_group(root, mode="a")
    ids, chunks = g["sample_id"][:], g["sample_id"].chunks
    assert chunks[0] <= 50  # several chunks
    del g["sample_id"]
    a = g.create_array(
        "sample_id",
        shape=ids.shape,
        chunks=chunks,
        dtype=ids.dtype,
        compressors=zarr.codecs.GzipCodec(level=1),
        dimension_names=["row"],
    )
    a[:] = ids
    shard = _open(root, spec)
    assert shard.meta["sample_id"] is None and shard.meta["logits"] is not None
    got = shard.read(0, 100, [c.name for c in spec])
    assert all(np.array_equal(got[n], ref[n]) for n in ref)
    os.remove(os.path.join(root, "sample_id", "c", "1"))  # general path: a missing chunk is no zero
    with pytest.raises(CorruptShardError, match="chunk sample_id/c/1 is missing"):
        shard.read(0, 100, ["sample_id"])


def test_bad_chunks_are_refused_with_the_chunk_named(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, backend="zarr", n=100, c=6, shards=1)
    root, spec = _shard(uri)
    names = [c.name for c in spec]
    with open(os.path.join(root, "sample_id", "c", "1"), "wb") as f:  # zstd column, not a zstd frame
        f.write(b"not zstd at all")
    with pytest.raises(CorruptShardError, match="chunk sample_id/c/1 does not decompress"):
        _open(root, spec).read(50, 100, names)
    path = os.path.join(root, "logits", "c", "0", "0")  # plain column, short object
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-2])
    with pytest.raises(CorruptShardError, match="chunk logits/c/0/0 holds"):
        _open(root, spec).read(0, 50, ["logits"])
    os.remove(path)
    with pytest.raises(CorruptShardError, match="chunk logits/c/0/0 is missing"):
        _open(root, spec).read(0, 50, ["logits"])
    os.remove(os.path.join(root, "view", "zarr.json"))
    with pytest.raises(CorruptShardError, match="array 'view' is missing"):
        _open(root, spec)


def test_the_reader_streams_the_same_rows_as_before(tmp_path):
    """End to end through open_soft_labels: stored values are z/T in float16, every row once."""
    uri = str(tmp_path / "ds")
    z = write_toy(uri, backend="zarr", n=500, c=10, shards=3, views=2)
    ds = open_soft_labels(uri)
    rows = list(ds.iter_batches(64, shuffle=True, seed=3))
    sid = np.concatenate([b["sample_id"] for b in rows])
    view = np.concatenate([b["view"] for b in rows])
    logits = np.concatenate([b["logits"] for b in rows])
    assert len(sid) == 1000 and len(set(zip(sid.tolist(), view.tolist()))) == 1000
    want = (z[sid * 2 + view] / np.float32(4.0)).astype(np.float16)
    assert np.array_equal(logits.view(np.uint16), want.view(np.uint16))
