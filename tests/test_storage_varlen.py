"""Token labels of VARIABLE length: every (sample_id, view) sequence has 1 <= n <= seq_len
rows (positions 0..n-1); shard entries record num_sequences; the reader pads to seq_len
and says each sequence's length. Real Parquet and Zarr files, both token kinds."""

import json
import os
import shutil
from pathlib import Path

import forge
import numpy as np
import pytest
from conftest import DATA, TEACHER
from test_storage_tokens import sampled_labels, topk_labels

import storage.layout as layout
from storage import (
    CorruptShardError,
    CoverageError,
    InvalidLogitsError,
    ManifestError,
    SoftLabelWriter,
    convert,
    open_soft_labels,
    verify,
)
from storage.shards import commit_path, forget_verified
from storage.tokens import shard_problems

BACKENDS = ["parquet", "zarr"]
KINDS = ["token_topk", "token_sampled"]
V, K, DRAWS, S_MAX = 60, 3, 12, 4
LABELS = {"token_topk": ("topk_ids", "topk_logprobs", "missing_mass"), "token_sampled": ("sample_ids", "sample_counts")}


def make_sequences(shard_lengths, L, views=1, seed=0, kind="token_topk"):
    """[(sample_id, view, {label: (n, ...)}), ...] per shard; sample ids count up."""
    rng = np.random.default_rng(seed)
    shards, sid = [], 0
    for lengths in shard_lengths:
        seqs = []
        for i, n in enumerate(lengths):
            s, v = sid + i // views, i % views
            if kind == "token_topk":
                ids, lp, mm = topk_labels(n, V, K, int(rng.integers(1 << 30)))
                seqs.append((s, v, {"topk_ids": ids, "topk_logprobs": lp, "missing_mass": mm}))
            else:
                ids, counts = sampled_labels(n, V, DRAWS, S_MAX, int(rng.integers(1 << 30)))
                pad = S_MAX - ids.shape[1]
                seqs.append(
                    (
                        s,
                        v,
                        {
                            "sample_ids": np.pad(ids, ((0, 0), (0, pad))),
                            "sample_counts": np.pad(counts, ((0, 0), (0, pad))),
                        },
                    )
                )
        assert len(lengths) % views == 0
        sid += len(lengths) // views
        shards.append(seqs)
    return shards


def flat(seqs):
    """The flat per-token arrays write_shard takes: sid (its sample_ids), views, positions, labels."""
    n = [len(next(iter(d.values()))) for _, _, d in seqs]
    out = {
        "sid": np.repeat([s for s, _, _ in seqs], n),
        "views": np.repeat([v for _, v, _ in seqs], n),
        "positions": np.concatenate([np.arange(k) for k in n]),
    }
    for c in seqs[0][2]:
        out[c] = np.concatenate([d[c] for _, _, d in seqs])
    return out


def write_args(kind):
    return (
        {"ids": "topk_ids", "logprobs": "topk_logprobs", "missing_mass": "missing_mass"}
        if kind == "token_topk"
        else {"ids": "sample_ids", "counts": "sample_counts"}
    )


def open_writer(uri, kind, L, views=1, backend="parquet", **kw):
    extra = dict(k=K, dtype="float32", tail_dtype="float32") if kind == "token_topk" else dict(draws=DRAWS, s_max=S_MAX)
    return SoftLabelWriter(
        uri,
        backend=backend,
        representation=kind,
        vocab_size=V,
        seq_len=L,
        num_views=views,
        teacher=TEACHER,
        data=DATA,
        **extra,
        **kw,
    )


def write_dataset(uri, kind, shard_lengths, L, views=1, backend="parquet", seed=0, per_sequence_ids=False):
    shards = make_sequences(shard_lengths, L, views, seed, kind)
    with open_writer(uri, kind, L, views, backend) as w:
        for i, seqs in enumerate(shards):
            f = flat(seqs)
            sample_ids = [s for s, _, _ in seqs] if per_sequence_ids else f["sid"]
            w.write_shard(
                i,
                sample_ids,
                views=f["views"] if views > 1 else None,
                positions=f["positions"],
                **{a: f[c] for a, c in write_args(kind).items()},
            )
    return {(s, v): d for seqs in shards for s, v, d in seqs}


