"""The label stream (RowStream: dense / top-k rows) and HardLabelBatches on real soft-label
datasets written into tmp_path."""

import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data.datasets import ArrayDataset
from pipeline.training.batches import HardLabelBatches
from pipeline.training.stream import open_label_stream
from pipeline.views.images import ViewSpec, apply_views
from storage import SoftLabelWriter
from storage.topk import scaled_topk

C = 5
SPEC = ViewSpec(shift=1, hflip=True, noise_std=0.05, seed=5)
TEACHER = {"name": "known-fn", "fingerprint": "sha256:known"}


def make_inputs(n=40, seed=0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    x = rng.random((n, 1, 6, 6), dtype=np.float32)
    y = rng.integers(0, C, n)
    ids = rng.permutation(n) * 3 + 7  # non-contiguous ids, rows not in id order
    return ArrayDataset("toy", x, y, ids, C)


def known_logits(sid, view, y) -> np.ndarray:
    """Teacher logits as a known function of (sample_id, view, label): (R, C) float32."""
    sid, view = np.asarray(sid), np.asarray(view)
    z = 10.0 * np.eye(C, dtype=np.float32)[y]
    z += ((sid % 13)[:, None] * 0.25 * np.arange(C)[None, :]).astype(np.float32)
    z += (0.5 * view)[:, None].astype(np.float32)
    return z.astype(np.float32)


def write_store(
    uri,
    inputs,
    *,
    views=3,
    spec=SPEC,
    temperature=2.0,
    representation="dense",
    k=None,
    backend="parquet",
    shards=3,
    dtype="float32",
):
    order = np.random.default_rng(1).permutation(len(inputs))  # shards not in input order
    sids = np.repeat(inputs.sample_ids[order], views)
    vws = np.tile(np.arange(views), len(inputs))
    ys = np.repeat(inputs.y[order], views)
    z = known_logits(sids, vws, ys)
    data = {
        "name": "toy",
        "split": "all",
        "fingerprint": inputs.fingerprint(),
        "transform": spec.to_dict() if spec is not None else None,
    }
    bounds = np.linspace(0, len(sids), shards + 1).astype(int)
    with SoftLabelWriter(
        uri,
        backend=backend,
        num_classes=C,
        temperature=temperature,
        num_views=views,
        representation=representation,
        k=k,
        dtype=dtype,
        teacher=TEACHER,
        data=data,
    ) as w:
        for i in range(shards):
            a, b = bounds[i], bounds[i + 1]
            w.write_shard(i, sids[a:b], z[a:b], vws[a:b] if views > 1 else None)
    return uri


def source_rows(inputs, batch):
    pos = inputs.index_of(batch["sample_id"].numpy())
    return pos, inputs.y[pos]


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_stream_joins_inputs_views_and_stored_logits(tmp_path, backend):
    inputs = make_inputs()
    uri = write_store(str(tmp_path / "sl"), inputs, backend=backend)
    stream = open_label_stream(uri, inputs, SPEC, batch_size=16, seed=3)
    seen = []
    for b in stream:
        assert set(b) == {"x", "y", "sample_id", "view", "weight", "stored_logits"}
        assert b["x"].dtype == torch.float32 and b["y"].dtype == torch.int64
        assert b["stored_logits"].dtype == torch.float32 and b["weight"].dtype == torch.float32
        pos, y = source_rows(inputs, b)
        sid, view = b["sample_id"].numpy(), b["view"].numpy()
        assert np.array_equal(b["y"].numpy(), y)
        # the stored z/T, as stored (float32 store, T = 2: z/2 is exact); no temperature math
        assert torch.equal(b["stored_logits"], torch.from_numpy(known_logits(sid, view, y) / np.float32(2.0)))
        # pixels: the same views the teacher saw, regenerated bit-exactly, row by row
        for r in range(len(sid)):
            want = apply_views(torch.from_numpy(inputs.x[pos[r : r + 1]]), sid[r : r + 1], view[r : r + 1], SPEC)
            assert torch.equal(b["x"][r : r + 1], want)
        ident = view == 0
        assert torch.equal(b["x"][ident], torch.from_numpy(inputs.x[pos[ident]]))
        assert (b["weight"] == 1).all()  # one rank, one worker: no pad rows
        seen += list(zip(sid.tolist(), view.tolist()))
    assert sorted(seen) == sorted((int(s), v) for s in inputs.sample_ids for v in range(3))
    assert stream.num_batches() == len(range(0, 120, 16))


def test_stream_topk_fields(tmp_path):
    inputs = make_inputs()
    uri = write_store(str(tmp_path / "sl"), inputs, representation="topk", k=2, temperature=4.0)
    stream = open_label_stream(uri, inputs, batch_size=32)  # view spec taken from the manifest
    assert stream.transform == SPEC and stream.kind == "topk"
    n = 0
    for b in stream:
        assert set(b) == {"x", "y", "sample_id", "view", "weight", "topk_ids", "topk_logprobs"}
        _, y = source_rows(inputs, b)
        z = known_logits(b["sample_id"].numpy(), b["view"].numpy(), y)
        vals, idx, lse = scaled_topk((z.astype(np.float64) / 4.0).astype(np.float32), 2)
        assert b["topk_ids"].dtype == torch.int64 and b["topk_logprobs"].dtype == torch.float32
        assert np.array_equal(b["topk_ids"].numpy(), idx)
        # the teacher's log-probs at the stored T: stored z/T minus the stored logsumexp of all classes
        np.testing.assert_allclose(b["topk_logprobs"].numpy(), vals - lse[:, None], rtol=1e-3, atol=1e-6)
        n += len(y)
    assert n == 120


@pytest.mark.parametrize("chunk_batches", [1, 3, 16])
def test_joined_chunks_cut_into_exactly_the_readers_batches(tmp_path, monkeypatch, chunk_batches):
    """The stream joins k batches per read and cuts them; its batches must be the reader's
    iter_batches(B) batches row for row (order, pad rows, partial last batch), per rank."""
    import pipeline.training.stream as st
    from storage import open_soft_labels

    inputs = make_inputs(n=37)
    uri = write_store(str(tmp_path / "sl"), inputs, views=3, shards=4)
    other = write_store(str(tmp_path / "other"), inputs, views=3, shards=2, temperature=5.0)
    B = 8
    ds = open_soft_labels(uri)
    for rank in range(2):
        stream = open_label_stream(
            uri, inputs, SPEC, batch_size=B, seed=4, rank=rank, world_size=2, extra_soft_labels=[other]
        )
        monkeypatch.setattr(st, "MAX_JOIN_BATCHES", chunk_batches)  # 5 classes: far below the byte budget
        assert stream.join_batches() == chunk_batches
        stream.set_epoch(1)
        got = list(stream)
        want = list(ds.iter_batches(B, seed=4, epoch=1, rank=rank, world_size=2))
        assert len(got) == len(want) == stream.num_batches() == 7  # 111 rows / 2 ranks -> 56 -> 7 batches
        for g, w in zip(got, want):
            assert g["sample_id"].numpy().tolist() == w["sample_id"].tolist()
            assert g["view"].numpy().tolist() == w["view"].tolist()
            assert g["weight"].numpy().tolist() == (~w["pad"]).astype(float).tolist()
            assert torch.equal(g["stored_logits"], torch.from_numpy(w["logits"]))
            z = known_logits(w["sample_id"], w["view"], inputs.y[inputs.index_of(w["sample_id"])])
            assert g["extra_stored_logits"].shape == (1, len(w["sample_id"]), C)
            # the other teacher's rows as IT stored them (its own T = 5)
            assert torch.equal(g["extra_stored_logits"][0], torch.from_numpy(z / np.float32(5.0)))


def test_stream_yields_stored_data_only(tmp_path):
    """Batches carry the stored columns and the inputs, nothing derived from a student
    temperature (no teacher_probs / teacher_neg_entropy / rescaled logits): the objective
    (pipeline/objectives/objective.py) does every temperature step. The stream exposes each teacher's
    stored T, and refuses the removed kd_temperature argument."""
    inputs = make_inputs(n=30)
    uri = write_store(str(tmp_path / "sl"), inputs, views=2, shards=2, temperature=2.0)
    other = write_store(str(tmp_path / "other"), inputs, views=2, shards=3, temperature=5.0)
    stream = open_label_stream(uri, inputs, SPEC, batch_size=16, extra_soft_labels=[other])
    assert stream.temperature == 2.0 and stream.extra_temperatures == [5.0]
    stored = {"x", "y", "sample_id", "view", "weight", "stored_logits", "extra_stored_logits"}
    for b in stream:
        assert set(b) == stored
        z = known_logits(b["sample_id"].numpy(), b["view"].numpy(), b["y"].numpy())
        assert torch.equal(b["stored_logits"], torch.from_numpy(z / np.float32(2.0)))
        assert torch.equal(b["extra_stored_logits"][0], torch.from_numpy(z / np.float32(5.0)))
    with pytest.raises(TypeError, match="kd_temperature"):
        open_label_stream(uri, inputs, SPEC, batch_size=16, kd_temperature=3.0)


def test_worker_numpy_batches_equal_in_process_batches(tmp_path):
    """worker_numpy: a DataLoader worker hands over numpy arrays (collate_fn=keep_batch);
    turned into tensors by from_wire they equal the in-process tensor batches, field by field."""
    from pipeline.training.stream import from_wire, keep_batch

    inputs = make_inputs(n=30)
    uri = write_store(str(tmp_path / "sl"), inputs, views=2, shards=2)
    stream = open_label_stream(uri, inputs, SPEC, batch_size=8, seed=2)
    want = list(stream)
    stream.worker_numpy = True
    assert all(isinstance(v, torch.Tensor) for v in next(iter(stream)).values())  # only workers switch
    dl = DataLoader(stream, batch_size=None, num_workers=1, collate_fn=keep_batch, multiprocessing_context="spawn")
    got = list(dl)
    assert len(got) == len(want) == stream.num_batches()
    for g, w in zip(got, want):
        assert all(isinstance(v, np.ndarray) for v in g.values())
        g = from_wire(g)
        assert set(g) == set(w)
        for key in w:
            assert torch.equal(g[key], w[key]) and g[key].dtype == w[key].dtype, key


def test_pixels_cross_from_workers_as_uint8_and_come_back_bit_exact():
    """8-bit images (k/255 as float32, by division or by 1/255) travel as uint8, a quarter of
    the bytes, and are rebuilt to the same float32 bits; anything else travels unchanged."""
    from pipeline.training.stream import from_wire, to_wire

    k = np.random.default_rng(0).integers(0, 256, (8, 1, 6, 6)).astype(np.float32)
    for x in (k / np.float32(255), k * np.float32(1 / 255)):
        wire = to_wire({"x": x, "sample_id": np.arange(8)})
        assert wire["x"].dtype == np.uint8 and wire["x"].nbytes == x.nbytes // 4
        back = from_wire(wire)
        assert set(back) == {"x", "sample_id"} and back["x"].dtype == torch.float32
        assert np.array_equal(back["x"].numpy().view(np.uint32), x.view(np.uint32))  # the very bits
    noisy = k / np.float32(255) + np.float32(1e-3)  # not pixels (a noise view): as it is
    assert to_wire({"x": noisy})["x"] is noisy
    rows = np.random.default_rng(1).random((8, 5)).astype(np.float32)  # tabular rows: as they are
    assert to_wire({"x": rows})["x"] is rows
    assert torch.equal(from_wire({"x": noisy})["x"], torch.from_numpy(noisy))


def _epoch(loader, stream, epoch):
    stream.set_epoch(epoch)
    return [{k: v.clone() for k, v in b.items()} for b in loader]


def test_dataloader_workers_ranks_exactly_once_and_set_epoch(tmp_path):
    inputs = make_inputs(n=37)
    uri = write_store(str(tmp_path / "sl"), inputs, views=2, shards=4)
    loaders = []
    for rank in range(2):
        s = open_label_stream(uri, inputs, SPEC, batch_size=8, seed=1, rank=rank, world_size=2)
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
        order = [
            (s, v)
            for b in _epoch(loaders[0][1], loaders[0][0], e)
            for s, v in zip(b["sample_id"].tolist(), b["view"].tolist())
        ]
        if e in epochs:
            assert order == epochs[e]  # deterministic per epoch
        epochs.setdefault(e, order)
    # set_epoch reached the persistent workers: epoch 1's order differs from epoch 0's
    assert epochs[0] != epochs[1]


def test_stream_refusals(tmp_path):
    inputs = make_inputs()
    uri = write_store(str(tmp_path / "sl"), inputs)
    with pytest.raises(ValueError, match="differs from the transform"):
        open_label_stream(uri, inputs, ViewSpec(shift=2, seed=5), batch_size=8)
    with pytest.raises(ValueError, match="num_classes=7"):
        open_label_stream(uri, ArrayDataset("toy", inputs.x, inputs.y, inputs.sample_ids, 7), batch_size=8)
    missing = inputs.subset(np.arange(10))
    with pytest.raises(ValueError, match="sample id"):
        list(open_label_stream(uri, missing, batch_size=8))
    bare = write_store(str(tmp_path / "bare"), inputs, spec=None, views=2)
    with pytest.raises(ValueError, match="2 views per sample"):
        open_label_stream(bare, inputs, None, batch_size=8)
    with pytest.raises(ValueError, match="rank must be in"):
        open_label_stream(uri, inputs, batch_size=8, rank=2, world_size=2)


def test_hard_label_batches_split_views_and_epochs():
    inputs = make_inputs(n=50)
    spec = ViewSpec(shift=1, seed=2)

    def run(epoch, world=3, **kw):
        out = []
        for r in range(world):
            hb = HardLabelBatches(inputs, batch_size=8, transform=spec, seed=4, rank=r, world_size=world, **kw)
            hb.set_epoch(epoch)
            out.append(list(hb))
        return out

    ranks = run(0)
    assert (
        len({len(r) for r in ranks}) == 1
        and len(ranks[0]) == HardLabelBatches(inputs, batch_size=8, world_size=3).num_batches()
    )
    ids = [s for r in ranks for b in r for s in b["sample_id"][b["weight"] == 1].tolist()]
    assert sorted(ids) == sorted(inputs.sample_ids.tolist())
    b = ranks[1][0]
    assert set(b) == {"x", "y", "sample_id", "view", "weight"}
    pos = inputs.index_of(b["sample_id"].numpy())
    assert torch.equal(b["y"], torch.from_numpy(inputs.y[pos]))
    assert torch.equal(b["x"], apply_views(torch.from_numpy(inputs.x[pos]), b["sample_id"], b["view"], spec))
    assert (b["view"] > 0).all()  # fresh augmentation ids
    views = lambda rs: {s: v for r in rs for b in r for s, v in zip(b["sample_id"].tolist(), b["view"].tolist())}
    assert views(run(0)) == views(ranks)  # deterministic per (seed, epoch)
    assert views(run(1)) != views(ranks)  # new views next epoch
    assert set(views(run(0, num_views=2)).values()) <= {0, 1}
