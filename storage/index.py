"""The shard index: which shards a dataset has, their sizes, ranges and checksums, at a
cost per reader that does not grow with the number of shards it does not read.

Format 1 and 2 manifests list every shard inline (`shards`: ~300 B of JSON each, 300 MB
at 10^6 shards, parsed by every rank and DataLoader worker). Format 3 keeps the table
out of the manifest, as Iceberg and Delta keep manifest lists:

    _index/units-<sha16>.parquet          one int64 per shard: the rows (dense, top-k) or
                                          sequences (token kinds) it holds. Every reader
                                          reads it: it is what partitions an epoch over
                                          ranks and workers (RLE-encoded: a few KB when
                                          the shards are cut alike, 8 MB at 10^6 worst case)
    _index/part-NNNNN-<sha16>.parquet     the entries of PART_SHARDS consecutive shards
                                          (index, sha256, num_rows, first/last sample id,
                                          bytes, rows_per_block[, num_sequences]): a reader
                                          loads a part when it first opens one of its shards

The manifest's `index` section names each file with its sha256 (so the manifest digest,
and a signature over it, covers every entry), and a file is hashed before anything in it
is used. A shard's path is not stored: it is `data/shard-NNNNN-<sha256[:16]>.<ext>`,
derived from its index and checksum, so it cannot point outside the dataset.

`ShardIndex` is the one reader of both forms: `units`, `entry(i)`, `entries()`.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ManifestError
from .fs import Location
from .layout import DATA_DIR, TOKEN_KINDS, shard_basename
from .token_sequences import entry_sequences

INDEX_DIR = "_index"
PART_SHARDS = 1 << 16  # entries per part: ~5 MB decoded, the unit a reader loads
PARTS_CACHED = 2  # parts a reader keeps decoded (a rank streams shards in a random order)
EXT = {"parquet": ".parquet", "zarr": ".zarr"}
INT_FIELDS = ("num_rows", "first_sample_id", "last_sample_id", "bytes", "rows_per_block")


def shard_path(index: int, sha256: str, backend: str) -> str:
    """The one place a shard's relative path is derived (data/shard-NNNNN-<sha16>.ext)."""
    return f"{DATA_DIR}/{shard_basename(index)}-{sha256[:16]}{EXT[backend]}"


def is_token(manifest: dict) -> bool:
    rep = manifest.get("representation")
    return isinstance(rep, dict) and rep.get("kind") in TOKEN_KINDS


def entry_units(entry: dict, token: bool, seq_len: int | None) -> int:
    """What a shard contributes to the epoch's partition: its rows, or its sequences."""
    return entry_sequences(entry, int(seq_len)) if token else int(entry["num_rows"])


def entry_columns(entries: list[dict], manifest: dict) -> dict[str, np.ndarray]:
    """Shard entries (dicts, shard order) as write_index's columns: the INT_FIELDS, token
    kinds' num_sequences, and sha256 as (n, 32) uint8."""
    cols = {k: np.array([e[k] for e in entries], np.int64) for k in INT_FIELDS}
    if is_token(manifest):
        L = int(manifest["seq_len"])
        cols["num_sequences"] = np.array([entry_sequences(e, L) for e in entries], np.int64)
    cols["sha256"] = np.frombuffer(b"".join(bytes.fromhex(e["sha256"]) for e in entries), np.uint8).reshape(-1, 32)
    return cols


# ------------------------------------------------------------------ writing


