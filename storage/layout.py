"""The label schema (which columns a row has) and how one shard's columns become bytes,
for each backend, and how they are read back.

A shard is a set of equal-length columns. 1-D columns (sample_id, view, logsumexp) are
plain columns; 2-D columns of width w (logits, topk_logits, topk_indices, feature) are
per-row vectors, stored so that every common data tool sees numbers and that reading is
a memcpy, because streaming them is the hot path:

- Parquet: a required `fixed_size_list<T>[w]` column (Parquet LIST), written and read by
  storage/parquet_codec.py: DuckDB, polars, pandas, pyarrow.dataset and HF `datasets`
  read it as float arrays, and the reader views each page's values as one buffer.
- Zarr v3: one array per column, chunked along rows only (chunks of `rows_per_block`
  rows, all w columns), with `dimension_names` ("row", "class" | "k" | "feature"), so
  xarray opens a shard as a Dataset and a block read is one object read.

Format 1 datasets (2-D Parquet columns as `fixed_size_binary`) are still read.

Logit columns are uncompressed by default: float logits barely compress (random-ish
mantissas; zstd saved ~8% here) and decompression dominated read time. Small columns
(ids, views, top-k indices) use zstd, which shrinks them several-fold for free.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from . import parquet_codec
from .errors import CorruptShardError
from .token_packing import id_bits, packed_row_bytes

if TYPE_CHECKING:
    from collections.abc import Callable

    import zarr
    from zarr.abc.store import Store

# A block (Parquet row group / Zarr chunk) of ~16 MiB: large enough that per-block
# overhead vanishes, small enough that a shuffle buffer of a few blocks fits in RAM.
TARGET_BLOCK_BYTES = 16 << 20
MIN_BLOCK_ROWS = 1024
DATA_DIR = "data"  # shards live here, apart from manifest.json and _commits/


@dataclass(frozen=True)
class Column:
    name: str
    dtype: str  # numpy dtype name
    width: int | None  # None for 1-D columns
    dim: str = "class"  # name of the second dimension (Zarr dimension_names)
    binary: bool = False  # uint8 (rows, width) stored as Parquet fixed_size_binary[width] (packed ids)

    def to_dict(self) -> dict:
        d = {"dtype": self.dtype, "shape": [] if self.width is None else [self.width]}
        if self.binary:
            d["storage"] = "fixed_size_binary"
        return d


TOKEN_KINDS = ("token_topk", "token_sampled")
# the stored dtype of each token value dtype: bfloat16 as its upper 16 bits, uint8 as log-prob codes
TOKEN_VALUE_STORAGE = {"float16": "float16", "bfloat16": "uint16", "uint8": "uint8", "float32": "float32"}


def token_id_column(name: str, width: int, vocab_size: int, dim: str) -> Column:
    """Token ids: uint16 lists when the vocabulary fits 16 bits, else bit-packed bytes
    (storage/token_packing.py) in one fixed_size_binary[ceil(width * bits / 8)] value per row."""
    bits = id_bits(vocab_size)
    if bits == 16:
        return Column(name, "uint16", width, dim)
    return Column(name, "uint8", packed_row_bytes(width, bits), "byte", binary=True)


def index_dtype(num_classes: int) -> str:
    """Smallest unsigned integer that holds class ids 0..C-1 (uint8 up to 256 classes)."""
    if num_classes <= 1 << 8:
        return "uint8"
    if num_classes <= 1 << 16:
        return "uint16"
    return "int32"


def columns_for(manifest: dict) -> list[Column]:
    """The label schema: the columns of a row, implied by a manifest's representation.
    The same for both backends; the one place a new layout adds its columns."""
    rep, C = manifest["representation"], manifest["num_classes"]
    cols = [Column("sample_id", "int64", None), Column("view", "int32", None)]
    if rep["kind"] in TOKEN_KINDS:
        # one row per token position; the rows of a sequence are contiguous, positions 0..L-1
        cols.append(Column("position", "int32", None))
        if rep.get("tokens"):  # the target token of each row: generated text stores its own tokens
            cols.append(Column("token", "int32", None))
        if rep.get("target_logprob"):  # the teacher's log-prob of each row's target (cross-tokenizer)
            cols.append(Column("target_logprob", "float32", None))
        V = manifest.get("vocab_size", C)
        if rep["kind"] == "token_topk":
            return cols + [
                token_id_column("topk_ids", rep["k"], V, "k"),
                Column("topk_logprobs", TOKEN_VALUE_STORAGE[rep["dtype"]], rep["k"], "k"),
                Column("missing_mass", rep["tail_dtype"], None),
            ]
        return cols + [
            token_id_column("sample_ids", rep["s_max"], V, "s"),
            Column("sample_counts", rep["count_dtype"], rep["s_max"], "s"),
        ]
    if rep["kind"] == "dense":
        cols.append(Column("logits", rep["dtype"], C, "class"))
    else:
        cols += [
            Column("topk_logits", rep["dtype"], rep["k"], "k"),
            Column("topk_indices", rep.get("index_dtype") or index_dtype(C), rep["k"], "k"),
            Column("logsumexp", "float32", None),
        ]
    feat = manifest.get("feature")
    if feat:
        cols.append(Column("feature", feat["dtype"], int(np.prod(feat["shape"])), "feature"))
    return cols


def rows_per_block(row_bytes: int, num_rows: int, align: int = 1) -> int:
    """Rows per block: ~TARGET_BLOCK_BYTES, and blocks of equal size so that Zarr's last
    chunk (always stored at full chunk size) wastes no space. `align` (the sequence length
    of token layouts): blocks hold whole sequences, a multiple of `align` rows."""
    align = max(1, int(align))
    target = max(MIN_BLOCK_ROWS, TARGET_BLOCK_BYTES // max(1, row_bytes))
    units = max(1, -(-max(1, num_rows) // align))  # sequences (rows when align = 1)
    target_units = max(1, -(-target // align))
    blocks = -(-units // target_units)
    return -(-units // blocks) * align


def seq_align(manifest: dict) -> int:
    """Rows per sequence for token layouts (blocks are cut at sequence boundaries), else 1."""
    return int(manifest["seq_len"]) if manifest["representation"]["kind"] in TOKEN_KINDS else 1


def row_bytes(columns: list[Column]) -> int:
    return sum(np.dtype(c.dtype).itemsize * (c.width or 1) for c in columns)


def shard_basename(index: int) -> str:
    return f"shard-{index:05d}"


# ---------------------------------------------------------------- hashing
# A shard's bytes are `objects`: {relative path: [buffers]} ("" for a single file), each
# value a list of bytes-like parts that are written (and hashed) in order, so the big
# columns are never joined into one copy.


def tree_sha256(objects: dict[str, list]) -> str:
    """sha256 of a shard. One file: the file's bytes. A directory (Zarr): over sorted
    relative paths, each as `path NUL size NUL bytes` (see docs/format.md)."""
    h = hashlib.sha256()
    if list(objects) == [""]:
        for part in objects[""]:
            h.update(part)
        return h.hexdigest()
    for key in sorted(objects):
        parts = objects[key]
        h.update(key.encode() + b"\0" + str(sum(_nbytes(p) for p in parts)).encode() + b"\0")
        for part in parts:
            h.update(part)
    return h.hexdigest()


def _nbytes(part) -> int:
    return part.nbytes if isinstance(part, memoryview) else len(part)


def objects_nbytes(objects: dict[str, list]) -> int:
    return sum(_nbytes(p) for parts in objects.values() for p in parts)


# ---------------------------------------------------------------- Parquet


def _codec_dtype(c: Column) -> str:
    return parquet_codec.BINARY if c.binary else c.dtype


def encode_parquet(
    cols: dict[str, np.ndarray], spec: list[Column], compression: str, align: int = 1
) -> dict[str, list]:
    n = len(cols["sample_id"])
    fields = [(c.name, _codec_dtype(c), c.width) for c in spec]
    codecs = {c.name: (compression if c.width is not None and c.dtype.startswith("float") else "zstd") for c in spec}
    parts = parquet_codec.encode(
        fields, cols, rows_per_group=rows_per_block(row_bytes(spec), n, align), compression=codecs
    )
    return {"": parts}


def _decode_arrow(col: pa.ChunkedArray | pa.Array, c: Column) -> np.ndarray:
    """pyarrow's decoding (the slow, general path; also format 1's fixed_size_binary)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if c.width is None:
        return col.to_numpy(zero_copy_only=False).astype(c.dtype, copy=False)
    if pa.types.is_fixed_size_binary(col.type):
        item = np.dtype(c.dtype).itemsize
        return np.frombuffer(
            col.buffers()[1], dtype=c.dtype, count=len(col) * c.width, offset=col.offset * c.width * item
        ).reshape(len(col), c.width)
    return col.flatten().to_numpy(zero_copy_only=False).astype(c.dtype, copy=False).reshape(len(col), c.width)


