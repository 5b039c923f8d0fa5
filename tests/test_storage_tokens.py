"""Token labels of a language model (representation token_topk / token_sampled): one row
per token position, whole sequences per shard, read back by row or by sequence."""

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, TEACHER

import storage.layout as layout
from storage import (
    CorruptShardError,
    CoverageError,
    InvalidLogitsError,
    MismatchError,
    SoftLabelError,
    SoftLabelWriter,
    convert,
    open_soft_labels,
    verify,
)
from storage.token_packing import LOGPROB_STEP, bf16_bits, from_bf16_bits

BACKENDS = ["parquet", "zarr"]


def topk_labels(n: int, V: int, k: int, seed: int = 0):
    """(ids (n, k) int64, logprobs (n, k) float32, missing_mass (n,) float32) of random
    peaked next-token distributions, as pipeline/token_labels.topk_token_labels makes them."""
    rng = np.random.default_rng(seed)
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(n)]).astype(np.int64)
    z = rng.standard_normal((n, k)).astype(np.float64) * 2
    z[:, 0] += 4
    keep = rng.uniform(0.5, 0.999, n)  # mass of the k kept ids
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True) * keep[:, None]
    order = np.argsort(-p, axis=1)
    return (
        np.take_along_axis(ids, order, 1),
        np.log(np.take_along_axis(p, order, 1)).astype(np.float32),
        (1 - keep).astype(np.float32),
    )


def sampled_labels(n: int, V: int, draws: int, s_max: int, seed: int = 0):
    """(ids (n, u), counts (n, u) int32, 0 = padding) with u <= s_max unique ids per row."""
    rng = np.random.default_rng(seed)
    u = rng.integers(1, s_max + 1, n)
    ids = np.zeros((n, s_max), np.int64)
    counts = np.zeros((n, s_max), np.int32)
    for r in range(n):
        ids[r, : u[r]] = np.sort(rng.choice(V, u[r], replace=False))
        c = np.ones(u[r], np.int64) + rng.multinomial(draws - u[r], np.ones(u[r]) / u[r])
        counts[r, : u[r]] = c
    return ids[:, : u.max()], counts[:, : u.max()]


def write_topk(
    uri,
    *,
    backend="parquet",
    V=50,
    L=8,
    k=4,
    seqs=(5, 4, 6),
    dtype="uint8",
    views=1,
    tail_dtype="float32",
    seed=0,
    **kw,
):
    """A complete token_topk dataset; returns (ids, logprobs, missing_mass, sample_id, view) per token."""
    n = sum(seqs) * views * L
    ids, lp, mm = topk_labels(n, V, k, seed)
    seq_sid = np.repeat(np.arange(sum(seqs)), views)
    seq_view = np.tile(np.arange(views), sum(seqs))
    sid, view = np.repeat(seq_sid, L), np.repeat(seq_view, L)
    bounds = np.concatenate([[0], np.cumsum(seqs)]) * views * L
    with SoftLabelWriter(
        uri,
        backend=backend,
        representation="token_topk",
        vocab_size=V,
        seq_len=L,
        k=k,
        dtype=dtype,
        tail_dtype=tail_dtype,
        num_views=views,
        teacher=TEACHER,
        data=DATA,
        **kw,
    ) as w:
        for i in range(len(seqs)):
            a, b = bounds[i], bounds[i + 1]
            w.write_shard(
                i,
                sid[a:b],
                ids=ids[a:b],
                logprobs=lp[a:b],
                missing_mass=mm[a:b],
                views=view[a:b] if views > 1 else None,
            )
    return ids, lp, mm, sid, view


def decoded_tolerance(dtype):
    return {"float32": 0, "float16": 2e-2, "bfloat16": 8e-2, "uint8": LOGPROB_STEP / 2 + 1e-6}[dtype]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [50, 100_000])  # 16-bit ids and 17-bit packed ids
