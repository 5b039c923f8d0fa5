"""TableSource: the pipeline.data.datasets Source protocol over a memory-mapped source cache.

The base of pipeline/data/sources.py's TextSource, ImageSource and FeatureSource (which add
encode, in_shape and describe): the cache table mapped on first use (and again after
unpickling), sample ids and labels read from it, positions -> cache rows, payload gathers
chunk by chunk, subset / labeled / split / index_of with pipeline.data.datasets's semantics, the
label checks, and the fingerprints (from the sidecar's content fingerprint; nothing re-read).
"""

from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pyarrow as pa

from pipeline.data.cache import column_numpy, map_table
from pipeline.data.datasets import index_of, split_dataset
from pipeline.data.readers import few_values

_VOLATILE = ("path", "cache")  # describe() keys that name places, not content (left out of fingerprints)


class TableSource:
    """A Source backed by a memory-mapped Arrow cache (the base of TextSource, ImageSource,
    FeatureSource). Open one with open_table_source()."""

    input_kind = "dense"

    def __init__(
        self,
        *,
        name: str,
        cache_path: str,
        meta: dict,
        source: dict,
        num_classes: int | None = None,
        classes: list[str] | None = None,
    ):
        self.name = name
        self.split_spec = "full"
        self._cache_path = cache_path
        self._meta = meta
        self._source = source  # {"format", "path", "split", "label_column", "id_column", ...}
        self._rows: np.ndarray | None = None  # positions in the cache table; None = all rows
        self._table: pa.Table | None = None
        self.classes = meta.get("classes") if classes is None else list(classes)
        self._load_ids_labels()
        self.num_classes = self._check_labels(num_classes)

    # -- state
    @property
    def table(self) -> pa.Table:
        """The mapped cache table (all rows; self._rows selects this source's)."""
        if self._table is None:
            self._table = map_table(self._cache_path)
        return self._table

    def _load_ids_labels(self) -> None:
        t = self.table
        ids = column_numpy(t, "sample_id")
        self.sample_ids = ids if self._rows is None else ids[self._rows]
        if not self._meta["labeled"]:
            self.y = None
            return
        codes = column_numpy(t, "label")
        remap = self._meta.get("label_remap")
        if remap is not None:
            codes = np.where(codes >= 0, np.asarray(remap, np.int64)[np.maximum(codes, 0)], -1)
        self.y = codes if self._rows is None else codes[self._rows]

    def _check_labels(self, num_classes: int | None) -> int | None:
        """num_classes from the classes / labels, refusing what pipeline.data.datasets._checked refuses."""
        where = self._source["path"]
        if self.y is None:
            return None if num_classes is None else int(num_classes)
        lab = self.y[self.y >= 0]
        col = self._source.get("label_column")
        if self.classes is not None:
            k = len(self.classes)
            if num_classes is not None and int(num_classes) != k:
                raise ValueError(
                    f"{where}: num_classes={num_classes} but there are {k} classes {few_values(self.classes)}"
                )
            if len(lab) and lab.max() >= k:
                raise ValueError(f"{where}: label {int(lab.max())} >= the {k} classes {few_values(self.classes)}")
            return k
        if num_classes is not None:
            if len(lab) and lab.max() >= int(num_classes):
                raise ValueError(f"dataset {self.name!r}: label {int(lab.max())} >= num_classes {num_classes}")
            return int(num_classes)
        if not len(lab):
            raise ValueError(
                f"{where}: label column {col!r} holds no label (all null); leave label_column out "
                f"for an unlabeled set, or give num_classes"
            )
        k = int(lab.max()) + 1
        counts = np.bincount(lab, minlength=k)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            present = np.flatnonzero(counts)
            raise ValueError(
                f"{where}: labels are not 0..K-1: found {len(present)} distinct labels {few_values(present.tolist())}, "
                f"so {k} classes are inferred and {len(empty)} of them have no sample ({few_values(empty.tolist())}). "
                f"Remap the labels to 0..{len(present) - 1}, or, if those classes exist but are absent from this "
                f"file, set num_classes"
            )
        return k

    def __getstate__(self) -> dict:
        # the mapped table, ids and labels are re-read from the cache file by the receiver
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_table", "_index_cache", "sample_ids", "y", "_feature_views", "_chunk_index")
        }

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
            raise IndexError(
                f"dataset {self.name!r}: position(s) {few_values(bad[:10].tolist())} out of range for {n} rows"
            )
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
        parts = [chunks[c[a]].take(pa.array(r[a:b] - starts[c[a]])) for a, b in zip(np.r_[0, cut], np.r_[cut, len(r)])]
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.concat_arrays(parts).take(pa.array(inverse))

    def subset(self, idx, *, split_spec: str | None = None):
        """Rows at positions idx, keeping their sample ids (the mapped table is shared)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        new = copy.copy(self)
        new.__dict__.pop("_index_cache", None)  # the chunk index and feature views stay shared
        new._rows = self._cache_rows(idx)
        new.sample_ids = self.sample_ids[idx]
        new.y = None if self.y is None else self.y[idx]
        new.split_spec = self.split_spec if split_spec is None else split_spec
        return new

    def labeled(self):
        """The rows that have a label (y >= 0), ids kept; e.g. before a stratified split."""
        if self.y is None:
            raise ValueError(f"dataset {self.name!r} has no labels")
        return self.subset(
            np.flatnonzero(self.y >= 0),
            split_spec=json.dumps({"labeled_only": True, "parent": self.split_spec}, sort_keys=True),
        )

    def split(
        self,
        *,
        seed: int,
        fractions: dict[str, float] | None = None,
        sizes: dict[str, int] | None = None,
        stratify: bool = True,
    ) -> dict:
        """split_dataset(self, ...) (Source)."""
        if stratify and self.y is not None and (self.y < 0).any():
            raise ValueError(
                f"dataset {self.name!r} ({self.split_spec}): {int((self.y < 0).sum())} of {len(self)} "
                f"rows are unlabeled (null label); a stratified split needs every row labelled: split "
                f"source.labeled(), or pass stratify=False"
            )
        return split_dataset(self, seed=seed, fractions=fractions, sizes=sizes, stratify=stratify)

    def index_of(self, sample_ids) -> np.ndarray:
        """Positions (int64) of the given sample ids; ValueError naming any missing id."""
        return index_of(self, sample_ids)

    def content_fingerprint(self) -> str:
        """sha256 of the whole cached content (ids, labels, payload bytes), from the sidecar."""
        return self._meta["fingerprint"]

    def fingerprint(self) -> str:
        return cached_fingerprint(self)

    def _describe_common(self) -> dict:
        m = self._meta
        return {
            "source": dict(self._source),
            "cache": self._cache_path,
            "rows": len(self),
            "rows_in_source": m["rows_in_source"],
            "dropped": dict(m["dropped"]),
            "classes": self.classes,
            "num_classes": self.num_classes,
        }

    @property
    def in_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    def model_args(self) -> dict:
        return {"in_shape": self.in_shape}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, rows={len(self)}, num_classes={self.num_classes}, "
            f"split_spec={self.split_spec[:60]!r})"
        )


def cached_fingerprint(src) -> str:
    """The fingerprint of a source streamed into a cache (a table, an image folder, a token
    corpus): sha256 over the content's hash (from the cache's sidecar: nothing re-read), the
    split definition, describe() minus the places (paths), and this set's ids (sorted)."""
    h = hashlib.sha256(
        json.dumps(
            {
                "content": src.content_fingerprint(),
                "split_spec": src.split_spec,
                "describe": stable_json(src.describe()),
            },
            sort_keys=True,
        ).encode()
    )
    h.update(np.sort(src.sample_ids).astype("<i8").tobytes())
    return h.hexdigest()


def stable_json(d):
    """describe() without the keys that name places (paths), recursively."""
    if isinstance(d, dict):
        return {k: stable_json(v) for k, v in d.items() if k not in _VOLATILE}
    if isinstance(d, list):
        return [stable_json(v) for v in d]
    return d
