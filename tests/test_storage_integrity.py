"""Nothing read from disk reaches training unchecked: damaged, replaced or foreign shards,
hostile paths, malformed or edited manifests and commit records are refused by name
(issue #8 part 2, issue #12's store items)."""

import json
import os
import shutil

import forge
import numpy as np
import pytest
from conftest import DATA, TEACHER, toy_logits, write_toy

from storage import (
    CorruptShardError,
    ManifestError,
    MismatchError,
    SoftLabelError,
    SoftLabelWriter,
    open_soft_labels,
    verify,
)
from storage.manifest import manifest_digest


def _manifest(uri):
    with open(os.path.join(uri, "manifest.json")) as f:
        return json.load(f)


def _write_manifest(uri, m, *, redigest=True):
    """Write an edited manifest; redigest=True re-signs it (a careful attacker or a bug),
    so that the check under test is not the digest."""
    if redigest:
        m["digest"] = manifest_digest(m)
    with open(os.path.join(uri, "manifest.json"), "w") as f:
        json.dump(m, f)


def _stream_all(uri):
    ds = open_soft_labels(uri)
    return sum(len(b["sample_id"]) for b in ds.iter_batches(64, shuffle=False))


def _data_file(uri, pos):
    rel = forge.load(uri)[1][pos]["path"]
    path = os.path.join(uri, rel)
    if os.path.isdir(path):  # zarr: the logits chunk
        path = max(
            (os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "logits")) for f in fs if f != "zarr.json"),
            key=os.path.getsize,
        )
    return rel, path


# ---------------------------------------------------------------- shard bytes


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_flipped_byte_in_data_pages_never_reaches_the_reader(tmp_path, backend):
    uri = str(tmp_path / "ds")
    write_toy(uri, backend=backend, n=300, shards=3)
    assert _stream_all(uri) == 300
    rel, path = _data_file(uri, 1)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x10  # inside the logits values: the file still decodes
    open(path, "wb").write(bytes(data))
    with pytest.raises(CorruptShardError, match=rel.split("/")[-1]):
        _stream_all(uri)
    ds = open_soft_labels(uri)
    with pytest.raises(CorruptShardError, match="does not hold the bytes that were committed"):
        ds.take(np.arange(300))
    assert not verify(uri).ok


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_shard_replaced_by_another_shards_bytes_or_rewritten(tmp_path, backend):
    uri = str(tmp_path / "ds")
    write_toy(uri, backend=backend, n=300, shards=3)
    _, entries = forge.load(uri)
    a, b = (os.path.join(uri, entries[i]["path"]) for i in (0, 1))
    if backend == "parquet":
        shutil.copyfile(b, a)
    else:
        shutil.rmtree(a)
        shutil.copytree(b, a)
    with pytest.raises(CorruptShardError, match=os.path.basename(entries[0]["path"])):
        _stream_all(uri)
    # a valid shard with other values, written by distillery itself under the old name
    other = str(tmp_path / "other")
    write_toy(other, backend=backend, n=300, shards=3, seed=5)
    src = os.path.join(other, forge.load(other)[1][0]["path"])
    if backend == "parquet":
        shutil.copyfile(src, a)
    else:
        shutil.rmtree(a)
        shutil.copytree(src, a)
    with pytest.raises(CorruptShardError):
        _stream_all(uri)


def test_each_shard_is_hashed_once_per_process_and_again_after_a_change(tmp_path, monkeypatch):
    import storage.shards as shards

    uri = str(tmp_path / "ds")
    write_toy(uri, n=200, shards=2)
    shards.forget_verified()
    calls = []
    real = shards._hash_local_file
    monkeypatch.setattr(shards, "_hash_local_file", lambda p: calls.append(p) or real(p))
    _stream_all(uri)
    _stream_all(uri)
    open_soft_labels(uri).take([0, 150])
    assert len(calls) == 2  # two shards, hashed once each
    rel, path = _data_file(uri, 0)
    os.utime(path, ns=(1, 1))  # same bytes, new mtime: hashed again, still fine
    assert _stream_all(uri) == 200 and len(calls) == 3


