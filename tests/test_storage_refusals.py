"""Bad input gets a clear error naming what is wrong, and stored data is never damaged."""

import json
import os

import numpy as np
import pytest
from conftest import DATA, TEACHER, write_toy

from storage import (
    IncompleteDatasetError,
    InvalidLogitsError,
    ManifestError,
    MismatchError,
    SoftLabelError,
    SoftLabelWriter,
    open_soft_labels,
    verify,
)


def _writer(uri, **kw):
    args = dict(backend="parquet", num_classes=4, temperature=2.0, teacher=TEACHER, data=DATA)
    args.update(kw)
    return SoftLabelWriter(uri, **args)


def test_errors_share_one_base():
    for cls in (IncompleteDatasetError, InvalidLogitsError, ManifestError, MismatchError):
        assert issubclass(cls, SoftLabelError)


def test_fingerprint_mismatch_is_refused_and_data_kept(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, c=4, n=40, shards=2, temperature=2.0)
    other = dict(TEACHER, fingerprint="sha256:teacher-b")
    with pytest.raises(
        MismatchError, match=r"teacher\.fingerprint: stored 'sha256:teacher-a', this writer 'sha256:teacher-b'"
    ):
        _writer(uri, teacher=other)
    with pytest.raises(MismatchError, match="temperature: stored 2.0, this writer 3.0"):
        _writer(uri, temperature=3.0)
    assert verify(uri).ok  # refusal touched nothing
    w = _writer(uri, teacher=other, overwrite=True)  # explicit overwrite starts afresh
    assert w.committed_shards() == [] and w.manifest["status"] == "partial"
    with pytest.raises(IncompleteDatasetError):
        open_soft_labels(uri)


def test_same_fingerprints_resume(tmp_path):
    uri = str(tmp_path / "ds")
    w = _writer(uri)
    w.write_shard(0, [0, 1], np.ones((2, 4), np.float32))
    w2 = _writer(uri, teacher=dict(TEACHER, name="renamed"))  # names are not identity
    assert w2.committed_shards() == [0]


def test_partial_dataset_is_never_read_as_complete(tmp_path):
    uri = str(tmp_path / "ds")
    w = _writer(uri, num_shards=3)
    w.write_shard(0, [0, 1], np.ones((2, 4), np.float32))
    with pytest.raises(IncompleteDatasetError, match=r"partial \(1 shard\(s\) committed of 3\)"):
        open_soft_labels(uri)
    with pytest.raises(IncompleteDatasetError, match=r"shard\(s\) \[1, 2\] not committed"):
        w.finalize()
    assert not verify(uri).ok


def test_unknown_format_version(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=10, shards=1)
    p = os.path.join(uri, "manifest.json")
    m = json.load(open(p))
    m["format_version"] = 99
    json.dump(m, open(p, "w"))
    with pytest.raises(ManifestError, match="unknown format_version 99"):
        open_soft_labels(uri)
    with pytest.raises(ManifestError, match="unknown format_version 99"):
        _writer(uri, num_classes=10, temperature=4.0)


def test_nan_and_inf_logits_are_refused_naming_shard_and_row(tmp_path):
    uri = str(tmp_path / "ds")
    w = _writer(uri)
    z = np.zeros((5, 4), np.float32)
    z[3, 1] = np.nan
    with pytest.raises(InvalidLogitsError, match=r"shard 7: logits row 3 \(sample_id 13, view 0\) contains NaN"):
        w.write_shard(7, np.arange(10, 15), z)
    z[3, 1] = np.inf
    with pytest.raises(InvalidLogitsError, match="row 3 .* contains Inf"):
        w.write_shard(7, np.arange(10, 15), z)
    z[3, 1] = 1e6  # finite, but 1e6 / T overflows float16
    with pytest.raises(InvalidLogitsError, match="overflows float16"):
        w.write_shard(7, np.arange(10, 15), z)
    assert w.committed_shards() == []
    assert not any(n.startswith("shard-") for n in os.listdir(uri))


def test_shape_and_argument_errors(tmp_path):
    uri = str(tmp_path / "ds")
    w = _writer(uri, num_views=2)
    with pytest.raises(InvalidLogitsError, match=r"logits must be float of shape \(2, 4\)"):
        w.write_shard(0, [0, 1], np.zeros((2, 5), np.float32))
    with pytest.raises(InvalidLogitsError, match="views are required when num_views=2"):
        w.write_shard(0, [0, 1], np.zeros((2, 4), np.float32))
    with pytest.raises(InvalidLogitsError, match="row 1 has view 2"):
        w.write_shard(0, [0, 1], np.zeros((2, 4), np.float32), views=[0, 2])
    with pytest.raises(SoftLabelError, match="duplicate"):
        w.write_shard(0, [0, 0], np.zeros((2, 4), np.float32), views=[1, 1])
    with pytest.raises(ValueError, match="backend must be one of"):
        _writer(str(tmp_path / "x"), backend="csv")
    with pytest.raises(ValueError, match="needs an int k"):
        _writer(str(tmp_path / "x"), representation="topk")
    with pytest.raises(ValueError, match=r"teacher is missing required key\(s\) \['fingerprint'\]"):
        _writer(str(tmp_path / "x"), teacher={"name": "t"})


def test_coverage_errors_at_finalize(tmp_path):
    uri = str(tmp_path / "ds")
    w = _writer(uri, num_views=2)
    z = np.zeros((2, 4), np.float32)
    w.write_shard(0, [0, 0], z, views=[0, 1])
    w.write_shard(1, [0, 1], z, views=[1, 0])  # (0, 1) twice; sample 1 lacks view 1
    with pytest.raises(SoftLabelError, match=r"\(sample_id 0, view 1\) appears more than once \(shards 0 and 1\)"):
        w.finalize()


def test_expect_names_every_differing_field(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=10, shards=1, temperature=4.0)
    open_soft_labels(uri, expect={"teacher": {"fingerprint": TEACHER["fingerprint"]}, "temperature": 4.0})
    with pytest.raises(MismatchError) as e:
        open_soft_labels(
            uri,
            expect={
                "teacher.fingerprint": "sha256:other",
                "temperature": 2.0,
                "representation": {"kind": "topk", "dtype": "float16", "k": 4},
            },
        )
    msg = str(e.value)
    assert "teacher.fingerprint: expected 'sha256:other', found 'sha256:teacher-a'" in msg
    assert "temperature: expected 2.0, found 4.0" in msg
    assert "representation: expected" in msg


def test_corrupt_manifest_json(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=10, shards=1)
    open(os.path.join(uri, "manifest.json"), "w").write("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        open_soft_labels(uri)
