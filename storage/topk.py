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

from .layout import index_dtype  # noqa: F401  (re-exported; its one owner is layout)
from .parallel import for_row_blocks


def logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """log(sum(exp(x))) along `axis`, in float32 for float32 input (vectorised exp; the
    result is stored as float32) and float64 otherwise."""
    x = np.asarray(x)
    if x.dtype != np.float32:
        x = x.astype(np.float64)
    m = np.max(x, axis=axis, keepdims=True)
    return (np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m).squeeze(axis)


def scaled_topk(scaled: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values (n,k) descending, indices (n,k), logsumexp (n,)) of scaled logits (n, C)."""
    scaled = np.ascontiguousarray(scaled)
    n, C = scaled.shape
    vals = np.empty((n, k), scaled.dtype)
    idx = np.empty((n, k), np.int64)
    lse = np.empty(n, np.float32 if scaled.dtype == np.float32 else np.float64)

    def block(a: int, b: int) -> None:
        x = scaled[a:b]
        if k == C:
            i = np.argsort(-x, axis=1, kind="stable")
        else:  # the k largest in any order (no negated copy), then sorted descending
            part = np.argpartition(x, C - k, axis=1)[:, C - k :]
            order = np.argsort(-np.take_along_axis(x, part, axis=1), axis=1, kind="stable")
            i = np.take_along_axis(part, order, axis=1)
        idx[a:b] = i
        vals[a:b] = np.take_along_axis(x, i, axis=1)
        lse[a:b] = logsumexp(x, axis=1)

    for_row_blocks(block, n, n * C)
    return vals, idx, lse


def topk_probs(topk_logits: np.ndarray, logsumexp_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (n,k), tail mass (n,)) at the stored temperature."""
    p = np.exp(np.asarray(topk_logits, np.float64) - np.asarray(logsumexp_, np.float64)[:, None])
    tail = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
    return p, tail


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)