def test_zarr_missing_chunk_is_corruption_not_zeros(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, backend="zarr", n=3000, shards=1, c=10)  # several chunks per array
    ds = open_soft_labels(uri)
    # every chunk exists on disk, even those equal to the fill value (views are all 0)
    shard = os.path.join(uri, ds.shards[0]["path"])
    assert os.listdir(os.path.join(shard, "view", "c"))
    assert sum(len(b["sample_id"]) for b in ds.iter_batches(500, shuffle=False)) == 3000  # opened + hashed
    victim = os.path.join(shard, "logits", "c", "0", "0")
    os.remove(victim)
    with pytest.raises(CorruptShardError, match="chunk logits/c/0/0 is missing"):
        for _ in ds.iter_batches(500, shuffle=False):
            pass
    with pytest.raises(CorruptShardError):  # a new process (cache forgotten) refuses at open
        import storage.shards as shards

        shards.forget_verified()
        _stream_all(uri)


# ---------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "path",
    [
        "../../outside/x.parquet",
        "/etc/passwd",
        "data/../../x/shard-00000-0000000000000000.parquet",
        "s3://elsewhere/shard-00000-0000000000000000.parquet",
        "data\\shard-00000.parquet",
    ],
)
@pytest.mark.parametrize("which", ["units", "parts"])
def test_manifest_shard_paths_must_stay_inside_the_dataset(tmp_path, path, which):
    """Format 3 stores no shard path (it is derived from the shard's index and checksum), so
    an edited entry cannot point outside the dataset; the files the manifest does name,
    the index files, must stay inside it."""
    uri = str(tmp_path / "ds")
    write_toy(uri, n=100, shards=2)
    m, entries = forge.load(uri)
    good = entries[0]["path"]
    entries[0]["path"] = path
    forge.save(uri, m, entries)  # what a forger writes: the path is not stored
    assert forge.load(uri)[1][0]["path"] == good and _stream_all(uri) == 100
    m, _ = forge.load(uri)
    ref = m["index"]["units"] if which == "units" else m["index"]["parts"][0]
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(os.path.join(uri, ref["path"]), outside / "x.parquet")  # same bytes, same sha256
    ref["path"] = path
    forge.save(uri, m)
    field = r"index\.units" if which == "units" else r"index\.parts\[0\]"
    kind = "units" if which == "units" else "part"
    with pytest.raises(ManifestError, match=rf"'{field}' must be \{{path: _index/{kind}-"):
        open_soft_labels(uri)
    report = verify(uri)
    assert not report.ok, report.problems
    assert f"'index.{which}" in report.problems[0] and "_index/" in report.problems[0], report.problems


def test_commit_record_with_a_hostile_path_is_refused_and_nothing_is_deleted(tmp_path):
    uri, victim = str(tmp_path / "ds"), tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.parquet").write_bytes(b"keep me")
    z = toy_logits(100, 10)
    w = SoftLabelWriter(
        uri, backend="parquet", num_classes=10, temperature=2.0, teacher=TEACHER, data=DATA, num_shards=2
    )
    w.write_shard(0, np.arange(50), z[:50])
    rec_path = os.path.join(uri, "_commits", "shard-00000.json")
    rec = json.load(open(rec_path))
    own = os.path.join(uri, rec["path"])
    rec["path"] = "../victim/precious.parquet"
    json.dump(rec, open(rec_path, "w"))
    w2 = SoftLabelWriter(
        uri, backend="parquet", num_classes=10, temperature=2.0, teacher=TEACHER, data=DATA, num_shards=2
    )
    with pytest.raises(ManifestError, match=r"_commits/shard-00000.json.*not allowed"):
        w2.committed_shards()
    # rewriting shard 0 reads its record: refused before anything is published or removed
    with pytest.raises(ManifestError, match=r"_commits/shard-00000.json.*not allowed"):
        w2.write_shard(0, np.arange(50), z[:50])
    # a writer publishing shard 1 reads only shard 1's record (format 3: one read per
    # shard), so it goes on; finalize lists every record and refuses the hostile one
    w2.write_shard(1, np.arange(50, 100), z[50:])
    with pytest.raises(ManifestError, match=r"_commits/shard-00000.json.*not allowed"):
        w2.finalize()
    assert (victim / "precious.parquet").read_bytes() == b"keep me" and os.path.exists(own)


