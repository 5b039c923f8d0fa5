"""`import distillery`: the public API under one name (issue #20), installed by setuptools
from pipeline/api without moving the fixed top-level folders; every package the tree holds
is installed."""

import os
import subprocess
import sys
import tomllib

from conftest import write_toy
from setuptools import find_packages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_distillery_imports_from_anywhere_and_re_exports_the_owners(tmp_path):
    uri = str(tmp_path / "ds")
    write_toy(uri, n=40, shards=2)
    code = (
        "import distillery, storage, pipeline.objectives.objective as o;"
        "assert distillery.open_labels is storage.open_soft_labels and distillery.Objective is o.Objective;"
        "assert 'kd' in distillery.LOSSES and distillery.keys.load_verifier;"
        f"ds = distillery.open_labels({uri!r}); print(len(ds), distillery.verify({uri!r}).ok)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)  # not the repo root
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["40", "True"]


def test_every_package_in_the_tree_is_installed():
    tool = tomllib.loads(open(os.path.join(ROOT, "pyproject.toml")).read())["tool"]["setuptools"]
    found = set(find_packages(ROOT, include=["storage*", "pipeline*", "flows*"])) - {"pipeline.api"}
    assert set(tool["packages"]) == found | {"distillery"}
    assert tool["package-dir"] == {"distillery": "pipeline/api"}


def test_stored_labels_join_by_id_and_distill_loss_is_hinton_kd(tmp_path):
    import numpy as np
    import pytest
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    import distillery

    uri = str(tmp_path / "ds")
    z = write_toy(uri, n=40, shards=2, c=5, temperature=2.0, dtype="float32")  # rows = sample ids 0..39
    labels = distillery.open_labels(uri)
    ids = np.array([7, 3, 39, 0])
    data = distillery.StoredLabels(labels, TensorDataset(torch.arange(4)), sample_ids=ids)
    (x,), target = next(iter(DataLoader(data, batch_size=4)))
    assert x.tolist() == [0, 1, 2, 3]
    np.testing.assert_allclose(target["stored_logits"].numpy(), z[ids] / 2.0, rtol=1e-6)
    # the loss, by hand: T²·KL(softmax(z/T) ‖ softmax(s/T)) averaged over rows (Hinton et al. 2015)
    s = torch.randn(4, 5, dtype=torch.float64)
    p = torch.softmax(torch.as_tensor(z[ids], dtype=torch.float64) / 2.0, 1)
    want = 4.0 * (p * (p.log() - torch.log_softmax(s / 2.0, 1))).sum(1).mean()
    got = distillery.distill_loss(s.float(), target, labels=labels)
    assert abs(float(got) - float(want)) < 1e-5
    # with alpha: α·CE + (1 − α)·KD
    y = torch.tensor([1, 0, 4, 2])
    ce = torch.nn.functional.cross_entropy(s, y)
    mixed = distillery.distill_loss(s.float(), target, labels=labels, alpha=0.3, y=y)
    assert abs(float(mixed) - float(0.3 * ce + 0.7 * want)) < 1e-5
    with pytest.raises(ValueError, match="pass y"):
        distillery.distill_loss(s.float(), target, labels=labels, alpha=0.3)
    with pytest.raises(distillery.SoftLabelError, match=r"\(sample_id, view\) \(40, 0\) is not in"):
        distillery.StoredLabels(labels, TensorDataset(torch.arange(2)), sample_ids=[1, 40])