def _arrow_width(t: pa.DataType, c: Column) -> int | None:
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_fixed_size_binary(t):
        return t.byte_width // np.dtype(c.dtype).itemsize
    return None


class ParquetShard:
    """Reads row ranges of one Parquet shard, a row group at a time.

    `source` is a local path or a pyarrow buffer holding the (already verified) file."""

    def __init__(self, source: str | pa.Buffer, spec: list[Column], name: str = "shard"):
        self.name = name
        self.file = pq.ParquetFile(
            pa.BufferReader(source) if isinstance(source, pa.Buffer) else source, pre_buffer=False
        )
        self.raw = source if isinstance(source, pa.Buffer) else None
        self.path = None if self.raw is not None else source
        self._fh = None
        self.spec = {c.name: c for c in spec}
        md = self.file.metadata
        self.num_rows = md.num_rows
        self.block_starts = np.cumsum([0] + [md.row_group(i).num_rows for i in range(md.num_row_groups)])
        schema = self.file.schema_arrow
        for c in spec:  # the file must hold exactly the columns the manifest describes
            if c.name not in schema.names:
                raise CorruptShardError(f"{name}: column {c.name!r} is missing (has {schema.names})")
            w = _arrow_width(schema.field(c.name).type, c)
            if w != c.width:
                raise CorruptShardError(f"{name}: column {c.name!r} has width {w}, the manifest says {c.width}")
        leaves = [md.schema.column(j).path.split(".")[0] for j in range(md.num_columns)]
        self.col_index = {n: leaves.index(n) for n in self.spec}

    def blocks(self) -> list[tuple[int, int]]:
        s = self.block_starts
        return [(int(s[i]), int(s[i + 1])) for i in range(len(s) - 1)]

    def _chunk_bytes(self, start: int, size: int):
        if self.raw is not None:
            return self.raw.slice(start, size)
        if self._fh is None:
            self._fh = pa.OSFile(self.path)  # buffers from Arrow's pool: reused pages
        self._fh.seek(start)
        return self._fh.read_buffer(size)

    def _read_group(self, g: int, name: str) -> np.ndarray:
        c = self.spec[name]
        rg = self.file.metadata.row_group(g)
        cm = rg.column(self.col_index[name])
        start = cm.dictionary_page_offset if cm.has_dictionary_page else cm.data_page_offset
        size = cm.total_compressed_size
        # pyarrow names Parquet's LZ4_RAW (7) "LZ4"; the old framed LZ4 (5) is left to pyarrow
        codec = {"UNCOMPRESSED": 0, "ZSTD": 6, "LZ4": 7, "LZ4_RAW": 7}.get(cm.compression, -1)
        if codec >= 0 and not cm.has_dictionary_page:
            buf = self._chunk_bytes(start, size)
            if buf.size != size:
                raise CorruptShardError(f"{self.name}: row group {g} column {name} is truncated")
            a = parquet_codec.read_column_chunk(buf, size, _codec_dtype(c), c.width, rg.num_rows, codec)
            if a is not None:
                return a
        t = self.file.read_row_group(g, columns=[name], use_threads=False)
        return _decode_arrow(t.column(0), c)

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        s = self.block_starts
        first = int(np.searchsorted(s, start, side="right") - 1)
        last = max(first + 1, int(np.searchsorted(s, stop, side="left")))
        out = {}
        for name in columns:
            parts = [self._read_group(g, name) for g in range(first, last)]
            a = parts[0] if len(parts) == 1 else np.concatenate(parts)
            out[name] = a[start - int(s[first]) : stop - int(s[first])]
        return out


