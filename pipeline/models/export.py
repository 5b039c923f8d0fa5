"""Compression beyond distillation: portable weights, a TorchScript artifact, int8 weights.

- safetensors: the state_dict as a flat, mmap-able, pickle-free file.
- TorchScript: a traced graph that runs without this repo's Python code.
- dynamic int8 quantization (CPU): nn.Linear weights stored as int8, activations
  quantized on the fly per batch. Only nn.Linear layers are converted, so an MLP
  shrinks ~4x while a conv net keeps its convs (and BatchNorm) in float32 and only
  its head shrinks. Quantized models run on CPU only.
"""

from __future__ import annotations

import copy
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn

from pipeline.data.datasets import model_inputs
from pipeline.evaluate import predict_logits
from pipeline.models.registry import model_stats


def export_safetensors(model: nn.Module, path: str) -> int:
    """Write model's state_dict to `path` (.safetensors). Returns the file size in bytes."""
    from safetensors.torch import save_model

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_model(model, path)  # handles shared (tied) tensors, unlike save_file
    return os.path.getsize(path)


def load_safetensors(model: nn.Module, path: str) -> nn.Module:
    """Load weights from `path` into `model` (same architecture, strict). Returns `model`."""
    from safetensors.torch import load_model

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    p = next(iter(model.parameters()), None)
    try:
        load_model(model, path, strict=True, device=str(p.device) if p is not None else "cpu")
    except RuntimeError as e:
        raise ValueError(f"{path} does not fit {type(model).__name__}: {e}") from None
    return model


def export_torchscript(
    model: nn.Module, path: str, example_input: torch.Tensor, *, atol: float = 1e-5
) -> torch.jit.ScriptModule:
    """Trace `model` in eval mode on `example_input` (B, ...), save to `path`, reload it and
    check the reloaded module reproduces model(example_input) within atol. Returns it."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch.jit is deprecated (DeprecationWarning, FutureWarning since torch 2.14) and still works
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            # input checks (a token id range) trace as constants; the reloaded module is compared below
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            traced = torch.jit.trace(model, example_input)
            torch.jit.save(traced, path)
            loaded = torch.jit.load(path, map_location=example_input.device)
            want, got = model(example_input), loaded(example_input)
    finally:
        model.train(was_training)
    if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=0):
        err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
        raise RuntimeError(
            f"TorchScript at {path} does not reproduce the model: output shape "
            f"{tuple(got.shape)} vs {tuple(want.shape)}, max abs diff {err:.3g} > atol {atol}"
        )
    return loaded


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A CPU copy of `model` with every nn.Linear dynamically quantized to int8 (eval mode).

    Conv / BatchNorm layers stay float32 (dynamic quantization covers Linear only)."""
    if not any(isinstance(m, nn.Linear) for m in model.modules()):
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear layer; dynamic int8 quantization would change nothing"
        )
    from torch.ao.quantization import quantize_dynamic

    m = copy.deepcopy(model).cpu().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.ao.quantization -> torchao, still works
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for a in range(0, len(x), batch_size):
            correct += (model(x[a : a + batch_size]).argmax(1) == y[a : a + batch_size]).sum().item()
    return correct / len(x)


def compression_report(model: nn.Module, x_test, y_test, *, in_shape: tuple[int, ...], repeats: int = 20) -> dict:
    """fp32 vs dynamic-int8 on CPU: accuracy on (x_test (N, ...), y_test (N,)), serialized
    state_dict size, median batch-1 latency (models.model_stats), plus the safetensors size.

    {"fp32": {accuracy, size_bytes, latency_ms}, "int8": {...}, "params",
     "safetensors_bytes", "size_ratio" (int8 / fp32), "accuracy_drop" (fp32 - int8)}
    """
    source = hasattr(x_test, "encode")  # a pipeline.data.datasets Source (token ids, decoded images...)
    x = (
        x_test
        if source
        else torch.as_tensor(np.asarray(x_test) if not torch.is_tensor(x_test) else x_test, dtype=torch.float32).cpu()
    )
    y = torch.as_tensor(np.asarray(y_test) if not torch.is_tensor(y_test) else y_test).long().cpu()
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(f"x_test and y_test must be non-empty with equal length, got {len(x)} and {len(y)}")
    fp32 = copy.deepcopy(model).cpu().eval()
    int8 = quantize_dynamic_int8(fp32)
    example = model_inputs(x, [0], [0]) if source else None
    out = {}
    for name, m in (("fp32", fp32), ("int8", int8)):
        st = model_stats(m, in_shape=tuple(in_shape), repeats=repeats, example=example)
        acc = float((predict_logits(m, x).argmax(1) == y).double().mean()) if source else _accuracy(m, x, y)
        out[name] = {"accuracy": acc, "size_bytes": st["size_bytes"], "latency_ms": st["latency_ms"]}
    # quantized Linear weights are packed buffers, not parameters: count the fp32 model's
    out["params"] = sum(p.numel() for p in fp32.parameters())
    with tempfile.TemporaryDirectory() as d:
        out["safetensors_bytes"] = export_safetensors(fp32, os.path.join(d, "model.safetensors"))
    out["size_ratio"] = out["int8"]["size_bytes"] / out["fp32"]["size_bytes"]
    out["accuracy_drop"] = out["fp32"]["accuracy"] - out["int8"]["accuracy"]
    return out
