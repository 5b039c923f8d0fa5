"""The text transfer-set recipe end to end on tiny assets: a Parquet review table streamed
through the tokenizer, a (tiny, random) Hugging Face encoder fine-tuned with frozen lower
layers, token-masking views, stored labels, two token students and their baselines, and
`distill inspect --replay` recomputing stored rows with the teacher."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from _tiny_hf import tiny_encoder

import storage

pytestmark = pytest.mark.usefixtures("prefect_harness")

POS = "love great perfect soft beautiful comfortable nice good".split()
NEG = "hate poor cheap ugly tight bad return loose".split()
FILL = "the a dress top skirt fit size fabric color it was very".split()


def reviews_table(path, n=400, seed=0):
    """Reviews whose sentiment words decide the label (plus filler and a few null texts)."""
    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for i in range(n):
        pos = bool(rng.integers(2))
        words = list(rng.choice(FILL, rng.integers(3, 9))) + list(rng.choice(POS if pos else NEG, rng.integers(1, 4)))
        rng.shuffle(words)
        texts.append(None if i % 50 == 7 else " ".join(words))
        labels.append("positive" if pos else "negative")
    pq.write_table(pa.table({"Review Text": texts, "Sentiment": labels}), path, row_group_size=128)
    return path


def text_config(tmp_path, **over):
    enc = tiny_encoder(tmp_path / "encoder")
    table = reviews_table(tmp_path / "reviews.parquet")
    cfg = {
        "name": "tinytext",
        "runs_dir": str(tmp_path / "runs"),
        "data": {
            "source": {
                "kind": "parquet",
                "path": str(table),
                "text_column": "Review Text",
                "label_column": "Sentiment",
            },
            "tokenizer": {"path": str(enc), "max_length": 16},
            "sizes": {"train": 60, "transfer": 200, "val": 40, "test": 80},
            "seed": 0,
            "label_split": "transfer",
        },
        "views": {"num_views": 2, "transform": {"kind": "tokens", "mask_prob": 0.15}},
        "teacher": {
            "model": {
                "name": "tiny-bert",
                "arch": "hf-encoder",
                "kwargs": {"path": str(enc), "freeze_embeddings": True, "freeze_layers": 1},
            },
            "train": {"epochs": 8, "lr": 0.003, "batch_size": 16, "device": "cpu"},
        },
        "label": {
            "backend": "parquet",
            "temperature": 2.0,
            "shard_size": 100,
            "device": "cpu",
            "batch_size": 64,
            "runner": {"kind": "thread", "max_workers": 1},
        },
        "students": {
            "models": [
                {"name": "bag", "arch": "bag", "kwargs": {"dim": 16, "hidden": 16}},
                {
                    "name": "tfm",
                    "arch": "transformer",
                    "kwargs": {"d_model": 16, "nhead": 2, "dim_feedforward": 32, "layers": 1},
                },
            ],
            "temperatures": [2.0],
            "alphas": [0.0],
            "losses": ["kd"],
            "baseline": True,
            "quantize": False,
            "train": {"epochs": 2, "lr": 0.01, "batch_size": 32, "device": "cpu"},
            "max_parallel": 1,
        },
    }
    for k, v in over.items():
        cfg[k] = v
    path = tmp_path / "text.yaml"
    # sort_keys=False: data.sizes stays in the reviews recipe's order (train, transfer, val,
    # test), not alphabetical, as a user writes it; --replay must cut the same splits
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    from flows.flows import distill_flow

    tmp = tmp_path_factory.mktemp("text")
    path = text_config(tmp)
    report = distill_flow(str(path), [])
    return {"tmp": tmp, "config": path, "report": report}


def test_text_recipe_end_to_end(text_run):
    from flows.config import load_config

    cfg = load_config(text_run["config"])
    rep = json.loads((cfg.run_dir() / "report.json").read_text())
    t = rep["teacher"]
    assert t["arch"]["arch"] == "hf-encoder" and t["arch"]["kwargs"]["path"].endswith("encoder")
    # embeddings + layer 0 frozen: fewer parameters trained than the model has
    assert 0 < t["trained_params"] < t["params"]
    names = sorted(s["name"] for s in rep["students"])
    assert names == ["bag-T2-a0-kd", "bag-baseline", "tfm-T2-a0-kd", "tfm-baseline"]
    for s in rep["students"]:
        assert 0.0 <= s["accuracy"] <= 1.0 and os.path.exists(s["checkpoint"])
    m = storage.open_soft_labels(cfg.soft_label_uri(), verify=True).manifest
    assert m["num_samples"] == 200 and m["num_views"] == 2 and m["num_classes"] == 2
    assert m["data"]["transform"]["kind"] == "tokens" and m["data"]["transform"]["mask_prob"] == 0.15
    inp = m["data"]["inputs"]
    assert inp["kind"] == "tokens" and inp["max_length"] == 16 and len(inp["tokenizer"]["fingerprint"]) == 64


def test_replay_matches_and_refuses_a_changed_teacher(text_run, capsys, tmp_path):
    """--replay recomputes stored rows (token ids, masking views) with the recorded teacher:
    they match; a teacher file with other weights at the recorded path is refused (its
    checkpoint fingerprint), not silently replayed. (Rows that do not match: test_replay.py.)"""
    import shutil

    import torch

    from flows.cli import main
    from flows.config import load_config
    from pipeline.models.checkpoint import load_checkpoint

    cfg = load_config(text_run["config"])
    uri = cfg.soft_label_uri()
    assert main(["inspect", uri, "--replay", "16"]) == 0
    out = capsys.readouterr().out
    assert "16 rows recomputed" in out and ": match" in out and "tokens, tokenizer" in out
    # the same architecture with perturbed weights at the recorded path: a different teacher
    path = cfg.teacher_path()
    shutil.copy(path, tmp_path / "teacher.bak")
    try:
        payload = load_checkpoint(path)
        torch.manual_seed(1)
        for v in payload["state_dict"].values():
            if v.is_floating_point():
                v.add_(torch.randn_like(v) * 0.5)
        torch.save(payload, path)
        assert main(["inspect", uri, "--replay", "16"]) == 1
        assert "file modified or corrupt" in capsys.readouterr().err
    finally:
        shutil.copy(tmp_path / "teacher.bak", path)


def test_a_student_with_another_tokenizer_is_refused(text_run, tmp_path, capsys):
    """The tokenizer is part of the inputs' lineage: other token ids, other inputs."""
    from flows.cli import main

    other = tiny_encoder(tmp_path / "other", words=["zebra", "quartz"] + list(POS + NEG))
    rc = main(["students", str(text_run["config"]), f"data.tokenizer.path={other}"])
    err = capsys.readouterr().err
    assert rc != 0 and "fingerprint" in err