# ---------------------------------------------------------------- manifest structure


@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda m: m.update(shards="shard-00000.parquet"), "shards"),
        (lambda m: m.update(representation="dense"), "representation"),
        (lambda m: m.pop("index"), "index"),  # format 3: the shard table is in `index`
        (lambda m: m.update(num_classes="ten"), "num_classes"),
        (lambda m: m.update(temperature=float("inf")), "temperature"),
        (lambda m: m["index"]["parts"][0].update(num_rows="50"), "index.parts[0].num_rows"),
        (lambda m: m["index"]["parts"][0].update(sha256="abc"), "index.parts[0]"),
        (lambda m: m["index"]["units"].update(sha256="abc"), "index.units"),
        (lambda m: m["representation"].update(kind="topk", k=99), "representation.k"),
        (lambda m: m.update(num_classes=8), "columns"),
    ],
)
def test_malformed_manifest_names_the_field(tmp_path, edit, field):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=100, shards=2)
    m = _manifest(uri)
    edit(m)
    _write_manifest(uri, m)
    with pytest.raises(ManifestError) as e:
        open_soft_labels(uri)
    assert f"'{field}'" in str(e.value) or f"{field!r}" in str(e.value), str(e.value)
    assert "Traceback" not in str(e.value)


def test_stored_width_larger_than_num_classes_is_refused_by_the_shard(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=100, shards=2, c=10)
    m = _manifest(uri)
    m["num_classes"] = 8
    m.pop("columns")
    _write_manifest(uri, m)
    with pytest.raises(ManifestError, match="committed by a run labelling something else"):
        open_soft_labels(uri)  # the commits' lineage says 10 classes
    from storage.manifest import lineage_digest

    for name in os.listdir(os.path.join(uri, "_commits")):  # forge them too: the shard itself still says no
        p = os.path.join(uri, "_commits", name)
        rec = json.load(open(p))
        rec["lineage"] = lineage_digest(m)
        json.dump(rec, open(p, "w"))
    with pytest.raises(CorruptShardError, match="column 'logits' has width 10, the manifest says 8"):
        _stream_all(uri)


# ---------------------------------------------------------------- tamper evidence


def test_edited_manifest_is_detected_by_its_digest(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=100, shards=2, temperature=4.0)
    m = _manifest(uri)
    m["temperature"] = 1.0
    _write_manifest(uri, m, redigest=False)
    with pytest.raises(ManifestError, match="was modified after distillery wrote it"):
        open_soft_labels(uri)
    assert any("modified" in p for p in verify(uri).problems)


def test_manifest_and_commits_must_agree(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=300, shards=3, temperature=4.0)
    good, entries = forge.load(uri)
    # a shard entry removed (and the totals fixed up, the index and digest recomputed)
    m = json.loads(json.dumps(good))
    gone = entries.pop()
    m.update(num_shards=2, num_rows=m["num_rows"] - gone["num_rows"], num_samples=m["num_samples"] - gone["num_rows"])
    forge.save(uri, m, entries)
    with pytest.raises(ManifestError, match="shard 2 is committed but not in the manifest"):
        open_soft_labels(uri)
    assert any("not in the manifest" in p for p in verify(uri).problems)
    # the temperature changed and re-signed: the commit records' lineage disagrees
    m = json.loads(json.dumps(good))
    m["temperature"] = 1.0
    forge.save(uri, m)
    with pytest.raises(ManifestError, match="committed by a run labelling something else"):
        open_soft_labels(uri)


