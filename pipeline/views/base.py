"""Shared parts of the view transforms: the Transform protocol, the kinds and their
version, the hash stream numbers, and argument validation (per-row randomness: rng.py)."""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from typing import Protocol, runtime_checkable

import numpy as np
import torch

TRANSFORMS_VERSION = 1  # bump when an algorithm here changes; part of every fingerprint
KINDS = ("tokens", "signal", "function", "compose", "torchvision")


# hash streams (distinct from views.py's 1..4)
S_TOK_MASK, S_TOK_DROP = 21, 22
S_SIG_SHIFT, S_SIG_SCALE, S_SIG_NOISE = 31, 32, 33


@runtime_checkable
class Transform(Protocol):
    """What labelling, training and evaluation need from a view transform (see the module
    docstring). ViewSpec, TokenViews, SignalViews, FunctionView and Compose implement it."""

    @property
    def is_identity(self) -> bool: ...

    def apply(
        self, x: torch.Tensor, sample_ids: np.ndarray | torch.Tensor, views: np.ndarray | torch.Tensor
    ) -> torch.Tensor: ...

    def to_dict(self) -> dict: ...

    def fingerprint(self) -> str: ...


# ---------------------------------------------------------------- per-row randomness


# ---------------------------------------------------------------- validation


def check_number(name: str, v: object, *, lo: float, hi: float | None = None, what: str) -> float:
    if (
        isinstance(v, bool)
        or not isinstance(v, numbers.Real)
        or not math.isfinite(float(v))
        or v < lo
        or (hi is not None and v > hi)
    ):
        raise ValueError(f"{name} must be {what}, found {v!r}")
    return float(v)


def check_prob(name: str, v: object) -> float:
    return check_number(name, v, lo=0.0, hi=1.0, what="a probability in [0, 1]")


def check_int(name: str, v: object, *, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v >= hi):
        rng = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi})"
        raise ValueError(f"{name} must be {rng}, found {v!r}")
    return int(v)


def check_seed(name: str, v: object) -> int:
    return check_int(name, v, lo=0, hi=2**63)


def transform_fingerprint(d: dict) -> str:
    blob = json.dumps({"version": TRANSFORMS_VERSION, **d}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def check_keys(kind: str, d: dict, known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"transform kind {kind!r}: unknown key(s) {unknown}, expected some of {sorted(known)}")