def _parquet_bytes(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    # dictionary + RLE: equal sizes (every shard cut alike) shrink to a few bytes per page
    pq.write_table(table, buf, compression="zstd", use_dictionary=True, write_statistics=False)
    return buf.getvalue()


def write_index(loc: Location, manifest: dict, cols: dict[str, np.ndarray]) -> dict:
    """Write the index files of the shards in `cols` (one array per entry field, shard
    order; `sha256` as (n, 32) uint8) and return the manifest's `index` section. Files are
    named after their content, so a re-finalize never overwrites what a reader is using."""
    token = is_token(manifest)
    n = len(cols["num_rows"])
    units = cols["num_sequences"] if token else cols["num_rows"]
    ublob = _parquet_bytes(pa.table({"units": pa.array(np.asarray(units, np.int64))}))
    usha = hashlib.sha256(ublob).hexdigest()
    upath = f"{INDEX_DIR}/units-{usha[:16]}.parquet"
    loc.write_bytes_atomic(upath, ublob)
    fields = INT_FIELDS + (("num_sequences",) if token else ())
    parts = []
    for a in range(0, n, PART_SHARDS):
        b = min(n, a + PART_SHARDS)
        table = pa.table(
            {
                "index": pa.array(np.arange(a, b, dtype=np.int64)),
                "sha256": pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(32), b - a, [None, pa.py_buffer(np.ascontiguousarray(cols["sha256"][a:b]).tobytes())]
                ),
                **{f: pa.array(np.asarray(cols[f][a:b], np.int64)) for f in fields},
            }
        )
        blob = _parquet_bytes(table)
        sha = hashlib.sha256(blob).hexdigest()
        path = f"{INDEX_DIR}/part-{a // PART_SHARDS:05d}-{sha[:16]}.parquet"
        loc.write_bytes_atomic(path, blob)
        parts.append(
            {
                "path": path,
                "sha256": sha,
                "first_shard": a,
                "num_shards": b - a,
                "num_rows": int(np.asarray(cols["num_rows"][a:b], np.int64).sum()),
                "bytes": int(np.asarray(cols["bytes"][a:b], np.int64).sum()),
            }
        )
    return {
        "part_shards": PART_SHARDS,
        "units": {"path": upath, "sha256": usha},
        "parts": parts,
        "max_rows_per_block": int(np.max(cols["rows_per_block"])) if n else 0,
    }


def total_bytes(manifest: dict) -> int:
    """Bytes of all shards on disk, from the manifest alone (format 3: its index parts' sums)."""
    if manifest.get("format_version", 1) >= 3:
        return sum(int(p.get("bytes", 0)) for p in (manifest.get("index") or {}).get("parts", []))
    return sum(int(s.get("bytes", 0)) for s in manifest.get("shards", []))


def index_files(manifest: dict) -> set[str]:
    """The index files a format-3 manifest references (finalize keeps these, removes others)."""
    ix = manifest.get("index") or {}
    out = {p["path"] for p in ix.get("parts", [])}
    if ix.get("units"):
        out.add(ix["units"]["path"])
    return out


# ------------------------------------------------------------------ reading


