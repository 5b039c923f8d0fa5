"""Damaged shards are found by verify() and by open_soft_labels(verify=True), by name."""

import os

import pytest
from conftest import write_toy

from storage import CorruptShardError, open_soft_labels, verify


def _shard_file(uri, index):
    ds = open_soft_labels(uri)
    rel = ds.shards[index]["path"]
    path = os.path.join(uri, rel)
    if os.path.isdir(path):  # zarr: damage the logits chunk, the biggest object
        chunks = [
            os.path.join(d, f) for d, _, fs in os.walk(os.path.join(path, "logits")) for f in fs if f != "zarr.json"
        ]
        path = max(chunks, key=os.path.getsize)
    return rel, path


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_reported_by_name(tmp_path, backend, damage):
    uri = str(tmp_path / "ds")
    write_toy(uri, backend=backend, n=300, shards=3)
    assert verify(uri).ok
    rel, path = _shard_file(uri, 1)
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01  # one flipped bit in the middle of the logits
    open(path, "wb").write(bytes(data))

    report = verify(uri)
    assert not report.ok
    assert any(rel in p and "sha256 mismatch" in p for p in report.problems), report.problems
    assert all("shard-00000" not in p and "shard-00002" not in p for p in report.problems)
    with pytest.raises(CorruptShardError, match=rel):
        open_soft_labels(uri, verify=True)


def test_missing_shard_and_extra_problems(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, backend="parquet", n=100, shards=2)
    rel, path = _shard_file(uri, 0)
    os.remove(path)
    report = verify(uri)
    assert not report.ok and any("missing" in p and "shard 0" in p for p in report.problems)
    assert "1 problem" in str(report) or "problem(s)" in str(report)


def test_verify_of_nothing(tmp_path):
    report = verify(str(tmp_path / "nope"))
    assert not report.ok and "manifest.json not found" in report.problems[0]
