"""Teacher labelling into a real store: every stored row is recomputed independently here."""

import numpy as np
import pytest
import torch

import storage
from pipeline.data.datasets import load_digits8
from pipeline.device import resolve_device
from pipeline.labelling.classify import ClassifyLabeller, feature_shape, label_dataset
from pipeline.labelling.loop import LabelRun, plan_shards
from pipeline.models.registry import build_model
from pipeline.views.images import ViewSpec, apply_views

T = 3.0
SPEC = ViewSpec(shift=1, noise_std=0.05, seed=7)
TEACHER = {"name": "mlp-teacher", "fingerprint": "sha256:test-teacher"}


@pytest.fixture(scope="module")
def digits():
    ds = load_digits8()
    return ds.subset(np.arange(0, 600, 2), split_spec="every-2nd-of-600")  # 300 rows, ids 0, 2, 4, ...


def teacher():
    torch.manual_seed(0)
    return build_model({"arch": "mlp", "kwargs": {"width": 32, "depth": 1}}, in_shape=(1, 8, 8), num_classes=10)


def expected(model, ds, num_views, spec):
    """(sample_ids, views, raw logits, x_views) for every row, rows ordered (sample, view)."""
    sids = np.repeat(ds.sample_ids, num_views)
    views = np.tile(np.arange(num_views), len(ds))
    x = torch.from_numpy(np.repeat(ds.x, num_views, axis=0))
    xv = apply_views(x, sids, views, spec) if spec is not None else x
    model.eval()
    with torch.no_grad():
        z = model(xv).numpy()
    return sids, views, z, xv


def run(model, ds, uri, **kw):
    args = dict(backend="parquet", temperature=T, teacher=TEACHER, num_views=2, view_spec=SPEC, shard_size=100)
    return label_dataset(model, ds, uri, **{**args, **kw})


def test_plan_shards():
    assert plan_shards(250, shard_size=100) == [(0, 100), (100, 200), (200, 250)]
    assert plan_shards(5, shard_size=100) == [(0, 5)]
    with pytest.raises(ValueError, match="shard_size"):
        plan_shards(10, shard_size=0)
    with pytest.raises(ValueError, match="num_samples"):
        plan_shards(0, shard_size=10)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="device"):
        resolve_device("tpu:banana")


def test_torch_threads_pins_and_restores_the_count():
    import os
    import threading

    from pipeline.device import torch_threads

    assert os.environ["MKL_CBWR"]  # importing pipeline asks MKL for thread-count-independent results
    before = torch.get_num_threads()
    seen = []
    with torch_threads(1):
        with torch_threads(1):  # a second user (another sweep) shares the setting
            t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
            t.start()
            t.join()
        assert torch.get_num_threads() == 1  # the outer user still holds it
    assert seen == [1] and torch.get_num_threads() == before
    with torch_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        with torch_threads(0):
            pass


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_label_dataset_stores_teacher_logits_and_rerun_skips(tmp_path, digits, backend):
    model, uri = teacher(), str(tmp_path / "labels")
    seen = []
    out = run(model, digits, uri, backend=backend, progress=seen.append)
    assert [s["shard"] for s in seen] == [0, 1, 2] and out["skipped"] == []
    assert [s["rows"] for s in out["shards"]] == [200, 200, 200]  # 100 samples x 2 views

    ds = storage.open_soft_labels(uri)
    m = ds.manifest
    assert m["status"] == "complete" and m["backend"] == backend and m["num_samples"] == 300
    assert m["num_rows"] == 600 and m["num_views"] == 2 and m["temperature"] == T
    assert m["teacher"] == TEACHER
    assert m["data"] == {
        "name": "digits",
        "split": "every-2nd-of-600",
        "fingerprint": digits.fingerprint(),
        "transform": SPEC.to_dict(),
        "inputs": {"kind": "dense", "in_shape": [1, 8, 8]},
    }
    assert storage.verify(uri).ok

    sids, views, z, _ = expected(model, digits, 2, SPEC)
    got = ds.take(digits.sample_ids)  # every view, id-major
    np.testing.assert_array_equal(got["sample_id"], sids)
    np.testing.assert_array_equal(got["view"], views)
    np.testing.assert_allclose(got["logits"].astype(np.float32), z / T, rtol=1e-3, atol=2e-3)
    assert not np.allclose(z[0::2], z[1::2], atol=1e-3)  # views really differ

    # re-run: nothing labelled, teacher only probed once, manifest not rewritten
    calls = []
    h = model.register_forward_hook(lambda *a: calls.append(1))
    again = run(model, digits, uri, backend=backend)
    h.remove()
    assert again["skipped"] == [0, 1, 2] and again["shards"] == [] and len(calls) == 1
    assert again["manifest"]["finalized_at"] == m["finalized_at"]


