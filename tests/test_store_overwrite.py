"""A run whose labels another run replaced (started with overwrite=True and other settings
while it was labelling) ends with an error that says so and names the other run, never
with success (issue #19: it used to exit 0 reporting the shards it had labelled)."""

import numpy as np
import pytest
from conftest import DATA, TEACHER

from storage import MismatchError, SoftLabelWriter, open_soft_labels

Z = np.random.default_rng(0).standard_normal((40, 4)).astype(np.float32)


def writer(uri, T, overwrite=False):
    return SoftLabelWriter(
        uri,
        backend="parquet",
        num_classes=4,
        temperature=T,
        teacher=TEACHER,
        data=DATA,
        num_shards=4,
        num_samples=40,
        overwrite=overwrite,
    )


def label(w, shards):
    for i in shards:
        w.write_shard(i, np.arange(i * 10, i * 10 + 10), Z[i * 10 : i * 10 + 10])


def test_a_run_overwritten_mid_way_fails_naming_the_other_run(tmp_path):
    uri = str(tmp_path / "ds")
    a = writer(uri, 2.0)
    label(a, [0])
    b = writer(uri, 4.0, overwrite=True)
    label(b, range(4))
    b.finalize()
    with pytest.raises(MismatchError, match=r"this run's labels were replaced by another run's \(writer"):
        label(a, [1])
    with pytest.raises(MismatchError, match="committed by a run labelling something else"):
        a.finalize()
    assert open_soft_labels(uri).temperature == 4.0  # B's dataset, untouched by A


def test_a_finished_run_replaced_before_it_reports_fails(tmp_path):
    """A finalized, then B replaced the labels before A's run ended (its last step re-checks)."""
    uri = str(tmp_path / "ds")
    a = writer(uri, 2.0)
    label(a, range(4))
    a.finalize()
    a.confirm()  # still A's
    b = writer(uri, 4.0, overwrite=True)
    label(b, range(4))
    b.finalize()
    with pytest.raises(MismatchError, match="replaced by another run's .*temperature 4.0"):
        a.confirm()