def test_a_transfer_file_whose_ids_collide_with_the_labelled_set_is_refused(tmp_path, capsys):
    """An unlabelled pool in a file of its own (data.transfer) is the label split; its sample
    ids must not name samples of data.source, or a stored label would name two reviews."""
    from flows.cli import main
    from flows.config import load_config
    from flows.preflight import preflight

    path = text_config(tmp_path)
    pool = tmp_path / "pool.parquet"
    texts = [" ".join(np.random.default_rng(i).choice(POS + NEG + FILL, 6)) for i in range(150)]
    pq.write_table(pa.table({"Review Text": texts}), pool)
    sizes = "data.sizes={train: 60, val: 40, test: 80}"
    over = [f"data.transfer={{kind: parquet, path: {pool}, text_column: Review Text}}", sizes]
    rc = main(["label", str(path), *over])  # row-index ids 0.. in both files
    err = capsys.readouterr().err
    assert rc == 2 and "share" in err and "sample ids" in err and "id_column" in err
    assert not (tmp_path / "runs" / "tinytext" / "soft_labels").exists()  # nothing written
    # unique ids across the two files: accepted, and the pool is the label split
    pq.write_table(pa.table({"Review Text": texts, "rid": np.arange(10_000, 10_150)}), pool)
    over[0] = f"data.transfer={{kind: parquet, path: {pool}, text_column: Review Text, id_column: rid}}"
    cfg = load_config(path, over)
    preflight(cfg)
    from flows import inputs

    s = inputs.splits(cfg)
    assert len(s["transfer"]) == 150 and s["transfer"].y is None and len(s["train"]) == 60