def test_resume_after_partial_run_matches_fresh_run(tmp_path, digits):
    model = teacher()
    fresh = run(model, digits, str(tmp_path / "fresh"))["manifest"]

    uri = str(tmp_path / "resumed")
    # an interrupted run: shards 0 and 2 labelled (with another batch size), shard 1 missing
    partial = LabelRun(
        ClassifyLabeller(
            model,
            digits,
            transform=SPEC,
            num_views=2,
            batch_size=64,
            output={"uri": uri, "backend": "parquet", "temperature": T},
        ),
        shard_size=100,
        teacher=TEACHER,
    )
    assert partial.pending() == [0, 1, 2]
    for i in (0, 2):
        partial.label_shard(i)
    assert partial.pending() == [1] and partial.label_shard(0)["records"] == []  # a retry: nothing to do
    with pytest.raises(storage.IncompleteDatasetError):
        storage.open_soft_labels(uri)

    out = run(model, digits, uri)
    assert out["skipped"] == [0, 2] and [s["shard"] for s in out["shards"]] == [1]
    # batch size does not change the bytes: each shard is a pure function of its rows
    got, want = (storage.open_soft_labels(str(p)).shards for p in (uri, tmp_path / "fresh"))
    assert [s["sha256"] for s in got] == [s["sha256"] for s in want] and len(want) == fresh["num_shards"] == 3
    assert out["manifest"]["index"] == storage.open_soft_labels(uri).manifest["index"]
    assert storage.verify(uri).ok

    with pytest.raises(ValueError, match="shard_size|shards"):
        run(model, digits, uri, shard_size=64)


def test_feature_layer_stores_features(tmp_path, digits):
    model, uri = teacher(), str(tmp_path / "feat")
    assert feature_shape(model, "body", (1, 8, 8)) == [32]
    out = run(model, digits, uri, backend="zarr", feature_layer="body", dtype="float32")
    assert out["manifest"]["feature"] == {"name": "body", "shape": [32], "dtype": "float32"}
    _, _, z, xv = expected(model, digits, 2, SPEC)
    got = storage.open_soft_labels(uri).take(digits.sample_ids)
    with torch.no_grad():
        f = model.features(xv).numpy()
    np.testing.assert_allclose(got["feature"], f, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["logits"], z / T, rtol=1e-5, atol=1e-5)

    # body.1 = the Linear before ReLU(inplace=True): the hook must keep the pre-ReLU values
    uri2 = str(tmp_path / "feat_linear")
    run(model, digits, uri2, feature_layer="body.1", dtype="float32")
    with torch.no_grad():
        pre = model.body[1](xv.flatten(1)).numpy()
    assert (pre < 0).any()
    np.testing.assert_allclose(
        storage.open_soft_labels(uri2).take(digits.sample_ids)["feature"], pre, rtol=1e-5, atol=1e-5
    )

    with pytest.raises(ValueError, match="not a submodule"):
        feature_shape(model, "body.99", (1, 8, 8))


def test_topk_representation(tmp_path, digits):
    model, uri = teacher(), str(tmp_path / "topk")
    run(model, digits, uri, representation="topk", k=3, num_views=1, view_spec=None)
    ds = storage.open_soft_labels(uri)
    assert ds.manifest["representation"]["kind"] == "topk" and ds.manifest["data"]["transform"] is None
    _, _, z, _ = expected(model, digits, 1, None)
    got = ds.take(digits.sample_ids)
    ref = np.sort(z, axis=1)[:, ::-1][:, :3] / T
    np.testing.assert_allclose(got["topk_logits"].astype(np.float32), ref, rtol=1e-3, atol=2e-3)
    np.testing.assert_array_equal(got["topk_indices"][:, 0], z.argmax(1))
    p, tail = storage.topk_probs(got["topk_logits"], got["logsumexp"])
    full = storage.softmax(z / T)
    np.testing.assert_allclose(p[:, 0], full.max(1), atol=2e-3)


def test_clear_errors(tmp_path, digits):
    model = teacher()
    with pytest.raises(ValueError, match="needs a non-identity transform"):
        run(model, digits, str(tmp_path / "a"), view_spec=None)
    with pytest.raises(ValueError, match="transform"):
        run(
            model,
            digits,
            str(tmp_path / "b"),
            data={"name": "d", "split": "s", "fingerprint": "f", "transform": {"shift": 3}},
        )
    with pytest.raises(ValueError, match="classes"):
        run(
            model,
            digits.subset(np.arange(10)).__class__(  # same data claiming 5 classes
                "d", digits.x[:10], None, digits.sample_ids[:10], 5
            ),
            str(tmp_path / "c"),
        )
    with pytest.warns(UserWarning, match="amp"):
        run(model, digits.subset(np.arange(20)), str(tmp_path / "d"), amp="bf16")
