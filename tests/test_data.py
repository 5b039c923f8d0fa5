import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.datasets import (
    ArrayDataset,
    Source,
    load_dataset,
    load_digits8,
    load_mnist5k,
    load_npz,
    load_parquet,
    open_source,
    split_dataset,
)


@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


@pytest.fixture(scope="module")
def digits():
    return load_digits8()


def test_mnist5k_is_real_mnist(mnist):
    assert len(mnist) == 5000 and mnist.x.shape == (5000, 1, 28, 28)
    assert mnist.x.dtype == np.float32 and mnist.y.dtype == np.int64
    assert mnist.x.min() == 0.0 and mnist.x.max() == 1.0
    assert mnist.num_classes == 10
    assert np.bincount(mnist.y).tolist() == [500] * 10
    np.testing.assert_array_equal(mnist.sample_ids, np.arange(5000))
    sid, x, label = mnist[3]
    assert sid == 3 and x.shape == (1, 28, 28) and label == int(mnist.y[3])


def test_digits8(digits):
    assert digits.x.shape == (1797, 1, 8, 8) and digits.num_classes == 10
    assert 0.0 <= digits.x.min() and digits.x.max() == 1.0
    assert load_dataset("digits").fingerprint() == digits.fingerprint()


def test_split_sizes_deterministic_disjoint_stratified(mnist):
    a = split_dataset(mnist, seed=7, sizes={"train": 4000, "test": 1000})
    b = split_dataset(mnist, seed=7, sizes={"train": 4000, "test": 1000})
    c = split_dataset(mnist, seed=8, sizes={"train": 4000, "test": 1000})
    for k in a:
        np.testing.assert_array_equal(a[k].sample_ids, b[k].sample_ids)
        assert a[k].fingerprint() == b[k].fingerprint()
    assert not np.array_equal(a["test"].sample_ids, c["test"].sample_ids)
    assert len(np.intersect1d(a["train"].sample_ids, a["test"].sample_ids)) == 0
    assert len(a["train"]) + len(a["test"]) == 5000
    assert np.bincount(a["train"].y).tolist() == [400] * 10
    assert np.bincount(a["test"].y).tolist() == [100] * 10
    # ids are the source ids, and rows really are those source rows
    t = a["test"]
    np.testing.assert_array_equal(t.x, mnist.x[t.sample_ids])
    np.testing.assert_array_equal(t.y, mnist.y[t.sample_ids])


def test_split_fractions(digits):
    s = split_dataset(digits, seed=0, fractions={"train": 0.8, "val": 0.1, "test": 0.1})
    assert sum(len(v) for v in s.values()) == len(digits)
    ids = np.concatenate([v.sample_ids for v in s.values()])
    assert len(np.unique(ids)) == len(digits)
    full = np.bincount(digits.y) / len(digits)
    for v in s.values():  # each split within one sample per class of the full ratio
        assert np.all(np.abs(np.bincount(v.y, minlength=10) - full * len(v)) <= 1.5)
    # splitting a split keeps original ids
    sub = split_dataset(s["train"], seed=1, sizes={"a": 100})["a"]
    assert np.isin(sub.sample_ids, s["train"].sample_ids).all()


