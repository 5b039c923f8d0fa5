"""Shared parts of the view transforms (pipeline/transforms.py): the Transform protocol,
per-row randomness from the splitmix64 hash of views.py, and argument validation."""
from __future__ import annotations

import hashlib
import json
import math
import numbers
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from .views import _check_ids, _row_keys, _splitmix64


TRANSFORMS_VERSION = 1  # bump when an algorithm here changes; part of every fingerprint
KINDS = ("tokens", "signal", "function", "compose")

_MASK63 = (1 << 63) - 1
_P_ONE = 1 << 53                     # a probability p is the integer threshold round(p * 2**53)

# hash streams (distinct from views.py's 1..4)
_S_TOK_MASK, _S_TOK_DROP = 21, 22
_S_SIG_SHIFT, _S_SIG_SCALE, _S_SIG_NOISE = 31, 32, 33


@runtime_checkable
class Transform(Protocol):
    """What labelling, training and evaluation need from a view transform (see the module
    docstring). ViewSpec, TokenViews, SignalViews, FunctionView and Compose implement it."""

    @property
    def is_identity(self) -> bool: ...

    def apply(self, x: torch.Tensor, sample_ids, views) -> torch.Tensor: ...

    def to_dict(self) -> dict: ...

    def fingerprint(self) -> str: ...


# ---------------------------------------------------------------- per-row randomness

def row_keys(seed: int, sample_ids, views) -> np.ndarray:
    """(B,) uint64 key per row, a pure function of (seed, sample_id, view)."""
    seed = _seed("seed", seed)
    sids, vws = _check_ids(sample_ids, views)
    return _row_keys(seed, sids, vws)


def row_generators(seed: int, sample_ids, views) -> list[torch.Generator]:
    """One CPU torch.Generator per row, seeded from its row key (key & (2**63 - 1)), so
    anything drawn from it is a pure function of (seed, sample_id, view). Draw on the CPU
    (torch generators are device-bound) and move the result."""
    return [torch.Generator().manual_seed(int(k) & _MASK63) for k in row_keys(seed, sample_ids, views)]


def _bernoulli(stream_keys: np.ndarray, index: np.ndarray, p: float) -> np.ndarray:
    """(B, L) bool: element (b, i) is True with probability p, from the hash of
    (stream_keys[b], index[b, i]); exact integer comparison."""
    thr = np.uint64(int(round(p * _P_ONE)))
    h = _splitmix64(stream_keys[:, None] ^ _splitmix64(index.astype(np.uint64)))
    return (h >> np.uint64(11)) < thr


# ---------------------------------------------------------------- validation

def _num(name: str, v, *, lo: float, hi: float | None = None, what: str) -> float:
    if (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v))
            or v < lo or (hi is not None and v > hi)):
        raise ValueError(f"{name} must be {what}, found {v!r}")
    return float(v)


def _prob(name: str, v) -> float:
    return _num(name, v, lo=0.0, hi=1.0, what="a probability in [0, 1]")


def _int(name: str, v, *, lo: int = 0, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v >= hi):
        rng = f"an int >= {lo}" if hi is None else f"an int in [{lo}, {hi})"
        raise ValueError(f"{name} must be {rng}, found {v!r}")
    return int(v)


def _seed(name: str, v) -> int:
    return _int(name, v, lo=0, hi=2**63)


def _fingerprint(d: dict) -> str:
    blob = json.dumps({"version": TRANSFORMS_VERSION, **d}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_keys(kind: str, d: dict, known: set[str]) -> None:
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"transform kind {kind!r}: unknown key(s) {unknown}, expected some of {sorted(known)}")


def _rows(x, sample_ids, views, who: str) -> tuple[np.ndarray, np.ndarray]:
    if not torch.is_tensor(x):
        raise ValueError(f"{who}: x must be a torch.Tensor, found {type(x).__name__}")
    sids, vws = _check_ids(sample_ids, views)
    if x.ndim == 0 or len(sids) != x.shape[0]:
        raise ValueError(f"{who}: x has {x.shape[0] if x.ndim else 0} rows but {len(sids)} sample_ids")
    return sids, vws
