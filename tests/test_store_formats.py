"""Format 2 datasets (written by distillery before format 3, kept in tests/data/format2:
the very bytes that writer produced) still open, stream and verify, and `distill convert`
upgrades them to format 3 bit-exact."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import cli_in_process

from storage import open_soft_labels, verify

HERE = os.path.join(os.path.dirname(__file__), "data", "format2")


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_a_format_2_dataset_opens_streams_verifies_and_converts_to_format_3(tmp_path, backend):
    src = str(tmp_path / "old")
    shutil.copytree(os.path.join(HERE, f"format2-{backend}"), src)
    z = np.load(os.path.join(HERE, f"format2-{backend}-logits.npy"))
    assert json.load(open(os.path.join(src, "manifest.json")))["format_version"] == 2
    ds = open_soft_labels(src)
    got = np.concatenate([b["logits"] for b in ds.iter_batches(16, shuffle=False)]).astype(np.float32)
    np.testing.assert_allclose(got, z / 2.0, rtol=2**-10, atol=1e-3)
    assert verify(src).ok and len(ds.shards) == 2

    dst = str(tmp_path / "new")
    r = cli_in_process("convert", src, dst)
    assert r.returncode == 0, r.stderr
    assert f"{backend} format 3" in r.stdout
    m = json.load(open(os.path.join(dst, "manifest.json")))
    assert m["format_version"] == 3 and "shards" not in m and len(m["index"]["parts"]) == 1
    new = open_soft_labels(dst)
    again = np.concatenate([b["logits"] for b in new.iter_batches(16, shuffle=False)])
    assert again.tobytes() == np.concatenate([b["logits"] for b in ds.iter_batches(16, shuffle=False)]).tobytes()
    assert verify(dst).ok and [e["sha256"] for e in new.shards] != [] and new.manifest["planned_samples"] == 40