@pytest.mark.parametrize(
    "override,needle",
    [
        ("teacher.model.kwargs.path={tmp}/nope", "teacher.model.kwargs.path"),
        ("data.source.text_column=Review", "'Review'"),
        ("data.tokenizer.path={tmp}/big", "different tokenizer"),
        ("views.transform={{kind: tokens, mask_prob: 1.5}}", "mask_prob"),
    ],
)
def test_bad_text_inputs_stop_before_anything_is_written(tmp_path, capsys, override, needle):
    """A missing model directory, a text column that does not exist, a tokenizer that does
    not match the model, a bad view: exit 2 naming the problem, and no run directory."""
    from _tiny_hf import tiny_tokenizer

    from flows.cli import main

    path = text_config(tmp_path)
    tiny_tokenizer(tmp_path / "big", words=[f"w{i}" for i in range(200)])  # 205 tokens > the model's 45
    rc = main(["run", str(path), override.format(tmp=tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and needle in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_ddp_text_student_from_the_stored_labels(text_run, tmp_path):
    """torchrun with 2 ranks trains a token student from the recipe's stored labels, its
    inputs streamed from the same Parquet table through the same tokenizer."""
    import socket
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = text_run["tmp"]
    runs = tmp / "runs"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        "-m",
        "flows.ddp",
        str(text_run["config"]),
        f"runs_dir={tmp_path}",
        f"label.uri={runs / 'tinytext' / 'soft_labels'}",
        f"teacher.checkpoint={runs / 'tinytext' / 'teacher.pt'}",
        "--student",
        "bag-T2-a0-kd",
        "--threads",
        "1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    out = tmp_path / "tinytext" / "students"
    result = json.load(open(out / "bag-T2-a0-kd.result.json"))
    assert result["epochs_run"] == 2 and result["best_val"] is not None and 0 <= result["accuracy"] <= 1
    assert os.path.exists(out / "bag-T2-a0-kd.pt")


def test_dataloader_workers_tokenize_in_parallel(text_run):
    """Text is tokenized (and viewed) in DataLoader workers started with forkserver: the
    source pickles small, and every (sample_id, view) gets the same token ids as in-process."""
    import pickle

    import torch
    from torch.utils.data import DataLoader

    from flows import inputs
    from flows.config import load_config
    from pipeline.training.stream import keep_batch, open_label_stream

    cfg = load_config(text_run["config"])
    inputs = inputs.splits(cfg)["transfer"]
    assert len(pickle.dumps(inputs)) < 200_000  # the mapped table stays behind
    stream = open_label_stream(cfg.soft_label_uri(), inputs, batch_size=32, shuffle=False)

    def rows(batches):
        out = {}
        for b in batches:
            x = torch.as_tensor(b["x"])
            for sid, v, w, ids in zip(b["sample_id"].tolist(), b["view"].tolist(), b["weight"].tolist(), x):
                if w:
                    out[(sid, v)] = [t for t in ids.tolist() if t != 0]  # pad id 0: per-batch padding differs
        return out

    here = rows(stream)
    stream.worker_numpy = True
    loader = DataLoader(
        stream, batch_size=None, num_workers=2, multiprocessing_context="forkserver", collate_fn=keep_batch
    )
    there = rows(loader)
    assert len(here) == 400 and here == there
    assert any(4 in ids for (s, v), ids in here.items() if v == 1)  # view 1 masks some words ([MASK] = 4)
