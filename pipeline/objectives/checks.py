"""Argument checks and the weighted mean every loss shares. Shapes: B (or N) rows, C classes."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def shape_of(x: Tensor) -> tuple[int, ...]:
    return tuple(x.shape)


def check_2d(name: str, x: Tensor) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, C), got shape {shape_of(x)}")


def check_same(a_name: str, a: Tensor, b_name: str, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape, got {a_name} {shape_of(a)} and {b_name} {shape_of(b)}"
        )


def check_rows(name: str, x: Tensor, batch: int) -> None:
    # x must be (B,) with the same B as the logits
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},), got {shape_of(x)}")


def check_temperature(temperature: float) -> None:
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_int(name: str, x: Tensor) -> None:
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {x.dtype}")


def row_mean(per_row: Tensor, weights: Tensor | None) -> Tensor:
    """(B,) -> scalar: plain mean, or weighted mean Σ w_b l_b / Σ w_b."""
    if weights is None:
        return per_row.mean()
    return per_row @ normalized_weights(weights, per_row.shape[0], per_row)


def normalized_weights(weights: Tensor | None, rows: int, like: Tensor) -> Tensor:
    """(B,) weights summing to 1 (an all-zero ``weights`` stays all zero): uniform if None."""
    if weights is None:
        return torch.full((rows,), 1.0 / rows, dtype=torch.float32, device=like.device)
    check_rows("weights", weights, rows)
    w = weights.float()
    return w / w.sum().clamp_min(torch.finfo(torch.float32).tiny)  # clamp: all padding gives 0, not nan
