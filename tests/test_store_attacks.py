"""Attacks on real datasets (written by the real writer, as a labelling run writes them:
with the plan of shards and samples): each edit below was once accepted by `distill
inspect --verify` and by the reader training uses (issue #19). An attacker here recomputes
every checksum and digest it can (tests/forge.py); what must catch the edit is the format's
cross-checks (commit records binding lineage, format and plan; the shard's own bytes), or,
against a forger who rewrites everything, a signature."""

import json
import os

import numpy as np
import pytest
from conftest import DATA, TEACHER, cli_in_process, toy_logits
from forge import commits, drop_commit, load, save, write_commit

from pipeline.keys import generate, load_signer, load_verifier
from storage import ManifestError, SoftLabelWriter, open_soft_labels, verify

N, SHARDS, C = 90, 3, 10


def labelled(uri, signing_key=None, backend="parquet"):
    """3 shards of 30 samples x 2 views, with the plan a labelling run records."""
    z = toy_logits(N * 2, C, 0)
    sids, views = np.repeat(np.arange(N), 2), np.tile(np.arange(2), N)
    w = SoftLabelWriter(
        uri,
        backend=backend,
        num_classes=C,
        temperature=4.0,
        num_views=2,
        teacher=TEACHER,
        data=DATA,
        num_shards=SHARDS,
        num_samples=N,
        signer=None if signing_key is None else load_signer(signing_key),
    )
    for i in range(SHARDS):
        a, b = i * 60, (i + 1) * 60
        w.write_shard(i, sids[a:b], z[a:b], views[a:b])
    w.finalize()
    return uri


def stream_all(uri, public_key=None, **kw):
    ds = open_soft_labels(uri, verifier=None if public_key is None else load_verifier(public_key), **kw)
    return sum(len(b["sample_id"]) for b in ds.iter_batches(32, shuffle=False))


def refused(uri, match, **kw):
    """The reader training uses refuses (at open or at the first batch), and verify too."""
    with pytest.raises(ManifestError, match=match):
        stream_all(uri, **kw)
    pk = kw.get("public_key")
    report = verify(uri, verifier=None if pk is None else load_verifier(pk))
    assert not report.ok, report
    return report


@pytest.fixture
def ds(tmp_path):
    uri = labelled(str(tmp_path / "ds"))
    assert stream_all(uri) == N * 2 and verify(uri).ok
    return uri


def test_downgrade_to_format_1_with_another_temperature_is_refused(ds):
    """temperature 4 -> 2, format_version 1, digest dropped: a v1 manifest has no digest,
    but its shards' commit records say format 3."""
    m, entries = load(ds)
    m.update(temperature=2.0, format_version=1)
    m.pop("index")
    save(ds, m, entries, digest=False)
    assert json.load(open(os.path.join(ds, "manifest.json")))["format_version"] == 1
    refused(ds, "written in format 3, the manifest claims format 1")


def test_downgrade_to_format_2_is_refused(ds):
    m, entries = load(ds)
    m.update(format_version=2)
    m.pop("index")
    save(ds, m, entries)
    refused(ds, "written in format 3, the manifest claims format 2")


def test_commit_records_stripped_of_their_lineage_are_refused(ds):
    """temperature changed, digest recomputed, lineage (and format, plan) deleted from
    every commit record so that the lineage cross-check has nothing to compare."""
    m, entries = load(ds)
    save(ds, dict(m, temperature=2.0), entries)
    for rec in commits(ds).values():
        write_commit(ds, {k: v for k, v in rec.items() if k not in ("lineage", "format_version", "plan")})
    refused(ds, "has no lineage")


