"""StoredLabelStream / HardLabelBatches on real soft-label datasets written into tmp_path."""
import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data import ArrayDataset
from pipeline.stream import HardLabelBatches, StoredLabelStream
from pipeline.views import ViewSpec, apply_views
from storage import SoftLabelWriter
from storage.topk import scaled_topk

C = 5
SPEC = ViewSpec(shift=1, hflip=True, noise_std=0.05, seed=5)
TEACHER = {"name": "known-fn", "fingerprint": "sha256:known"}


def make_inputs(n=40, seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 6, 6), dtype=np.float32)
    y = rng.integers(0, C, n)
    ids = rng.permutation(n) * 3 + 7   # non-contiguous ids, rows not in id order
    return ArrayDataset("toy", x, y, ids, C)


def known_logits(sid, view, y) -> np.ndarray:
    """Teacher logits as a known function of (sample_id, view, label): (R, C) float32."""
    sid, view = np.asarray(sid), np.asarray(view)
    z = 10.0 * np.eye(C, dtype=np.float32)[y]
    z += ((sid % 13)[:, None] * 0.25 * np.arange(C)[None, :]).astype(np.float32)
    z += (0.5 * view)[:, None].astype(np.float32)
    return z.astype(np.float32)


def write_store(uri, inputs, *, views=3, spec=SPEC, temperature=2.0, representation="dense", k=None,
                backend="parquet", shards=3, dtype="float32"):
    order = np.random.default_rng(1).permutation(len(inputs))   # shards not in input order
    sids = np.repeat(inputs.sample_ids[order], views)
    vws = np.tile(np.arange(views), len(inputs))
    ys = np.repeat(inputs.y[order], views)
    z = known_logits(sids, vws, ys)
    data = {"name": "toy", "split": "all", "fingerprint": inputs.fingerprint(),
            "transform": spec.to_dict() if spec is not None else None}
    bounds = np.linspace(0, len(sids), shards + 1).astype(int)
    with SoftLabelWriter(uri, backend=backend, num_classes=C, temperature=temperature, num_views=views,
                         representation=representation, k=k, dtype=dtype, teacher=TEACHER, data=data) as w:
        for i in range(shards):
            a, b = bounds[i], bounds[i + 1]
            w.write_shard(i, sids[a:b], z[a:b], vws[a:b] if views > 1 else None)
    return uri


def source_rows(inputs, batch):
    pos = inputs.index_of(batch["sample_id"].numpy())
    return pos, inputs.y[pos]


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_stream_joins_inputs_views_and_raw_logits(tmp_path, backend):
    inputs = make_inputs()
    uri = write_store(str(tmp_path / "sl"), inputs, backend=backend)
    stream = StoredLabelStream(uri, inputs, SPEC, batch_size=16, seed=3)
    seen = []
    for b in stream:
        assert set(b) == {"x", "y", "sample_id", "view", "weight", "teacher_logits"}
        assert b["x"].dtype == torch.float32 and b["y"].dtype == torch.int64
        assert b["teacher_logits"].dtype == torch.float32 and b["weight"].dtype == torch.float32
        pos, y = source_rows(inputs, b)
        sid, view = b["sample_id"].numpy(), b["view"].numpy()
        assert np.array_equal(b["y"].numpy(), y)
        # raw logits recovered exactly (float32 store, T = 2): scaled * T
        assert torch.equal(b["teacher_logits"], torch.from_numpy(known_logits(sid, view, y)))
        # pixels: the same views the teacher saw, regenerated bit-exactly, row by row
        for r in range(len(sid)):
            want = apply_views(torch.from_numpy(inputs.x[pos[r:r + 1]]), sid[r:r + 1], view[r:r + 1], SPEC)
            assert torch.equal(b["x"][r:r + 1], want)
        ident = view == 0
        assert torch.equal(b["x"][ident], torch.from_numpy(inputs.x[pos[ident]]))
        assert (b["weight"] == 1).all()   # one rank, one worker: no pad rows
        seen += list(zip(sid.tolist(), view.tolist()))
    assert sorted(seen) == sorted((int(s), v) for s in inputs.sample_ids for v in range(3))
    assert stream.num_batches() == len(range(0, 120, 16))


def test_stream_topk_fields(tmp_path):
    inputs = make_inputs()
    uri = write_store(str(tmp_path / "sl"), inputs, representation="topk", k=2, temperature=4.0)
    stream = StoredLabelStream(uri, inputs, batch_size=32)  # view spec taken from the manifest
    assert stream.view_spec == SPEC and stream.kind == "topk"
    n = 0
    for b in stream:
        assert "teacher_logits" not in b
        _, y = source_rows(inputs, b)
        z = known_logits(b["sample_id"].numpy(), b["view"].numpy(), y)
        vals, idx, lse = scaled_topk((z.astype(np.float64) / 4.0).astype(np.float32), 2)
        assert b["topk_indices"].dtype == torch.int64
        assert np.array_equal(b["topk_indices"].numpy(), idx)
        np.testing.assert_allclose(b["topk_logits"].numpy(), vals, rtol=1e-3)   # float32 store, exact-ish
        np.testing.assert_allclose(b["logsumexp"].numpy(), lse, rtol=1e-6)
        n += len(y)
    assert n == 120