def test_split_unlabeled_and_errors(digits):
    unl = ArrayDataset("u", digits.x[:100], None, np.arange(100) + 1000, None)
    s = split_dataset(unl, seed=0, sizes={"a": 60, "b": 40})
    assert s["a"].y is None and len(s["a"]) == 60
    with pytest.raises(ValueError, match="sum to 101 > 100"):
        split_dataset(unl, seed=0, sizes={"a": 60, "b": 41})
    with pytest.raises(ValueError, match="sum to <= 1"):
        split_dataset(unl, seed=0, fractions={"a": 0.6, "b": 0.5})
    with pytest.raises(ValueError, match="exactly one"):
        split_dataset(unl, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        split_dataset(unl, seed=0, sizes={"a": -1})


def test_fingerprint_stable_and_sensitive(mnist):
    again = load_mnist5k()
    assert again.fingerprint() == mnist.fingerprint()
    x = mnist.x.copy()
    x[17, 0, 5, 5] += 1e-3
    changed = ArrayDataset("mnist5k", x, mnist.y, mnist.sample_ids, 10)
    assert changed.fingerprint() != mnist.fingerprint()
    y = mnist.y.copy()
    y[0] = (y[0] + 1) % 10
    assert ArrayDataset("m", mnist.x, y, mnist.sample_ids, 10).fingerprint() != mnist.fingerprint()
    # row order does not matter (sample-id order is hashed), the split definition does
    perm = np.random.default_rng(0).permutation(len(mnist))
    assert mnist.subset(perm).fingerprint() == mnist.fingerprint()
    s = split_dataset(mnist, seed=0, sizes={"a": 2500, "b": 2500})
    assert s["a"].fingerprint() != s["b"].fingerprint()
    s2 = split_dataset(mnist, seed=0, sizes={"a": 2500, "b": 2499})
    assert s2["a"].fingerprint() != s["a"].fingerprint()


def test_index_of(digits):
    sub = digits.subset(np.arange(100, 200)[::-1])
    pos = sub.index_of([150, 199, 100])
    np.testing.assert_array_equal(sub.sample_ids[pos], [150, 199, 100])
    with pytest.raises(ValueError, match=r"not found, e.g. \[5, 99999\]"):
        sub.index_of([150, 5, 99999])


def test_tensors_and_dataloader(digits):
    ids, x, y = digits.tensors()
    assert ids.dtype == torch.int64 and x.shape == (1797, 1, 8, 8) and y.dtype == torch.int64
    batch = next(iter(torch.utils.data.DataLoader(digits, batch_size=4)))
    assert batch[0].tolist() == [0, 1, 2, 3] and batch[1].shape == (4, 1, 8, 8)


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (20, 6, 6), dtype=np.uint8)
    y = rng.integers(0, 3, 20)
    ids = np.arange(20) * 10 + 5
    p = tmp_path / "set.npz"
    np.savez(p, x=x, y=y, sample_id=ids)
    ds = load_dataset(str(p))
    assert ds.name == "set" and ds.x.shape == (20, 1, 6, 6)
    np.testing.assert_allclose(ds.x[:, 0], x / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, y)
    np.testing.assert_array_equal(ds.sample_ids, ids)
    assert load_npz(p).fingerprint() == ds.fingerprint()


def test_npz_unlabeled_and_custom_keys(tmp_path):
    p = tmp_path / "transfer.npz"
    np.savez(p, feats=np.ones((7, 4), np.float32))
    ds = load_npz(p, x_key="feats")
    assert ds.y is None and ds.num_classes is None and ds.x.shape == (7, 4)
    assert ds[0][2] == -1
    np.testing.assert_array_equal(ds.sample_ids, np.arange(7))


def test_npz_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        load_npz(tmp_path / "nope.npz")
    p = tmp_path / "bad.npz"
    np.savez(p, x=np.zeros((5, 3)), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match=r"y has 4 rows but 'x' has 5"):
        load_npz(p)
    with pytest.raises(ValueError, match=r"key 'pixels' not found, keys are \['x', 'y'\]"):
        load_npz(p, x_key="pixels")
    with pytest.raises(ValueError, match=r"bad.npz: key 'label' not found"):
        load_npz(p, y_key="label")


def test_parquet_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(30, 4)).astype(np.float32)
    table = pa.table(
        {
            "sample_id": np.arange(30, 60),
            "a": feats[:, 0],
            "b": feats[:, 1],
            "note": ["t"] * 30,
            "c": feats[:, 2],
            "d": feats[:, 3],
            "y": rng.integers(0, 2, 30),
        }
    )
    p = tmp_path / "tab.parquet"
    pq.write_table(table, p)
    ds = load_dataset(str(p))
    np.testing.assert_array_equal(ds.x, feats)  # non-numeric "note" skipped
    np.testing.assert_array_equal(ds.sample_ids, np.arange(30, 60))
    assert ds.num_classes == 2
    img = load_parquet(p, x_columns=["a", "b", "c", "d"], shape=(1, 2, 2))
    assert img.x.shape == (30, 1, 2, 2)
    unl = load_parquet(p, x_columns=["a"], y_column=None, id_column=None)
    assert unl.y is None and unl.x.shape == (30, 1) and unl.sample_ids[0] == 0
    with pytest.raises(ValueError, match=r"x_columns \['zz'\] not found"):
        load_parquet(p, x_columns=["a", "zz"])
    with pytest.raises(ValueError, match="column 'note' is string"):
        load_parquet(p, x_columns=["note"])
    with pytest.raises(ValueError, match=r"shape \(1, 3, 3\) needs 9 features, found 4"):
        load_parquet(p, x_columns=["a", "b", "c", "d"], shape=(1, 3, 3))
    with pytest.raises(ValueError, match="column 'label' not found"):
        load_parquet(p, y_column="label")