def check_sequence(truth, b, j, L):
    """Batch row j holds sequence (sample_id, view) exactly, zero-padded to L."""
    d = truth[(int(b["sample_id"][j]), int(b["view"][j]))]
    n = len(next(iter(d.values())))
    assert b["length"][j] == n and b["length"].dtype == np.int32
    for c, want in d.items():
        got = b[c][j]
        assert got.shape[0] == L
        assert np.array_equal(got[:n], want), c
        assert not got[n:].any(), f"{c}: padding is not zero"


SHARDS = [(1, 8, 3, 8, 5, 2), (8, 8, 8), (4, 1, 7, 6)]  # lengths 1 and seq_len, a full shard


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_of_mixed_lengths(tmp_path, backend, kind):
    uri, L = str(tmp_path / "ds"), 8
    truth = write_dataset(uri, kind, SHARDS, L, views=1, backend=backend, per_sequence_ids=kind == "token_sampled")
    ds = open_soft_labels(uri)
    m = ds.manifest
    assert [s["num_sequences"] for s in ds.shards] == [6, 3, 4]
    assert ds.num_sequences == 13 == m["num_samples"] and m["num_rows"] == m["num_tokens"] == sum(map(sum, SHARDS))
    ordered = list(ds.iter_sequences(5, shuffle=False))
    assert [len(b["sample_id"]) for b in ordered] == [5, 5, 3]
    assert np.concatenate([b["sample_id"] for b in ordered]).tolist() == list(range(13))
    for b in ordered:
        assert set(b) == {"sample_id", "view", "pad", "length", *LABELS[kind]} and not b["pad"].any()
        for j in range(len(b["sample_id"])):
            check_sequence(truth, b, j, L)
    assert ordered[0]["topk_ids" if kind == "token_topk" else "sample_ids"].dtype == np.int64
    got = 0
    for b in ds.iter_sequences(4, shuffle=True, seed=3, shuffle_buffer=5):
        for j in range(len(b["sample_id"])):
            check_sequence(truth, b, j, L)
        got += len(b["sample_id"])
    assert got == 13
    order = [9, 0, 4, 12, 7]
    t = ds.take_sequences(order)
    assert t["sample_id"].tolist() == order and "pad" not in t
    for j in range(len(order)):
        check_sequence(truth, t, j, L)
    raw = ds.take_sequences([0], decode=False)  # stored dtypes, padding zeros there too
    assert raw["length"].tolist() == [1] and not any(raw[c][0, 1:].any() for c in LABELS[kind])
    rows = np.concatenate([b["position"] for b in ds.iter_batches(7, shuffle=False)])
    assert rows.tolist() == [p for lens in SHARDS for n in lens for p in range(n)]
    assert verify(uri).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_blocks_that_cut_sequences_every_sequence_once_per_epoch(tmp_path, backend, monkeypatch):
    monkeypatch.setattr(layout, "MIN_BLOCK_ROWS", 5)  # tiny blocks: sequences span two of them
    monkeypatch.setattr(layout, "TARGET_BLOCK_BYTES", 5 * 40)
    uri, L, views = str(tmp_path / "ds"), 6, 2
    rng = np.random.default_rng(1)
    lengths = [list(rng.integers(1, L + 1, 2 * n)) for n in (7, 5, 9, 4)]
    lengths[1][0], lengths[2][3] = 1, L
    truth = write_dataset(uri, "token_topk", lengths, L, views=views, backend=backend)
    ds = open_soft_labels(uri)
    n_seq = sum(map(len, lengths))
    assert ds.num_sequences == n_seq
    cut = 0
    for p, e in enumerate(ds.shards):
        sh = ds._open(p, ds._shard_cache())
        starts, lens = ds._layout(p, sh)
        block_starts = [b0 for b0, _ in sh.blocks()]
        assert len(block_starts) > 1 and e["rows_per_block"] < e["num_rows"]
        cut += sum(any(s < b0 < s + n for b0 in block_starts) for s, n in zip(starts, lens))
    assert cut >= 4, "no sequence spans two blocks: the test does not test that"

    def epoch(seed, ep, B=3):
        seen, batches = [], []
        for rank in range(2):
            nb = 0
            for worker in range(2):
                for b in ds.iter_sequences(
                    B, seed=seed, epoch=ep, rank=rank, world_size=2, worker=worker, num_workers=2, shuffle_buffer=4
                ):
                    nb += 1
                    for j in range(len(b["sample_id"])):
                        check_sequence(truth, b, j, L)
                    seen += [((int(s), int(v)), bool(p)) for s, v, p in zip(b["sample_id"], b["view"], b["pad"])]
            batches.append(nb)
        return seen, batches

    seen, batches = epoch(1, 0)
    real = [k for k, pad in seen if not pad]
    assert sorted(real) == sorted(truth) and len(real) == len(set(real))  # every sequence exactly once
    assert len(seen) - len(real) <= 3
    assert batches[0] == batches[1] == ds.num_sequence_batches(3, world_size=2, num_workers=2)
    assert epoch(1, 0)[0] == seen and epoch(2, 1)[0] != seen
    ordered = [(int(s), int(v)) for b in ds.iter_sequences(4, shuffle=False) for s, v in zip(b["sample_id"], b["view"])]
    assert ordered == sorted(truth)
    keys = list(truth)
    pick = rng.permutation(len(keys))
    t = ds.take_sequences([keys[i][0] for i in pick], [keys[i][1] for i in pick])
    for j in range(len(pick)):
        check_sequence(truth, t, j, L)
    assert verify(uri).ok


