"""Evaluation: predictions, accuracy, calibration, teacher agreement, a comparison table.

All metrics take logits (N, C) and return plain Python floats/lists, so results go
straight into JSON logs. Metrics compute in fp32 on CPU.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.datasets import Source, model_inputs
from pipeline.models.registry import model_stats


def _tensor(a, dtype=None) -> torch.Tensor:
    t = a if torch.is_tensor(a) else torch.as_tensor(np.asarray(a))
    t = t.detach().cpu()
    return t if dtype is None else t.to(dtype)


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, C), got shape {tuple(logits.shape)}")


def _check_labels(logits: torch.Tensor, y: torch.Tensor) -> None:
    if y.shape != (logits.shape[0],):
        raise ValueError(f"labels must have shape ({logits.shape[0]},), got {tuple(y.shape)}")
    if len(y) and (y.min() < 0 or y.max() >= logits.shape[1]):
        raise ValueError(
            f"labels must be in [0, {logits.shape[1]}), got range "
            f"[{int(y.min())}, {int(y.max())}] (unlabeled rows are -1: drop them first)"
        )


@torch.inference_mode()
def predict_logits(model: nn.Module, x, *, batch_size: int = 512, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits (N, C) float32 on CPU in eval mode, for inputs x (N, ...) or for every row
    (view 0) of a Source (pipeline/data/datasets.py: tokenized, decoded... per batch); the model's
    train/eval mode is restored afterwards."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if hasattr(x, "encode"):  # a Source: rows become inputs batch by batch (dynamic padding)
        src = x
        batches = (
            model_inputs(
                src, np.arange(i, min(i + batch_size, len(src))), np.zeros(min(batch_size, len(src) - i), np.int64)
            )
            for i in range(0, len(src), batch_size)
        )
    else:
        x = _tensor(x, torch.float32)
        batches = (x[i : i + batch_size] for i in range(0, len(x), batch_size))
    was_training = model.training
    model.eval()
    try:
        outs = [model(xb.to(device)).float().cpu() for xb in batches]
    finally:
        model.train(was_training)
    if not outs:
        raise ValueError("predict_logits: x has no rows")
    return torch.cat(outs)


def accuracy(logits, y) -> float:
    logits, y = _tensor(logits, torch.float32), _tensor(y, torch.int64)
    _check_logits("logits", logits)
    _check_labels(logits, y)
    if len(y) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((logits.argmax(1) == y).double().mean())


def per_class_accuracy(logits, y, num_classes: int | None = None) -> list[float | None]:
    """Recall per class c = #(pred == y == c) / #(y == c); None for classes with no samples."""
    logits, y = _tensor(logits, torch.float32), _tensor(y, torch.int64)
    _check_logits("logits", logits)
    _check_labels(logits, y)
    C = logits.shape[1] if num_classes is None else int(num_classes)
    correct = torch.bincount(y[logits.argmax(1) == y], minlength=C).double()
    total = torch.bincount(y, minlength=C).double()
    return [float(correct[c] / total[c]) if total[c] > 0 else None for c in range(C)]


def agreement(student_logits, teacher_logits) -> float:
    """Top-1 agreement: fraction of rows where student and teacher predict the same class."""
    s, t = _tensor(student_logits, torch.float32), _tensor(teacher_logits, torch.float32)
    _check_logits("student_logits", s)
    if s.shape != t.shape:
        raise ValueError(f"student_logits {tuple(s.shape)} and teacher_logits {tuple(t.shape)} must match")
    return float((s.argmax(1) == t.argmax(1)).double().mean())


def expected_calibration_error(logits, y, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017, "On Calibration of Modern Neural Networks"):
        ECE = sum_m |B_m| / N * |acc(B_m) - conf(B_m)|
    with confidence = max softmax probability and M equal-width bins
    B_m = ((m-1)/M, m/M]. Empty bins contribute 0."""
    if not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    logits, y = _tensor(logits, torch.float32), _tensor(y, torch.int64)
    _check_logits("logits", logits)
    _check_labels(logits, y)
    if len(y) == 0:
        raise ValueError("ECE of an empty set is undefined")
    conf, pred = torch.softmax(logits.double(), dim=1).max(1)  # (N,), (N,)
    correct = (pred == y).double()
    # bin m (0-based) holds conf in (m/M, (m+1)/M]: index = ceil(conf*M) - 1
    idx = (torch.ceil(conf * n_bins) - 1).clamp(0, n_bins - 1).long()
    acc_sum = torch.bincount(idx, weights=correct, minlength=n_bins)
    conf_sum = torch.bincount(idx, weights=conf, minlength=n_bins)
    return float(((acc_sum - conf_sum).abs()).sum() / len(y))  # |B|/N * |acc-conf| = |sum(correct-conf)|/N


def evaluate(
    model: nn.Module,
    ds: Source,
    *,
    teacher_logits=None,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    n_bins: int = 15,
    stats: bool = True,
    latency_repeats: int = 20,
) -> dict:
    """accuracy, per_class_accuracy, ece, agreement (if teacher_logits (N, C) are given,
    rows in ds order), and params / size_bytes / latency_ms (CPU, batch 1) when stats=True."""
    if ds.y is None:
        raise ValueError(f"dataset {ds.name!r} has no labels; evaluation needs a labeled split")
    logits = predict_logits(model, ds, batch_size=batch_size, device=device)
    out = {
        "num_samples": len(ds),
        "accuracy": accuracy(logits, ds.y),
        "per_class_accuracy": per_class_accuracy(logits, ds.y, ds.num_classes),
        "ece": expected_calibration_error(logits, ds.y, n_bins),
    }
    if teacher_logits is not None:
        t = _tensor(teacher_logits, torch.float32)
        if t.shape != logits.shape:
            raise ValueError(
                f"teacher_logits must be {tuple(logits.shape)} (rows of {ds.name!r} in order), got {tuple(t.shape)}"
            )
        out["agreement"] = agreement(logits, t)
    if stats:
        was = next(model.parameters(), torch.empty(0)).device
        out.update(model_stats(model.cpu(), example=model_inputs(ds, [0], [0]), repeats=latency_repeats))
        model.to(was)
    return out