def test_dataset_validation_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'cifar'.*digits"):
        load_dataset("cifar")
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "missing.parquet"))
    with pytest.raises(ValueError, match="sample_ids are not unique"):
        ArrayDataset("d", np.zeros((3, 2)), None, np.array([1, 1, 2]), None)
    with pytest.raises(ValueError, match="label 5 >= num_classes 3"):
        ArrayDataset("d", np.zeros((3, 2)), np.array([0, 1, 5]), np.arange(3), 3)


def test_bad_files_are_refused_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.random((40, 8, 8), dtype=np.float32)
    y = np.arange(40) % 10
    # one stray label 99: 100 classes would be inferred, 89 of them empty
    stray = y.copy()
    stray[7] = 99
    p = tmp_path / "stray.npz"
    np.savez(p, x=x, y=stray)
    with pytest.raises(
        ValueError,
        match=rf"{p}: labels are not 0..K-1: found 11 distinct labels "
        r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, \.\.\., 99\], so 100 classes are inferred "
        r"and 89 of them have no sample .*data.loader.num_classes",
    ):
        load_npz(p)
    assert load_npz(p, num_classes=100).num_classes == 100  # said explicitly: allowed
    gap = tmp_path / "gap.npz"
    np.savez(gap, x=x, y=np.where(y == 3, 4, y))
    with pytest.raises(ValueError, match=r"1 of them have no sample \(\[3\]\)"):
        load_npz(gap)
    # inf / nan inputs (the evaluation crash was `RuntimeError: bincount`)
    bad = x.copy()
    bad[5, 1, 1], bad[9, 0, 0] = np.inf, np.nan
    p = tmp_path / "inf.npz"
    np.savez(p, x=bad, y=y)
    with pytest.raises(ValueError, match=rf"{p}: 2 row\(s\) of x hold inf or nan \(first: row 5, sample_id 5\)"):
        load_npz(p)
    # no rows (was: operands could not be broadcast)
    p = tmp_path / "empty.npz"
    np.savez(p, x=np.zeros((0, 8, 8), np.float32), y=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=rf"{p}: the dataset has no rows"):
        load_npz(p)
    # the same checks for Parquet
    t = pa.table({"a": np.array([0.5, np.nan, 1.0], np.float32), "y": [0, 1, 0]})
    p = tmp_path / "nan.parquet"
    pq.write_table(t, p)
    with pytest.raises(ValueError, match=rf"{p}: 1 row\(s\) of x hold inf or nan \(first: row 1"):
        load_parquet(p)
    p = tmp_path / "stray.parquet"
    pq.write_table(pa.table({"a": np.ones(3, np.float32), "y": [0, 1, 5]}), p)
    with pytest.raises(ValueError, match=rf"{p}: labels are not 0..K-1"):
        load_parquet(p)


def test_array_dataset_is_a_source(digits):
    src = open_source("digits")
    assert isinstance(src, Source) and isinstance(digits, Source)
    assert len(src) == len(src.sample_ids) == 1797 and src.fingerprint() == digits.fingerprint()
    parts = src.split(seed=0, sizes={"train": 600, "test": 300})
    assert all(isinstance(p, Source) for p in parts.values())
    ref = split_dataset(digits, seed=0, sizes={"train": 600, "test": 300})
    assert {k: p.fingerprint() for k, p in parts.items()} == {k: p.fingerprint() for k, p in ref.items()}


@pytest.mark.parametrize("bs", [1, 7, 256, 5000])
def test_iter_batches_is_stable_and_covers_every_id_once(digits, bs):
    part = digits.split(seed=3, sizes={"a": 500})["a"]
    batches = list(part.iter_batches(bs))
    again = list(part.iter_batches(bs))
    ids = np.concatenate([i for i, _ in batches])
    assert np.array_equal(ids, part.sample_ids)  # every id once, in the source's order
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(batches, again))
    assert all(len(i) == len(x) <= bs for i, x in batches) and len(batches) == -(-500 // bs)
    x = np.concatenate([x for _, x in batches])
    assert np.array_equal(x, part.x)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(part.iter_batches(0))
