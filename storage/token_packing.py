"""Bit packing and byte accounting for per-token language-model labels (numpy only).

A language-model teacher's label for one token position is a sparse summary of its
next-token distribution over a vocabulary of V ids (SmolLM2: V = 49,152):

    top-k    k ids + k log-probs (normalised over the FULL vocabulary) + optionally the
             missing mass m = 1 - sum(exp(logp)) as one value (the tail bucket)
    sampled  the u <= s unique ids of s draws from p (with replacement) + their counts

Ids take as few bits as the vocabulary needs (`id_bits`): 16 for V <= 65,536 (stored as
little-endian uint16), else ceil(log2 V) bits (17 for V <= 131,072, 18 for V <= 262,144),
bit-packed little-endian within each row. Rows are byte-aligned (a row of k ids takes
ceil(k * bits / 8) bytes), so one row can be sliced out of a packed block without
unpacking the others.

Bit order of the packed form (bits != 16): the row is one little-endian bit stream; id j's
bit b (b = 0 is the least significant) is stream bit j * bits + b, and stream bit p lives
in byte p // 8 at bit p % 8 (numpy's bitorder="little"). The unused high bits of a row's
last byte are zero.

bf16 values: numpy has no bfloat16, so `bf16_bits` / `from_bf16_bits` convert float32 to
and from its upper 16 bits (round to nearest even) as uint16.

uint8 values ("log-prob codes", `logprob_codes`): a log-probability (or the log of the
missing mass) stored as code = round(-logp / step), clipped to 0..255, read back as
-code * step; step = 1/16 covers [-15.94, 0] with a relative error in p of at most 3.2%.
Values below -15.94 (p < 1.2e-7) read back as -15.94.
"""

from __future__ import annotations

import math

import numpy as np

VALUE_BITS = {"float16": 16, "bfloat16": 16, "float32": 32, "uint8": 8}  # uint8: log-prob codes
LOGPROB_STEP = 1.0 / 16
_ROW_BLOCK_ELEMS = 1 << 20  # ids per block while packing / unpacking (bounds the bit temporaries)


def id_bits(vocab_size: int) -> int:
    """Bits per stored id: 16 for V <= 65,536, else ceil(log2 V) (17, 18, ...; at most 32)."""
    v = int(vocab_size)
    if v < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if v <= 1 << 16:
        return 16
    bits = math.ceil(math.log2(v))
    if bits > 32:
        raise ValueError(f"vocab_size {v} needs {bits} bits per id; at most 32 are supported")
    return bits


def counts_bits(draws: int) -> int:
    """Bits per stored count of a sampled label: 8 (uint8) when draws <= 255, else 16."""
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    if draws > 65_535:
        raise ValueError(f"draws must be <= 65,535, got {draws}")
    return 8 if draws <= 255 else 16


def packed_row_bytes(k: int, bits: int) -> int:
    """Bytes of one packed row of k ids: ceil(k * bits / 8) (2k for 16-bit ids)."""
    return (int(k) * int(bits) + 7) // 8


def _check_bits(bits: int) -> int:
    bits = int(bits)
    if not 1 <= bits <= 32:
        raise ValueError(f"bits must be in 1..32, got {bits}")
    return bits