def _epoch(loader, stream, epoch):
    stream.set_epoch(epoch)
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_dataloader_workers_ranks_exactly_once_and_set_epoch(tmp_path):
    inputs = make_inputs(n=37)
    uri = write_store(str(tmp_path / "sl"), inputs, views=2, shards=4)
    loaders = []
    for rank in range(2):
        s = StoredLabelStream(uri, inputs, SPEC, batch_size=8, seed=1, rank=rank, world_size=2)
        dl = DataLoader(s, batch_size=None, num_workers=2, persistent_workers=True)
        loaders.append((s, dl))
    epochs = {}
    for e in (0, 1, 0):
        counts, nb = collections.Counter(), []
        for s, dl in loaders:
            batches = _epoch(dl, s, e)
            nb.append(len(batches))
            assert len(batches) == s.num_batches(num_workers=2)
            for b in batches:
                pad = b["weight"] == 0
                assert set(b["weight"].unique().tolist()) <= {0.0, 1.0}
                counts.update(zip(b["sample_id"][~pad].tolist(), b["view"][~pad].tolist()))
        assert nb[0] == nb[1]  # every rank the same number of steps
        assert counts == collections.Counter((int(s), v) for s in inputs.sample_ids for v in range(2))
        order = [(s, v) for b in _epoch(loaders[0][1], loaders[0][0], e) for s, v in
                 zip(b["sample_id"].tolist(), b["view"].tolist())]
        if e in epochs:
            assert order == epochs[e]  # deterministic per epoch
        epochs.setdefault(e, order)
    # set_epoch reached the persistent workers: epoch 1's order differs from epoch 0's
    assert epochs[0] != epochs[1]


def test_stream_refusals(tmp_path):
    inputs = make_inputs()
    uri = write_store(str(tmp_path / "sl"), inputs)
    with pytest.raises(ValueError, match="differs from the transform"):
        StoredLabelStream(uri, inputs, ViewSpec(shift=2, seed=5), batch_size=8)
    with pytest.raises(ValueError, match="num_classes=7"):
        StoredLabelStream(uri, ArrayDataset("toy", inputs.x, inputs.y, inputs.sample_ids, 7), batch_size=8)
    missing = inputs.subset(np.arange(10))
    with pytest.raises(ValueError, match="sample id"):
        list(StoredLabelStream(uri, missing, batch_size=8))
    bare = write_store(str(tmp_path / "bare"), inputs, spec=None, views=2)
    with pytest.raises(ValueError, match="2 views per sample"):
        StoredLabelStream(bare, inputs, None, batch_size=8)
    with pytest.raises(ValueError, match="rank must be in"):
        StoredLabelStream(uri, inputs, batch_size=8, rank=2, world_size=2)


def test_hard_label_batches_split_views_and_epochs():
    inputs = make_inputs(n=50)
    spec = ViewSpec(shift=1, seed=2)

    def run(epoch, world=3, **kw):
        out = []
        for r in range(world):
            hb = HardLabelBatches(inputs, batch_size=8, view_spec=spec, seed=4, rank=r, world_size=world, **kw)
            hb.set_epoch(epoch)
            out.append(list(hb))
        return out

    ranks = run(0)
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == HardLabelBatches(
        inputs, batch_size=8, world_size=3).num_batches()
    ids = [s for r in ranks for b in r for s in b["sample_id"][b["weight"] == 1].tolist()]
    assert sorted(ids) == sorted(inputs.sample_ids.tolist())
    b = ranks[1][0]
    assert set(b) == {"x", "y", "sample_id", "view", "weight"}
    pos = inputs.index_of(b["sample_id"].numpy())
    assert torch.equal(b["y"], torch.from_numpy(inputs.y[pos]))
    assert torch.equal(b["x"], apply_views(torch.from_numpy(inputs.x[pos]), b["sample_id"], b["view"], spec))
    assert (b["view"] > 0).all()  # fresh augmentation ids
    views = lambda rs: {s: v for r in rs for b in r for s, v in zip(b["sample_id"].tolist(), b["view"].tolist())}
    assert views(run(0)) == views(ranks)   # deterministic per (seed, epoch)
    assert views(run(1)) != views(ranks)   # new views next epoch
    assert set(views(run(0, num_views=2)).values()) <= {0, 1}