class ShardIndex:
    """The shard table of an opened manifest, format 1-2 (inline) or 3 (index files).

    units: (num_shards,) int64, what each shard adds to the epoch's partition.
    entry(i): shard i's entry dict (index, path, num_rows, first_sample_id,
    last_sample_id, sha256, bytes, rows_per_block[, num_sequences]), checked."""

    def __init__(self, loc: Location, manifest: dict):
        self.loc, self.m = loc, manifest
        self.token = is_token(manifest)
        self.seq_len = manifest.get("seq_len")
        self.where = f"{loc.uri}/manifest.json"
        self._parts: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        self.group = None  # consecutive shards the epoch order keeps together (partition.shard_order)
        if manifest["format_version"] < 3:
            entries = manifest["shards"]
            self.num_shards = len(entries)
            self.units = np.array([entry_units(e, self.token, self.seq_len) for e in entries], np.int64)
            self.max_rows_per_block = max((int(e.get("rows_per_block", e["num_rows"])) for e in entries), default=0)
            self._inline = entries
            return
        self._inline = None
        ix = manifest["index"]
        self.num_shards = int(manifest["num_shards"])
        self.part_shards = self.group = int(ix["part_shards"])
        self.max_rows_per_block = int(ix["max_rows_per_block"])
        table = self._read_verified(ix["units"]["path"], ix["units"]["sha256"], "units")
        if table.schema.names != ["units"] or table.schema.field("units").type != pa.int64():
            raise ManifestError(f"{self.where}: index file {ix['units']['path']} is not a units table")
        self.units = table.column("units").to_numpy()
        want_total = (
            int(manifest["num_samples"]) * int(manifest["num_views"]) if self.token else int(manifest["num_rows"])
        )
        if len(self.units) != self.num_shards or (self.units < 1).any() or int(self.units.sum()) != want_total:
            raise ManifestError(
                f"{self.where}: index file {ix['units']['path']} disagrees with the manifest "
                f"({len(self.units)} shards summing to {int(self.units.sum())}; the manifest says "
                f"{self.num_shards} shards and {want_total} {'sequences' if self.token else 'rows'})"
            )

    def _read_verified(self, path: str, sha256: str, what: str) -> pa.Table:
        try:
            blob = self.loc.read_bytes(path)
        except FileNotFoundError:
            raise ManifestError(f"{self.where}: index {what} file {path} is missing") from None
        got = hashlib.sha256(blob).hexdigest()
        if got != sha256:
            raise ManifestError(
                f"{self.where}: index {what} file {path} does not hold the bytes the manifest "
                f"names (sha256 {sha256[:16]}…, found {got[:16]}…): it was modified or replaced"
            )
        try:
            return pq.read_table(pa.py_buffer(blob))
        except Exception as e:  # pyarrow raises many types for damaged files
            raise ManifestError(f"{self.where}: index {what} file {path} cannot be read: {e}") from None

    def __len__(self) -> int:
        return self.num_shards

    def _part(self, p: int) -> dict[str, np.ndarray]:
        if p in self._parts:
            self._parts.move_to_end(p)
            return self._parts[p]
        e = self.m["index"]["parts"][p]
        table = self._read_verified(e["path"], e["sha256"], f"part {p}")
        fields = ("index", "sha256") + INT_FIELDS + (("num_sequences",) if self.token else ())
        if table.schema.names != list(fields) or table.num_rows != e["num_shards"]:
            raise ManifestError(
                f"{self.where}: index part {e['path']} has columns {table.schema.names} and "
                f"{table.num_rows} entries; expected {list(fields)} and {e['num_shards']}"
            )
        cols = {f: table.column(f).to_numpy() for f in fields if f != "sha256"}
        sha = table.column("sha256").combine_chunks()
        cols["sha256"] = np.frombuffer(sha.buffers()[1], np.uint8)[: 32 * len(sha)].reshape(-1, 32)
        a = int(e["first_shard"])
        problem = _part_problem(cols, a, self.units[a : a + len(cols["index"])], self.token, self.seq_len)
        for f in ("num_rows", "bytes"):
            if problem is None and int(cols[f].sum()) != int(e[f]):
                problem = f"its shards hold {int(cols[f].sum())} {f.replace('num_', '')}, the manifest says {e[f]}"
        if problem is not None:
            raise ManifestError(f"{self.where}: index part {e['path']}: {problem}")
        self._parts[p] = cols
        while len(self._parts) > PARTS_CACHED:
            self._parts.popitem(last=False)
        return cols

    def entry(self, i: int) -> dict:
        if self._inline is not None:
            return self._inline[i]
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} of {self.num_shards}")
        cols = self._part(i // self.part_shards)
        r = i - (i // self.part_shards) * self.part_shards
        sha = cols["sha256"][r].tobytes().hex()
        out = {"index": i, "path": shard_path(i, sha, self.m["backend"])}
        out.update({f: int(cols[f][r]) for f in INT_FIELDS})
        out["sha256"] = sha
        if self.token:
            out["num_sequences"] = int(cols["num_sequences"][r])
        return out

    def entries(self) -> Iterator[dict]:
        """Every entry in shard order (one part decoded at a time)."""
        for i in range(self.num_shards):
            yield self.entry(i)


def _part_problem(cols: dict, first: int, units: np.ndarray, token: bool, seq_len: int | None) -> str | None:
    n = len(cols["index"])
    if not np.array_equal(cols["index"], np.arange(first, first + n)):
        return f"entries are not shards {first}..{first + n - 1} in order"
    for f in ("num_rows", "rows_per_block"):
        if (cols[f] < 1).any():
            return f"shard {first + int(np.flatnonzero(cols[f] < 1)[0])}: {f} must be >= 1"
    if (cols["bytes"] < 0).any():
        return f"shard {first + int(np.flatnonzero(cols['bytes'] < 0)[0])}: bytes must be >= 0"
    mine = cols["num_sequences"] if token else cols["num_rows"]
    if token:
        ns, rows = cols["num_sequences"], cols["num_rows"]
        bad = np.flatnonzero((ns < 1) | (ns > rows) | (rows > ns * int(seq_len)))
        if len(bad):
            i = int(bad[0])
            return (
                f"shard {first + i}: num_sequences {int(ns[i])} and num_rows {int(rows[i])} are not "
                f"sequences of 1..seq_len={seq_len} tokens"
            )
    if not np.array_equal(mine, units):
        i = int(np.flatnonzero(mine != units)[0])
        return (
            f"shard {first + i}: {int(mine[i])} {'sequences' if token else 'rows'}, the units file says {int(units[i])}"
        )
    return None
