"""Streaming a table source's input once into its memory-mapped Arrow IPC cache.

The batches of pipeline/data/readers.py become the cache's columns (layout: the module
docstring of pipeline/data/sources.py): sample ids (stable_id, an id column, or the row index),
label codes (LabelColumn), and the payload converted per kind (TextPayload, ImageBytesPayload,
FolderPayload, FeaturePayload), with rows whose payload is null or empty dropped. build_cache
writes the cache and its JSON sidecar atomically while hashing the content fingerprint;
cache_files names them by the cache key, load_cache_meta reads back a complete one and
map_table maps it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.types as pat

from pipeline.data.readers import FolderReader, TableReader

CACHE_VERSION = 2  # bump when the cache layout or what it holds changes (2: images verified while building)
FINGERPRINT_SCHEME = 1  # bump when the content fingerprint is computed differently


# ---------------------------------------------------------------- small helpers


def stable_id(key: str) -> int:
    """A string's sample id: sha256 -> first 8 bytes (big-endian) -> & (2**63 - 1)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") & (2**63 - 1)


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


# ---------------------------------------------------------------- labels and ids while streaming


class LabelColumn:
    """Per-batch label codes (-1 = null). Integers are used as they are; strings get codes in
    first-seen order, remapped to the sorted classes at the end (or the given classes' order)."""

    def __init__(self, inp: TableReader | None, column: str | None, classes: list[str] | None):
        self.column, self.given = column, classes
        self.where = inp.where if inp is not None else ""
        self.mode = None
        self.hf_names = None
        if column is None:
            return
        if inp is None:  # an image folder: codes are sub-folder indices into `classes`
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
                null |= _np(pc.fill_null(pc.is_nan(arr), False)).astype(bool)  # pandas' missing value
                arr = pc.if_else(pa.array(null), pa.scalar(None, arr.type), arr)
                frac = _np(pc.fill_null(pc.not_equal(arr, pc.round(arr)), False)).astype(bool)
                if frac.any():
                    r = int(np.flatnonzero(frac)[0])
                    raise ValueError(
                        f"label column {self.column!r} in {self.where}: labels must be integers, "
                        f"found {arr[r].as_py()!r} at row {row0 + r}"
                    )
            vals = _np(pc.fill_null(pc.cast(arr, pa.int64(), safe=False), 0)).astype(np.int64)
            neg = (vals < 0) & ~null
            if neg.any():
                r = int(np.flatnonzero(neg)[0])
                raise ValueError(
                    f"label column {self.column!r} in {self.where}: negative label {int(vals[r])} at "
                    f"row {row0 + r} (labels are 0..K-1; leave a row's label null for unlabeled)"
                )
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
                    raise ValueError(
                        f"label column {self.column!r} in {self.where}: value {v!r} at row {row0 + r} "
                        f"is not one of classes {self.given}"
                    )
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
            return classes, [order[v] for v in self.seen]  # self.seen iterates in code order
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
                raise ValueError(
                    f"id column {column!r} in {where}: id {arr[r].as_py()} at row {row0 + r} does not fit in int64"
                )
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
        h_data.update(memoryview(bufs[2])[int(offs[0]) : int(offs[-1])])


class TextPayload:
    name, type, kind = "text", pa.large_string(), "text"

    def __init__(self, inp: TableReader, column: str):
        self.column, self.where = column, inp.where
        t = inp.type_of(column)
        if not _is_text(t):
            raise ValueError(
                f"text column {column!r} in {inp.where} is {t}, not text (string); name a string column as text_column"
            )

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

    def hash(self, arr, h_len, h_data, ids=None) -> None:
        _varbin_hash(arr, h_len, h_data)

    def info(self, first) -> dict:
        return {"column": self.column}


