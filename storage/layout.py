"""How one shard's columns become bytes, for each backend, and how they are read back.

A shard is a set of equal-length columns. 1-D columns (sample_id, view, logsumexp)
are stored natively. 2-D columns of width w (logits, topk_logits, topk_indices,
feature) are stored so that reading is a memcpy, because streaming them is the hot path:

- Parquet: a `fixed_size_binary(w * itemsize)` column, one value per row, its numpy
  dtype and width in the field metadata. Measured here (100k x 1000 float16): a
  FixedSizeList<float16> + zstd column read at ~0.05x np.load; fixed_size_binary,
  uncompressed, at ~0.7x, because decoding is one contiguous buffer that numpy views
  without a copy.
- Zarr v3: one array per column, chunked along rows only (chunks of `rows_per_block`
  rows, all w columns), so a block read is one object read.

Logit columns are uncompressed by default: float logits barely compress (random-ish
mantissas; zstd saved ~8% here) and decompression dominated read time. Small columns
(ids, views) use zstd, which shrinks them ~10x for free.
"""
from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

# A block (Parquet row group / Zarr chunk) of ~16 MiB: large enough that per-block
# overhead vanishes, small enough that a shuffle buffer of a few blocks fits in RAM.
TARGET_BLOCK_BYTES = 16 << 20
MIN_BLOCK_ROWS = 1024


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str        # numpy dtype name
    width: int | None  # None for 1-D columns

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": [] if self.width is None else [self.width]}