def test_a_consistently_smaller_dataset_is_refused(ds):
    """The last shard's entry and commit record dropped, totals, plan and digest recomputed:
    every remaining record still binds the plan of 3 shards and 90 samples."""
    m, entries = load(ds)
    gone = entries.pop()
    drop_commit(ds, gone["index"])
    rows = sum(e["num_rows"] for e in entries)
    m.update(num_shards=2, num_rows=rows, num_samples=rows // 2, planned_shards=2, planned_samples=rows // 2)
    save(ds, m, entries)
    refused(ds, r"binds a plan of \{'shards': 3, 'samples': 90\}")


def test_a_smaller_dataset_keeping_the_plan_fields_is_refused_by_the_manifest_schema(ds):
    m, entries = load(ds)
    gone = entries.pop()
    drop_commit(ds, gone["index"])
    rows = sum(e["num_rows"] for e in entries)
    m.update(num_shards=2, num_rows=rows, num_samples=rows // 2)
    save(ds, m, entries)
    with pytest.raises(ManifestError, match="planned_shards"):
        open_soft_labels(ds)


def test_an_edited_first_sample_id_is_refused_by_the_training_reader(ds):
    m, entries = load(ds)
    entries[1]["first_sample_id"] = 31
    save(ds, m, entries)
    refused(ds, "sample ids 31..59, its commit record 30..59")
    # the commit record forged to agree: the shard's own bytes still disagree
    rec = commits(ds)[1]
    write_commit(ds, dict(rec, first_sample_id=31))
    with pytest.raises(ManifestError, match="holds sample ids 30..59, its entry says 31..59"):
        stream_all(ds)


@pytest.mark.parametrize(
    "layout,field",
    [(["x"], "field 'layout' must be an object"), ({"row_bytes": "big"}, "field 'layout.row_bytes' must be an int")],
)
def test_a_malformed_layout_is_one_line_naming_the_field(ds, layout, field):
    m, entries = load(ds)
    save(ds, dict(m, layout=layout))
    with pytest.raises(ManifestError, match=field):
        open_soft_labels(ds)
    r = cli_in_process("inspect", ds)
    assert r.returncode == 1 and field in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_edited_index_part_is_refused_by_its_checksum(ds):
    m, _ = load(ds)
    part = os.path.join(ds, m["index"]["parts"][0]["path"])
    data = bytearray(open(part, "rb").read())
    data[len(data) // 2] ^= 1
    open(part, "wb").write(bytes(data))
    with pytest.raises(ManifestError, match="does not hold the bytes the manifest names"):
        stream_all(ds)


# ------------------------------------------------------------------ signed datasets


@pytest.fixture
def keys(tmp_path):
    priv, pub = generate(str(tmp_path / "keys"))
    other_priv, other_pub = generate(str(tmp_path / "keys"), "other")
    return {"priv": priv, "pub": pub, "other_priv": other_priv, "other_pub": other_pub}


def test_a_signed_dataset_reads_with_its_key_and_refuses_every_forgery(tmp_path, keys):
    uri = labelled(str(tmp_path / "signed"), signing_key=keys["priv"])
    m = json.load(open(os.path.join(uri, "manifest.json")))
    assert m["signature"]["alg"] == "ed25519"
    assert all(r["signature"]["alg"] == "ed25519" for r in commits(uri).values())
    assert stream_all(uri, public_key=keys["pub"]) == N * 2
    assert verify(uri, verifier=load_verifier(keys["pub"])).ok
    # the wrong key
    refused(uri, "signed by key .* not by the required key", public_key=keys["other_pub"])

    # a forger rewrites the temperature, the digest, every commit record's lineage
    m, entries = load(uri)
    forged = dict(m, temperature=2.0)
    forged.pop("signature")
    save(uri, forged, entries)
    from storage.manifest import lineage_digest

    for rec in commits(uri).values():
        write_commit(uri, dict(rec, lineage=lineage_digest(forged)))
    assert stream_all(uri) == N * 2  # without a key, a complete forgery reads
    refused(uri, "manifest.json is not signed", public_key=keys["pub"])
    # ... and re-attaching the old signature does not help: it signs another digest
    save(uri, dict(forged, signature=m["signature"]), entries)
    refused(uri, "does not match its content", public_key=keys["pub"])


def test_a_forged_commit_record_in_a_signed_dataset_is_refused_when_its_shard_opens(tmp_path, keys):
    uri = labelled(str(tmp_path / "signed"), signing_key=keys["priv"])
    rec = commits(uri)[2]
    write_commit(uri, dict(rec, writer={"host": "elsewhere", "pid": 1}))
    assert stream_all(uri) == N * 2  # the record still agrees with the manifest
    refused(uri, "_commits/shard-00002.json has a signature .* that does not match", public_key=keys["pub"])


def test_an_unsigned_dataset_is_refused_when_a_key_is_required(ds, keys):
    refused(ds, "is not signed, and a signed dataset .* was required", public_key=keys["pub"])
    r = cli_in_process("inspect", ds, "--public-key", keys["pub"])
    assert r.returncode == 1 and "is not signed" in r.stderr


def test_keygen_writes_a_private_key_only_its_owner_reads(tmp_path):
    r = cli_in_process("keygen", str(tmp_path / "k"))
    assert r.returncode == 0, r.stderr
    assert oct(os.stat(tmp_path / "k" / "distillery.key").st_mode & 0o777) == "0o600"
    r = cli_in_process("keygen", str(tmp_path / "k"))
    assert r.returncode == 1 and "never overwrites" in r.stderr
