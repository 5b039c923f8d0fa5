"""Students under torchrun (flows/ddp.py, 2 ranks, gloo on the CPU) for both tasks, through
the very recipe the flows run: every stored row (a classifier's (sample, view), a language
model's window) is trained on exactly once per epoch over the ranks, the ranks step in lock
step, and rank 0 writes the same checkpoint a `distill students` would reuse."""

import collections
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml
from conftest import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _label(path: str, overrides: list[str]):
    """Teacher and labels by the recipes, in this process (no Prefect)."""
    from flows.config import load_config
    from flows.recipes import ensure_teacher, finalize_labels, label_one_shard, plan_labels

    cfg = load_config(path, overrides)
    teacher = ensure_teacher(cfg)
    for p in plan_labels(cfg, teacher)["pending"]:
        label_one_shard(cfg, teacher, p["shard"])
    finalize_labels(cfg, teacher)
    return cfg


def _torchrun(path: str, overrides: list[str], student: str, rec) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={_port()}",
        "-m",
        "flows.ddp",
        path,
        *overrides,
        "--student",
        student,
        "--record-ids",
        str(rec),
        "--threads",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return {r: [json.loads(x) for x in open(rec / f"{student}.rank{r}.jsonl")] for r in (0, 1)}


def _each_once(rows: dict, epochs: int, expected: collections.Counter) -> int:
    for epoch in range(epochs):
        steps = [sum(b["epoch"] == epoch for b in rows[r]) for r in (0, 1)]
        assert steps[0] == steps[1] > 0  # lock-step ranks: no DDP hang
        seen = collections.Counter()
        for r in (0, 1):
            for b in rows[r]:
                if b["epoch"] == epoch:
                    seen.update((s, v) for s, v, w in zip(b["sample_id"], b["view"], b["weight"]) if w == 1)
        assert seen == expected, epoch
    return steps[0]


def test_classifier_students_on_two_ranks(tmp_path):
    over = [
        f"runs_dir={tmp_path / 'runs'}",
        "students.models=[{name: mlp-16, arch: mlp, kwargs: {width: 16}}]",
        "students.train.epochs=2",
        "students.quantize=false",
        "students.export=false",
    ]
    cfg = _label(TINY, over)
    from flows.inputs import splits

    train = splits(cfg)["train"]
    expected = collections.Counter((int(s), v) for s in train.sample_ids for v in (0, 1))
    for student in ("mlp-16-T3-a0.5-kd", "mlp-16-baseline"):
        rows = _torchrun(TINY, over, student, tmp_path / "ids")
        result = json.loads((cfg.run_dir() / "students" / f"{student}.result.json").read_text())
        if student.endswith("kd"):  # every stored (sample, view) once per epoch
            steps = _each_once(rows, 2, expected)
            assert result["epochs_run"] == 2 and result["steps"] == 2 * steps
        else:  # the baseline: every labelled image once per epoch, one view each
            assert result["epochs_run"] == 4  # the fairness rule: as many steps as the KD student
            for epoch in range(4):
                ids = [
                    s
                    for r in (0, 1)
                    for b in rows[r]
                    if b["epoch"] == epoch
                    for s, w in zip(b["sample_id"], b["weight"])
                    if w == 1
                ]
                assert sorted(ids) == sorted(train.sample_ids.tolist())
        assert os.path.exists(result["checkpoint"]) and 0 <= result["accuracy"] <= 1


def test_language_model_students_on_two_ranks(tmp_path):
    from test_lm_recipe import lm_config

    path = lm_config(
        tmp_path,
        students={
            "models": [{"name": "s1", "arch": "llama", "kwargs": {"layers": 1, "hidden": 16, "heads": 2}}],
            "losses": ["topk_kl"],
            "temperatures": [1.0],
            "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "device": "cpu"},
        },
    )
    cfg = _label(path, [])
    expected = collections.Counter((w, 0) for w in range(cfg.corpus.sizes["train"]))
    from flows.lm import splits

    expected = collections.Counter((int(s), 0) for s in splits(cfg)["train"].sample_ids)
    rows = _torchrun(path, [], "s1-T1-a0.5-topk_kl", tmp_path / "ids")
    steps = _each_once(rows, 2, expected)  # every train window once per epoch over the ranks
    result = json.loads((cfg.run_dir() / "students" / "s1-T1-a0.5-topk_kl.result.json").read_text())
    assert result["epochs_run"] == 2 and result["steps"] == 2 * steps and result["perplexity"] > 1
    assert result["units"] == 2 * 24 * 16  # every token of every window, each epoch
    assert os.path.isdir(result["hf_dir"])
    # a later `distill students` reuses it: the checkpoint is complete, nothing is trained again
    from flows.recipes import ensure_teacher, student_runs, train_student

    run = next(r for r in student_runs(cfg) if r["name"] == "s1-T1-a0.5-topk_kl")
    again = train_student(cfg, ensure_teacher(cfg), run)
    assert again["epochs_trained"] == 0 and again["perplexity"] == result["perplexity"]
    yaml.safe_load(open(path))  # the config stayed as written