class ImageBytesPayload:
    name, type, kind = "image", pa.large_binary(), "image"

    def __init__(self, inp: TableReader, column: str):
        self.column, self.where = column, inp.where
        t = inp.type_of(column)
        self.struct = pat.is_struct(t) and t.get_field_index("bytes") >= 0
        if not (self.struct or pat.is_binary(t) or pat.is_large_binary(t)):
            raise ValueError(
                f"image column {column!r} in {inp.where} is {t}; expected encoded image bytes "
                f"(binary, or a struct with a 'bytes' field like datasets' Image feature)"
            )

    def columns(self) -> list[str]:
        return [self.column]

    def convert(self, batch: pa.RecordBatch, row0: int, ids: np.ndarray):
        arr = batch.column(self.column)
        if self.struct:
            t = arr.type
            children = arr.flatten()  # parent nulls merged into the children
            data = children[t.get_field_index("bytes")]
            if t.get_field_index("path") >= 0:
                path = children[t.get_field_index("path")]
                by_path = _nulls(data) & ~_nulls(path)
                if by_path.any():
                    r = int(np.flatnonzero(by_path)[0])
                    raise ValueError(
                        f"image column {self.column!r} in {self.where}: row {row0 + r} references its "
                        f"image by path ({path[r].as_py()!r}) without bytes; only embedded image bytes "
                        f"are supported (datasets: cast_column(..., Image(decode=True)) then "
                        f"save_to_disk embeds them)"
                    )
            arr = data
        arr = arr.cast(pa.large_binary())
        null = _nulls(arr)
        empty = (_np(pc.fill_null(pc.binary_length(arr), 1)) == 0) & ~null
        return arr, null, empty

    def hash(self, arr, h_len, h_data, ids=None) -> None:
        _varbin_hash(arr, h_len, h_data)
        for sid, b in zip(ids, arr.to_pylist()):  # the one streaming pass also checks every image decodes
            _check_image(b, f"{self.where}: image of sample_id {int(sid)} (column {self.column!r})")

    def info(self, first) -> dict:
        return {"column": self.column, "first_image": _probe_image(first)}


def _check_image(data: bytes, where: str) -> None:
    """ValueError naming `where` unless `data` is a complete image Pillow can decode (its
    header, and PIL's verify() over the stream: a truncated or corrupt file fails here, when
    the cache is built, instead of minutes later in the middle of training)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        raise ValueError(f"{where}: cannot decode the image ({type(e).__name__}: {e})") from None


def _probe_image(src) -> dict | None:
    """{"size": [H, W], "mode": ...} of an image (bytes or a path), from its header; None if unreadable."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            return {"size": [int(im.height), int(im.width)], "mode": im.mode}
    except Exception:  # noqa: BLE001 - a probe; a bad image is reported when it is encoded
        return None


class FolderPayload:
    name, type, kind = "path", pa.string(), "path"

    def __init__(self, folder: FolderReader):
        self.folder = folder

    def hash(self, arr, h_len, h_data, ids=None) -> None:
        for rel in arr.to_pylist():
            path = os.path.join(self.folder.path, rel)
            with open(path, "rb") as f:
                data = f.read()
            h_data.update(data)
            h_len.update(np.int64(len(data)).astype("<i8").tobytes())
            _check_image(data, path)  # the one pass over the files also checks each decodes

    def info(self, first) -> dict:
        return {
            "first_image": _probe_image(os.path.join(self.folder.path, first)),
            "skipped_files": self.folder.skipped,
        }


class FeaturePayload:
    name, kind = "features", "features"

    def __init__(self, inp: TableReader, columns: list[str] | None, exclude: tuple):
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
            raise ValueError(
                f"{self.where}: the feature columns hold inf or nan at row {row0 + r} "
                f"(sample_id {int(ids[r])}){more}; drop or repair the row(s)"
            )
        arr = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), d)
        return arr, null, np.zeros(n, bool)

    def hash(self, arr, h_len, h_data, ids=None) -> None:
        if len(arr):
            h_data.update(np.ascontiguousarray(_np(arr.flatten()), dtype="<f4").tobytes())

    def info(self, first) -> dict:
        return {"feature_columns": self.feature_columns, "dim": len(self.feature_columns)}


# ---------------------------------------------------------------- building and opening the cache


