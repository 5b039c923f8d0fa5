"""Round trips: what goes in as raw logits comes out as logits / T, for every layout."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, TEACHER, toy_logits, write_toy

from storage import SoftLabelWriter, convert, open_soft_labels, softmax, topk_probs, verify

TOL = {"float16": 2e-3, "float32": 1e-6}  # relative precision of the storage dtype


def _all_rows(ds):
    got = {}
    for b in ds.iter_batches(64, shuffle=False):
        for k, v in b.items():
            got.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in got.items()}


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_dense_round_trip(tmp_path, backend, dtype):
    T = 3.0  # deliberately not a power of two
    z = write_toy(str(tmp_path / "ds"), backend=backend, dtype=dtype, temperature=T, n=300, c=17, shards=3)
    ds = open_soft_labels(str(tmp_path / "ds"))
    rows = _all_rows(ds)
    assert rows["logits"].dtype == np.dtype(dtype)
    assert np.array_equal(rows["sample_id"], np.arange(300))
    np.testing.assert_allclose(rows["logits"].astype(np.float64), z / T, rtol=TOL[dtype], atol=TOL[dtype])
    # any student temperature is recoverable: z / T' = (z / T) * T / T'
    rescaled = rows["logits"].astype(np.float32) * np.float32(T / 1.5)
    np.testing.assert_allclose(rescaled, z / 1.5, rtol=TOL[dtype], atol=2 * TOL[dtype])
    m = ds.manifest
    assert m["status"] == "complete" and m["num_samples"] == 300 and m["num_rows"] == 300
    assert m["representation"] == {"kind": "dense", "dtype": dtype, "k": None}
    assert m["teacher"] == TEACHER and m["data"] == DATA and m["temperature"] == T
    shards = ds.shards
    assert [s["index"] for s in shards] == [0, 1, 2]
    assert sum(s["num_rows"] for s in shards) == 300
    assert shards[0]["first_sample_id"] == 0 and shards[-1]["last_sample_id"] == 299


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_topk_round_trip_is_exact_against_full_softmax(tmp_path, backend, dtype):
    T, C, k = 2.0, 300, 5  # C > 256 exercises uint16 class ids
    z = write_toy(
        str(tmp_path / "ds"),
        backend=backend,
        dtype=dtype,
        temperature=T,
        n=120,
        c=C,
        representation="topk",
        k=k,
        shards=2,
    )
    ds = open_soft_labels(str(tmp_path / "ds"))
    rows = _all_rows(ds)
    assert rows["topk_indices"].dtype == np.uint16 and rows["logsumexp"].dtype == np.float32
    full = softmax(z / T)  # (n, C), float64 reference
    ref_idx = np.argsort(-z, axis=1)[:, :k]
    assert np.array_equal(rows["topk_indices"].astype(np.int64), ref_idx)
    p, tail = topk_probs(rows["topk_logits"], rows["logsumexp"])
    np.testing.assert_allclose(p, np.take_along_axis(full, ref_idx, 1), atol=5 * TOL[dtype], rtol=5 * TOL[dtype])
    np.testing.assert_allclose(tail, 1 - np.take_along_axis(full, ref_idx, 1).sum(1), atol=5 * TOL[dtype])
    # the tail is real mass, not renormalised away
    assert (tail > 1e-4).any()


def test_topk_takes_small_fraction_of_dense_bytes(tmp_path):
    kw = dict(n=2000, c=1000, shards=1)
    write_toy(str(tmp_path / "dense"), **kw)
    write_toy(str(tmp_path / "topk"), representation="topk", k=16, **kw)
    d = open_soft_labels(str(tmp_path / "dense")).shards[0]["bytes"]
    t = open_soft_labels(str(tmp_path / "topk")).shards[0]["bytes"]
    assert t / d <= 0.05, (t, d)


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_views_and_feature_column(tmp_path, backend):
    uri = str(tmp_path / "ds")
    n, V, C = 50, 3, 10
    rng = np.random.default_rng(1)
    z = toy_logits(n * V, C)
    feats = rng.standard_normal((n * V, 2, 4)).astype(np.float32)
    sids, views = np.repeat(np.arange(n), V), np.tile(np.arange(V), n)
    with SoftLabelWriter(
        uri,
        backend=backend,
        num_classes=C,
        temperature=1.0,
        num_views=V,
        teacher=TEACHER,
        data=DATA,
        feature={"name": "penultimate", "shape": [2, 4]},
        dtype="float32",
    ) as w:
        w.write_shard(0, sids[:75], z[:75], views[:75], features=feats[:75])
        w.write_shard(1, sids[75:], z[75:], views[75:], features=feats[75:])
    ds = open_soft_labels(uri)
    assert ds.manifest["num_samples"] == n and ds.manifest["num_rows"] == n * V
    assert ds.manifest["feature"] == {"name": "penultimate", "shape": [2, 4], "dtype": "float32"}
    got = ds.take([7, 3])  # every view of each id, id-major
    assert got["sample_id"].tolist() == [7, 7, 7, 3, 3, 3] and got["view"].tolist() == [0, 1, 2, 0, 1, 2]
    rows = [7 * V, 7 * V + 1, 7 * V + 2, 3 * V, 3 * V + 1, 3 * V + 2]
    np.testing.assert_allclose(got["logits"], z[rows])
    np.testing.assert_allclose(got["feature"].reshape(-1, 2, 4), feats[rows])
    one = ds.take([40, 2], views=[2, 1], columns=["logits"])
    np.testing.assert_allclose(one["logits"], z[[40 * V + 2, 2 * V + 1]])
    with pytest.raises(Exception, match=r"\(999, 0\) is not in the dataset"):
        ds.take([999])


@pytest.mark.parametrize("src_backend,dst_backend", [("parquet", "zarr"), ("zarr", "parquet")])
@pytest.mark.parametrize("representation", ["dense", "topk"])
def test_convert_is_bit_exact(tmp_path, src_backend, dst_backend, representation):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write_toy(
        src,
        backend=src_backend,
        representation=representation,
        k=4 if representation == "topk" else None,
        temperature=3.0,
        views=2,
        n=60,
    )
    m = convert(src, dst, backend=dst_backend)
    assert m["backend"] == dst_backend and m["status"] == "complete"
    assert verify(dst).ok
    a, b = _all_rows(open_soft_labels(src)), _all_rows(open_soft_labels(dst))
    for col in a:
        assert a[col].dtype == b[col].dtype and np.array_equal(a[col], b[col]), col
    assert m["extra"]["converted_from"]["backend"] == src_backend


def test_manifest_is_plain_json_with_documented_fields(tmp_path):
    write_toy(str(tmp_path / "ds"))
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    for field in (
        "format_version",
        "backend",
        "status",
        "num_samples",
        "num_views",
        "num_classes",
        "temperature",
        "representation",
        "teacher",
        "data",
        "index",
        "created_at",
        "producer",
    ):
        assert field in m, field
    assert m["producer"]["name"] == "distillery"
    # format 3: the shard table is not inline; the manifest names the index files by sha256
    assert "shards" not in m and m["format_version"] == 3
    ix = m["index"]
    for f in [ix["units"], *ix["parts"]]:
        blob = (tmp_path / "ds" / f["path"]).read_bytes()
        assert f["path"].startswith("_index/") and hashlib.sha256(blob).hexdigest() == f["sha256"]
    assert sum(p["num_shards"] for p in ix["parts"]) == m["num_shards"] == 4
    entries = open_soft_labels(str(tmp_path / "ds")).shards
    assert len(entries) == m["num_shards"]
    for s in entries:
        assert set(s) >= {"path", "num_rows", "first_sample_id", "last_sample_id", "sha256"}
        assert len(s["sha256"]) == 64 and (tmp_path / "ds" / s["path"]).exists()
    # the manifest documents every field it writes
    doc = (Path(__file__).resolve().parent.parent / "docs" / "format.md").read_text()
    for field in m:
        assert f"`{field}`" in doc, f"docs/format.md does not document manifest field {field!r}"
