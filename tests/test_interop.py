"""The stored labels open as numbers in the tools users already have, each with the one
line docs/format.md gives ("Reading with other tools"), and every tool sees exactly the
values distillery's own reader returns."""

import glob
import os

import numpy as np
import pytest
from conftest import write_toy

from storage import open_soft_labels


@pytest.fixture(scope="module")
def parquet_ds(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("interop") / "dense")
    write_toy(uri, n=120, c=10, shards=3, views=2)
    ds = open_soft_labels(uri)
    ref = ds.take(np.arange(120))  # id-major, views ascending
    return uri, ref


@pytest.fixture(scope="module")
def topk_ds(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("interop") / "topk")
    write_toy(uri, n=60, c=300, shards=2, representation="topk", k=4)
    return uri, open_soft_labels(uri).take(np.arange(60))


def _by_id(sample_id, view, logits):
    order = np.lexsort((np.asarray(view), np.asarray(sample_id)))
    return np.asarray(logits)[order]


def test_duckdb(parquet_ds, topk_ds):
    import duckdb

    uri, ref = parquet_ds
    con = duckdb.connect()
    rows = con.sql(
        f"SELECT sample_id, view, logits FROM read_parquet('{uri}/data/*.parquet') ORDER BY sample_id, view"
    ).fetchall()
    got = np.array([r[2] for r in rows], dtype=np.float32)
    assert got.shape == (240, 10) and np.array_equal(got, ref["logits"].astype(np.float32))
    # a query a user would write: the teacher's argmax per row, in SQL
    am = con.sql(
        f"SELECT list_position(logits, list_max(logits)) - 1 FROM read_parquet('{uri}/data/*.parquet') "
        f"ORDER BY sample_id, view"
    ).fetchnumpy()
    assert np.array_equal(next(iter(am.values())), ref["logits"].argmax(1))
    turi, tref = topk_ds
    idx = con.sql(f"SELECT topk_indices FROM read_parquet('{turi}/data/*.parquet') ORDER BY sample_id").fetchall()
    assert np.array_equal(np.array([r[0] for r in idx]), tref["topk_indices"])


def test_polars(parquet_ds):
    import polars as pl

    uri, ref = parquet_ds
    df = pl.read_parquet(f"{uri}/data/*.parquet").sort(["sample_id", "view"])
    assert df.schema["logits"] == pl.Array(pl.Float16, 10)
    assert np.array_equal(df["logits"].to_numpy(), ref["logits"])


def test_pandas(parquet_ds):
    import pandas as pd

    uri, ref = parquet_ds
    df = pd.read_parquet(f"{uri}/data").sort_values(["sample_id", "view"])
    got = np.stack(df["logits"].to_numpy())
    assert got.dtype == np.float16 and np.array_equal(got, ref["logits"])


def test_pyarrow_dataset(parquet_ds):
    import pyarrow as pa
    import pyarrow.dataset as pds

    uri, ref = parquet_ds
    d = pds.dataset(f"{uri}/data", format="parquet")
    assert d.schema.field("logits").type == pa.list_(pa.field("element", pa.float16(), nullable=False), 10)
    t = d.to_table(filter=pds.field("sample_id") < 10).sort_by([("sample_id", "ascending"), ("view", "ascending")])
    got = t.column("logits").combine_chunks().flatten().to_numpy().reshape(-1, 10)
    assert np.array_equal(got, ref["logits"][:20])


def test_hf_datasets(parquet_ds, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    import datasets

    uri, ref = parquet_ds
    h = datasets.load_dataset(
        "parquet", data_files=f"{uri}/data/*.parquet", split="train", cache_dir=str(tmp_path / "hf-cache")
    ).with_format("numpy")
    assert h.features["logits"].feature.dtype == "float16"
    got = _by_id(h["sample_id"], h["view"], np.stack(list(h["logits"])))
    assert np.array_equal(got, ref["logits"])


def test_xarray_opens_zarr_shards_and_the_whole_dataset(tmp_path):
    import xarray as xr

    uri = str(tmp_path / "z")
    write_toy(uri, backend="zarr", n=90, c=10, shards=3, views=2)
    ref = open_soft_labels(uri).take(np.arange(90))
    shard = sorted(glob.glob(f"{uri}/data/shard-*.zarr"))[0]
    one = xr.open_zarr(shard, consolidated=False)
    assert one["logits"].dims == ("row", "class") and one["sample_id"].dims == ("row",)
    both = xr.open_mfdataset(
        f"{uri}/data/shard-*.zarr", engine="zarr", combine="nested", concat_dim="row", consolidated=False
    )
    got = _by_id(both["sample_id"].values, both["view"].values, both["logits"].values)
    assert np.array_equal(got, ref["logits"])
    tree = xr.open_datatree(uri, engine="zarr", consolidated=False)
    assert len(tree["data"].children) == 3 and os.path.exists(os.path.join(uri, "zarr.json"))
