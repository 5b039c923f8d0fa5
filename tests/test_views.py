import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from pipeline.views.images import ViewSpec, apply_views, view_params

SPEC = ViewSpec(shift=3, hflip=True, noise_std=0.1, seed=11)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _images(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 12, 12, generator=g)


def test_view0_is_identity():
    x = _images()
    ids = np.arange(16) + 100
    out = apply_views(x, ids, np.zeros(16, np.int64), SPEC)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()
    mixed = apply_views(x, ids, np.array([0, 1] * 8), SPEC)
    assert torch.equal(mixed[0::2], x[0::2])
    assert not torch.equal(mixed[1::2], x[1::2])
    p = view_params(SPEC, ids, np.zeros(16, np.int64))
    assert not p["dx"].any() and not p["dy"].any() and not p["flip"].any()


def test_independent_of_batch_order_and_composition():
    x = _images(32)
    ids = np.arange(32) * 7 + 3
    views = np.arange(32) % 4
    ref = apply_views(x, ids, views, SPEC)
    perm = np.random.default_rng(1).permutation(32)
    shuffled = apply_views(x[perm], ids[perm], views[perm], SPEC)
    assert torch.equal(shuffled, ref[perm])
    # the same rows inside a different batch, next to unrelated rows
    other = _images(5, seed=9)
    rows = [4, 17, 30]
    batch = torch.cat([other[:2], x[rows], other[2:]])
    b_ids = np.concatenate([[999, 1000], ids[rows], [1001, 1002, 1003]])
    b_views = np.concatenate([[1, 2], views[rows], [3, 1, 0]])
    out = apply_views(batch, b_ids, b_views, SPEC)
    assert torch.equal(out[2:5], ref[rows])
    # single-row batches, views as a scalar
    for r in rows:
        one = apply_views(x[r : r + 1], ids[r : r + 1], int(views[r]), SPEC)
        assert torch.equal(one[0], ref[r])


def test_views_and_seeds_differ():
    x = _images(8)
    ids = np.arange(8)
    v1 = apply_views(x, ids, np.ones(8, np.int64), SPEC)
    v2 = apply_views(x, ids, np.full(8, 2), SPEC)
    assert all(not torch.equal(v1[i], v2[i]) for i in range(8))
    other_seed = ViewSpec(shift=3, hflip=True, noise_std=0.1, seed=12)
    s2 = apply_views(x, ids, np.ones(8, np.int64), other_seed)
    assert all(not torch.equal(v1[i], s2[i]) for i in range(8))
    assert apply_views(x, ids, 1, SPEC).min() >= 0 and apply_views(x, ids, 1, SPEC).max() <= 1


def test_params_cover_range():
    ids = np.arange(2000)
    p = view_params(SPEC, ids, np.ones(2000, np.int64))
    assert set(p["dx"].tolist()) == set(range(-3, 4)) == set(p["dy"].tolist())
    assert 0.4 < p["flip"].mean() < 0.6
    no_flip = view_params(ViewSpec(shift=1), ids, np.ones(2000, np.int64))
    assert not no_flip["flip"].any() and not no_flip["noise_key"].any()


def test_shift_moves_content_with_zero_fill():
    spec = ViewSpec(shift=2, seed=5)
    ids, views = np.arange(40), np.ones(40, np.int64)
    img = torch.zeros(40, 2, 6, 7)
    img[:, :, 2, 3] = 1.0  # one bright pixel per channel
    img[:, 1, 0, 0] = 0.5  # near the corner: may be shifted out
    out = apply_views(img, ids, views, spec)
    p = view_params(spec, ids, views)
    assert {(int(a), int(b)) for a, b in zip(p["dx"], p["dy"])} > {(0, 0)}
    for b in range(40):
        dx, dy = int(p["dx"][b]), int(p["dy"][b])
        want = torch.zeros(2, 6, 7)
        want[:, 2 + dy, 3 + dx] = 1.0  # +dx right, +dy down
        if 0 <= dy < 6 and 0 <= dx < 7:
            want[1, dy, dx] = 0.5
        assert torch.equal(out[b], want), (b, dx, dy)