# ---------------------------------------------------------------- Zarr


def _zarr_compressors(compression: str, c: Column):
    from zarr.codecs import BloscCodec, ZstdCodec

    if c.width is None or not c.dtype.startswith("float"):
        return ZstdCodec(level=3)
    return {"none": None, "lz4": BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), "zstd": ZstdCodec(level=3)}[
        compression
    ]


def encode_zarr(cols: dict[str, np.ndarray], spec: list[Column], compression: str, align: int = 1) -> dict[str, list]:
    import zarr
    from zarr.storage import MemoryStore

    n = len(cols["sample_id"])
    block = rows_per_block(row_bytes(spec), n, align)
    store_dict: dict = {}
    g = zarr.open_group(
        MemoryStore(store_dict),
        mode="w",
        zarr_format=3,
        attributes={"num_rows": n, "columns": {c.name: c.to_dict() for c in spec}},
    )
    direct: dict[str, list] = {}
    for c in spec:
        a = np.ascontiguousarray(cols[c.name], dtype=c.dtype)
        shape, chunks = ((n,), (block,)) if c.width is None else ((n, c.width), (block, c.width))
        dims = ("row",) if c.width is None else ("row", c.dim)
        compressors = _zarr_compressors(compression, c)
        # every chunk is written, even one equal to the fill value: a missing chunk is
        # then always corruption, never "zeros"
        arr = g.create_array(
            c.name,
            shape=shape,
            dtype=c.dtype,
            chunks=chunks,
            dimension_names=dims,
            compressors=compressors,
            fill_value=0,
            config={"write_empty_chunks": True},
        )
        if compressors is None and a.dtype.byteorder in ("=", "<", "|") and sys.byteorder == "little":
            # uncompressed (the logit columns, most of the bytes): a chunk is its rows' bytes in
            # C order, the edge chunk padded with the fill value to full size (the Zarr v3 spec;
            # what zarr writes, byte for byte). Views of the array, not copies through zarr's
            # buffers: the writer then runs at the durable floor (hash, write, fsync)
            direct.update(_raw_chunks(c.name, a, block))
        else:
            arr[...] = a
    out = {k: [v.to_bytes()] for k, v in store_dict.items()}
    out.update(direct)
    return dict(sorted(out.items()))


