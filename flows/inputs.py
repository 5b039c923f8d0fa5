"""The config's data: its source (a built-in dataset, a file, or a streamed table / image
folder and an optional transfer file), the tokenizer, the deterministic splits and the
view transform. Loaded once per process (tasks share threads) and the same everywhere:
preflight, every task, `distill inspect --replay`."""

from __future__ import annotations

import functools
import json
import os

import numpy as np

from pipeline.data.datasets import Source, load_dataset, split_dataset
from pipeline.views.images import ViewSpec

from .config import ClassifyConfig as Config


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from pipeline.hf_files import load_tokenizer

    return load_tokenizer(path)


def tokenizer(cfg: Config):
    """The config's tokenizer (data.tokenizer.path), loaded once per process; None without one."""
    return _tokenizer(cfg.data.tokenizer.path) if cfg.data.tokenizer else None


def _open_source(spec: dict, tok: dict):
    from pipeline.data.sources import open_table_source

    return open_table_source(
        {k: v for k, v in spec.items() if v is not None},
        tokenizer=_tokenizer(tok["path"]) if tok else None,
        tokenizer_path=tok.get("path"),
        max_length=tok.get("max_length", 128),
    )


def splits_of(data_json: str) -> dict[str, Source]:
    """The splits of a data section (JSON, key order kept); cached per process until a
    split file named in it changes."""
    return _splits_of(data_json, _files_state(json.loads(data_json).get("split_files")))


def _files_state(files: dict | None) -> tuple:
    out = []
    for path in (files or {}).values():
        try:
            st = os.stat(path)
            out.append((path, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((path, None, None))
    return tuple(out)


@functools.lru_cache(maxsize=8)
def _splits_of(data_json: str, files_state: tuple) -> dict[str, Source]:
    d = json.loads(data_json)
    if d.get("source"):  # a streamed table / image folder, cached memory-mapped (pipeline/data/sources.py)
        tok = d.get("tokenizer") or {}
        ds = _open_source(d["source"], tok)
        if ds.y is not None and (ds.y < 0).any():
            # rows with no label (a null in the label column) are dropped before splitting:
            # the labelled and evaluation splits need labels, and splits are stratified
            ds = ds.labeled()
    else:
        ds = load_dataset(d["dataset"], **d["loader"])
    if d.get("ranges") or d.get("split_files"):
        out = own_splits(ds, d.get("ranges"), d.get("split_files"))
    else:
        out = split_dataset(ds, seed=d["seed"], sizes=d["sizes"], fractions=d["fractions"])
    if d.get("transfer"):  # an unlabelled pool of its own: the whole file is the label split
        pool = _open_source(d["transfer"], d.get("tokenizer") or {})
        pool = pool.subset(
            np.arange(len(pool)),
            split_spec=json.dumps({"split": d["label_split"], "transfer_file": True}, sort_keys=True),
        )
        for name, part in out.items():
            both = np.intersect1d(part.sample_ids, pool.sample_ids)
            if len(both):
                raise ValueError(
                    f"data.transfer ({d['transfer']['path']}) and split {name!r} of data.source share {len(both)} "
                    f"sample ids (e.g. {both[:5].tolist()}): a stored label must name one sample. Give both files "
                    f"an id column that is unique across them (data.source.id_column / data.transfer.id_column)"
                )
        out[d["label_split"]] = pool
    return out


def own_splits(ds: Source, ranges: dict | None, files: dict | None) -> dict[str, Source]:
    """The data's own splits: fixed row ranges of the file's row order, or files listing
    each split's sample ids. Each split's split_spec records the definition (and a file's
    sha256), so labels and students follow a change of it."""
    from pipeline.paths import file_sha256

    out = {}
    for name, (a, b) in (ranges or {}).items():
        if b > len(ds):
            raise ValueError(f"data.ranges.{name}: rows [{a}, {b}) but {ds.name!r} has {len(ds)} rows")
        spec = json.dumps({"split": name, "ranges": {k: list(v) for k, v in ranges.items()}}, sort_keys=True)
        out[name] = ds.subset(np.arange(a, b), split_spec=spec)
    seen: dict[str, np.ndarray] = {}
    for name, path in (files or {}).items():
        try:
            ids = np.load(path) if path.endswith(".npy") else np.loadtxt(path, dtype=np.int64, ndmin=1)
        except (OSError, ValueError) as e:
            raise ValueError(f"data.split_files.{name}: {path}: {e}") from None
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"data.split_files.{name}: {path} must hold one integer sample id per line / entry")
        try:
            pos = ds.index_of(ids)
        except ValueError as e:
            raise ValueError(f"data.split_files.{name}: {path}: {e}") from None
        uniq, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise ValueError(f"data.split_files.{name}: {path} lists sample id {int(uniq[counts > 1][0])} twice")
        for other, taken in seen.items():
            both = np.intersect1d(taken, uniq)
            if len(both):
                raise ValueError(f"data.split_files: sample id {int(both[0])} is in both {other!r} and {name!r}")
        seen[name] = uniq
        spec = json.dumps({"split": name, "sha256": file_sha256(path)}, sort_keys=True)
        out[name] = ds.subset(np.sort(pos), split_spec=spec)
    return out


def splits(cfg: Config) -> dict[str, Source]:
    """Deterministic splits from the config (cached per process: tasks share threads)."""
    return splits_of(cfg.data.model_dump_json())


def view_spec(cfg: Config):
    """The config's deterministic view transform (a ViewSpec, or a pipeline/views/transforms.py
    transform from views.transform), None for plain single-view labels."""
    v = cfg.views
    if v.transform is not None:
        from pipeline.hf_files import tokenizer_info
        from pipeline.views.transforms import transform_from_config

        tok = tokenizer(cfg)
        d = dict(v.transform)
        if d["kind"] != "compose":  # views.seed seeds the transform unless it names its own
            d.setdefault("seed", v.seed)
        return transform_from_config(d, tokenizer_info=tokenizer_info(tok) if tok is not None else None)
    if v.num_views == 1 and not (v.shift or v.hflip or v.noise_std):
        return None
    return ViewSpec(shift=v.shift, hflip=v.hflip, noise_std=v.noise_std, seed=v.seed)


def eval_split(cfg: Config) -> Source:
    s = splits(cfg)
    return s.get("test") or s.get("val") or next(iter(s.values()))


def unit(src) -> str:
    """What a row is, for the report's sentences: texts, images or samples."""
    if src.input_kind == "tokens":
        return "texts"
    return "images" if len(src.in_shape) == 3 else "samples"
