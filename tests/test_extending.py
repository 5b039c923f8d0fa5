"""The walk of docs/architecture.md, done: a new loss registered from this test module (no
file of distillery touched) is accepted by the config, trains a student through the one
training loop, and its logged term is its formula over the stored rows, computed here by
hand; a new task's data source only needs a `task` name the registry knows."""

import json

import numpy as np
import pytest
import torch

from pipeline.objectives.checks import row_mean
from pipeline.objectives.dense import rescale
from pipeline.objectives.losses import LOSSES, register_loss


@pytest.fixture
def l1_probs():
    """|p − q|₁ between the teacher's and the student's class probabilities at T' (a toy)."""

    @register_loss("l1_probs", labels=("dense",))
    def loss(z, t, *, temperature, weights, chunk_size):
        p = torch.softmax(rescale(t["teachers"][0], t["stored_temperatures"][0], temperature).float(), -1)
        q = torch.softmax(z.float() / temperature, -1)
        return row_mean((p - q).abs().sum(-1), weights)

    yield "l1_probs"
    LOSSES.pop("l1_probs")


def test_a_loss_registered_from_outside_trains_a_student(l1_probs, tmp_path):
    from conftest import TINY, write_toy

    from flows.config import ConfigError, load_config
    from pipeline.data.datasets import ArrayDataset
    from pipeline.models.registry import build_model
    from pipeline.training.config import TrainConfig
    from pipeline.training.loop import train
    from pipeline.training.stream import open_label_stream

    # the config knows it once it is registered (a classifier storing dense labels)
    assert load_config(TINY, ["students.losses=[l1_probs]"]).student_losses() == ["l1_probs"]
    # data whose rows the toy store labels: 200 samples, 10 classes
    rng = np.random.default_rng(0)
    data = ArrayDataset("toy", rng.random((200, 6), dtype=np.float32), rng.integers(0, 10, 200), np.arange(200), 10)
    uri = str(tmp_path / "labels")
    write_toy(uri, n=200, c=10, temperature=4.0)
    torch.manual_seed(0)
    model = build_model({"arch": "mlp", "kwargs": {"width": 8, "depth": 1}}, in_shape=(6,), num_classes=10)
    log = tmp_path / "log.jsonl"
    cfg = TrainConfig(
        loss="l1_probs", temperature=2.0, epochs=1, batch_size=64, lr=0.0, device="cpu", log_path=str(log)
    )
    # the store was written with another data fingerprint than this toy set: no expect= here
    out = train(model, cfg, train_data=data, labels=uri)
    assert out["epochs_run"] == 1 and out["steps"] == 4
    # lr 0: the logged term is the formula's mean over every stored row, by hand (float64)
    total, n = 0.0, 0
    for b in open_label_stream(uri, data, batch_size=64):
        with torch.no_grad():
            s = model.eval()(b["x"]).double().numpy() / 2.0
        zs = b["stored_logits"].double().numpy() * 4.0 / 2.0
        p = np.exp(zs - zs.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        q = np.exp(s - s.max(-1, keepdims=True))
        q /= q.sum(-1, keepdims=True)
        keep = b["weight"].numpy() > 0
        total += np.abs(p - q).sum(-1)[keep].sum()
        n += keep.sum()
    rec = json.loads(log.read_text().splitlines()[-1])
    assert rec["kd_loss"] == pytest.approx(total / n, rel=1e-5) and rec["train_loss"] == rec["kd_loss"]
    LOSSES.pop("l1_probs")
    with pytest.raises(ConfigError, match="l1_probs"):
        load_config(TINY, ["students.losses=[l1_probs]"])
    register_loss("l1_probs", labels=("dense",))(lambda *a, **k: None)  # the fixture removes it again


def test_the_task_of_a_source_is_named_by_the_source():
    from pipeline.data.datasets import ArrayDataset
    from pipeline.tasks import TASKS, task_of

    ds = ArrayDataset("toy", np.zeros((2, 3), np.float32), np.zeros(2, np.int64), np.arange(2), 2)
    assert task_of(ds) is TASKS["classify"]
    ds.task = "segmentation"
    with pytest.raises(ValueError, match="names task 'segmentation'; known: \\['classify', 'lm'\\]"):
        task_of(ds)