def _raw_chunks(name: str, a: np.ndarray, block: int) -> dict[str, list]:
    """{chunk key: [bytes parts]} of an uncompressed array chunked (block, width) along rows
    (default chunk key encoding: `c/i` 1-D, `c/i/0` 2-D)."""
    n, row = len(a), a[:1].nbytes if len(a) else a.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
    suffix = "" if a.ndim == 1 else "/0"
    flat = memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")
    out = {}
    for i, r0 in enumerate(range(0, max(n, 1), block)):
        r1 = min(n, r0 + block)
        parts: list = [flat[r0 * row : r1 * row]]
        if r1 - r0 < block:  # the edge chunk is stored at full size
            parts.append(bytes((block - (r1 - r0)) * row))
        out[f"{name}/c/{i}{suffix}"] = parts
    return out


class ZarrShard:
    """Reads row ranges of one Zarr shard group.

    Fast path, for the arrays this format writes: each column's zarr.json is parsed here,
    and each chunk object is fetched and viewed
    with numpy: plain chunks (codecs [bytes little-endian]: the logit columns) in one copy,
    zstd chunks ([bytes, zstd]: ids, views, top-k indices) in one decompression. The chunk
    layout is fixed by the Zarr v3 spec (C order, edge chunks stored at full size). Opening
    zarr's own objects costs ~6 ms a shard and decoding small columns through it ~3 ms a
    block, which was most of the streaming time. A chunk object that does not exist is
    corruption (every chunk is written), never the fill value. Any other codec chain or
    key encoding goes through zarr. The bytes were hashed against the manifest before this
    class sees them (shards.open_shard); what they decode to is still checked.
    """

    def __init__(
        self,
        store: Store,
        spec: list[Column],
        raw_get: Callable[[str], bytes | np.ndarray],
        raw_has: Callable[[str], bool],
        name: str = "shard",
    ):
        self.name = name
        self.store = store
        self.spec = {c.name: c for c in spec}
        self.raw_get = raw_get  # key -> bytes-like, or raises FileNotFoundError
        self.raw_has = raw_has  # key -> bool
        self._group = None  # zarr's group, opened only for the general path
        self.meta: dict[str, _ChunkedArray | None] = {}
        for c in spec:
            m = self._metadata(c.name)
            shape = m.shape if m is not None else self.group()[c.name].shape
            if (c.width is None and len(shape) != 1) or (c.width is not None and tuple(shape[1:]) != (c.width,)):
                raise CorruptShardError(
                    f"{name}: array {c.name!r} has shape {shape}, the manifest says "
                    f"(rows{'' if c.width is None else f', {c.width}'})"
                )
            self.meta[c.name] = m
        first = self.meta[spec[0].name] or self.group()[spec[0].name]
        self.num_rows = int(first.shape[0])
        self.chunk_rows = int(first.chunks[0])

    def group(self) -> zarr.Group:
        if self._group is None:
            import zarr

            self._group = zarr.open_group(self.store, mode="r", zarr_format=3)
        return self._group

    def _metadata(self, column: str):
        """The column's array metadata when the fast path can read it, else None (zarr reads it)."""
        try:
            meta = json.loads(bytes(self.raw_get(f"{column}/zarr.json")))
        except FileNotFoundError:
            raise CorruptShardError(f"{self.name}: array {column!r} is missing") from None
        except ValueError as e:
            raise CorruptShardError(f"{self.name}: {column}/zarr.json is not valid JSON ({e})") from None
        return _ChunkedArray.parse(meta)

    def blocks(self) -> list[tuple[int, int]]:
        n, b = self.num_rows, self.chunk_rows
        return [(s, min(n, s + b)) for s in range(0, n, b)]

    def read(self, start: int, stop: int, columns: list[str]) -> dict[str, np.ndarray]:
        out = {}
        for name in columns:
            m = self.meta[name]
            if m is None:  # the general path: zarr decodes
                arr = self.group()[name]
                rows = arr.chunks[0]
                # zarr would return the fill value for a missing chunk
                for i in range(start // rows, -(-stop // rows)):
                    key = f"{name}/{arr.metadata.encode_chunk_key((i,) + (0,) * (arr.ndim - 1))}"
                    if not self.raw_has(key):
                        raise CorruptShardError(f"{self.name}: chunk {key} is missing")
                out[name] = arr[start:stop]
                continue
            rows = m.chunks[0]
            c0 = start // rows
            parts = [self._chunk(name, m, i) for i in range(c0, -(-stop // rows))]
            a = parts[0] if len(parts) == 1 else np.concatenate(parts)
            lo = start - c0 * rows
            out[name] = a[lo : lo + stop - start]
        return out

    def _chunk(self, name: str, m: _ChunkedArray, i: int) -> np.ndarray:
        key = f"{name}/{m.chunk_key(i)}"
        try:
            data = self.raw_get(key)
        except FileNotFoundError:
            raise CorruptShardError(f"{self.name}: chunk {key} is missing") from None
        want = m.chunk_bytes
        if m.zstd:
            try:
                data = _ZSTD.decompress(memoryview(data), decompressed_size=want, asbytes=False)
            except Exception as e:  # pyarrow raises OSError/ArrowException for a bad frame
                raise CorruptShardError(f"{self.name}: chunk {key} does not decompress ({e})") from None
        got = len(memoryview(data).cast("B"))
        if got != want:
            raise CorruptShardError(f"{self.name}: chunk {key} holds {got} bytes, its array's metadata says {want}")
        return np.frombuffer(data, dtype=m.dtype).reshape(m.chunks)


_ZSTD = pa.Codec("zstd")


@dataclass(frozen=True)
class _ChunkedArray:
    """What the fast path needs of one Zarr v3 array's metadata."""

    shape: tuple
    chunks: tuple
    dtype: np.dtype
    zstd: bool

    @property
    def chunk_bytes(self) -> int:
        return int(np.prod(self.chunks)) * self.dtype.itemsize

    def chunk_key(self, i: int) -> str:
        return "c/" + "/".join(str(j) for j in (i,) + (0,) * (len(self.shape) - 1))

    @staticmethod
    def parse(meta: dict) -> _ChunkedArray | None:
        """A _ChunkedArray for the layouts this format writes, else None."""
        try:
            codecs = meta["codecs"]
            names = [c["name"] for c in codecs]
            if names not in (["bytes"], ["bytes", "zstd"]) or sys.byteorder != "little":
                return None
            if (codecs[0].get("configuration") or {}).get("endian", "little") != "little":
                return None
            if meta.get("storage_transformers") or meta["chunk_grid"]["name"] != "regular":
                return None
            enc = meta["chunk_key_encoding"]
            if enc["name"] != "default" or (enc.get("configuration") or {}).get("separator", "/") != "/":
                return None
            dtype = np.dtype(meta["data_type"])
            shape = tuple(int(x) for x in meta["shape"])
            chunks = tuple(int(x) for x in meta["chunk_grid"]["configuration"]["chunk_shape"])
        except (KeyError, TypeError, ValueError):
            return None  # unusual or damaged metadata: zarr reads it, or says why not
        if (
            dtype.kind not in "iufb"
            or len(chunks) != len(shape)
            or not shape
            or min(chunks) < 1
            or tuple(chunks[1:]) != tuple(shape[1:])
        ):
            return None
        return _ChunkedArray(shape, chunks, dtype, names[-1] == "zstd")
