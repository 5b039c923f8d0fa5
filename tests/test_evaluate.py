"""Metrics against hand-computed values."""

import math

import numpy as np
import pytest
import torch

from flows.report import format_table
from pipeline.data.datasets import ArrayDataset
from pipeline.evaluate import (
    accuracy,
    agreement,
    evaluate,
    expected_calibration_error,
    per_class_accuracy,
    predict_logits,
)
from pipeline.models.registry import build_model


def logits_for(conf_pred):
    """Two-class logits whose softmax max is `conf` on class `pred`: log-probabilities."""
    rows = []
    for conf, pred in conf_pred:
        p = [1 - conf, 1 - conf]
        p[pred] = conf
        rows.append([math.log(v) for v in p])
    return torch.tensor(rows)


def test_ece_hand_computed():
    # confidences .95 .95 .65 .75 -> bins (0.9,1], (0.9,1], (0.6,0.7], (0.7,0.8] with 10 bins
    logits = logits_for([(0.95, 0), (0.95, 1), (0.65, 0), (0.75, 1)])
    y = torch.tensor([0, 0, 0, 1])  # correct, wrong, correct, correct
    # bin (0.9,1]: 2/4 * |0.5 - 0.95| = 0.225; (0.6,0.7]: 1/4 * |1 - 0.65| = 0.0875; (0.7,0.8]: 1/4 * 0.25
    want = 0.225 + 0.0875 + 0.0625  # = 0.375, up to float32 logits
    assert expected_calibration_error(logits, y, n_bins=10) == pytest.approx(want, abs=1e-6)
    # one bin: |overall accuracy - mean confidence| = |0.75 - 0.825|
    assert expected_calibration_error(logits, y, n_bins=1) == pytest.approx(0.075, abs=1e-6)
    # perfectly calibrated within a bin: conf 0.75 and 3 of 4 right
    cal = logits_for([(0.75, 0)] * 4)
    assert expected_calibration_error(cal, torch.tensor([0, 0, 0, 1]), n_bins=15) == pytest.approx(0.0, abs=1e-6)


def test_ece_matches_reference_loop():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 7, generator=g) * 3
    y = torch.randint(0, 7, (500,), generator=g)
    p = torch.softmax(logits.double(), 1)
    conf, pred = p.max(1)
    ece = 0.0
    for m in range(15):
        lo, hi = m / 15, (m + 1) / 15
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.double().mean() * abs((pred[sel] == y[sel]).double().mean() - conf[sel].mean())
    assert expected_calibration_error(logits, y) == pytest.approx(float(ece), abs=1e-12)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(logits, y, n_bins=0)


def test_accuracy_agreement_per_class():
    logits = torch.tensor([[2.0, 0, 0], [0, 2.0, 0], [0, 2.0, 0], [2.0, 0, 0], [0, 0, 2.0]])
    y = torch.tensor([0, 1, 0, 0, 1])  # preds 0 1 1 0 2
    assert accuracy(logits, y) == pytest.approx(3 / 5)
    # class 0: 2 of 3 right; class 1: 1 of 2; class 2: no samples
    assert per_class_accuracy(logits, y) == [pytest.approx(2 / 3), 0.5, None]
    teacher = torch.tensor([[1.0, 0, 0], [0, 0, 1.0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0]])  # 0 2 1 1 2
    assert agreement(logits, teacher) == pytest.approx(3 / 5)
    assert agreement(np.asarray(logits), teacher.numpy()) == pytest.approx(3 / 5)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 3\)"):
        accuracy(logits, torch.tensor([0, 1, 0, 0, 3]))
    with pytest.raises(ValueError, match="must match"):
        agreement(logits, teacher[:, :2])


def test_predict_and_evaluate_and_report():
    torch.manual_seed(0)
    model = build_model(
        {"arch": "mlp", "kwargs": {"width": 8, "depth": 1, "dropout": 0.5}}, in_shape=(4,), num_classes=3
    )
    rng = np.random.default_rng(0)
    ds = ArrayDataset("tab", rng.random((50, 4), dtype=np.float32), rng.integers(0, 3, 50), np.arange(50), 3)
    model.train()
    full = predict_logits(model, ds.x, batch_size=512)
    assert model.training  # mode restored
    # eval mode: no dropout, so batching changes nothing beyond float rounding
    torch.testing.assert_close(full, predict_logits(model, ds.x, batch_size=7), rtol=1e-5, atol=1e-6)
    assert full.shape == (50, 3) and full.dtype == torch.float32
    r = evaluate(model, ds, teacher_logits=full, latency_repeats=2)
    assert r["accuracy"] == accuracy(full, ds.y) and r["agreement"] == 1.0
    assert len(r["per_class_accuracy"]) == 3 and 0 <= r["ece"] <= 1
    assert r["params"] == sum(p.numel() for p in model.parameters()) and r["size_bytes"] > 0
    assert r["latency_ms"] > 0
    with pytest.raises(ValueError, match="no labels"):
        evaluate(model, ArrayDataset("u", ds.x, None, ds.sample_ids, 3))
    report = format_table(
        [
            {"name": "teacher", "accuracy": 0.981, "params": 1_200_000, "size_bytes": 4_800_000, "latency_ms": 1.5},
            {
                "name": "student-kd",
                "accuracy": 0.95,
                "agreement": 0.962,
                "params": 25_000,
                "size_bytes": 100_000,
                "latency_ms": 0.1,
                "baseline": 0.93,
            },
        ]
    )
    lines = report.splitlines()
    assert len(lines) == 4 and lines[0].split() == ["name", "acc", "agree", "params", "size", "latency", "baseline"]
    assert "student-kd" in lines[3] and "96.20%" in lines[3] and "93.00%" in lines[3] and "25.0K" in lines[3]
    assert "1.20M" in lines[2] and lines[2].split()[2] == "-"  # no agreement for the teacher itself
