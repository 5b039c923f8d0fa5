"""The same store through a real S3 API server (moto) on 127.0.0.1."""

import numpy as np
import pytest
import s3fs
from conftest import TEACHER, write_toy

from storage import CorruptShardError, SoftLabelWriter, convert, open_soft_labels, verify

pytestmark = pytest.mark.s3


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
@pytest.mark.parametrize("representation", ["dense", "topk"])
def test_s3_round_trip(s3_server, s3_uri, backend, representation):
    so = s3_server["storage_options"]
    k = 3 if representation == "topk" else None
    z = write_toy(
        s3_uri,
        backend=backend,
        representation=representation,
        k=k,
        n=150,
        views=2,
        shards=3,
        temperature=2.0,
        dtype="float32",
        storage_options=so,
    )
    ds = open_soft_labels(
        s3_uri,
        storage_options=so,
        verify=True,
        expect={"teacher.fingerprint": TEACHER["fingerprint"], "backend": backend},
    )
    got = ds.take([10, 149])
    rows = [20, 21, 298, 299]
    if representation == "dense":
        np.testing.assert_allclose(got["logits"], z[rows] / 2.0, rtol=1e-6)
    else:
        np.testing.assert_allclose(got["topk_logits"][:, 0], z[rows].max(1) / 2.0, rtol=1e-6)
    seen = np.concatenate([b["sample_id"] * 2 + b["view"] for b in ds.iter_batches(64, seed=5)])
    assert sorted(seen.tolist()) == list(range(300))
    fs = s3fs.S3FileSystem(endpoint_url=so["endpoint_url"], key="testing", secret="testing")
    listing = [p.rsplit("/", 1)[-1] for p in fs.ls(s3_uri)]
    assert "manifest.json" in listing and "_tmp" not in listing


def test_s3_resume_and_corruption(s3_server, s3_uri):
    so = s3_server["storage_options"]
    args = dict(
        backend="parquet",
        num_classes=5,
        temperature=1.0,
        teacher=TEACHER,
        data={"name": "d", "split": "train", "fingerprint": "f", "transform": None},
        storage_options=so,
    )
    w = SoftLabelWriter(s3_uri, num_shards=2, **args)
    w.write_shard(0, [0, 1, 2], np.eye(3, 5, dtype=np.float32))
    w2 = SoftLabelWriter(s3_uri, **args)  # a second process would see the same
    assert w2.committed_shards() == [0]
    w2.write_shard(1, [3, 4], np.ones((2, 5), np.float32))
    w2.finalize()
    assert verify(s3_uri, storage_options=so).ok
    fs = s3fs.S3FileSystem(endpoint_url=so["endpoint_url"], key="testing", secret="testing")
    shard = open_soft_labels(s3_uri, storage_options=so).shards[1]["path"]
    data = bytearray(fs.cat_file(f"{s3_uri}/{shard}"))
    data[len(data) // 3] ^= 0xFF
    fs.pipe_file(f"{s3_uri}/{shard}", bytes(data))
    report = verify(s3_uri, storage_options=so)
    assert not report.ok and shard in report.problems[0]
    with pytest.raises(CorruptShardError, match=shard):
        open_soft_labels(s3_uri, storage_options=so, verify=True)


FORK_SCRIPT = """
import multiprocessing as mp, sys
sys.path.insert(0, "tests")
from storage import open_soft_labels
uri, endpoint = sys.argv[1], sys.argv[2]
so = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
ds = open_soft_labels(uri, storage_options=so)
parent = sum(int(b["sample_id"].sum()) for b in ds.iter_batches(16, worker=0, num_workers=2))

def child(q):
    q.put(int(sum(int(b["sample_id"].sum()) for b in ds.iter_batches(16, worker=1, num_workers=2))))

ctx = mp.get_context("fork")
q = ctx.Queue()
p = ctx.Process(target=child, args=(q,))
p.start()
total = parent + q.get(timeout=60)
p.join(timeout=60)
print(total, p.exitcode)
"""


def test_forked_worker_reads_s3_after_parent_did(s3_server, s3_uri):
    """A dataset used in the parent, then iterated in a forked child (as DataLoader workers
    are). Run in a fresh interpreter: this pytest process also hosts Prefect's test server,
    whose threads a fork would inherit."""
    import subprocess
    import sys

    so = s3_server["storage_options"]
    write_toy(s3_uri, backend="zarr", n=64, shards=2, storage_options=so)
    r = subprocess.run(
        [sys.executable, "-c", FORK_SCRIPT, s3_uri, so["endpoint_url"]],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(__import__("pathlib").Path(__file__).resolve().parent.parent),
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(sum(range(64))), "0"]


def test_convert_local_to_s3(s3_server, s3_uri, tmp_path):
    so = s3_server["storage_options"]
    src = str(tmp_path / "src")
    write_toy(src, backend="parquet", n=40, shards=2)
    m = convert(src, s3_uri, backend="zarr", dst_storage_options=so)
    assert m["backend"] == "zarr"
    assert verify(s3_uri, storage_options=so).ok


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_s3_reader_refuses_a_damaged_object_and_a_hostile_path(s3_server, s3_uri, backend):
    """On an object store the shard is fetched once, hashed, and read from those bytes:
    a flipped byte never reaches a batch; a manifest path outside the prefix is refused."""
    import json

    from storage.fs import Location
    from storage.index import ShardIndex
    from storage.manifest import manifest_digest

    so = s3_server["storage_options"]
    write_toy(s3_uri, backend=backend, n=120, shards=2, storage_options=so)
    fs = s3fs.S3FileSystem(endpoint_url=so["endpoint_url"], key="testing", secret="testing")
    m = json.loads(fs.cat_file(f"{s3_uri}/manifest.json"))
    entry = ShardIndex(Location(s3_uri, so), m).entry(1)  # format 3: the entries are in the index files
    target = f"{s3_uri}/{entry['path']}"
    if backend == "zarr":
        target = max(
            (p for p in fs.find(target) if "/logits/" in p and not p.endswith("zarr.json")),
            key=lambda p: fs.info(p)["size"],
        )
    data = bytearray(fs.cat_file(target))
    data[len(data) // 2] ^= 0x04
    fs.pipe_file(target, bytes(data))
    with pytest.raises(CorruptShardError, match=entry["path"].split("/")[-1]):
        for _ in open_soft_labels(s3_uri, storage_options=so).iter_batches(32, shuffle=False):
            pass
    # format 3 stores no shard path (derived from index and sha256); the files the manifest
    # names are the index files: one outside the prefix (same bytes, same sha256) is refused
    part = m["index"]["parts"][0]
    hostile = "../other-prefix/" + part["path"].split("/")[-1]
    fs.pipe_file(
        f"{s3_uri.rsplit('/', 1)[0]}/other-prefix/{part['path'].split('/')[-1]}",
        fs.cat_file(f"{s3_uri}/{part['path']}"),
    )
    part["path"] = hostile
    m["digest"] = manifest_digest(m)
    fs.pipe_file(f"{s3_uri}/manifest.json", json.dumps(m).encode())
    from storage import ManifestError

    with pytest.raises(ManifestError, match=r"'index\.parts\[0\]' must be \{path: _index/part-"):
        open_soft_labels(s3_uri, storage_options=so)