def rows_per_block(row_bytes: int, num_rows: int) -> int:
    """Rows per block: ~TARGET_BLOCK_BYTES, and blocks of equal size so that Zarr's last
    chunk (always stored at full chunk size) wastes no space."""
    target = max(MIN_BLOCK_ROWS, TARGET_BLOCK_BYTES // max(1, row_bytes))
    num_rows = max(1, num_rows)
    blocks = -(-num_rows // target)
    return -(-num_rows // blocks)


def row_bytes(columns: list[Column]) -> int:
    return sum(np.dtype(c.dtype).itemsize * (c.width or 1) for c in columns)


def shard_basename(index: int) -> str:
    return f"shard-{index:05d}"


def tree_sha256(objects: dict[str, bytes]) -> str:
    """sha256 of a shard. One file: the file's bytes. A directory (Zarr): over sorted
    relative paths, each as `path NUL size NUL bytes` (see docs/format.md)."""
    h = hashlib.sha256()
    if list(objects) == [""]:
        h.update(objects[""])
        return h.hexdigest()
    for key in sorted(objects):
        data = objects[key]
        h.update(key.encode() + b"\0" + str(len(data)).encode() + b"\0")
        h.update(data)
    return h.hexdigest()


# ---------------------------------------------------------------- Parquet

def _codec(compression: str) -> str:
    return "none" if compression == "none" else compression


def encode_parquet(cols: dict[str, np.ndarray], spec: list[Column], compression: str) -> dict[str, bytes]:
    n = len(cols["sample_id"])
    fields, arrays, per_col_codec = [], [], {}
    for c in spec:
        a = np.ascontiguousarray(cols[c.name], dtype=c.dtype)
        if c.width is None:
            arrays.append(pa.array(a))
            fields.append(pa.field(c.name, arrays[-1].type))
            per_col_codec[c.name] = "zstd"
        else:
            item = np.dtype(c.dtype).itemsize * c.width
            arrays.append(pa.FixedSizeBinaryArray.from_buffers(pa.binary(item), n, [None, pa.py_buffer(a)]))
            fields.append(pa.field(c.name, pa.binary(item), nullable=False,
                                   metadata={b"dtype": c.dtype.encode(), b"width": str(c.width).encode()}))
            per_col_codec[c.name] = _codec(compression)
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    buf = io.BytesIO()
    pq.write_table(
        table, buf,
        row_group_size=rows_per_block(row_bytes(spec), n),
        compression=per_col_codec,
        use_dictionary=False,
        write_statistics=["sample_id", "view"],
        data_page_size=1 << 20,
    )
    return {"": buf.getvalue()}


def _decode_arrow(col: pa.ChunkedArray | pa.Array, c: Column) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if c.width is None:
        return col.to_numpy(zero_copy_only=False)
    item = np.dtype(c.dtype).itemsize
    # Zero-copy view of the fixed-size values buffer (read-only), honouring slice offsets.
    return np.frombuffer(col.buffers()[1], dtype=c.dtype, count=len(col) * c.width,
                         offset=col.offset * c.width * item).reshape(len(col), c.width)


class ParquetShard:
    """Reads row ranges of one Parquet shard, a row group at a time."""

    def __init__(self, source, spec: list[Column]):
        self.file = pq.ParquetFile(source, pre_buffer=False)
        self.spec = {c.name: c for c in spec}
        md = self.file.metadata
        self.num_rows = md.num_rows
        starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        self.block_starts = starts  # len = num_row_groups + 1

    def blocks(self) -> list[tuple[int, int]]:
        s = self.block_starts
        return [(int(s[i]), int(s[i + 1])) for i in range(len(s) - 1)]

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        s = self.block_starts
        first = int(np.searchsorted(s, start, side="right") - 1)
        last = int(np.searchsorted(s, stop, side="left"))
        groups = list(range(first, max(first + 1, last)))
        t = self.file.read_row_groups(groups, columns=columns, use_threads=False)
        t = t.slice(start - int(s[first]), stop - start)
        return {name: _decode_arrow(t.column(name), self.spec[name]) for name in columns}


# ---------------------------------------------------------------- Zarr

def _zarr_compressors(compression: str, one_d: bool):
    from zarr.codecs import BloscCodec, ZstdCodec
    if one_d:
        return ZstdCodec(level=3)
    return {"none": None, "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"),
            "zstd": ZstdCodec(level=3)}[compression]


def encode_zarr(cols: dict[str, np.ndarray], spec: list[Column], compression: str) -> dict[str, bytes]:
    import zarr
    from zarr.storage import MemoryStore

    n = len(cols["sample_id"])
    block = rows_per_block(row_bytes(spec), n)
    store_dict: dict = {}
    g = zarr.open_group(MemoryStore(store_dict), mode="w", zarr_format=3,
                        attributes={"num_rows": n, "columns": {c.name: c.to_dict() for c in spec}})
    for c in spec:
        a = np.ascontiguousarray(cols[c.name], dtype=c.dtype)
        shape, chunks = ((n,), (block,)) if c.width is None else ((n, c.width), (block, c.width))
        arr = g.create_array(c.name, shape=shape, dtype=c.dtype, chunks=chunks,
                             compressors=_zarr_compressors(compression, c.width is None),
                             fill_value=0)
        arr[...] = a
    return {k: v.to_bytes() for k, v in store_dict.items()}


class ZarrShard:
    """Reads row ranges of one Zarr shard group.

    Fast path: a whole-chunk read of an uncompressed array (codecs == [bytes, little
    endian], the default for logit columns) fetches the chunk object's bytes and views
    them with numpy: one copy instead of zarr's two (file -> buffer -> output array),
    which is what lifts Zarr streaming from ~0.45x to ~0.8x np.load here. The chunk
    layout is fixed by the Zarr v3 spec (C order, little endian, edge chunks stored at
    full size); a chunk never written means "all fill_value". Everything else goes
    through zarr.
    """

    def __init__(self, store, spec: list[Column], raw_get=None):
        import zarr
        self.group = zarr.open_group(store, mode="r", zarr_format=3)
        self.spec = {c.name: c for c in spec}
        self.arrays = {}
        self.raw_get = raw_get            # key -> bytes-like, or raises FileNotFoundError
        first = self.group[spec[0].name]
        self.num_rows = int(first.shape[0])
        self.chunk_rows = int(first.chunks[0])

    def blocks(self) -> list[tuple[int, int]]:
        n, b = self.num_rows, self.chunk_rows
        return [(s, min(n, s + b)) for s in range(0, n, b)]

    def _array(self, name):
        if name not in self.arrays:
            arr = self.group[name]
            self.arrays[name] = (arr, self.raw_get is not None and _plain_bytes(arr))
        return self.arrays[name]

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in columns:
            arr, plain = self._array(name)
            whole_chunk = start % self.chunk_rows == 0 and stop - start <= self.chunk_rows \
                and (stop - start == self.chunk_rows or stop == self.num_rows)
            if plain and whole_chunk:
                out[name] = self._read_chunk(arr, name, start // self.chunk_rows)[: stop - start]
            else:
                out[name] = arr[start:stop]
        return out

    def _read_chunk(self, arr, name: str, i: int) -> np.ndarray:
        key = arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))
        shape = arr.chunks
        try:
            data = self.raw_get(f"{name}/{key}")
        except FileNotFoundError:  # zarr skips writing chunks that are all fill_value
            return np.full(shape, arr.metadata.fill_value, dtype=arr.dtype)
        return np.frombuffer(data, dtype=arr.dtype).reshape(shape)


def _plain_bytes(arr) -> bool:
    import sys

    from zarr.codecs import BytesCodec
    codecs = arr.metadata.codecs
    return (sys.byteorder == "little" and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or getattr(codecs[0].endian, "value", codecs[0].endian) == "little")
            and arr.metadata.chunk_key_encoding.separator == "/")