@pytest.mark.parametrize("dtype", ["uint8", "bfloat16", "float16"])
def test_topk_round_trip(tmp_path, backend, V, dtype):
    uri = str(tmp_path / "ds")
    L, k = 8, 5
    ids, lp, mm, sid, _ = write_topk(uri, backend=backend, V=V, L=L, k=k, dtype=dtype)
    ds = open_soft_labels(uri)
    m = ds.manifest
    assert m["num_tokens"] == m["num_rows"] == len(ids) == 15 * L and m["seq_len"] == L and m["vocab_size"] == V
    assert m["num_samples"] == 15 and m["temperature"] == 1.0
    rep = m["representation"]
    assert rep["kind"] == "token_topk" and rep["k"] == k and rep["dtype"] == dtype
    assert rep["id_bits"] == (16 if V <= 65536 else 17)
    assert m["columns"]["topk_ids"] == (
        {"dtype": "uint16", "shape": [k]}
        if V <= 65536
        else {"dtype": "uint8", "shape": [(k * 17 + 7) // 8], "storage": "fixed_size_binary"}
    )
    # whole sequences, in stored order, decoded
    got = {}
    for b in ds.iter_sequences(4, shuffle=False):
        assert not b["pad"].any()
        for c, v in b.items():
            got.setdefault(c, []).append(v)
    got = {c: np.concatenate(v) for c, v in got.items()}
    assert got["sample_id"].tolist() == list(range(15))
    assert got["topk_ids"].dtype == np.int64 and got["topk_ids"].shape == (15, L, k)
    assert np.array_equal(got["topk_ids"].reshape(-1, k), ids)
    assert got["topk_logprobs"].dtype == np.float32
    np.testing.assert_allclose(
        got["topk_logprobs"].reshape(-1, k),
        lp,
        atol=decoded_tolerance(dtype),
        rtol=decoded_tolerance(dtype) if dtype != "uint8" else 0,
    )
    assert np.array_equal(got["missing_mass"].reshape(-1), mm)  # float32 tail: exact
    # rows are rows: the row-level reader streams every token, stored columns
    rows = list(ds.iter_batches(50, shuffle=False))
    assert sum(len(b["sample_id"]) for b in rows) == 15 * L
    assert np.array_equal(np.concatenate([b["position"] for b in rows]), np.tile(np.arange(L), 15))
    assert np.array_equal(np.concatenate([b["sample_id"] for b in rows]), sid)
    # by sequence id, in the order asked
    t = ds.take_sequences([7, 2])
    assert t["sample_id"].tolist() == [7, 2]
    assert np.array_equal(t["topk_ids"], ids.reshape(15, L, k)[[7, 2]])
    assert verify(uri).ok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V, draws", [(50, 20), (100_000, 300)])  # uint8 / uint16 counts
def test_sampled_round_trip(tmp_path, backend, V, draws):
    uri = str(tmp_path / "ds")
    L, s_max, nseq = 6, 12, 9
    ids, counts = sampled_labels(nseq * L, V, draws, s_max)
    assert ids.shape[1] <= s_max
    with SoftLabelWriter(
        uri,
        backend=backend,
        representation="token_sampled",
        vocab_size=V,
        seq_len=L,
        draws=draws,
        s_max=s_max,
        teacher=TEACHER,
        data=DATA,
    ) as w:
        w.write_shard(0, np.arange(5), ids=ids[: 5 * L], counts=counts[: 5 * L])  # per-sequence ids
        w.write_shard(
            1,
            np.repeat(np.arange(5, 9), L),
            ids=ids[5 * L :].reshape(4, L, -1),
            counts=counts[5 * L :].reshape(4, L, -1),
        )  # (B, L, u)
    ds = open_soft_labels(uri)
    rep = ds.manifest["representation"]
    assert rep == {
        "kind": "token_sampled",
        "k": None,
        "draws": draws,
        "s_max": s_max,
        "count_dtype": "uint8" if draws <= 255 else "uint16",
        "id_bits": 16 if V <= 65536 else 17,
        "id_storage": "uint16" if V <= 65536 else "packed",
    }
    assert ds.manifest["num_tokens"] == nseq * L
    t = ds.take_sequences(np.arange(nseq))
    u = ids.shape[1]
    assert t["sample_ids"].shape == (nseq, L, s_max) and t["sample_counts"].dtype == np.int32
    assert np.array_equal(t["sample_ids"].reshape(-1, s_max)[:, :u], ids)
    assert np.array_equal(t["sample_counts"].reshape(-1, s_max)[:, :u], counts)
    assert not t["sample_counts"].reshape(-1, s_max)[:, u:].any()  # padded to s_max with 0
    assert (t["sample_counts"].sum(-1) == draws).all()
    assert verify(uri).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_iter_sequences_partitions_every_sequence_once(tmp_path, backend, monkeypatch):
    # small blocks (several per shard) and L = 7, which does not divide the block target
    monkeypatch.setattr(layout, "MIN_BLOCK_ROWS", 16)
    monkeypatch.setattr(layout, "TARGET_BLOCK_BYTES", 16 * 40)
    uri = str(tmp_path / "ds")
    L, views = 7, 2
    ids, lp, mm, _, _ = write_topk(uri, backend=backend, L=L, k=3, seqs=(7, 5, 9, 4), views=views, dtype="float32")
    ds = open_soft_labels(uri)
    assert all(s["rows_per_block"] % L == 0 for s in ds.shards)
    assert any(s["rows_per_block"] < s["num_rows"] for s in ds.shards)  # several blocks
    n_seq = 25 * views
    by_key = ids.reshape(n_seq, L, 3)  # sequences in (sample_id, view) order

    def epoch(seed, ep, B=3):
        seen, counts = [], []
        for rank in range(2):
            nb = 0
            for worker in range(2):
                for b in ds.iter_sequences(
                    B, seed=seed, epoch=ep, rank=rank, world_size=2, worker=worker, num_workers=2, shuffle_buffer=6
                ):
                    nb += 1
                    key = b["sample_id"] * views + b["view"]
                    assert np.array_equal(b["topk_ids"], by_key[key])
                    assert np.array_equal(b["topk_logprobs"], lp.reshape(n_seq, L, 3)[key])
                    seen += [(int(x), bool(p)) for x, p in zip(key, b["pad"])]
            counts.append(nb)
        return seen, counts

    seen, counts = epoch(1, 0)
    real = [x for x, pad in seen if not pad]
    assert sorted(real) == list(range(n_seq))  # every sequence exactly once
    assert len(seen) - len(real) <= 3  # at most P - 1 pad sequences
    assert counts[0] == counts[1] == ds.num_sequence_batches(3, world_size=2, num_workers=2)
    assert epoch(1, 0)[0] == seen  # deterministic per (seed, epoch)
    assert epoch(1, 1)[0] != seen and epoch(2, 0)[0] != seen  # and shuffled differently otherwise
    assert real != sorted(real)
    ordered = [int(x) for b in ds.iter_sequences(4, shuffle=False) for x in b["sample_id"] * views + b["view"]]
    assert ordered == list(range(n_seq))


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_catches_a_flipped_byte(tmp_path, backend):
    uri = str(tmp_path / "ds")
    write_topk(uri, backend=backend, V=100_000)
    assert verify(uri).ok
    entry = open_soft_labels(uri).shards[1]
    path = os.path.join(uri, entry["path"])
    if backend == "zarr":  # a chunk of the packed ids
        path = os.path.join(path, "topk_ids", "c", "0", "0")
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
    report = verify(uri)
    assert not report.ok and any("sha256 mismatch" in p and "shard 1" in p for p in report.problems), report.problems
    from storage.shards import forget_verified

    forget_verified()
    with pytest.raises(CorruptShardError, match="sha256 mismatch"):
        list(open_soft_labels(uri).iter_sequences(4, shuffle=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_skips_committed_shards_and_gives_identical_bytes(tmp_path, backend):
    clean, crashed = str(tmp_path / "clean"), str(tmp_path / "crashed")
    write_topk(clean, backend=backend, V=100_000, dtype="bfloat16")
    L, k, seqs = 8, 4, (5, 4, 6)
    n = sum(seqs) * L
    ids, lp, mm = topk_labels(n, 100_000, k, 0)
    sid = np.repeat(np.arange(sum(seqs)), L)
    bounds = np.concatenate([[0], np.cumsum(seqs)]) * L
    args = dict(
        backend=backend,
        representation="token_topk",
        vocab_size=100_000,
        seq_len=L,
        k=k,
        dtype="bfloat16",
        teacher=TEACHER,
        data=DATA,
    )

    def shard(w, i):
        a, b = bounds[i], bounds[i + 1]
        return w.write_shard(i, sid[a:b], ids=ids[a:b], logprobs=lp[a:b], missing_mass=mm[a:b])

    w = SoftLabelWriter(crashed, **args)
    shard(w, 0)
    shard(w, 1)
    del w  # "killed": shards 0-1 committed, no finalize
    with pytest.raises(SoftLabelError, match="partial"):
        open_soft_labels(crashed)
    w = SoftLabelWriter(crashed, **args)  # re-run: resumes
    assert w.committed_shards() == [0, 1] and w.pending(range(3)) == [2]
    for i in w.pending(range(3)):
        shard(w, i)
    w.finalize()
    da, db = open_soft_labels(clean), open_soft_labels(crashed)
    a, b = da.manifest, db.manifest
    assert [(s["path"], s["sha256"]) for s in da.shards] == [(s["path"], s["sha256"]) for s in db.shards]
    assert a["num_tokens"] == b["num_tokens"] == n
    # a different seq_len is another labelling: refused, naming the field
    with pytest.raises(MismatchError, match="seq_len"):
        SoftLabelWriter(crashed, **dict(args, seq_len=4))


def _writer(tmp_path, kind="token_topk", **kw):
    args = dict(backend="parquet", representation=kind, vocab_size=50, seq_len=4, teacher=TEACHER, data=DATA)
    args.update({"k": 3} if kind == "token_topk" else {"draws": 10, "s_max": 5})
    args.update(kw)
    return SoftLabelWriter(str(tmp_path / "ds"), **args)


def test_refuses_a_temperature_other_than_one(tmp_path):
    with pytest.raises(ValueError, match="temperature 1.0.*student applies its own temperature"):
        _writer(tmp_path, temperature=2.0)
    assert _writer(tmp_path, temperature=1.0).manifest["temperature"] == 1.0


@pytest.mark.parametrize(
    "field, change, message",
    [
        (
            "ids",
            lambda d: d["ids"].__setitem__((5, 1), 50),
            r"ids: row 5 \(sample_id 1, view 0, position 1\) has id 50, "
            r"outside \[0, vocab_size=50\)",
        ),
        ("ids", lambda d: d["ids"].__setitem__((0, 0), -1), r"ids: row 0 .* has id -1"),
        ("logprobs", lambda d: d["logprobs"].__setitem__((6, 2), 0.25), r"logprobs: row 6 .* log-prob 0.25 > 0"),
        ("logprobs", lambda d: d["logprobs"].__setitem__((1, 0), np.nan), r"logprobs: row 1 .* NaN"),
        (
            "missing_mass",
            lambda d: d["missing_mass"].__setitem__(3, 1.5),
            r"missing_mass: row 3 .* is 1.5, outside \[0, 1\]",
        ),
        ("missing_mass", lambda d: d["missing_mass"].__setitem__(2, -0.1), r"missing_mass: row 2 .* outside \[0, 1\]"),
        (
            "positions",
            lambda d: d.__setitem__("positions", np.array([0, 1, 2, 3, 0, 2, 1, 3])),
            r"positions must be 0..3, ascending and contiguous per sequence .* row 5 .* has position 2, expected 1",
        ),
        (
            "sample_ids",
            lambda d: d.__setitem__("sample_ids", np.array([0, 0, 0, 0, 1, 1, 2, 1])),
            r"sample_ids/views: the 4 rows of a sequence must share one \(sample_id, view\); row 6",
        ),
        (
            "rows",
            lambda d: d.update({k: d[k][:6] for k in ("ids", "logprobs", "missing_mass", "sample_ids")}),
            r"whole sequences of seq_len=4 tokens; got 6 rows",
        ),
        (
            "shape",
            lambda d: d.__setitem__("logprobs", d["logprobs"][:, :2]),
            r"logprobs must be a float array of shape \(8, 3\)",
        ),
    ],
)
def test_topk_refusals_name_the_field(tmp_path, field, change, message):
    w = _writer(tmp_path)
    ids, lp, mm = topk_labels(8, 50, 3)
    d = {"ids": ids, "logprobs": lp, "missing_mass": mm, "sample_ids": np.repeat([0, 1], 4), "positions": None}
    change(d)
    with pytest.raises(InvalidLogitsError, match=message):
        w.write_shard(0, d.pop("sample_ids"), **d)
    assert w.committed_shards() == []


def test_sampled_refusals_name_the_field(tmp_path):
    w = _writer(tmp_path, kind="token_sampled")
    ids, counts = sampled_labels(8, 50, 10, 5)
    bad = counts.copy()
    bad[3, 0] += 1  # the row sums to 11 > draws = 10
    with pytest.raises(InvalidLogitsError, match=r"counts: row 3 .* sums to 11 > draws=10"):
        w.write_shard(0, [0, 1], ids=ids, counts=bad)
    bad = counts.copy()
    bad[2, 0] = -1
    with pytest.raises(InvalidLogitsError, match=r"counts: row 2 .* negative count"):
        w.write_shard(0, [0, 1], ids=ids, counts=bad)
    with pytest.raises(InvalidLogitsError, match=r"more than s_max=5"):
        w.write_shard(0, [0, 1], ids=np.zeros((8, 6), np.int64), counts=np.ones((8, 6), np.int32))
    with pytest.raises(CoverageError, match=r"sequence \(sample_id 0, view 0\) appears more than once"):
        w.write_shard(0, [0, 0], ids=ids, counts=counts)
    with pytest.raises(InvalidLogitsError, match="not logits"):
        w.write_shard(0, [0, 1], np.zeros((8, 50), np.float32))
    with pytest.raises(ValueError, match="s_max"):
        _writer(tmp_path, kind="token_sampled", s_max=11)  # more stored ids than draws
    with pytest.raises(ValueError, match="needs seq_len"):
        _writer(tmp_path, seq_len=None)
    with pytest.raises(ValueError, match="dtype"):
        _writer(tmp_path, dtype="int8")


def test_token_dataset_refuses_row_take_and_convert_is_bit_exact(tmp_path):
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write_topk(src, V=100_000, views=2, dtype="uint8", tail_dtype="float16")
    with pytest.raises(SoftLabelError, match="take_sequences"):
        open_soft_labels(src).take([0])
    m = convert(src, dst, backend="zarr")
    assert m["num_tokens"] == open_soft_labels(src).manifest["num_tokens"] and verify(dst).ok
    a, b = open_soft_labels(src).take_sequences(np.arange(15)), open_soft_labels(dst).take_sequences(np.arange(15))
    for c in a:
        assert np.array_equal(a[c], b[c]), c


def test_bf16_and_codes_decode_as_documented(tmp_path):
    uri = str(tmp_path / "ds")
    ids, lp, mm, _, _ = write_topk(uri, dtype="bfloat16", seqs=(2,))
    ds = open_soft_labels(uri)
    raw = ds.take_sequences([0, 1], decode=False)
    assert raw["topk_logprobs"].dtype == np.uint16
    assert np.array_equal(raw["topk_logprobs"].reshape(-1, 4), bf16_bits(lp))
    assert np.array_equal(ds.take_sequences([0, 1])["topk_logprobs"].reshape(-1, 4), from_bf16_bits(bf16_bits(lp)))


def test_docs_describe_the_token_layout(tmp_path):
    write_topk(str(tmp_path / "ds"))
    ids, counts = sampled_labels(8, 50, 10, 5)
    w = _writer(tmp_path / "sampled", kind="token_sampled")
    w.write_shard(0, [0, 1], ids=ids, counts=counts)
    doc = (Path(__file__).resolve().parent.parent / "docs" / "format.md").read_text()
    for m in (open_soft_labels(str(tmp_path / "ds")).manifest, w.finalize()):
        for field in list(m) + list(m["representation"]) + list(m["columns"]):
            assert f"`{field}`" in doc, f"docs/format.md does not document {field!r}"
    assert "token_topk" in doc and "token_sampled" in doc and "iter_sequences" in doc


@pytest.mark.s3
def test_s3_token_round_trip(s3_server, s3_uri):
    so = s3_server["storage_options"]
    ids, _, _, _, _ = write_topk(s3_uri, backend="zarr", V=100_000, storage_options=so)
    ds = open_soft_labels(s3_uri, storage_options=so, verify=True)
    got = np.concatenate([b["topk_ids"] for b in ds.iter_sequences(4, shuffle=False)])
    assert np.array_equal(got.reshape(-1, 4), ids)
    assert ds.manifest["num_tokens"] == len(ids)


@pytest.mark.parametrize("kind", ["token_topk", "token_sampled"])
def test_distill_inspect_shows_bytes_per_token_and_the_missing_mass(tmp_path, capsys, kind):
    """`distill inspect` on a language-model dataset: tokens, sequence length, bytes per token
    on disk, and the distribution of the missing mass (top-k) or of unique ids (sampled)."""
    import json

    from flows.cli import main

    uri = str(tmp_path / "ds")
    if kind == "token_topk":
        _, _, mm, _, _ = write_topk(uri, L=8, k=4, seqs=(5, 4, 6))
    else:
        n, L = 6 * 8, 8
        ids, counts = sampled_labels(n, 50, 20, 6)
        with SoftLabelWriter(
            uri,
            backend="parquet",
            representation="token_sampled",
            vocab_size=50,
            seq_len=L,
            draws=20,
            s_max=6,
            teacher=TEACHER,
            data=DATA,
        ) as w:
            w.write_shard(0, np.repeat(np.arange(6), L), ids=ids, counts=counts)
    assert main(["inspect", uri]) == 0
    out = capsys.readouterr().out
    m = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    per_token = sum(s["bytes"] for s in open_soft_labels(uri).shards) / m["num_tokens"]
    assert f"tokens: {m['num_tokens']:,} ({m['num_tokens'] // 8:,} sequences of 8, vocabulary 50, 16-bit ids)" in out
    assert f"{per_token:.1f} bytes/token on disk" in out
    if kind == "token_topk":
        assert f"missing mass over 120 positions: mean {float(np.mean(mm.astype(np.float64))):.3g}" in out
    else:
        assert f"unique ids per position over 48 positions: mean {float((counts > 0).sum(1).mean()):.3g}" in out
    assert main(["inspect", uri, "--json"]) == 0
    tok = json.loads(capsys.readouterr().out)["tokens"]
    assert tok["num_tokens"] == m["num_tokens"] and tok["positions"] == m["num_tokens"]
