"""Lineage: students and teachers are refused, or trained again, when the config's data,
split, views or labels are not those the stored labels / checkpoints were made from.

One module fixture: the tiny config on an .npz copy of sklearn digits, a teacher trained
in its runs directory and soft labels made by the real label flow."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY

import storage
from flows.config import load_config

pytestmark = pytest.mark.usefixtures("prefect_harness")

# one student model (+ its baseline), nothing exported: the sweep in seconds
SMALL = [
    "students.models=[{name: mlp-16, arch: mlp, kwargs: {width: 16, depth: 1}}]",
    "students.quantize=false",
    "students.export=false",
]


def _write_npz(path, x, y, ids):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, sample_id=ids)
    return str(path)


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    from flows.flows import label_flow
    from flows.recipes import ensure_teacher
    from pipeline.data.datasets import load_digits8

    root = tmp_path_factory.mktemp("lineage")
    d = load_digits8()
    npz = _write_npz(root / "data" / "digits_npz.npz", d.x, d.y, d.sample_ids)
    # the same sample ids, other pixels: the top-left pixel of every image brightened
    x2 = d.x.copy()
    x2[:, 0, 0, 0] += 0.5
    altered = _write_npz(root / "altered" / "digits_npz.npz", x2, d.y, d.sample_ids)
    overrides = [f"runs_dir={root / 'runs'}", f"data.dataset={npz}"]
    cfg = load_config(TINY, overrides)
    teacher = ensure_teacher(cfg)
    labels = label_flow(TINY, overrides)
    return {
        "root": root,
        "npz": npz,
        "altered": altered,
        "overrides": overrides,
        "cfg": cfg,
        "teacher": teacher,
        "uri": labels["datasets"]["dense"]["uri"],
    }


def _keep_teacher(run):
    # the fixture's teacher as a given checkpoint: exempt from the teacher's lineage check,
    # so these tests reach the labels' check
    return [f"teacher.checkpoint={run['teacher']['checkpoint']}", f"label.uri={run['uri']}"]


def test_same_ids_changed_inputs_are_refused(npz_run, tmp_path, capsys):
    from flows.classify import LabelLineageError, check_label_lineage
    from flows.cli import main
    from flows.recipes import student_runs, train_student

    uri = npz_run["uri"]
    cfg = load_config(TINY, [f"runs_dir={tmp_path}", f"data.dataset={npz_run['altered']}", *_keep_teacher(npz_run)])
    run = [r for r in student_runs(cfg) if r["loss"] != "ce"][0]
    with pytest.raises(LabelLineageError) as e:
        train_student(cfg, npz_run["teacher"], run)
    msg = str(e.value)
    assert f"refusing the soft labels at {uri}" in msg and "data.fingerprint differs" in msg
    assert "the same split of 'digits_npz'" in msg and "other images or labels" in msg
    # same ids: no coverage complaint, only the inputs differ
    assert "no stored label" not in msg and "not in this config's label split" not in msg
    # the unchanged file passes
    check_label_lineage(
        load_config(TINY, [f"runs_dir={tmp_path}", f"data.dataset={npz_run['npz']}", *_keep_teacher(npz_run)]), uri
    )
    # the CLI: one line, exit 1, nothing trained
    capsys.readouterr()
    assert (
        main(
            [
                "students",
                TINY,
                f"runs_dir={tmp_path}",
                f"data.dataset={npz_run['altered']}",
                *_keep_teacher(npz_run),
                *SMALL,
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert f"distill: LabelLineageError: refusing the soft labels at {uri}" in err and "data.fingerprint" in err
    assert not (tmp_path / "tiny" / "students").exists()


def test_enlarged_label_split_is_refused(npz_run, tmp_path):
    from flows.classify import LabelLineageError
    from flows.recipes import student_runs, train_student

    uri = npz_run["uri"]
    cfg = load_config(
        TINY, [*npz_run["overrides"], f"runs_dir={tmp_path}", "data.sizes.train=700", *_keep_teacher(npz_run)]
    )
    run = [r for r in student_runs(cfg) if r["loss"] != "ce"][0]
    with pytest.raises(LabelLineageError) as e:
        train_student(cfg, npz_run["teacher"], run)
    msg = str(e.value)
    assert uri in msg and "data.fingerprint differs" in msg and "'train': 700" in msg
    assert "100 of the 700 samples of this config's label split 'train' have no stored label" in msg
    assert not (tmp_path / "tiny" / "students").exists()


def test_views_that_differ_from_the_stored_transform_are_refused(npz_run, tmp_path, capsys):
    from flows.classify import LabelLineageError, check_label_lineage
    from flows.cli import main

    uri = npz_run["uri"]
    m = storage.open_soft_labels(uri).manifest
    assert m["num_views"] == 2 and m["data"]["transform"] == {"shift": 1, "hflip": False, "noise_std": 0.0, "seed": 0}
    for views, want in (
        (["views.shift=2"], ["views.shift: stored 1, config 2"]),
        (
            ["views.num_views=3", "views.seed=5"],
            ["views.num_views: stored 2, config 3", "views.seed: stored 0, config 5"],
        ),
        (["views.hflip=true"], ["views.hflip: stored False, config True"]),
    ):
        cfg = load_config(TINY, [*npz_run["overrides"], *views, *_keep_teacher(npz_run)])
        with pytest.raises(LabelLineageError) as e:
            check_label_lineage(cfg, uri)
        msg = str(e.value)
        assert uri in msg and all(w in msg for w in want), msg
        assert "data.fingerprint" not in msg  # only the views are wrong
    capsys.readouterr()
    assert (
        main(
            [
                "students",
                TINY,
                f"runs_dir={tmp_path}",
                *npz_run["overrides"][1:],
                "views.shift=2",
                *_keep_teacher(npz_run),
                *SMALL,
            ]
        )
        == 1
    )
    err = capsys.readouterr().err
    assert "distill: LabelLineageError:" in err and "views.shift: stored 1, config 2" in err
    assert not (tmp_path / "tiny" / "students").exists()


def _train_files(cfg):
    return {p.name: p.stat().st_mtime_ns for p in (cfg.run_dir() / "students").glob("*.train.pt")}


def test_students_resume_only_their_own_lineage(npz_run, capsys):
    """Same config twice: the second sweep reuses the finished students. data.seed=1 with labels
    of that split, in the same runs directory: every student trains again, evaluated on the new split."""
    from flows.flows import label_flow, students_flow
    from flows.inputs import eval_split, splits
    from flows.recipes import student_runs, train_student
    from pipeline.evaluate import evaluate
    from pipeline.models.checkpoint import load_model

    base = [*npz_run["overrides"], *SMALL]
    cfg0 = load_config(TINY, base)
    first = {s["name"]: s for s in students_flow(TINY, base)["students"]}
    log0 = _train_files(cfg0)
    assert len(log0) == 2
    ck = torch.load(cfg0.run_dir() / "students" / "mlp-16-T3-a0.5-kd.train.pt", weights_only=True)
    assert ck["lineage"]["split"]["seed"] == 0 and ck["lineage"]["soft_labels"] == [
        storage.open_soft_labels(npz_run["uri"]).manifest["digest"]
    ]

    # the same config again: resumed complete, nothing trained, the same students
    again = {s["name"]: s for s in students_flow(TINY, base)["students"]}
    assert again.keys() == first.keys()
    assert _train_files(cfg0) == log0
    assert {n: s["accuracy"] for n, s in again.items()} == {n: s["accuracy"] for n, s in first.items()}

    # data.seed=1, relabelled (the fixture's teacher given as a checkpoint), same runs directory
    seed1 = [
        *base,
        "data.seed=1",
        f"label.uri={npz_run['root'] / 'labels-seed1'}",
        f"teacher.checkpoint={npz_run['teacher']['checkpoint']}",
    ]
    label_flow(TINY, seed1)
    cfg1 = load_config(TINY, seed1)
    report = students_flow(TINY, seed1)
    log1 = _train_files(cfg1)
    assert log1.keys() == log0.keys() and all(log1[n] != log0[n] for n in log0)  # rewritten: trained
    test1 = eval_split(cfg1)
    assert not np.array_equal(test1.sample_ids, eval_split(cfg0).sample_ids)
    for s in report["students"]:
        ck = torch.load(s["checkpoint"].replace(".pt", ".train.pt"), weights_only=True)
        assert ck["lineage"]["split"]["seed"] == 1 and ck["epoch"] > 0 and len(ck["history"]) == ck["epoch"]
        # the reported accuracy is the new model's on the new split
        model, _ = load_model(s["checkpoint"])
        assert s["accuracy"] == evaluate(model, test1)["accuracy"]
    # the recipe says why it does not resume: back to data.seed=0, the seed-1 resume file is not continued
    run = [r for r in student_runs(cfg0) if r["loss"] == "ce"][0]
    capsys.readouterr()
    out = train_student(cfg0, npz_run["teacher"], run)
    said = capsys.readouterr().out
    assert f"{run['name']}.train.pt: not resuming, it belongs to another run (" in said
    assert "split.seed" in said and "data.test" in said and "training from scratch" in said
    assert out["epochs_trained"] == out["epochs_run"] > 0
    assert out["accuracy"] == first[run["name"]]["accuracy"]  # the same seed-0 baseline, trained again
    assert splits(cfg0)["test"].fingerprint() != test1.fingerprint()


def test_teacher_of_another_lineage_is_refused_and_retrain_replaces_it(npz_run, tmp_path, capsys):
    from flows.classify import TeacherLineageError, check_teacher_lineage
    from flows.cli import main
    from flows.recipes import ensure_teacher
    from pipeline.models.checkpoint import checkpoint_info

    src = npz_run["cfg"].teacher_path()
    runs = tmp_path / "runs"
    (runs / "tiny").mkdir(parents=True)
    for name in ("teacher.pt", "teacher.pt.train.pt"):  # the finished model and its resume file
        shutil.copy(f"{os.path.dirname(src)}/{name}", runs / "tiny" / name)
    path = str(runs / "tiny" / "teacher.pt")
    ov = [f"runs_dir={runs}", *npz_run["overrides"][1:]]
    lin = checkpoint_info(path)["lineage"]
    assert lin["model"] == {"arch": "cnn", "kwargs": {"channels": [8, 16]}} and lin["views"]["shift"] == 1
    assert json.loads(lin["data"]["split"])["seed"] == 0 and lin["train"]["lr"] == 0.01
    same = ensure_teacher(load_config(TINY, ov))
    assert same["fingerprint"] == npz_run["teacher"]["fingerprint"]

    def refused(*extra):
        with pytest.raises(TeacherLineageError) as e:
            ensure_teacher(load_config(TINY, [*ov, *extra]))
        msg = str(e.value)
        assert f"refusing to reuse the teacher at {path}" in msg
        assert "Delete the file or pass `distill teacher train --retrain`" in msg
        return msg

    msg = refused("data.seed=1")
    assert "train split: the checkpoint was trained on split 'train' cut with data.seed=0" in msg
    assert "this config cuts split 'train' cut with data.seed=1" in msg and "val split" in msg
    assert "teacher.train.lr: checkpoint 0.01, config 0.02" in refused("teacher.train.lr=0.02")
    assert "views.shift: checkpoint 1, config 2" in refused("views.shift=2")
    assert "teacher.model.kwargs.channels: checkpoint [8, 16], config [4, 8]" in refused(
        "teacher.model.kwargs.channels=[4, 8]"
    )
    with pytest.raises(TeacherLineageError, match="same split, other images or labels"):
        check_teacher_lineage(load_config(TINY, [f"runs_dir={runs}", f"data.dataset={npz_run['altered']}"]), path)
    # a given teacher.checkpoint is the user's choice: not checked
    assert ensure_teacher(load_config(TINY, [*ov, "data.seed=1", f"teacher.checkpoint={path}"]))["checkpoint"] == path

    # the CLI: labelling and teacher training refuse in one line; --retrain trains a new teacher
    capsys.readouterr()
    assert main(["label", TINY, *ov, "data.seed=1", f"label.uri={tmp_path / 'l'}"]) == 1
    assert "distill: TeacherLineageError: refusing to reuse the teacher at " + path in capsys.readouterr().err
    assert not (tmp_path / "l").exists()
    assert main(["teacher", "train", TINY, *ov, "data.seed=1"]) == 1
    assert "distill: TeacherLineageError:" in capsys.readouterr().err
    assert main(["teacher", "train", TINY, "--retrain", *ov, "data.seed=1"]) == 0
    info = checkpoint_info(path)
    # really trained on the seed-1 split (not the old resume file continued)
    assert info["fingerprint"] != npz_run["teacher"]["fingerprint"]
    assert json.loads(info["lineage"]["data"]["split"])["seed"] == 1 and info["metrics"]["epochs_run"] == 3
    mtime = os.stat(path).st_mtime_ns
    assert ensure_teacher(load_config(TINY, [*ov, "data.seed=1"]))["fingerprint"] == info["fingerprint"]
    assert os.stat(path).st_mtime_ns == mtime  # reused, not trained again
    assert "data.seed=1" in refused()  # and now the seed-0 config is the one refused


def test_teacher_without_recorded_lineage_is_refused(npz_run, tmp_path):
    from flows.classify import TeacherLineageError
    from flows.recipes import ensure_teacher
    from pipeline.models.checkpoint import load_checkpoint

    payload = load_checkpoint(npz_run["cfg"].teacher_path())
    del payload["metadata"]["lineage"]  # as written before lineage was recorded
    (tmp_path / "tiny").mkdir()
    torch.save(payload, tmp_path / "tiny" / "teacher.pt")
    with pytest.raises(TeacherLineageError, match="records no training lineage"):
        ensure_teacher(load_config(TINY, [f"runs_dir={tmp_path}", *npz_run["overrides"][1:]]))
