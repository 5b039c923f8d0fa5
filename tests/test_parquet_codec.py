"""storage/parquet_codec.py writes standard Parquet: pyarrow's own reader must return
exactly what distillery's fast reader returns, for every dtype, width, compression and
row-group cut the writer can produce; anything unexpected falls back to pyarrow."""

import io
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_toy

from storage import open_soft_labels, parquet_codec
from storage.layout import Column, ParquetShard


def _file(cols, arrays, rows_per_group, compression):
    return b"".join(
        bytes(p) for p in parquet_codec.encode(cols, arrays, rows_per_group=rows_per_group, compression=compression)
    )


@pytest.mark.parametrize("compression", ["none", "zstd", "lz4"])
@pytest.mark.parametrize("n, width, rpg", [(1, 1, 1), (37, 10, 8), (1000, 257, 300), (5, 3, 100)])
def test_every_column_type_reads_the_same_in_pyarrow_and_the_fast_path(tmp_path, compression, n, width, rpg):
    rng = np.random.default_rng(n * width)
    cols = [
        ("sample_id", "int64", None),
        ("view", "int32", None),
        ("f16", "float16", width),
        ("f32", "float32", width),
        ("u8", "uint8", width),
        ("u16", "uint16", width),
        ("i32", "int32", width),
        ("lse", "float32", None),
    ]
    arrays = {
        "sample_id": rng.integers(-(2**40), 2**40, n),
        "view": rng.integers(0, 9, n).astype(np.int32),
        "f16": rng.standard_normal((n, width)).astype(np.float16),
        "f32": rng.standard_normal((n, width)).astype(np.float32),
        "u8": rng.integers(0, 256, (n, width)).astype(np.uint8),
        "u16": rng.integers(0, 65536, (n, width)).astype(np.uint16),
        "i32": rng.integers(-(2**31), 2**31 - 1, (n, width)).astype(np.int32),
        "lse": rng.standard_normal(n).astype(np.float32),
    }
    raw = _file(cols, arrays, rpg, {c: compression for c, _, _ in cols})
    t = pq.read_table(io.BytesIO(raw))
    assert t.num_rows == n and pq.read_metadata(io.BytesIO(raw)).num_row_groups == -(-n // rpg)
    path = tmp_path / "f.parquet"
    path.write_bytes(raw)
    shard = ParquetShard(str(path), [Column(c, d, w) for c, d, w in cols])

    def no_fallback(*a, **k):
        raise AssertionError("the fast path fell back to pyarrow for a file the codec wrote")

    shard.file.read_row_group = no_fallback
    fast = shard.read(0, n, [c for c, _, _ in cols])
    for name, dtype, w in cols:
        col = t.column(name).combine_chunks()
        assert col.type == (
            pa.from_numpy_dtype(np.dtype(dtype))
            if w is None
            else pa.list_(pa.field("element", pa.from_numpy_dtype(np.dtype(dtype)), nullable=False), w)
        )
        ref = col.to_numpy() if w is None else col.flatten().to_numpy().reshape(n, w)
        assert np.array_equal(ref, arrays[name]) and np.array_equal(fast[name], arrays[name]), name
        assert fast[name].dtype == np.dtype(dtype)
    # a row range across row groups
    a, b = n // 3, max(n // 3 + 1, (2 * n) // 3)
    part = shard.read(a, b, ["f16", "sample_id"])
    assert np.array_equal(part["f16"], arrays["f16"][a:b]) and np.array_equal(
        part["sample_id"], arrays["sample_id"][a:b]
    )


def test_statistics_let_pyarrow_prune_by_sample_id(tmp_path):
    cols = [("sample_id", "int64", None), ("view", "int32", None), ("logits", "float16", 4)]
    n = 1000
    arrays = {"sample_id": np.arange(n), "view": np.zeros(n, np.int32), "logits": np.ones((n, 4), np.float16)}
    raw = _file(cols, arrays, 100, {})
    md = pq.read_metadata(io.BytesIO(raw))
    st = md.row_group(3).column(0).statistics
    assert st.has_min_max and (st.min, st.max) == (300, 399)


def test_files_written_by_pyarrow_are_read_through_the_fallback(tmp_path):
    """A shard that is not in the codec's page shape (here: pyarrow's own writer, V1
    pages and dictionary encoding) still reads correctly."""
    uri = str(tmp_path / "ds")
    write_toy(uri, n=50, shards=1)
    ds = open_soft_labels(uri)
    want = ds.take(np.arange(50))
    entry = ds.shards[0]
    t = pq.read_table(os.path.join(uri, entry["path"]))
    other = tmp_path / "pyarrow.parquet"
    pq.write_table(t, other, use_dictionary=True, data_page_version="1.0", row_group_size=7)
    sh = ParquetShard(str(other), ds.columns)
    got = sh.read(0, 50, ["sample_id", "logits"])
    assert np.array_equal(got["logits"], want["logits"]) and np.array_equal(got["sample_id"], want["sample_id"])


@pytest.mark.parametrize("compression", ["none", "zstd"])
@pytest.mark.parametrize("n, width, rpg", [(1, 1, 1), (37, 11, 8), (300, 68, 128)])
def test_fixed_size_binary_columns_read_the_same_in_pyarrow_and_the_fast_path(tmp_path, compression, n, width, rpg):
    """Bit-packed token ids: uint8 (rows, width) stored as fixed_size_binary[width]."""
    rng = np.random.default_rng(width)
    cols = [("sample_id", "int64", None), ("packed", parquet_codec.BINARY, width), ("u8", "uint8", 4)]
    arrays = {
        "sample_id": np.arange(n),
        "packed": rng.integers(0, 256, (n, width)).astype(np.uint8),
        "u8": rng.integers(0, 256, (n, 4)).astype(np.uint8),
    }
    raw = _file(cols, arrays, rpg, {c: compression for c, _, _ in cols})
    t = pq.read_table(io.BytesIO(raw))
    col = t.column("packed").combine_chunks()
    assert col.type == pa.binary(width)
    assert np.array_equal(
        np.frombuffer(col.buffers()[1], np.uint8, count=n * width).reshape(n, width), arrays["packed"]
    )
    path = tmp_path / "f.parquet"
    path.write_bytes(raw)
    spec = [
        Column("sample_id", "int64", None),
        Column("packed", "uint8", width, "byte", binary=True),
        Column("u8", "uint8", 4),
    ]
    shard = ParquetShard(str(path), spec)
    fast = shard.read(0, n, ["packed", "u8"])
    assert fast["packed"].dtype == np.uint8 and np.array_equal(fast["packed"], arrays["packed"])
    assert np.array_equal(fast["u8"], arrays["u8"])
    # a pyarrow-written copy (V1 pages, dictionary) reads through the fallback
    other = tmp_path / "pyarrow.parquet"
    pq.write_table(t, other, use_dictionary=True, data_page_version="1.0", row_group_size=7)
    slow = ParquetShard(str(other), spec).read(0, n, ["packed"])
    assert np.array_equal(slow["packed"], arrays["packed"])