def test_fixed_length_written_with_positions_is_the_old_layout(tmp_path):
    """Fixed-length data, flat with positions or in the old (B, L, w) convention: the same
    bytes, blocks cut at sequences, and batches exactly as before plus length == seq_len."""
    L = 4
    shards = make_sequences([(L,) * 6, (L,) * 3], L)
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    with open_writer(a, "token_topk", L) as w:
        for i, seqs in enumerate(shards):
            f = flat(seqs)
            w.write_shard(
                i,
                f["sid"],
                positions=f["positions"],
                ids=f["topk_ids"],
                logprobs=f["topk_logprobs"],
                missing_mass=f["missing_mass"],
            )
    with open_writer(b, "token_topk", L) as w:
        for i, seqs in enumerate(shards):
            f = flat(seqs)
            w.write_shard(
                i,
                [s for s, _, _ in seqs],
                ids=f["topk_ids"].reshape(-1, L, K),
                logprobs=f["topk_logprobs"].reshape(-1, L, K),
                missing_mass=f["missing_mass"],
            )
    ma, mb = open_soft_labels(a).shards, open_soft_labels(b).shards
    assert [s["sha256"] for s in ma] == [s["sha256"] for s in mb]
    assert [s["num_sequences"] for s in ma] == [6, 3]
    batch = next(open_soft_labels(a).iter_sequences(9, shuffle=False))
    assert batch["length"].tolist() == [L] * 9 and batch["topk_ids"].shape == (9, L, K)


