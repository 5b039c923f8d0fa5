"""Variable-length token sequences: where the sequences of a token shard start, how they
are padded to (S, seq_len, ...) for the reader, and the per-sequence keys that finalize()
and take_sequences() index. Numpy only (see docs/format.md, "Token layouts").

A token shard is a run of sequences; sequence i is rows [start_i, start_i + n_i) with
`position` 0 .. n_i - 1 (1 <= n_i <= seq_len), so the sequence starts are exactly the
rows whose position is 0. A shard is *full* when every n_i == seq_len (num_rows ==
num_sequences x seq_len): the fixed-length layout, read with a reshape and no per-row
work. Other shards are read through their start offsets, found once per process by
reading the shard's small position column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from .errors import CorruptShardError, ManifestError

if TYPE_CHECKING:
    from .fs import Location
    from .layout import ParquetShard, ZarrShard


def entry_sequences(entry: dict, L: int) -> int:
    """A shard entry's (or commit record's) sequence count: `num_sequences`, or for
    entries written before that field existed, num_rows // seq_len."""
    ns = entry.get("num_sequences")
    return int(ns) if ns is not None else int(entry["num_rows"]) // L


def is_full(entry: dict, L: int) -> bool:
    """Every sequence of the shard has seq_len rows (the fixed-length fast path)."""
    return int(entry["num_rows"]) == entry_sequences(entry, L) * L


