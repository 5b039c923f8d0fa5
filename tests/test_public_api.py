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
