"""Numpy helpers for the stored representations (no torch here).

Stored values are temperature-scaled logits s = z / T. Any other temperature T' is
exact for the dense form: z / T' = s * (T / T').

Top-k stores the k largest s, their class ids and logsumexp(s) over ALL classes, so
    p_i    = exp(s_i - logsumexp(s))          for the k stored classes (exact)
    p_tail = 1 - sum_i p_i                    (exact mass of the C - k others)
rather than a renormalised top-k softmax, which overstates every stored probability.
The top-k form is exact only at the stored temperature T.
"""
from __future__ import annotations

import numpy as np

from .layout import index_dtype  # noqa: F401  (re-exported: one owner, layout)


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return (np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def scaled_topk(scaled: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (n,k) descending, indices (n,k), logsumexp (n,)) of scaled logits (n, C)."""
    n, C = scaled.shape
    if k == C:
        idx = np.argsort(-scaled, axis=1, kind="stable")
    else:
        part = np.argpartition(-scaled, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scaled, part, axis=1), axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1)
    vals = np.take_along_axis(scaled, idx, axis=1)
    return vals, idx, logsumexp(scaled, axis=1)


def topk_probs(topk_logits: np.ndarray, logsumexp_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n,k), tail mass (n,)) at the stored temperature."""
    p = np.exp(np.asarray(topk_logits, np.float64) - np.asarray(logsumexp_, np.float64)[:, None])
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    return p, tail


def rescale(scaled: np.ndarray, stored_temperature: float, new_temperature: float) -> np.ndarray:
    """Dense scaled logits at another temperature: (z/T) * T / T'."""
    return np.asarray(scaled, np.float32) * np.float32(stored_temperature / new_temperature)


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