def position_problem(pos: np.ndarray, L: int) -> tuple[int, str, int] | None:
    """None when `pos` is a run of sequences 0..n-1 with 1 <= n <= L; else
    (row, what, expected): what "gap" (the row's position is not the previous + 1 and not
    0; expected = the position it should have) or "long" (the row is past seq_len)."""
    n = len(pos)
    if n == 0:
        return (0, "empty", 0)
    if n % L == 0 and np.array_equal(pos.reshape(-1, L), np.broadcast_to(np.arange(L, dtype=pos.dtype), (n // L, L))):
        return None  # the fixed-length layout
    starts = starts_of(pos)
    want = np.arange(n) - np.repeat(starts, np.diff(np.append(starts, n)))
    bad = np.flatnonzero(pos != want)
    if len(bad):
        return (int(bad[0]), "gap", int(want[bad[0]]))
    over = np.flatnonzero(pos >= L)
    if len(over):
        return (int(over[0]), "long", L - 1)
    return None


def starts_of(pos: np.ndarray) -> np.ndarray:
    """Row offsets (int64) of the sequence starts: the rows at position 0 (and row 0)."""
    is_start = pos == 0
    if len(is_start):
        is_start[0] = True
    return np.flatnonzero(is_start).astype(np.int64)


def bounds(pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the sequences of a valid position column."""
    starts = starts_of(pos)
    return starts, np.diff(np.append(starts, len(pos))).astype(np.int64)


def shard_layout(sh: ParquetShard | ZarrShard, entry: dict, L: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of an opened shard's sequences: arithmetic for a full shard, its
    position column (read once, checked) otherwise. CorruptShardError when the positions
    are not whole sequences or their count is not the entry's num_sequences."""
    ns = entry_sequences(entry, L)
    if is_full(entry, L):
        return np.arange(ns, dtype=np.int64) * L, np.full(ns, L, np.int64)
    try:
        pos = sh.read(0, sh.num_rows, ["position"])["position"]
    except CorruptShardError:
        raise
    except Exception as e:
        raise CorruptShardError(f"{name}: its position column cannot be read: {type(e).__name__}: {e}") from None
    bad = position_problem(pos, L)
    if bad is not None:
        raise CorruptShardError(
            f"{name}: row {bad[0]} has position {int(pos[bad[0]]) if len(pos) else None}: "
            f"not whole sequences of 1..seq_len={L} tokens"
        )
    starts, lengths = bounds(pos)
    if len(starts) != ns:
        raise ManifestError(f"{name} holds {len(starts)} sequences, its manifest entry says num_sequences {ns}")
    return starts, lengths


def pad(rows: dict[str, np.ndarray], lengths: np.ndarray, L: int) -> dict[str, np.ndarray]:
    """Rows of consecutive whole sequences with these lengths -> {sample_id (S,), view (S,),
    length (S,) int32, label columns (S, L, ...) zero-padded past each length}; the
    position column is dropped. All lengths == L is a reshape (no copy)."""
    S = len(lengths)
    n = int(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if S else np.zeros(0, np.int64)
    full = n == S * L
    dest = None
    if not full:
        seq = np.repeat(np.arange(S, dtype=np.int64), lengths)
        dest = seq * L + (np.arange(n, dtype=np.int64) - offsets[seq])
    out = {}
    for k, a in rows.items():
        if k == "position":
            continue
        if k in ("sample_id", "view"):
            out[k] = a[::L] if full else a[offsets]
        elif full:
            out[k] = a.reshape(S, L, *a.shape[1:])
        else:
            z = np.zeros((S * L,) + a.shape[1:], a.dtype)
            z[dest] = a
            out[k] = z.reshape(S, L, *a.shape[1:])
    out["length"] = lengths.astype(np.int32)
    return out


def gather(block: dict[str, np.ndarray], starts: np.ndarray, lengths: np.ndarray, L: int) -> dict[str, np.ndarray]:
    """The sequences at rows `starts` (lengths `lengths`) of a block, padded (pad)."""
    offsets = np.cumsum(lengths) - lengths
    rows = np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))
    return pad({c: a[rows] for c, a in block.items()}, lengths, L)


def check_full_rows(rows: dict[str, np.ndarray], L: int, name: str, a: int) -> None:
    """Rows read as whole sequences of seq_len by the fast path: their first and last
    positions must say so (a per-sequence check, no per-row work)."""
    pos = rows.get("position")
    if pos is not None and len(pos) and (pos[::L].any() or (pos[L - 1 :: L] != L - 1).any()):
        raise CorruptShardError(
            f"{name}: rows from {a} are not whole sequences of seq_len={L} tokens, as its "
            f"manifest entry (num_rows = num_sequences x seq_len) says"
        )


def iter_segment(
    sh: ParquetShard | ZarrShard,
    read: Callable[[int, int], dict[str, np.ndarray]],
    starts: np.ndarray,
    lengths: np.ndarray,
    a: int,
    b: int,
    L: int,
) -> Iterator[dict[str, np.ndarray]]:
    """Sequences a..b-1 of an opened variable-length shard, padded, a storage block at a
    time: each block is read once, and the tail of a sequence cut by a block boundary is
    carried into the next block's chunk. `read(lo, hi)` returns the rows lo..hi-1."""
    ends = starts + lengths
    r0, r1 = int(starts[a]), int(ends[b - 1])
    carry, base, i = None, r0, a
    for b0, b1 in sh.blocks():
        lo, hi = max(b0, r0), min(b1, r1)
        if lo >= hi:
            continue
        rows = read(lo, hi)
        if carry is not None:
            rows = {k: np.concatenate([carry[k], rows[k]]) for k in rows}
        k = min(b, int(np.searchsorted(ends, hi, side="right")))
        if k > i:
            cut = int(ends[k - 1]) - base
            yield pad({c: v[:cut] for c, v in rows.items()}, lengths[i:k], L)
            carry = {c: v[cut:] for c, v in rows.items()} if cut < len(rows["sample_id"]) else None
            base, i = int(ends[k - 1]), k
        else:
            carry = rows
    if i != b:
        raise CorruptShardError(f"{getattr(sh, 'name', 'shard')}: sequences {i}..{b - 1} are not inside its blocks")


def sequence_keys(
    loc: Location,
    manifest: dict,
    entries,
    opener: Callable[[int], ParquetShard | ZarrShard],
    layout: Callable[[int, ParquetShard | ZarrShard], tuple[np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, ...]:
    """(sample_id, view, shard position, start row, length) of every sequence of the
    dataset, `entries` (the shards) in order; every shard's layout checked (shard_layout).
    `opener(p)` opens shard p (storage.shards.open_shard, or the reader's per-process
    cache: passed in, so this module never imports the shard layer); `layout(p, shard)`
    replaces finding its layout."""
    L = int(manifest["seq_len"])
    parts = []
    for p, e in enumerate(entries):
        sh = opener(p)
        name = f"{loc.uri}: shard {e['path']}"
        try:
            starts, lengths = layout(p, sh) if layout is not None else shard_layout(sh, e, L, name)
            ids = sh.read(0, sh.num_rows, ["sample_id", "view"])
        except (CorruptShardError, ManifestError):
            raise
        except Exception as ex:
            raise CorruptShardError(f"{name} cannot be read: {type(ex).__name__}: {ex}") from None
        parts.append(
            (ids["sample_id"][starts], ids["view"][starts], np.full(len(starts), p, np.int32), starts, lengths)
        )
    if not parts:
        return (
            np.zeros(0, np.int64),
            np.zeros(0, np.int32),
            np.zeros(0, np.int32),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
        )
    return tuple(np.concatenate(x) for x in zip(*parts))
