"""pipeline.labelling.replay: stored rows recomputed with the teacher match, and rows whose inputs
cannot be regenerated (a view function that is not deterministic) are reported."""

import numpy as np
import pytest
import torch

import storage
from pipeline.data.datasets import ArrayDataset
from pipeline.labelling.classify import label_dataset
from pipeline.labelling.replay import replay_rows
from pipeline.models.registry import build_model
from pipeline.views.images import ViewSpec
from pipeline.views.transforms import FunctionView

VIEW_FNS = """
import torch

def jitter(x, generator, scale=0.1):
    return x + scale * torch.randn(x.shape, generator=generator)

def leaky(x, generator, scale=0.1):
    return x + scale * torch.randn(x.shape)        # the global RNG: not a function of (sample, view)
"""


@pytest.fixture
def view_module(tmp_path, monkeypatch):
    (tmp_path / "my_views.py").write_text(VIEW_FNS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_views"


def _label(tmp_path, transform, representation="dense", k=None):
    rng = np.random.default_rng(0)
    ds = ArrayDataset("toy", rng.random((60, 12), dtype=np.float32), rng.integers(0, 5, 60), np.arange(100, 160), 5)
    torch.manual_seed(0)
    model = build_model({"arch": "mlp", "kwargs": {"width": 16}}, in_shape=(12,), num_classes=5)
    uri = str(tmp_path / f"labels-{representation}")
    label_dataset(
        model,
        ds,
        uri,
        temperature=3.0,
        teacher={"name": "mlp", "fingerprint": "t"},
        num_views=3,
        view_spec=transform,
        shard_size=25,
        representation=representation,
        k=k,
    )
    return model, ds, storage.open_soft_labels(uri)


@pytest.mark.parametrize("representation,k", [("dense", None), ("topk", 2)])
def test_replay_matches_deterministic_views(tmp_path, view_module, representation, k):
    for transform in (ViewSpec(noise_std=0.05, seed=3), FunctionView(f"{view_module}:jitter", seed=1)):
        model, ds, labels = _label(tmp_path / type(transform).__name__, transform, representation, k)
        r = replay_rows(model, ds, labels, n=40, transform=transform, seed=0)
        assert r["ok"] and r["rows"] == 40 and r["max_excess"] <= 0
        assert r["max_abs_diff"] < 5e-3  # float16 rounding of z/T


def test_replay_catches_a_view_function_that_is_not_deterministic(tmp_path, view_module):
    transform = FunctionView(f"{view_module}:leaky", seed=1)
    model, ds, labels = _label(tmp_path, transform)
    r = replay_rows(model, ds, labels, n=40, transform=transform, seed=0)
    assert not r["ok"] and r["worst"]["view"] > 0 and r["max_abs_diff"] > 1e-2


def test_replay_catches_other_inputs(tmp_path):
    transform = ViewSpec(noise_std=0.05, seed=3)
    model, ds, labels = _label(tmp_path, transform)
    other = ArrayDataset("toy", ds.x + 0.2, ds.y, ds.sample_ids, 5)
    assert not replay_rows(model, other, labels, n=20, transform=transform)["ok"]
    with pytest.raises(ValueError, match="n >= 1"):
        replay_rows(model, ds, labels, n=0, transform=transform)