def pack_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    """Pack ids (N, k) (any integer dtype, each in [0, 2**bits)) into uint8 (N, row_bytes).

    bits == 16: the little-endian uint16 bytes of each id. Other widths: a vectorised
    little-endian bit stream per row (module docstring), rows byte-aligned. Refuses ids out
    of range rather than wrapping them."""
    bits = _check_bits(bits)
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"ids must be 2-D (N, k), got shape {ids.shape}")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must be integers, got {ids.dtype}")
    n, k = ids.shape
    if ids.size:
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= 1 << bits:
            raise ValueError(f"ids must lie in [0, {1 << bits}) for {bits}-bit packing, got [{lo}, {hi}]")
    rb = packed_row_bytes(k, bits)
    if bits == 16:
        return np.ascontiguousarray(ids.astype("<u2")).view(np.uint8).reshape(n, rb)
    out = np.empty((n, rb), np.uint8)
    step = max(1, _ROW_BLOCK_ELEMS // max(k, 1))
    for a in range(0, n, step):
        block = np.ascontiguousarray(ids[a : a + step].astype("<u4"))  # (r, k)
        r = block.shape[0]
        bitarr = np.unpackbits(block.view(np.uint8).reshape(r, k, 4), axis=-1, bitorder="little")
        stream = bitarr[:, :, :bits].reshape(r, k * bits)  # (r, k*bits)
        out[a : a + r] = np.packbits(stream, axis=-1, bitorder="little")  # pads the last byte with 0
    return out


def unpack_ids(buf: np.ndarray, bits: int, shape: tuple[int, int]) -> np.ndarray:
    """Exact inverse of `pack_ids`: uint8 bytes (N * row_bytes, flat or (N, row_bytes)) ->
    int64 ids of `shape` (N, k)."""
    bits = _check_bits(bits)
    n, k = (int(s) for s in shape)
    rb = packed_row_bytes(k, bits)
    buf = np.asarray(buf)
    if buf.dtype != np.uint8:
        raise TypeError(f"packed ids must be uint8, got {buf.dtype}")
    if buf.size != n * rb:
        raise ValueError(f"{buf.size} bytes do not hold {n} rows of {k} {bits}-bit ids ({n * rb} bytes)")
    buf = np.ascontiguousarray(buf).reshape(n, rb)
    if bits == 16:
        return buf.view("<u2").reshape(n, k).astype(np.int64)
    out = np.empty((n, k), np.int64)
    step = max(1, _ROW_BLOCK_ELEMS // max(k, 1))
    for a in range(0, n, step):
        block = buf[a : a + step]
        r = block.shape[0]
        stream = np.unpackbits(block, axis=-1, bitorder="little")[:, : k * bits].reshape(r, k, bits)
        wide = np.zeros((r, k, 32), np.uint8)
        wide[:, :, :bits] = stream
        out[a : a + r] = np.packbits(wide, axis=-1, bitorder="little").view("<u4").reshape(r, k)
    return out


def bytes_per_token(
    *,
    k: int | np.ndarray,
    id_bits: int,
    value_dtype: str | None = None,
    tail: bool = True,
    counts_bits: int | None = None,
    length_bytes: float | None = None,
) -> float:
    """Stored bytes per token position (rows byte-aligned, as `pack_ids` writes them).

    top-k (counts_bits None):
        ceil(k * id_bits / 8) + k * value_bits / 8 + (value_bits / 8 if tail else 0)
        e.g. k = 32, 16-bit ids, bf16 values + tail: 64 + 64 + 2 = 130 B.
    sampled (counts_bits given, value_dtype None, no tail):
        ceil(u * id_bits / 8) + ceil(u * counts_bits / 8) + length_bytes
        per row of u stored unique ids; `length_bytes` (default 1: a uint8 u per row, enough
        for draws <= 255) says where a ragged row ends. e.g. u = 20, 16-bit ids, uint8
        counts: 40 + 20 + 1 = 61 B.
    k: an int, or an array of per-row stored counts (ragged sampled rows): the mean of the
    per-row bytes is returned.
    """
    ks = np.asarray(k, np.int64)
    if ks.size == 0 or (ks < 0).any():
        raise ValueError(f"k must be >= 0 (an int or per-row counts), got {k!r}")
    ids_b = (ks * int(id_bits) + 7) // 8
    if counts_bits is None:
        if value_dtype not in VALUE_BITS:
            raise ValueError(f"value_dtype must be one of {sorted(VALUE_BITS)}, got {value_dtype!r}")
        vb = VALUE_BITS[value_dtype]
        if length_bytes:
            raise ValueError("length_bytes is for ragged sampled rows; top-k rows have a fixed k")
        per_row = ids_b + ks * vb / 8 + (vb / 8 if tail else 0.0)
    else:
        if value_dtype is not None or tail:
            raise ValueError("a sampled label stores ids and counts only: pass value_dtype=None, tail=False")
        per_row = ids_b + (ks * int(counts_bits) + 7) // 8 + (1.0 if length_bytes is None else float(length_bytes))
    return float(np.mean(per_row))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 as uint16 (its upper 16 bits), round to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(np.asarray(x, np.float32)).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(np.asarray(x, np.float32))
    return np.where(nan, np.uint16(0x7FC0), rounded)


def from_bf16_bits(b: np.ndarray) -> np.ndarray:
    """bfloat16 stored as uint16 -> float32 (exact)."""
    return (np.asarray(b, np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def logprob_codes(logp: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """Log-probabilities (<= 0; -inf allowed) -> uint8 codes round(-logp / step), clipped to 0..255."""
    x = np.asarray(logp, np.float64)
    if np.isnan(x).any():
        raise ValueError("log-probabilities must not be NaN")
    return np.clip(np.rint(-x / step), 0, 255).astype(np.uint8)


def from_logprob_codes(codes: np.ndarray, step: float = LOGPROB_STEP) -> np.ndarray:
    """uint8 codes -> log-probabilities -code * step (float32)."""
    return (np.asarray(codes, np.uint8).astype(np.float32) * np.float32(-step)).astype(np.float32)
