"""convert(): copy a dataset to the other backend, bit-exact, and prove it equal.

Stored columns are copied verbatim (no un-scaling and re-scaling, which would not
round-trip in float16), shard by shard with the same shard boundaries, and the copy is
compared column by column with the source before convert() returns.
"""

from __future__ import annotations

import numpy as np

from .errors import SoftLabelError
from .layout import TOKEN_KINDS
from .manifest import BACKENDS
from .reader import open_soft_labels
from .shards import open_shard
from .writer import SoftLabelWriter


def convert(
    src_uri: str,
    dst_uri: str,
    *,
    backend: str,
    storage_options: dict | None = None,
    dst_storage_options: dict | None = None,
    compression: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Copy `src_uri` into `dst_uri` with `backend`; returns the new manifest."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    src = open_soft_labels(src_uri, storage_options=storage_options)
    m = src.manifest
    rep = m["representation"]
    token = {}
    if rep["kind"] in TOKEN_KINDS:
        token = dict(
            vocab_size=m["vocab_size"],
            seq_len=m["seq_len"],
            tail_dtype=rep.get("tail_dtype"),
            draws=rep.get("draws"),
            s_max=rep.get("s_max"),
        )
    w = SoftLabelWriter(
        dst_uri,
        backend=backend,
        num_classes=m["num_classes"],
        temperature=m["temperature"],
        representation=rep["kind"],
        k=rep["k"],
        dtype=rep.get("dtype"),
        num_views=m["num_views"],
        **token,
        teacher=m["teacher"],
        data=m["data"],
        storage_options=dst_storage_options or storage_options,
        overwrite=overwrite,
        num_shards=m["num_shards"],
        num_samples=m["num_samples"],
        feature=m.get("feature"),
        compression=compression or m.get("layout", {}).get("compression", "none"),
        extra=dict(m.get("extra", {}), converted_from={"uri": src.uri, "backend": m["backend"]}),
    )
    names = [c.name for c in src.columns]
    done = set(w.committed_shards())
    for s in src.index.entries():
        if s["index"] in done:
            continue
        sh = open_shard(src.loc, s, m["backend"], src.columns)
        w.write_scaled_columns(s["index"], sh.read(0, sh.num_rows, names))
    out = w.finalize()
    _check_equal(src, open_soft_labels(dst_uri, storage_options=dst_storage_options or storage_options))
    return out


def _check_equal(a, b) -> None:
    names = [c.name for c in a.columns]
    for sa, sb in zip(a.index.entries(), b.index.entries(), strict=True):
        ra = open_shard(a.loc, sa, a.manifest["backend"], a.columns)
        rb = open_shard(b.loc, sb, b.manifest["backend"], b.columns)
        ca, cb = ra.read(0, ra.num_rows, names), rb.read(0, rb.num_rows, names)
        for n in names:
            if ca[n].dtype != cb[n].dtype or not np.array_equal(ca[n].view(np.uint8), cb[n].view(np.uint8)):
                raise SoftLabelError(
                    f"convert: column {n!r} of shard {sa['index']} differs between {a.uri} and {b.uri}"
                )