def _strip_num_sequences(uri):
    """What the writer before num_sequences wrote: no num_sequences in entries or commits.
    That writer wrote format 2 (shard entries inline in the manifest; commit records with a
    lineage but no format_version or plan), which is still read; format 3 always records
    num_sequences."""
    m, entries = forge.load(uri)
    for e in entries:
        del e["num_sequences"]
    m = {k: v for k, v in m.items() if k not in ("index", "planned_samples")}
    m["format_version"] = 2
    forge.save(uri, m, entries)
    shutil.rmtree(Path(uri) / "_index")
    for e in entries:
        cp = Path(uri) / commit_path(e["index"])
        rec = json.loads(cp.read_text())
        for k in ("num_sequences", "format_version", "plan"):
            del rec[k]
        cp.write_text(json.dumps(rec, indent=1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_old_fixed_length_dataset_reads_identically(tmp_path, backend):
    L = 5
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    write_dataset(new, "token_sampled", [(L,) * 4, (L,) * 6], L, views=2, backend=backend)
    write_dataset(old, "token_sampled", [(L,) * 4, (L,) * 6], L, views=2, backend=backend)
    _strip_num_sequences(old)
    a, b = open_soft_labels(new), open_soft_labels(old)
    assert "num_sequences" not in b.shards[0] and b.num_sequences == a.num_sequences == 10
    for x, y in zip(a.iter_sequences(3, seed=4, shuffle_buffer=4), b.iter_sequences(3, seed=4, shuffle_buffer=4)):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    x, y = a.take_sequences([3, 0, 4]), b.take_sequences([3, 0, 4])
    assert all(np.array_equal(x[k], y[k]) for k in x) and (y["length"] == L).all()
    assert verify(old).ok
    assert b.manifest["format_version"] == 2 and "index" not in b.manifest
    # an entry without num_sequences holds sequences of exactly seq_len: the old rule
    m, entries = forge.load(old)
    entries[0]["num_rows"] += 1
    m["num_rows"] += 1
    m["num_tokens"] += 1
    forge.save(old, m, entries)  # still format 2: entries inline, digest recomputed
    with pytest.raises(ManifestError, match=r"shards\[0\].num_rows.*multiple of seq_len=5.*no num_sequences"):
        open_soft_labels(old)


def _writer(tmp_path, kind="token_topk", L=4):
    return open_writer(str(tmp_path / "ds"), kind, L)


def _topk(n, seed=0):
    ids, lp, mm = topk_labels(n, V, K, seed)
    return {"ids": ids, "logprobs": lp, "missing_mass": mm}


@pytest.mark.parametrize(
    "sample_ids, positions, error, message",
    [
        (
            [0, 0, 0, 0, 0, 1, 1],
            [0, 1, 2, 3, 4, 0, 1],
            InvalidLogitsError,
            r"positions: the sequence starting at row 0 \(sample_id 0, view 0\) has 5 tokens, more than seq_len=4; "
            r"row 4 \(sample_id 0, view 0, position 4\) is past its end",
        ),
        (
            [0, 0, 0, 1, 1, 1, 1],
            [0, 1, 3, 0, 1, 2, 3],
            InvalidLogitsError,
            r"positions must be .*contiguous per sequence.*row 2 \(sample_id 0, view 0, position 3\) has position 3, "
            r"expected 2",
        ),
        (
            [0, 0, 0, 1, 1, 1, 1],
            [1, 2, 3, 0, 1, 2, 3],
            InvalidLogitsError,
            r"positions must be .*starts at position 0\): row 0 \(sample_id 0, view 0, position 1\) has position 1, "
            r"expected 0",
        ),
        (
            [0, 0, 2, 1, 1, 1, 1],
            [0, 1, 2, 0, 1, 2, 3],
            InvalidLogitsError,
            r"sample_ids/views: the 3 rows of a sequence must share one \(sample_id, view\); "
            r"row 2 \(sample_id 2, view 0, position 2\) differs from its sequence's first row \(sample_id 0, view 0\)",
        ),
        (
            [0, 0, 0, 1, 1, 0, 0],
            [0, 1, 2, 0, 1, 0, 1],
            CoverageError,
            r"sequence \(sample_id 0, view 0\) appears more than once in the shard",
        ),
        (
            [0, 1, 2],
            [0, 1, 3, 0, 1, 2, 3],
            InvalidLogitsError,  # ids that fit no count: positions first
            r"positions must be .*row 2 \(position 3\) has position 3, expected 2",
        ),
        (
            [0, 1, 2],
            [0, 1, 2, 0, 1, 2, 3],
            InvalidLogitsError,
            r"sample_ids must be an integer array of 7 \(per token\) or 2 \(per sequence\) entries",
        ),
        ([0] * 7, [0, 1, 2], InvalidLogitsError, r"positions must be an integer array of 7 entries"),
    ],
)
def test_refusals_name_the_field_row_and_sequence(tmp_path, sample_ids, positions, error, message):
    w = _writer(tmp_path)
    with pytest.raises(error, match=message):
        w.write_shard(0, np.array(sample_ids), positions=np.array(positions), **_topk(7))
    assert w.committed_shards() == []


def test_sampled_variable_length_refusals(tmp_path):
    w = _writer(tmp_path, "token_sampled", L=3)
    ids, counts = sampled_labels(5, V, DRAWS, S_MAX)
    bad = counts.copy()
    bad[4, 0] += DRAWS
    with pytest.raises(InvalidLogitsError, match=r"counts: row 4 \(sample_id 1, view 0, position 1\) sums to"):
        w.write_shard(0, [0, 1], positions=[0, 1, 2, 0, 1], ids=ids, counts=bad)
    with pytest.raises(InvalidLogitsError, match=r"more than seq_len=3"):
        w.write_shard(0, [0], positions=[0, 1, 2, 3, 4], ids=ids, counts=counts)
    with pytest.raises(InvalidLogitsError, match=r"whole sequences of seq_len=3 tokens; got 5 rows.*positions="):
        w.write_shard(0, np.zeros(5, np.int64), ids=ids, counts=counts)
    w.write_shard(0, [0, 1], positions=[0, 1, 2, 0, 1], ids=ids, counts=counts)
    w.write_shard(1, [1], positions=[0, 1], ids=ids[:2], counts=counts[:2])  # sequence 1 again, another shard
    with pytest.raises(CoverageError, match=r"\(sample_id 1, view 0\) appears more than once \(shards 0 and 1\)"):
        w.finalize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_manifest_tampering_of_num_sequences_is_caught(tmp_path, backend):
    uri, L = str(tmp_path / "ds"), 4
    write_dataset(uri, "token_topk", [(1, 4, 2, 3), (2, 2, 4)], L, backend=backend)
    good, good_entries = forge.load(uri)
    assert [e["num_sequences"] for e in good_entries] == [4, 3]

    def save(m, entries):  # format 3: new index files, the manifest digest recomputed
        forge.save(uri, m, entries)

    def tampered(**per_shard):
        m, entries = json.loads(json.dumps(good)), json.loads(json.dumps(good_entries))
        for i, ns in per_shard.items():
            entries[int(i[1:])]["num_sequences"] = ns
        return m, entries

    save(*tampered(s0=3, s1=4))  # the index rewritten, the OLD digest kept: it no longer matches
    mp = Path(uri) / "manifest.json"
    mp.write_text(json.dumps(dict(json.loads(mp.read_text()), digest=good["digest"])))
    with pytest.raises(ManifestError, match="modified after distillery wrote it"):
        open_soft_labels(uri)
    save(*tampered(s0=5))  # digest recomputed: the totals give it away (the units file sums to 8, not 7)
    with pytest.raises(
        ManifestError,
        match=r"index file _index/units-[0-9a-f]{16}\.parquet disagrees with the manifest "
        r"\(2 shards summing to 8; the manifest says 2 shards and 7 sequences\)",
    ):
        open_soft_labels(uri)
    m, entries = tampered(s0=1)  # totals fixed up too: 10 rows cannot be 1 sequence of <= 4 tokens
    m["num_samples"] -= 3
    save(m, entries)
    with pytest.raises(
        ManifestError,
        match=r"index part _index/part-00000-[0-9a-f]{16}\.parquet: shard 0: num_sequences 1 and num_rows 10 "
        r"are not sequences of 1\.\.seq_len=4 tokens",
    ):
        open_soft_labels(uri)
    save(*tampered(s0=3, s1=4))  # totals kept: the commit records disagree
    with pytest.raises(
        ManifestError,
        match=r"shard 0 .*manifest says num_sequences 3 / num_rows 10, its commit "
        r"record 4 / 10",
    ):
        open_soft_labels(uri)
    report = verify(uri)
    assert not report.ok and any("num_sequences 3" in p for p in report.problems), report.problems
    for i, ns in ((0, 3), (1, 4)):  # records forged too: the shards themselves say no
        cp = Path(uri) / commit_path(i)
        rec = json.loads(cp.read_text())
        rec["num_sequences"] = ns
        cp.write_text(json.dumps(rec))
    ds = open_soft_labels(uri)
    with pytest.raises(ManifestError, match=r"holds 4 sequences, its manifest entry says num_sequences 3"):
        list(ds.iter_sequences(2, shuffle=False))
    report = verify(uri)
    assert any("shard 0" in p and "4 sequences, the manifest says num_sequences 3" in p for p in report.problems)
    assert any("shard 1" in p and "3 sequences, the manifest says num_sequences 4" in p for p in report.problems)
    save(good, good_entries)
    for i, ns in ((0, 4), (1, 3)):
        cp = Path(uri) / commit_path(i)
        rec = json.loads(cp.read_text())
        rec["num_sequences"] = ns
        cp.write_text(json.dumps(rec))
    assert verify(uri).ok


@pytest.mark.parametrize("backend", BACKENDS)
def test_verify_catches_a_flipped_byte_in_a_variable_length_shard(tmp_path, backend):
    uri = str(tmp_path / "ds")
    write_dataset(uri, "token_sampled", [(3, 1, 5), (5, 2)], 5, backend=backend)
    assert verify(uri).ok
    entry = open_soft_labels(uri).shards[0]
    path = os.path.join(uri, entry["path"])
    if backend == "zarr":
        path = os.path.join(path, "sample_counts", "c", "0", "0")
    data = bytearray(Path(path).read_bytes())
    data[len(data) // 2] ^= 0x01
    Path(path).write_bytes(bytes(data))
    report = verify(uri)
    assert not report.ok and any("sha256 mismatch" in p and "shard 0" in p for p in report.problems), report.problems
    forget_verified()
    with pytest.raises(CorruptShardError, match="sha256 mismatch"):
        open_soft_labels(uri).take_sequences([0])


def test_verify_rules_per_shard():
    """What verify() reports about the rows of a shard that break the variable-length rules."""
    m = {
        "seq_len": 3,
        "vocab_size": V,
        "representation": {
            "kind": "token_sampled",
            "k": None,
            "draws": DRAWS,
            "s_max": S_MAX,
            "count_dtype": "uint8",
            "id_bits": 16,
            "id_storage": "uint16",
        },
    }

    def cols(sids, pos, views=None):
        n = len(pos)
        return {
            "sample_id": np.array(sids, np.int64),
            "view": np.zeros(n, np.int32) if views is None else np.array(views, np.int32),
            "position": np.array(pos, np.int32),
            "sample_ids": np.zeros((n, S_MAX), np.uint16),
            "sample_counts": np.zeros((n, S_MAX), np.uint8),
        }

    assert shard_problems(m, cols([0, 0, 1], [0, 1, 0]), {"num_sequences": 2}) == []
    assert shard_problems(m, cols([0] * 4, [0, 1, 2, 3]), {"num_sequences": 1}) == [
        "a sequence longer than seq_len=3 (row 3 has position 3)"
    ]
    assert shard_problems(m, cols([0, 0, 1], [0, 2, 0]), {"num_sequences": 2}) == [
        "positions are not 0..n-1 contiguous per sequence (row 1 has position 2, expected 1)"
    ]
    assert shard_problems(m, cols([0, 1, 1], [0, 1, 0]), {"num_sequences": 2}) == [
        "the rows of a sequence do not share one (sample_id, view) (row 1)"
    ]
    assert shard_problems(m, cols([0, 0, 1], [0, 1, 0], [0, 1, 0]), {"num_sequences": 2}) == [
        "the rows of a sequence do not share one (sample_id, view) (row 1)"
    ]
    assert shard_problems(m, cols([0, 0, 1], [0, 1, 0]), {"num_sequences": 3}) == [
        "2 sequences, the manifest says num_sequences 3"
    ]
    assert "no num_sequences" in shard_problems(m, cols([0, 0, 1], [0, 1, 0]), {})[0]
    assert shard_problems(m, cols([0, 0, 0], [0, 1, 2]), {}) == []


@pytest.mark.parametrize("kind", KINDS)
def test_convert_round_trip_is_bit_exact(tmp_path, kind, monkeypatch):
    monkeypatch.setattr(layout, "MIN_BLOCK_ROWS", 4)
    monkeypatch.setattr(layout, "TARGET_BLOCK_BYTES", 4 * 30)
    src, mid, back = (str(tmp_path / n) for n in ("src", "mid", "back"))
    truth = write_dataset(src, kind, [(1, 6, 2, 6, 3, 5), (6, 6), (2, 4, 1, 3)], 6, views=2)
    m = convert(src, mid, backend="zarr")
    assert m["backend"] == "zarr" and "shards" not in m
    assert [s["num_sequences"] for s in open_soft_labels(mid).shards] == [6, 2, 4] and verify(mid).ok
    convert(mid, back, backend="parquet")
    a, b = open_soft_labels(src), open_soft_labels(back)
    assert [s["sha256"] for s in a.shards] == [s["sha256"] for s in b.shards]
    z = open_soft_labels(mid)
    keys = sorted(truth)
    x, y = (
        a.take_sequences([k[0] for k in keys], [k[1] for k in keys]),
        z.take_sequences([k[0] for k in keys], [k[1] for k in keys]),
    )
    assert all(np.array_equal(x[c], y[c]) for c in x)
    for j in range(len(keys)):
        check_sequence(truth, y, j, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_s3_round_trip_of_variable_length_sequences(s3_server, s3_uri, backend):
    """The same guarantees on an S3 API server (moto on 127.0.0.1): every sequence back with
    its exact rows and length, verify OK, and a flipped byte in a shard refused by name."""
    so = s3_server["storage_options"]
    L = 8
    shards = make_sequences(SHARDS, L, kind="token_topk")
    with open_writer(s3_uri, "token_topk", L, backend=backend, storage_options=so) as w:
        for i, seqs in enumerate(shards):
            f = flat(seqs)
            w.write_shard(
                i, f["sid"], positions=f["positions"], **{a: f[c] for a, c in write_args("token_topk").items()}
            )
    truth = {(s, v): d for seqs in shards for s, v, d in seqs}
    ds = open_soft_labels(s3_uri, storage_options=so)
    seen = 0
    for b in ds.iter_sequences(4, shuffle=True, seed=1):
        for j in range(len(b["sample_id"])):
            check_sequence(truth, b, j, L)
        seen += len(b["sample_id"])
    assert seen == ds.num_sequences == 13 and verify(s3_uri, storage_options=so).ok
    import fsspec

    fs = fsspec.filesystem("s3", **so)
    entry = ds.shards[1]
    target = f"{s3_uri}/{entry['path']}"
    files = [target] if fs.isfile(target) else [p for p in fs.find(target) if "/c/" in p or p.endswith("/c")]
    data = bytearray(fs.cat_file(files[-1]))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(files[-1], bytes(data))
    report = verify(s3_uri, storage_options=so)
    assert not report.ok and any(entry["path"] in p for p in report.problems)
