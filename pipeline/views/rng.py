"""Per-row randomness for deterministic views: a counter-based hash (splitmix64) of
(seed, sample_id, view, stream, element index), computed with exact integer arithmetic in
numpy. A row's result never depends on the rest of the batch, its order, the process, the
platform or the torch/numpy version's RNG streams. Every transform draws from here."""

from __future__ import annotations

import threading

import numpy as np
import torch

from pipeline.views.base import check_seed

# Seeding torch's global RNG and drawing from it must not interleave between threads (a sweep
# trains students in parallel threads): model init, training seeds and the torchvision views,
# which seed it per row, hold this one lock.
GLOBAL_RNG_LOCK = threading.RLock()

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(z: np.ndarray) -> np.ndarray:
    # splitmix64 finaliser on uint64 arrays; numpy array ops wrap mod 2**64 silently
    z = (z + _GOLDEN) & _M64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
    return z ^ (z >> np.uint64(31))


def _u64(a: np.ndarray) -> np.ndarray:
    # int64 -> uint64 by two's complement, so negative sample ids hash fine too
    return np.ascontiguousarray(a, dtype=np.int64).view(np.uint64)


def hash_row_keys(seed: int, sample_ids: np.ndarray, views: np.ndarray) -> np.ndarray:
    # (B,) uint64 key per (seed, sample_id, view): chained hashing, no batch dependence
    k = splitmix64(np.full(sample_ids.shape, seed, dtype=np.uint64))
    k = splitmix64(k ^ _u64(sample_ids))
    return splitmix64(k ^ _u64(views))


def hash_stream(keys: np.ndarray, stream: int) -> np.ndarray:
    return splitmix64(keys ^ splitmix64(np.full(keys.shape, stream, dtype=np.uint64)))


def check_ids(sample_ids, views) -> tuple[np.ndarray, np.ndarray]:
    sids = np.asarray(sample_ids.cpu() if torch.is_tensor(sample_ids) else sample_ids)
    vws = np.asarray(views.cpu() if torch.is_tensor(views) else views)
    if sids.ndim != 1 or not np.issubdtype(sids.dtype, np.integer):
        raise ValueError(f"sample_ids must be a 1-D integer array, found shape {sids.shape} dtype {sids.dtype}")
    if vws.ndim == 0:
        vws = np.full(sids.shape, int(vws))
    if vws.shape != sids.shape or not np.issubdtype(vws.dtype, np.integer):
        raise ValueError(
            f"views must be integers shaped like sample_ids {sids.shape}, found shape {vws.shape} dtype {vws.dtype}"
        )
    if len(vws) and vws.min() < 0:
        raise ValueError(f"views must be >= 0, found {int(vws.min())}")
    return sids.astype(np.int64), vws.astype(np.int64)


def irwin_hall_noise(noise_key: np.ndarray, n: int) -> np.ndarray:
    """(B, n) float32 standard-ish normal noise, bit-exact everywhere.

    Irwin-Hall: the sum of 12 uniforms minus 6 has mean 0 and variance 1 and is close
    to N(0, 1) (bounded to +-6). Each uniform is a 16-bit slice of a hash, so the sum is
    an exact integer and no transcendental (platform-dependent) math is involved.
    """
    idx = np.arange(n, dtype=np.uint64)[None, :] * np.uint64(3)  # (1, n)
    total = np.zeros((len(noise_key), n), dtype=np.int64)
    for j in range(3):  # 3 hashes x 4 slices
        h = splitmix64(noise_key[:, None] ^ splitmix64(idx + np.uint64(j)))  # (B, n)
        for s in range(4):
            total += ((h >> np.uint64(16 * s)) & np.uint64(0xFFFF)).astype(np.int64)
    # u = (k + 0.5) / 65536 per slice -> sum(u) - 6 = (total + 6) / 65536 - 6, exact in f32
    return ((total + 6).astype(np.float32) / np.float32(65536.0)) - np.float32(6.0)


MASK63 = (1 << 63) - 1


P_ONE = 1 << 53  # a probability p is the integer threshold round(p * 2**53)


def row_keys(seed: int, sample_ids, views) -> np.ndarray:
    """(B,) uint64 key per row, a pure function of (seed, sample_id, view)."""
    seed = check_seed("seed", seed)
    sids, vws = check_ids(sample_ids, views)
    return hash_row_keys(seed, sids, vws)


def row_generators(seed: int, sample_ids, views) -> list[torch.Generator]:
    """One CPU torch.Generator per row, seeded from its row key (key & (2**63 - 1)), so
    anything drawn from it is a pure function of (seed, sample_id, view). Draw on the CPU
    (torch generators are device-bound) and move the result."""
    return [torch.Generator().manual_seed(int(k) & MASK63) for k in row_keys(seed, sample_ids, views)]


def bernoulli(stream_keys: np.ndarray, index: np.ndarray, p: float) -> np.ndarray:
    """(B, L) bool: element (b, i) is True with probability p, from the hash of
    (stream_keys[b], index[b, i]); exact integer comparison."""
    thr = np.uint64(int(round(p * P_ONE)))
    h = splitmix64(stream_keys[:, None] ^ splitmix64(index.astype(np.uint64)))
    return (h >> np.uint64(11)) < thr


def check_rows(x, sample_ids, views, who: str) -> tuple[np.ndarray, np.ndarray]:
    if not torch.is_tensor(x):
        raise ValueError(f"{who}: x must be a torch.Tensor, found {type(x).__name__}")
    sids, vws = check_ids(sample_ids, views)
    if x.ndim == 0 or len(sids) != x.shape[0]:
        raise ValueError(f"{who}: x has {x.shape[0] if x.ndim else 0} rows but {len(sids)} sample_ids")
    return sids, vws