def test_hflip_mirrors_columns():
    spec = ViewSpec(hflip=True, seed=2)
    x = _images(64)
    ids, views = np.arange(64), np.full(64, 3)
    out = apply_views(x, ids, views, spec)
    flip = view_params(spec, ids, views)["flip"]
    assert flip.any() and not flip.all()
    for b in range(64):
        assert torch.equal(out[b], x[b].flip(-1) if flip[b] else x[b])


def test_tabular_noise_only_unclipped():
    spec = ViewSpec(shift=4, hflip=True, noise_std=0.5, seed=1)
    x = torch.full((200, 64), 5.0)
    out = apply_views(x, np.arange(200), np.ones(200, np.int64), spec)
    noise = out - x
    assert out.shape == x.shape and out.max() > 5.5  # not clipped to [0, 1]
    assert abs(noise.mean().item()) < 0.01 and abs(noise.std().item() - 0.5) < 0.01


def test_spec_round_trip_and_fingerprint():
    d = SPEC.to_dict()
    assert d == {"shift": 3, "hflip": True, "noise_std": 0.1, "seed": 11}
    assert ViewSpec.from_dict(d) == SPEC
    assert ViewSpec.from_dict(d).fingerprint() == SPEC.fingerprint()
    variants = [
        ViewSpec(**{**d, "shift": 2}),
        ViewSpec(**{**d, "hflip": False}),
        ViewSpec(**{**d, "noise_std": 0.2}),
        ViewSpec(**{**d, "seed": 12}),
    ]
    fps = {v.fingerprint() for v in variants} | {SPEC.fingerprint()}
    assert len(fps) == 5
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rotate'\]"):
        ViewSpec.from_dict({**d, "rotate": 10})
    with pytest.raises(ValueError, match="shift must be an int >= 0, found -1"):
        ViewSpec(shift=-1)
    with pytest.raises(ValueError, match="noise_std"):
        ViewSpec(noise_std=float("nan"))


def test_bad_inputs():
    x = _images(4)
    with pytest.raises(ValueError, match="x has 4 rows but 3 sample_ids"):
        apply_views(x, np.arange(3), 1, SPEC)
    with pytest.raises(ValueError, match="views must be >= 0, found -1"):
        apply_views(x, np.arange(4), np.array([0, 1, -1, 2]), SPEC)
    with pytest.raises(ValueError, match="found shape"):
        apply_views(torch.zeros(4, 12, 12), np.arange(4), 1, SPEC)


_CHILD = """
import sys, numpy as np, torch
from pipeline.views.images import ViewSpec, apply_views
x = torch.from_numpy(np.load(sys.argv[1]))
ids, views = np.load(sys.argv[2]), np.load(sys.argv[3])
spec = ViewSpec.from_dict({"shift": 3, "hflip": True, "noise_std": 0.1, "seed": 11})
np.save(sys.argv[4], apply_views(x, ids, views, spec).numpy())
"""


def test_other_process_regenerates_same_pixels(tmp_path):
    x = _images(24, seed=3)
    ids = np.arange(24, dtype=np.int64) * 13 + 5
    views = (np.arange(24) % 5).astype(np.int64)
    ref = apply_views(x, ids, views, SPEC).numpy()
    perm = np.random.default_rng(4).permutation(24)  # child also sees another order
    paths = [str(tmp_path / f) for f in ("x.npy", "ids.npy", "views.npy", "out.npy")]
    np.save(paths[0], x.numpy()[perm])
    np.save(paths[1], ids[perm])
    np.save(paths[2], views[perm])
    env = {**os.environ, "PYTHONPATH": ROOT, "PYTHONHASHSEED": "123"}
    subprocess.run([sys.executable, "-c", _CHILD, *paths], check=True, env=env, cwd=ROOT, timeout=120)
    child = np.load(paths[3])
    assert child.tobytes() == ref[perm].tobytes()
