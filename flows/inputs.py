"""The config's data: its source (a built-in dataset, a file, or a streamed table / image
folder and an optional transfer file), the tokenizer, the deterministic splits and the
view transform. Loaded once per process (tasks share threads) and the same everywhere:
preflight, every task, `distill inspect --replay`."""

from __future__ import annotations

import functools
import json

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


@functools.lru_cache(maxsize=8)
def splits_of(data_json: str) -> dict[str, Source]:
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
