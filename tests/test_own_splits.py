"""A user's data names its own splits (issue #19: splits were always cut at random from
data.sizes): fixed row ranges of the file (an .npz's n_train, a benchmark's test set) or
files of sample ids, each recorded in the split's definition (the labels' lineage)."""

import json

import numpy as np
import pytest
import yaml
from conftest import cli_in_process

from flows.config import load_config
from flows.inputs import splits


def config(tmp_path, **data):
    rng = np.random.default_rng(0)
    x, y = rng.random((500, 6), dtype=np.float32), rng.integers(0, 3, 500)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    cfg = {"name": "own", "data": {"dataset": str(tmp_path / "d.npz"), **data}}
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(p), x


def test_fixed_row_ranges_are_the_splits_and_are_recorded(tmp_path):
    path, x = config(
        tmp_path, ranges={"train": [0, 100], "transfer": [100, 400], "test": [400, 500]}, label_split="transfer"
    )
    s = splits(load_config(path))
    assert {k: len(v) for k, v in s.items()} == {"train": 100, "transfer": 300, "test": 100}
    np.testing.assert_array_equal(s["test"].encode(np.arange(100)).numpy(), x[400:])
    spec = json.loads(s["transfer"].split_spec)
    assert spec["split"] == "transfer" and spec["ranges"]["test"] == [400, 500]


def test_files_of_sample_ids_are_the_splits(tmp_path):
    ids = np.random.default_rng(1).permutation(500)
    np.save(tmp_path / "train.npy", ids[:50])
    np.savetxt(tmp_path / "test.txt", ids[50:150], fmt="%d")
    path, x = config(tmp_path, split_files={"train": str(tmp_path / "train.npy"), "test": str(tmp_path / "test.txt")})
    s = splits(load_config(path))
    assert sorted(s["train"].sample_ids.tolist()) == sorted(ids[:50].tolist())
    assert sorted(s["test"].sample_ids.tolist()) == sorted(ids[50:150].tolist())
    spec = json.loads(s["test"].split_spec)
    assert spec["split"] == "test" and len(spec["sha256"]) == 64
    # editing a file changes the split's definition (labels made from it are refused)
    np.savetxt(tmp_path / "test.txt", ids[50:151], fmt="%d")
    assert json.loads(splits(load_config(path))["test"].split_spec)["sha256"] != spec["sha256"]


@pytest.mark.parametrize(
    "data,message",
    [
        ({"ranges": {"train": [0, 300], "test": [250, 500]}}, "data.ranges.train and data.ranges.test overlap"),
        ({"ranges": {"train": [0, 100]}, "sizes": {"train": 100}}, "give one split definition"),
        ({"ranges": {"train": [0, 100], "test": [100, 900]}}, r"data.ranges.test: rows \[100, 900\) but"),
        ({"split_files": {"train": "nope.npy"}}, "data.split_files.train: nope.npy"),
    ],
)
def test_bad_split_definitions_are_one_line_before_anything_runs(tmp_path, data, message):
    path, _ = config(tmp_path, **data)
    r = cli_in_process("run", path)
    assert r.returncode == 2, r.stderr
    assert len(r.stderr.strip().splitlines()) <= 2 and __import__("re").search(message, r.stderr), r.stderr
