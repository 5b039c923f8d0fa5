"""The one student recipe (pipeline/training/student.py, through flows/recipes.py
train_student): the flows and the torchrun entry flows/ddp.py both call it, so their
checkpoints carry the same metadata shape; the baseline fairness rule; the teacher's
evaluation-logit cache."""

import numpy as np
import pytest
import torch
from conftest import TINY

import storage
from flows.config import load_config

FAST = [
    "students.models=[{name: mlp-16, arch: mlp, kwargs: {width: 16, depth: 1}}]",
    "students.quantize=false",
    "students.export=false",
    "students.train.epochs=1",
]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A teacher and its soft labels for the tiny config, made by the recipes (no Prefect)."""
    from flows.recipes import ensure_teacher, finalize_labels, label_one_shard, plan_labels

    root = tmp_path_factory.mktemp("student")
    cfg = load_config(TINY, [f"runs_dir={root / 'runs'}", *FAST])
    teacher = ensure_teacher(cfg)
    for p in plan_labels(cfg, teacher)["pending"]:
        label_one_shard(cfg, teacher, p["shard"])
    return {"root": root, "cfg": cfg, "teacher": teacher, "uri": finalize_labels(cfg, teacher)["dense"]["uri"]}


def _ddp(labelled, out, *extra):
    """The torchrun entry in this process (one rank): the tiny config's distilled student,
    in its own runs directory, from the labels and teacher made above."""
    from flows.ddp import main

    results = main(
        [
            TINY,
            f"runs_dir={out}",
            *FAST,
            f"label.uri={labelled['uri']}",
            f"teacher.checkpoint={labelled['teacher']['checkpoint']}",
            "students.train.lr=0.01",
            "--student",
            "mlp-16-T3-a0.5-kd",
            *extra,
        ]
    )
    assert len(results) == 1
    return results[0]


def test_flows_and_ddp_students_share_one_metadata_shape(labelled, tmp_path):
    from flows.recipes import student_runs, train_student
    from pipeline.models.checkpoint import checkpoint_info
    from pipeline.training.student import STUDENT_METADATA_KEYS

    cfg, teacher, uri = labelled["cfg"], labelled["teacher"], labelled["uri"]
    runs = {"hard" if r["loss"] == "ce" else "stored": r for r in student_runs(cfg)}
    flows_out = {mode: train_student(cfg, teacher, run) for mode, run in runs.items()}
    # the adapter's return dict is what reports read
    for out in flows_out.values():
        assert {
            "name",
            "arch_name",
            "mode",
            "accuracy",
            "agreement",
            "ece",
            "params",
            "size_bytes",
            "latency_ms",
            "checkpoint",
            "best_val",
            "epochs_run",
            "epochs_trained",
            "steps",
            "train_seconds",
            "torch_threads",
            "temperature",
            "alpha",
            "loss",
            "seed",
        } <= set(out)
        assert 0 <= out["accuracy"] <= 1 and 0 <= out["agreement"] <= 1
    ddp_out = _ddp(labelled, tmp_path / "ddp")

    stored = checkpoint_info(flows_out["stored"]["checkpoint"])
    hard = checkpoint_info(flows_out["hard"]["checkpoint"])
    ddp = checkpoint_info(ddp_out["checkpoint"])
    keys = set(STUDENT_METADATA_KEYS) | {"fingerprint", "created_at", "arch", "in_shape", "num_classes"}
    assert set(stored) == set(hard) == set(ddp) == keys
    assert stored["role"] == ddp["role"] == hard["role"] == "student"
    # both distilled students name the same labels and teacher the same way
    digest = storage.open_soft_labels(uri).manifest["digest"]
    assert [s["digest"] for s in stored["soft_labels"]] == [s["digest"] for s in ddp["soft_labels"]] == [digest]
    assert stored["soft_labels"][0]["uri"] == ddp["soft_labels"][0]["uri"] == uri
    assert stored["teacher"]["fingerprint"] == ddp["teacher"]["fingerprint"] == teacher["fingerprint"]
    assert stored["data"]["fingerprint"] == ddp["data"]["fingerprint"]  # the same train split
    assert stored["world_size"] == ddp["world_size"] == 1
    assert set(stored["metrics"]) == set(ddp["metrics"]) and ddp["metrics"]["epochs_run"] == 1
    assert stored["lineage"]["soft_labels"] == ddp["lineage"]["soft_labels"] == [digest]
    # the baseline learned from no labels, on the fair number of epochs
    assert hard["soft_labels"] == [] and "soft_labels" not in hard["lineage"]
    from pipeline.training.student import baseline_epochs

    fair = baseline_epochs(1, label_samples=600, num_views=2, labelled_samples=600, batch_size=64)
    assert hard["train_config"]["epochs"] == fair == flows_out["hard"]["epochs_run"] == 2


def test_ddp_entry_resumes_by_lineage(labelled, tmp_path, capsys):
    out = tmp_path / "ddp"
    first = _ddp(labelled, out)
    assert first["epochs_trained"] == 1
    ck = torch.load(first["checkpoint"].replace(".pt", ".train.pt"), weights_only=True)
    assert ck["lineage"]["split"]["seed"] == 0 and ck["lineage"]["teacher"] == labelled["teacher"]["fingerprint"]
    again = _ddp(labelled, out)
    assert again["epochs_trained"] == 0 and again["epochs_run"] == 1  # complete: reused
    capsys.readouterr()
    # another training config (the last override wins): not continued, trained from scratch
    other = _ddp(labelled, out, "students.train.lr=0.02")
    said = capsys.readouterr().out
    assert "not resuming" in said and "train.lr" in said and other["epochs_trained"] == 1


def test_baseline_rule():
    from pipeline.training.config import TrainConfig
    from pipeline.training.student import baseline_config, baseline_epochs

    # label split = labelled split: V x the epochs
    assert baseline_epochs(3, label_samples=600, num_views=2, labelled_samples=600, batch_size=64) == 6
    # scarce labels, large transfer set: many more epochs of the labelled subset
    assert baseline_epochs(2, label_samples=1000, num_views=1, labelled_samples=100, batch_size=100) == 20
    c = baseline_config(
        TrainConfig(epochs=2, batch_size=100, eval_every=1), label_samples=1000, num_views=1, labelled_samples=100
    )
    assert c.epochs == 20 and c.eval_every == 10


def test_teacher_eval_logits_are_cached(labelled, tmp_path):
    from flows.inputs import eval_split
    from pipeline.training.student import teacher_eval_logits

    test = eval_split(labelled["cfg"])
    z = teacher_eval_logits(labelled["teacher"], test, tmp_path)
    assert z.shape == (len(test), 10) and len(list(tmp_path.glob("teacher-eval-logits-*.npy"))) == 1
    bogus = dict(labelled["teacher"], checkpoint=str(tmp_path / "gone.pt"))  # the cache: no load
    assert np.array_equal(teacher_eval_logits(bogus, test, tmp_path), z)
