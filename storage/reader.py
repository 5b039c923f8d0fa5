"""open_soft_labels(): read a complete soft-label dataset, streamed or by sample id.

Streaming (`iter_batches`) walks this partition's segments (storage/partition.py) one
storage block at a time, through a bounded shuffle buffer, and re-batches into dicts
of numpy arrays:
    {"sample_id": (B,) int64, "view": (B,) int32, "logits": (B, C) float16 | ...,
     "pad": (B,) bool}
Arrays may be read-only views of the decoded block (copy before writing in place).

Token labels (representation token_topk / token_sampled): rows are token positions, so
iter_batches streams tokens (stored columns, undecoded); `iter_sequences` streams whole
sequences, shuffled and partitioned by sequence with the same rule, decoded and padded
to L = seq_len (zeros past each sequence's length; position p is real iff p < length):
    {"sample_id": (B,), "view": (B,), "pad": (B,), "length": (B,) int32,
     "topk_ids": (B, L, k) int64, "topk_logprobs": (B, L, k) float32, "missing_mass": (B, L) float32}
    (token_sampled: "sample_ids" (B, L, s_max) int64, "sample_counts" (B, L, s_max) int32)
and `take_sequences` reads sequences by (sample_id, view). Shards whose sequences all have
seq_len tokens are read with a reshape; the others through their sequence starts, found
once per process from the shard's position column (storage/token_sequences.py).
Filesystems are opened lazily inside iteration, so the dataset object can be handed
to forked DataLoader workers, including with S3.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import numpy.typing as npt

from . import token_sequences as seqs
from . import tokens
from .errors import CorruptShardError, IncompleteDatasetError, ManifestError, SoftLabelError
from .fs import Location
from .index import ShardIndex
from .layout import TOKEN_KINDS, ParquetShard, ZarrShard, columns_for, row_bytes
from .manifest import check_expect, lineage_digest
from .partition import batches_per_partition, partition_segments
from .shards import (
    check_signatures,
    commit_problem,
    commits_disagree,
    committed_indices,
    open_shard,
    read_commit,
    read_commits,
    read_id_columns,
    read_manifest,
)
from .verify import verify as verify_dataset

SHUFFLE_BUDGET_BYTES = 128 << 20  # per partition (DataLoader worker): the shuffle buffer + 3 blocks
# The whole stream's peak memory (one partition, default buffer) stays under
# stream_memory_bound(): the buffer's share of the budget, plus what decoding and eviction
# hold besides it (up to ~6.2 blocks measured, benchmarks/reader_memory.py). Checked there.
TRANSIENT_BLOCKS = 7


def stream_memory_bound(block_bytes: int) -> int:
    """Bytes a shuffled stream of one partition may hold at its peak (the documented bound):
    the buffer (SHUFFLE_BUDGET_BYTES less 3 blocks) and TRANSIENT_BLOCKS blocks in flight."""
    return SHUFFLE_BUDGET_BYTES - 3 * block_bytes + TRANSIENT_BLOCKS * block_bytes


REMOTE_OPEN_BYTES = 512 << 20  # object-store shards are held in memory while open: bound them


def open_soft_labels(
    uri: str,
    *,
    expect: dict | None = None,
    verify: bool = False,
    storage_options: dict | None = None,
    verifier: Any = None,
) -> SoftLabelDataset:
    """Open a COMPLETE dataset. `expect` = manifest values the caller requires, e.g.
    {"teacher": {"fingerprint": fp}, "temperature": 4.0} or {"teacher.fingerprint": fp};
    any difference raises MismatchError naming field, expected and found value.
    verify=True re-hashes every shard first (see storage.verify). verifier
    (storage/signing.py; pipeline/keys.py load_verifier): the manifest and every commit
    record read must carry its valid signature."""
    loc = Location(uri, storage_options)
    m = read_manifest(loc)
    if m["status"] != "complete":
        done = len(committed_indices(loc))
        planned = m.get("planned_shards")
        raise IncompleteDatasetError(
            f"soft-label dataset at {loc.uri} is partial ({done} shard(s) committed"
            f"{f' of {planned}' if planned else ''}); finish labelling (re-run resumes) before reading it"
        )
    index = ShardIndex(loc, m)
    lineage = lineage_digest(m) if m["format_version"] >= 2 else None
    if m["format_version"] < 3:  # an inline shard list: every record, once
        records = read_commits(loc, m["backend"])
        problems = commits_disagree(m, m["shards"], records, lineage)
        records = list(records.values())
    else:  # shard 0's record now (format, plan, lineage), each shard's own when it is opened
        rec = read_commit(loc, m["backend"], 0)
        problem = commit_problem(0, index.entry(0), rec, m, lineage)
        problems, records = ([] if problem is None else [problem]), [rec]
        if m.get("planned_shards") is None:
            # no plan binds the shard count (a writer opened without num_shards): count the
            # records instead, one listing, so a dropped last shard is still noticed
            listed = committed_indices(loc)
            extra = [i for i in listed if i >= m["num_shards"]]
            if extra or len(listed) != m["num_shards"]:
                problems.append(
                    f"{len(listed)} shards are committed but the manifest lists {m['num_shards']}"
                    + (f": shard {extra[0]} is committed but not in the manifest" if extra else "")
                )
    if problems:
        raise ManifestError(_disagree(loc.uri, problems))
    check_signatures(m, records, verifier, loc.uri)
    check_expect(m, expect, loc.uri)
    if verify:
        report = verify_dataset(uri, storage_options=storage_options, verifier=verifier)
        if not report.ok:
            raise CorruptShardError(
                f"soft-label dataset at {loc.uri} failed verification:\n  " + "\n  ".join(report.problems)
            )
    return SoftLabelDataset(loc, m, index, verifier=verifier)


def _disagree(uri: str, problems: list[str]) -> str:
    return (
        f"soft-label dataset at {uri}: the manifest and the committed shards disagree "
        f"(edited, or written by two runs):\n  " + "\n  ".join(problems[:10])
    )


class SoftLabelDataset:
    def __init__(self, loc: Location, manifest: dict, index: ShardIndex | None = None, *, verifier: Any = None):
        """A dataset opened by open_soft_labels (which checks it); a worker process re-creates
        it from the manifest. verifier: every commit record read must carry its signature."""
        self.loc = loc
        self.uri = loc.uri
        self.manifest = manifest
        self.index = index if index is not None else ShardIndex(loc, manifest)
        self.columns = columns_for(manifest)
        self.column_names = [c.name for c in self.columns]
        self._lineage = lineage_digest(manifest) if manifest["format_version"] >= 2 else None
        self._verifier = verifier  # the required signer's (storage/signing.py), or None
        self._index = None

    def __getstate__(self) -> dict:
        # open shard readers and their block caches stay in the process that opened them: a
        # DataLoader worker (spawn / forkserver) gets the dataset with its manifest, index
        # and id lookups, and opens its own shards
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("_open_shards", "_block_cache", "_cache_pid", "_layouts")
        }

    @functools.cached_property
    def shard_rows(self) -> np.ndarray:
        """(num_shards,) rows per shard (token kinds: token positions, read from every index
        part once)."""
        if not self.is_tokens:
            return self.index.units
        return np.array([e["num_rows"] for e in self.index.entries()], np.int64)

    @property
    def shards(self) -> list[dict]:
        """Every shard's entry (index, path, num_rows, first/last sample id, sha256, bytes,
        rows_per_block[, num_sequences]), in order. Reads the whole index: for tools and
        tests; the stream reads only the entries of the shards it opens."""
        return list(self.index.entries())

    def __len__(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def temperature(self) -> float:
        return float(self.manifest["temperature"])

    def __repr__(self) -> str:
        m = self.manifest
        return (
            f"SoftLabelDataset({self.uri!r}, backend={m['backend']}, rows={len(self)}, "
            f"classes={m['num_classes']}, views={m['num_views']}, T={m['temperature']}, "
            f"{m['representation']['kind']})"
        )

    def _open(self, pos: int, cache: dict):
        if pos not in cache:
            entry = self.index.entry(pos)
            # local shards hold a file handle, object-store shards their (verified) bytes
            limit = 64 if self.loc.is_local else max(1, REMOTE_OPEN_BYTES // max(1, entry["bytes"]))
            while len(cache) >= limit:
                cache.pop(next(iter(cache)))
            m = self.manifest
            if m["format_version"] >= 3:  # this shard's commit record: one small read per shard opened
                rec = read_commit(self.loc, m["backend"], pos)
                problem = commit_problem(pos, entry, rec, m, self._lineage)
                if problem is not None:
                    raise ManifestError(_disagree(self.uri, [problem]))
                check_signatures(m, [rec], self._verifier, self.uri)
            sh = open_shard(self.loc, entry, m["backend"], self.columns)
            _check_entry(self.uri, entry, sh)
            cache[pos] = sh
        return cache[pos]

    def _check_columns(self, columns) -> list[str]:
        if columns is None:
            return list(self.column_names)
        bad = [c for c in columns if c not in self.column_names]
        if bad:
            raise SoftLabelError(f"{self.uri}: unknown column(s) {bad}; this dataset has {self.column_names}")
        return list(dict.fromkeys(["sample_id", "view", *columns]))

    # ------------------------------------------------------------------ streaming

    def num_batches(
        self, batch_size: int, *, world_size: int = 1, num_workers: int = 1, drop_last: bool = False
    ) -> int:
        """Batches ONE rank yields per epoch (summed over its DataLoader workers)."""
        parts = world_size * num_workers
        return num_workers * batches_per_partition(len(self), parts, batch_size, drop_last)

    def iter_batches(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        shuffle_buffer: int | None = None,
        columns: list[str] | None = None,
        drop_last: bool = False,
    ) -> Iterator[dict[str, np.ndarray]]:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        cols = self._check_columns(columns)
        segs = partition_segments(
            self.shard_rows,
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            worker=worker,
            num_workers=num_workers,
            group=self.index.group,
        )
        blocks = self._blocks(segs, cols)
        if shuffle:
            if shuffle_buffer is None:
                shuffle_buffer = self.default_shuffle_buffer(batch_size)
            rng = np.random.default_rng([seed, epoch, rank * num_workers + worker])
            total = segs.rows()
            blocks = _shuffle_blocks(blocks, shuffle_buffer, rng, total, max(batch_size, 4096))
        yield from _rebatch(blocks, batch_size, drop_last)

    def default_shuffle_buffer(self, batch_size: int) -> int:
        """Rows in the shuffle window when iter_batches gets shuffle_buffer=None.

        Labelled data is often stored in class order; a window of a few blocks then yields
        class-skewed batches. So: as many rows as fit in SHUFFLE_BUDGET_BYTES (the whole
        partition when it fits), and at least eight batches. The budget covers the whole
        stream: the buffer gets what is left after the ~3 storage blocks in flight (one
        being decoded, one being evicted into, the batches handed out), measured by
        benchmarks/reader_memory.py."""
        row = max(1, self.manifest.get("layout", {}).get("row_bytes") or 1)
        block = self.index.max_rows_per_block * row
        return max(8 * batch_size, (SHUFFLE_BUDGET_BYTES - 3 * block) // row)

    def _shard_cache(self) -> dict:
        """Open shards of this process, kept across epochs (one round trip per shard on S3)."""
        if getattr(self, "_cache_pid", None) != os.getpid():  # after fork: nothing inherited
            self._open_shards, self._block_cache, self._cache_pid = {}, {}, os.getpid()
            self._layouts = {}
        return self._open_shards

    def _blocks(self, segs, cols) -> Iterator[dict[str, np.ndarray]]:
        cache = self._shard_cache()
        for seg in segs:
            sh = self._open(seg.shard, cache)
            for b0, b1 in sh.blocks():
                lo, hi = max(b0, seg.start), min(b1, seg.stop)
                if lo >= hi:
                    continue
                out = self._read_rows(seg.shard, sh, lo, hi, cols)
                out["pad"] = np.full(hi - lo, seg.pad)
                yield out

    # ------------------------------------------------------------------ random access

    def _build_index(self):
        if self._index is None:
            sids, views, shard_of = read_id_columns(
                self.loc, self.index.entries(), self.manifest["backend"], self.columns
            )
            starts = np.concatenate([[0], np.cumsum(self.shard_rows)])
            row = np.arange(len(sids)) - starts[shard_of]
            order = np.lexsort((views, sids))
            self._index = (sids[order], views[order], shard_of[order], row[order])
        return self._index

    def keys(self) -> tuple[np.ndarray, np.ndarray]:
        """(sample_ids (N,) int64, views (N,) int32) of every stored row, sorted by (sample id,
        view): what take() accepts. Reads the id columns of every shard once per process."""
        if self.is_tokens:
            sids, views = self._build_seq_index()[:2]
        else:
            sids, views = self._build_index()[:2]
        return sids.copy(), views.astype(np.int32, copy=True)

    def _locate(
        self, sample_ids, views, sids_sorted: np.ndarray, views_sorted: np.ndarray, what: str, unit: str
    ) -> np.ndarray:
        """Positions in an index sorted by (sample_id, view) of the requested rows: every
        view of each id (id-major, views ascending) when views is None, else one view each.
        SoftLabelError naming the first missing (sample_id, view)."""
        V = int(self.manifest["num_views"])
        ids = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        if views is None:
            ids, want = np.repeat(ids, V), np.tile(np.arange(V), len(ids))
        else:
            want = np.asarray(views, dtype=np.int64).reshape(-1)
            if want.shape != ids.shape:
                raise ValueError(f"views must have the same length as sample_ids ({len(ids)}), got {want.shape}")
        pos = np.searchsorted(sids_sorted, ids) + want
        ok = pos < len(sids_sorted)
        ok[ok] = (sids_sorted[pos[ok]] == ids[ok]) & (views_sorted[pos[ok]] == want[ok])
        if not ok.all():
            bad = np.flatnonzero(~ok)
            raise SoftLabelError(
                f"{self.uri}: {what} ({ids[bad[0]]}, {want[bad[0]]}) is not in "
                f"the dataset; {len(bad)} of {len(ids)} requested {unit} missing"
            )
        return pos

    def take(
        self, sample_ids: npt.ArrayLike, views: npt.ArrayLike | None = None, *, columns: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Rows for `sample_ids`, in the order given. views=None: every view of each id
        (id-major, views ascending); else an array of the same length naming one view each."""
        if self.is_tokens:
            raise SoftLabelError(
                f"{self.uri}: a token-label dataset has up to seq_len={self.seq_len} rows per "
                f"(sample_id, view); use take_sequences()"
            )
        cols = self._check_columns(columns)
        sids_sorted, views_sorted, shard_sorted, row_sorted = self._build_index()
        pos = self._locate(sample_ids, views, sids_sorted, views_sorted, "(sample_id, view)", "row(s)")
        shard, row = shard_sorted[pos], row_sorted[pos]
        out = {c: None for c in cols}
        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            for (b0, b1), blk in self._blocks_for(int(s), row[sel], cols):
                inb = (row[sel] >= b0) & (row[sel] < b1)
                rows, dst = row[sel][inb] - b0, sel[inb]
                for c in cols:
                    vals = blk[c][rows]
                    if out[c] is None:
                        out[c] = np.empty((len(pos),) + vals.shape[1:], vals.dtype)
                    out[c][dst] = vals
        return out

    # ------------------------------------------------------------------ token sequences

    @property
    def is_tokens(self) -> bool:
        return self.manifest["representation"]["kind"] in TOKEN_KINDS

    @property
    def seq_len(self) -> int:
        if not self.is_tokens:
            raise SoftLabelError(
                f"{self.uri}: representation {self.manifest['representation']['kind']!r} has no "
                f"sequences (only token_topk / token_sampled do)"
            )
        return int(self.manifest["seq_len"])

    def _seq_counts(self) -> np.ndarray:
        self.seq_len  # noqa: B018 (refuses datasets without sequences)
        return self.index.units

    @property
    def num_sequences(self) -> int:
        """(sample_id, view) sequences in the dataset (= num_samples x num_views)."""
        return int(self._seq_counts().sum())

    def _layout(self, pos: int, sh) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of shard `pos`'s sequences, found once per process."""
        self._shard_cache()
        if pos not in self._layouts:
            entry = self.index.entry(pos)
            self._layouts[pos] = seqs.shard_layout(sh, entry, self.seq_len, f"{self.uri}: shard {entry['path']}")
        return self._layouts[pos]

    def _read_rows(self, pos: int, sh, lo: int, hi: int, cols: list[str]) -> dict[str, np.ndarray]:
        try:
            return sh.read(lo, hi, cols)
        except CorruptShardError:
            raise
        except Exception as e:
            raise CorruptShardError(
                f"{self.uri}: shard {self.index.entry(pos)['path']} rows {lo}:{hi} "
                f"cannot be read: {type(e).__name__}: {e}"
            ) from None

    def num_sequence_batches(
        self, batch_size: int, *, world_size: int = 1, num_workers: int = 1, drop_last: bool = False
    ) -> int:
        """Batches of sequences ONE rank yields per epoch from iter_sequences (over its workers)."""
        n = int(self._seq_counts().sum())
        return num_workers * batches_per_partition(n, world_size * num_workers, batch_size, drop_last)

    def default_sequence_buffer(self, batch_size: int) -> int:
        """Sequences in iter_sequences' shuffle buffer by default: what fits in
        SHUFFLE_BUDGET_BYTES of stored bytes after ~3 blocks in flight, at least 8 batches."""
        seq = max(1, row_bytes(self.columns) * self.seq_len)
        block = self.index.max_rows_per_block * row_bytes(self.columns)
        return max(8 * batch_size, (SHUFFLE_BUDGET_BYTES - 3 * block) // seq)

    def iter_sequences(
        self,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        worker: int = 0,
        num_workers: int = 1,
        shuffle_buffer: int | None = None,
        drop_last: bool = False,
        decode: bool = True,
    ) -> Iterator[dict[str, np.ndarray]]:
        """Whole sequences, `batch_size` at a time: {"sample_id" (B,), "view" (B,), "pad" (B,),
        label columns (B, L, ...)}. Shuffling, partitioning over (rank, worker) and padding are
        iter_batches' (storage/partition.py), at sequence granularity: every (sample_id, view)
        is a non-pad sequence exactly once per epoch. decode=True: ids as int64, log-probs /
        missing mass as float32, counts as int32 (storage.tokens.decode); False: stored dtypes."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        L = self.seq_len
        segs = partition_segments(
            self._seq_counts(),
            seed=seed,
            epoch=epoch,
            shuffle=shuffle,
            rank=rank,
            world_size=world_size,
            worker=worker,
            num_workers=num_workers,
            group=self.index.group,
        )
        chunks = self._seq_blocks(segs, L)
        if shuffle:
            if shuffle_buffer is None:
                shuffle_buffer = self.default_sequence_buffer(batch_size)
            rng = np.random.default_rng([seed, epoch, rank * num_workers + worker, 0x5E0])
            total = segs.rows()
            chunks = _shuffle_blocks(chunks, shuffle_buffer, rng, total, max(batch_size, 64))
        for b in _rebatch(chunks, batch_size, drop_last):
            yield tokens.decode(self.manifest, b) if decode else b

    def _seq_blocks(self, segs, L: int) -> Iterator[dict[str, np.ndarray]]:
        """Per segment (in sequences), whole padded sequences a storage block at a time. A
        full shard's blocks hold whole sequences (the writer aligns them to seq_len): a
        reshape. Other shards' blocks may cut a sequence: its tail is carried over."""
        cache = self._shard_cache()
        cols = list(self.column_names)
        for seg in segs:
            sh = self._open(seg.shard, cache)
            entry = self.index.entry(seg.shard)

            def read(
                lo: int, hi: int, _p: int = seg.shard, _sh: ParquetShard | ZarrShard = sh
            ) -> dict[str, np.ndarray]:
                return self._read_rows(_p, _sh, lo, hi, cols)

            if seqs.is_full(entry, L):
                # cut points: the segment's ends and the block starts inside it, rounded up to sequences
                cuts = sorted(
                    {seg.start, seg.stop} | {-(-b0 // L) for b0, _ in sh.blocks() if seg.start < -(-b0 // L) < seg.stop}
                )
                for a, b in zip(cuts[:-1], cuts[1:]):
                    rows = read(a * L, b * L)
                    seqs.check_full_rows(rows, L, f"{self.uri}: shard {entry['path']}", a * L)
                    out = seqs.pad(rows, np.full(b - a, L, np.int64), L)
                    out["pad"] = np.full(b - a, seg.pad)
                    yield out
            else:
                starts, lengths = self._layout(seg.shard, sh)
                for out in seqs.iter_segment(sh, read, starts, lengths, seg.start, seg.stop, L):
                    out["pad"] = np.full(len(out["length"]), seg.pad)
                    yield out

    def _build_seq_index(self):
        if getattr(self, "_seq_index", None) is None:
            cache = self._shard_cache()
            sids, views, shard_of, row, length = seqs.sequence_keys(
                self.loc,
                self.manifest,
                list(self.index.entries()),
                opener=lambda p: self._open(p, cache),
                layout=self._layout,
            )
            order = np.lexsort((views, sids))
            self._seq_index = (sids[order], views[order], shard_of[order], row[order], length[order])
        return self._seq_index

    def take_sequences(
        self, sample_ids: npt.ArrayLike, views: npt.ArrayLike | None = None, *, decode: bool = True
    ) -> dict[str, np.ndarray]:
        """Whole sequences for `sample_ids`, in the order given, shaped like iter_sequences'
        batches (without "pad"; with "length"). views=None: every view of each id (id-major,
        views ascending); else an array of the same length naming one view each."""
        L = self.seq_len
        sids_sorted, views_sorted, shard_sorted, row_sorted, len_sorted = self._build_seq_index()
        pos = self._locate(sample_ids, views, sids_sorted, views_sorted, "sequence (sample_id, view)", "sequence(s)")
        shard, row, length = shard_sorted[pos], row_sorted[pos], len_sorted[pos]
        cols = list(self.column_names)
        out: dict[str, np.ndarray] = {}

        def put(padded: dict[str, np.ndarray], dst: np.ndarray) -> None:
            for c, vals in padded.items():
                if c not in out:
                    out[c] = np.empty((len(pos),) + vals.shape[1:], vals.dtype)
                out[c][dst] = vals

        for s in np.unique(shard):
            sel = np.flatnonzero(shard == s)
            for (b0, b1), blk in self._blocks_for(int(s), row[sel], cols):
                inb = (row[sel] >= b0) & (row[sel] < b1)
                starts, lens, dst = row[sel][inb] - b0, length[sel][inb], sel[inb]
                inside = starts + lens <= b1 - b0
                if inside.any():
                    put(seqs.gather(blk, starts[inside], lens[inside], L), dst[inside])
                sh = self._open(int(s), self._shard_cache())
                for r, n, d in zip(starts[~inside], lens[~inside], dst[~inside]):  # cut by a block end
                    rows = self._read_rows(int(s), sh, b0 + int(r), b0 + int(r) + int(n), cols)
                    put(seqs.pad(rows, np.array([n], np.int64), L), np.array([d]))
        return tokens.decode(self.manifest, out) if decode else out

    def _blocks_for(self, pos: int, rows: np.ndarray, cols: list[str]):
        """The storage blocks of shard `pos` holding `rows`, through a small per-process LRU
        cache, so that take() for the rows of a streamed batch (the multi-teacher join)
        reads each block once per shuffle window rather than once per batch."""
        sh = self._open(pos, self._shard_cache())  # also resets _block_cache after a fork
        bounds = sh.blocks()
        starts = np.array([b[0] for b in bounds])
        for bi in np.unique(np.searchsorted(starts, rows, side="right") - 1):
            key = (pos, int(bi), tuple(cols))
            blk = self._block_cache.pop(key, None)
            if blk is None:
                blk = sh.read(*bounds[bi], cols)
            self._block_cache[key] = blk  # most recently used last
            while len(self._block_cache) > 8:
                self._block_cache.pop(next(iter(self._block_cache)))
            yield bounds[bi], blk


def _check_entry(uri: str, entry: dict, sh) -> None:
    """The opened shard agrees with its entry: rows, and first and last sample id (two small
    reads of the sample_id column), so an edited entry is refused before any row is used."""
    problem = None
    if sh.num_rows != entry["num_rows"]:
        problem = f"{sh.num_rows} rows, its entry says {entry['num_rows']}"
    else:
        first = int(sh.read(0, 1, ["sample_id"])["sample_id"][0])
        last = int(sh.read(sh.num_rows - 1, sh.num_rows, ["sample_id"])["sample_id"][0])
        if (first, last) != (entry["first_sample_id"], entry["last_sample_id"]):
            problem = (
                f"sample ids {first}..{last}, its entry says {entry['first_sample_id']}..{entry['last_sample_id']}"
            )
    if problem is not None:
        raise ManifestError(f"{uri}: shard {entry['path']} holds {problem} (the manifest was edited)")


def _concat(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    if len(parts) == 1:
        return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _rows(d: dict[str, np.ndarray]) -> int:
    return len(d["sample_id"])


def _shuffle_blocks(blocks, buffer_rows: int, rng: np.random.Generator, total_rows: int, out_rows: int):
    """Bounded shuffle with a fixed buffer of min(buffer_rows, total_rows) rows, allocated once.

    Until it is full, incoming rows are stored; after that each incoming block of m rows
    evicts m random buffer slots (yielded) and takes their place; at the end the buffer is
    yielded in random order, `out_rows` at a time. Memory: the buffer, one decoded block and
    one yielded chunk, so SHUFFLE_BUDGET_BYTES bounds what the shuffle holds."""
    cap = max(1, min(buffer_rows, total_rows))
    buf: dict[str, np.ndarray] | None = None
    n = 0
    for blk in blocks:
        m = _rows(blk)
        if buf is None:
            buf = {k: np.empty((cap,) + v.shape[1:], v.dtype) for k, v in blk.items()}
        take = min(m, cap - n)  # fill free slots first
        if take:
            for k, v in blk.items():
                buf[k][n : n + take] = v[:take]
            n += take
        i = take
        while i < m:  # buffer full: evict random slots,
            c = min(m - i, cap, out_rows)  # a chunk at a time (small index arrays)
            slots = rng.choice(cap, size=c, replace=False) if c < cap else rng.permutation(cap)
            yield {k: buf[k][slots] for k in buf}
            for k, v in blk.items():
                buf[k][slots] = v[i : i + c]
            i += c
    if n:
        # shuffle the filled buffer in place, every column with the same permutation (the
        # same generator state and length give the same Fisher-Yates swaps), then hand out
        # views of it: no index array and no copy of the buffer
        state = rng.bit_generator.state
        for k in buf:
            rng.bit_generator.state = state
            rng.shuffle(buf[k][:n])
        for a in range(0, n, out_rows):
            yield {k: buf[k][a : a + out_rows] for k in buf}


def _rebatch(chunks, batch_size: int, drop_last: bool):
    carry: list[dict[str, np.ndarray]] = []
    have = 0
    for chunk in chunks:
        n, i = _rows(chunk), 0
        if have:  # top up the carried partial batch first
            need = min(batch_size - have, n)
            carry.append({k: v[:need] for k, v in chunk.items()})
            have, i = have + need, need
            if have == batch_size:
                yield _concat(carry)
                carry, have = [], 0
        while n - i >= batch_size:
            yield {k: v[i : i + batch_size] for k, v in chunk.items()}  # zero-copy slice
            i += batch_size
        if i < n:
            carry.append({k: v[i:] for k, v in chunk.items()})
            have += n - i
    if have and not drop_last:
        yield _concat(carry)