@pytest.mark.parametrize("planned", [None, 2])
def test_dropping_a_shard_of_a_planned_dataset_is_refused_at_open(tmp_path, planned):
    """Format 3: a dataset written with a plan (num_shards=, as `distill label` writes it)
    binds it in every commit record, so shard 0's record, read at open, refuses a manifest
    that drops a shard consistently (the plan cleared or fixed up to match)."""
    uri = str(tmp_path / "ds")
    write_toy(uri, n=300, shards=3, num_shards=3)
    m, entries = forge.load(uri)
    assert m["planned_shards"] == 3 and all(c["plan"]["shards"] == 3 for c in forge.commits(uri).values())
    gone = entries.pop()
    m.update(
        num_shards=2,
        planned_shards=planned,
        num_rows=m["num_rows"] - gone["num_rows"],
        num_samples=m["num_samples"] - gone["num_rows"],
    )
    forge.save(uri, m, entries)
    with pytest.raises(ManifestError, match=r"shard 0 .*binds a plan of \{'shards': 3.*shards or samples dropped"):
        open_soft_labels(uri)
    assert any("not in the manifest" in p for p in verify(uri).problems)


def test_finalize_refuses_shards_committed_by_another_labelling(tmp_path):
    """Two runs with different settings on one URI (an overwrite racing a running label)
    never produce a complete dataset that mixes their shards."""
    uri = str(tmp_path / "ds")
    z = toy_logits(100, 10)
    a = SoftLabelWriter(
        uri, backend="parquet", num_classes=10, temperature=3.0, teacher=TEACHER, data=DATA, num_shards=2
    )
    a.write_shard(0, np.arange(50), z[:50])
    # run B overwrites the dataset while A is still running, and writes shard 1
    b = SoftLabelWriter(
        uri,
        backend="parquet",
        num_classes=10,
        temperature=2.0,
        teacher=TEACHER,
        data=DATA,
        num_shards=2,
        overwrite=True,
    )
    b.write_shard(1, np.arange(50, 100), z[50:])
    a.write_shard(0, np.arange(50), z[:50])  # A carries on: its shard 0 lands in B's dataset
    with pytest.raises(MismatchError, match=r"shard\(s\) \[0\] were committed by a run labelling something else"):
        b.finalize()
    with pytest.raises(SoftLabelError):
        open_soft_labels(uri)


def test_format_1_datasets_are_still_read(tmp_path):
    """A dataset written by the previous format (shards at the root, fixed_size_binary
    columns, no digest) opens and streams the same values."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from storage.layout import tree_sha256

    uri = tmp_path / "v1"
    (uri / "_commits").mkdir(parents=True)
    n, c = 40, 10
    z = (toy_logits(n, c) / 2).astype(np.float16)
    t = pa.table(
        {
            "sample_id": np.arange(n),
            "view": np.zeros(n, np.int32),
            "logits": pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * c), n, [None, pa.py_buffer(z)]),
        }
    )
    import io

    buf = io.BytesIO()
    pq.write_table(t, buf)
    raw = buf.getvalue()
    sha = tree_sha256({"": [raw]})
    name = f"shard-00000-{sha[:16]}.parquet"
    (uri / name).write_bytes(raw)
    entry = {
        "index": 0,
        "path": name,
        "num_rows": n,
        "first_sample_id": 0,
        "last_sample_id": n - 1,
        "sha256": sha,
        "bytes": len(raw),
        "rows_per_block": n,
    }
    (uri / "_commits" / "shard-00000.json").write_text(json.dumps(entry))
    m = {
        "format_version": 1,
        "backend": "parquet",
        "status": "complete",
        "num_samples": n,
        "num_rows": n,
        "num_views": 1,
        "num_classes": c,
        "temperature": 2.0,
        "representation": {"kind": "dense", "dtype": "float16", "k": None},
        "feature": None,
        "teacher": TEACHER,
        "data": DATA,
        "num_shards": 1,
        "shards": [entry],
    }
    (uri / "manifest.json").write_text(json.dumps(m))
    ds = open_soft_labels(str(uri))
    got = next(ds.iter_batches(n, shuffle=False))
    assert np.array_equal(got["logits"], z) and verify(str(uri)).ok
