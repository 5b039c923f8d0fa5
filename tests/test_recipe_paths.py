"""What a manifest records to rebuild its inputs (`distill inspect --replay`) names files by
absolute paths: a config with relative paths (the shipped ones: `.assets/...`, a relative
runs_dir) labels from the repository root, and a replay runs from anywhere."""

import os

import numpy as np
import yaml

from flows.config import load_config


def test_classifier_recipe_and_teacher_paths_are_absolute(tmp_path, monkeypatch):
    from flows.classify import manifest_teacher, recipe_data

    monkeypatch.chdir(tmp_path)
    np.savez("d.npz", x=np.zeros((40, 3), np.float32), y=np.arange(40) % 2)
    np.save("train.npy", np.arange(10))
    np.save("test.npy", np.arange(10, 20))
    (tmp_path / "c.yaml").write_text(
        yaml.safe_dump(
            {"name": "p", "data": {"dataset": "d.npz", "split_files": {"train": "train.npy", "test": "test.npy"}}}
        )
    )
    d = recipe_data(load_config("c.yaml"))
    assert d["dataset"] == str(tmp_path / "d.npz")
    assert d["split_files"] == {"train": str(tmp_path / "train.npy"), "test": str(tmp_path / "test.npy")}
    assert recipe_data(load_config("c.yaml", ["data.dataset=mnist5k", "data.split_files=null"]))["dataset"] == "mnist5k"
    t = manifest_teacher({"name": "t", "fingerprint": "f", "checkpoint": "runs/p/teacher.pt"})
    assert t["checkpoint"] == os.path.join(str(tmp_path), "runs/p/teacher.pt")


def test_language_model_recipe_and_teacher_source_are_absolute(tmp_path, monkeypatch):
    from test_lm_recipe import lm_config

    from flows.lm import ensure_teacher, recipe

    path = lm_config(tmp_path)
    cfg = yaml.safe_load(open(path))
    cfg["corpus"]["path"], cfg["teacher"]["path"] = "docs", "teacher"  # relative to tmp_path
    (tmp_path / "rel.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)
    c = load_config("rel.yaml")
    r = recipe(c)
    assert r["corpus"]["path"] == str(tmp_path / "docs") and r["label_split"] == "train"
    assert list(r["corpus"]["sizes"]) == ["train", "val"]
    assert ensure_teacher(c)["source"] == str(tmp_path / "teacher")