def build_cache(
    stream,
    payload,
    labels: LabelColumn,
    arrow_path: str,
    json_path: str,
    *,
    header: dict,
    where: str,
    progress: Callable[[int], None] | None,
) -> dict:
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
                    payload.hash(arr, h_len, h_data, ids)
                    w.write_batch(
                        pa.record_batch([pa.array(ids, pa.int64()), pa.array(codes, pa.int64()), arr], schema=schema)
                    )
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
            raise ValueError(
                f"{where}: no rows left ({rows_seen} read, {dropped['null']} with a null payload, "
                f"{dropped['empty']} empty)"
            )
        srt = np.sort(ids)
        dup = srt[1:][srt[1:] == srt[:-1]]
        if len(dup):
            raise ValueError(
                f"{where}: sample ids are not unique: {len(np.unique(dup))} duplicated, e.g. {int(dup[0])}"
            )
        classes, remap = labels.finish()
        y = codes if remap is None else np.where(codes >= 0, np.asarray(remap, np.int64)[np.maximum(codes, 0)], -1)
        info = payload.info(first)
        fp = hashlib.sha256(
            json.dumps(
                {
                    "scheme": FINGERPRINT_SCHEME,
                    "payload": payload.kind,
                    "type": str(payload.type),
                    "labeled": labels.column is not None,
                    "classes": classes,
                },
                sort_keys=True,
            ).encode()
        )
        for part in (
            h_ids.digest(),
            hashlib.sha256(y.astype("<i8").tobytes()).digest(),
            h_len.digest(),
            h_data.digest(),
        ):
            fp.update(part)
        os.replace(tmp, arrow_path)
    except BaseException:
        _remove(tmp)
        raise
    meta = {
        "cache_version": CACHE_VERSION,
        "fingerprint": fp.hexdigest(),
        "rows": int(len(ids)),
        "rows_in_source": rows_seen,
        "dropped": dropped,
        "labeled": labels.column is not None,
        "classes": classes,
        "label_remap": remap,
        "payload": payload.kind,
        "payload_info": info,
        "cache_bytes": os.path.getsize(arrow_path),
        "header": header,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": time.time() - t0,
    }
    _atomic_write_bytes(json_path, json.dumps(meta, indent=1).encode())
    pa.default_memory_pool().release_unused()  # the allocator keeps freed batches otherwise (RSS)
    return meta


def table_stream(inp: TableReader, payload, labels: LabelColumn, id_column: str | None):
    cols = list(dict.fromkeys(payload.columns() + [c for c in (labels.column, id_column) if c is not None]))
    row0 = 0
    for batch in inp.batches(cols):
        n = batch.num_rows
        ids = _ids(batch.column(id_column) if id_column else None, row0, n, id_column, inp.where)
        codes = labels.codes(batch.column(labels.column), row0) if labels.column else np.full(n, -1, np.int64)
        arr, null, empty = payload.convert(batch, row0, ids)
        yield ids, codes, arr, null, empty
        row0 += n


def folder_stream(folder: FolderReader):
    for part in folder.batches():
        rels = [e[0] for e in part]
        ids = np.fromiter((stable_id(r) for r in rels), np.int64, count=len(rels))
        codes = np.fromiter((e[1] for e in part), np.int64, count=len(rels))
        zero = [e[0] for e in part if e[2] == 0]
        if zero:  # a file that exists but holds no image is damage, not a missing label: name it
            raise ValueError(
                f"image folder {folder.path}: {zero[0]} is an empty file (0 bytes)"
                + (f", and {len(zero) - 1} more in this batch" if len(zero) > 1 else "")
                + ": remove it or restore the image"
            )
        empty = np.zeros(len(rels), bool)
        yield ids, codes, pa.array(rels, pa.string()), np.zeros(len(rels), bool), empty


def cache_files(root: str, name: str, key_doc: dict) -> tuple[str, str]:
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:24]
    stem = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:40] or "source"
    base = os.path.join(root, f"{stem}-{key}")
    return base + ".arrow", base + ".json"


def load_cache_meta(arrow_path: str, json_path: str) -> dict | None:
    """The sidecar of a complete cache, or None (absent, unreadable, from another version)."""
    try:
        with open(json_path) as f:
            meta = json.load(f)
        if meta.get("cache_version") != CACHE_VERSION or os.path.getsize(arrow_path) != meta.get("cache_bytes"):
            return None
        return meta
    except (OSError, ValueError):
        return None


def column_numpy(t: pa.Table, name: str) -> np.ndarray:
    """An int64 column as one numpy array: zero-copy views of the mapped chunks, one copy."""
    parts = [c.to_numpy(zero_copy_only=True) for c in t.column(name).chunks]
    return np.concatenate(parts).astype(np.int64, copy=False) if parts else np.zeros(0, np.int64)


def map_table(path: str) -> pa.Table:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"source cache {path} is gone (cache directory cleaned?); open the source again")
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()
