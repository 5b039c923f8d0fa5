"""Classifiers: a row is a sample (an image, a text, a table row), a batch is its model
input x (B, ...) as the view names it and its label y (B,) (-1 when unlabelled); the
metric is accuracy, the export safetensors + TorchScript (+ the dynamic-int8 numbers)."""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from pipeline.data.datasets import Source, model_inputs
from pipeline.evaluate import accuracy, evaluate, predict_logits

if TYPE_CHECKING:
    from pipeline.views.base import Transform

_TRACE_LOCK = threading.Lock()  # torch.jit.trace is not safe in concurrent threads


class ClassifyTask:
    name, metric, higher_is_better, unit = "classify", "accuracy", True, "samples"

    def prepare(self) -> None:
        pass

    def labelled(self, data: Source) -> bool:
        return data.y is not None

    def batch(
        self, data: Source, pos: np.ndarray, views: np.ndarray, transform: Transform | None = None
    ) -> dict[str, torch.Tensor]:
        """{"x": the rows' inputs as views `views` name them (B, ...), "y": labels (B,) int64,
        -1 for an unlabelled set}."""
        y = torch.full((len(pos),), -1, dtype=torch.int64) if data.y is None else torch.from_numpy(data.y[pos])
        return {"x": model_inputs(data, pos, views, transform), "y": y}

    def units(self, batch: dict) -> torch.Tensor:
        return batch["weight"].sum()

    def score(self, model: nn.Module, data: Source, *, device: torch.device | str) -> float:
        return accuracy(predict_logits(model, data, device=device), data.y)

    def evaluate(
        self,
        model: nn.Module,
        data: Source,
        *,
        teacher_logits: np.ndarray | None = None,
        device: torch.device | str = "cpu",
    ) -> dict:
        """accuracy, per-class accuracy, ECE, agreement with the teacher, params, size, latency."""
        return evaluate(model, data, teacher_logits=teacher_logits, device=device)

    def export(
        self,
        model: nn.Module,
        out_dir: str,
        name: str,
        example: Source,
        *,
        quantize: bool = False,
        tokenizer_dir: str | None = None,
    ) -> dict:
        """safetensors + TorchScript (traced on two rows of `example`), and with quantize the
        dynamic-int8 model's accuracy, size and latency on `example` (a labelled split)."""
        from pipeline.models.export import compression_report, export_safetensors, export_torchscript

        paths = {
            "safetensors": os.path.join(out_dir, f"{name}.safetensors"),
            "torchscript": os.path.join(out_dir, f"{name}.ts.pt"),
        }
        export_safetensors(model, paths["safetensors"])
        n = min(2, len(example))
        with _TRACE_LOCK:  # students train in parallel threads
            export_torchscript(model, paths["torchscript"], model_inputs(example, np.arange(n), np.zeros(n, np.int64)))
        out: dict = dict(paths)
        if quantize:
            q = compression_report(model, example, example.y, in_shape=example.in_shape)["int8"]
            out["int8"] = {k: q[k] for k in ("accuracy", "size_bytes", "latency_ms")}
        return out
