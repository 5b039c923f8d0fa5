"""Shard I/O shared by the writer, reader and verifier: publish, commit records, the
manifest on disk, opening a shard (and proving its bytes are the committed ones).

A shard file is named `data/shard-NNNNN-<sha16>.parquet` (or a `.zarr` directory): the
name carries the first 16 hex digits of its sha256, so two writers that produce different
bytes for one shard never overwrite each other's file. The shard becomes part of the
dataset only when its commit record `_commits/shard-NNNNN.json` (one small object,
written atomically) names it. That record is the per-shard ownership rule: last
committer wins, and whichever wins names a file whose bytes match its checksum.

Nothing read from disk is trusted: commit records and manifest entries are validated
(safe relative paths, matching names) before anything is opened, written or deleted, and
`open_shard` hashes a shard's bytes the first time a process opens it (see "What is
checked when" in docs/format.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from .errors import CorruptShardError, CoverageError, ManifestError
from .fs import Location, temp_name
from .layout import Column, ParquetShard, ZarrShard, shard_basename, tree_sha256
from .manifest import COMMITS_DIR, MANIFEST, TMP_DIR, check_shard_path, now_iso, parse_manifest
from .parallel import pool
from .signing import check, manifest_payload, record_payload


def commit_path(index: int) -> str:
    return f"{COMMITS_DIR}/{shard_basename(index)}.json"


def read_manifest(loc: Location) -> dict:
    try:
        raw = loc.read_bytes(MANIFEST)
    except FileNotFoundError:
        raise ManifestError(f"no soft-label dataset at {loc.uri}: {MANIFEST} not found") from None
    return parse_manifest(raw, loc.uri)


# ------------------------------------------------------------------ publish


def publish(
    loc: Location,
    objects: dict[str, list],
    name_for: Callable[[str], str],
    accept: Callable[[str], bool] | None = None,
    hint: str = "shard",
) -> tuple[str, str] | None:
    """Make the shard `name_for(sha256)` (a file, or a directory of objects) appear complete
    or not at all. Returns (name, sha256), or None when `accept(sha256)` says no (then
    nothing is published). Locally the bytes are hashed while they are written to a temp
    file (two cores busy, not one), and the temp file is renamed once its name is known."""
    if not loc.is_local:
        sha = tree_sha256(objects)
        if accept is not None and not accept(sha):
            return None
        name = name_for(sha)
        if list(objects) == [""]:
            loc.fs.pipe_file(loc.path(name), b"".join(objects[""]))  # one PUT: atomic
        else:
            # Object stores have no directory rename; the objects become part of the
            # dataset only through the commit record written after them.
            loc.fs.pipe({loc.path(f"{name}/{k}"): b"".join(v) for k, v in objects.items()})
        return name, sha
    sha_future = pool().submit(tree_sha256, objects)
    tmp = loc.path(f"{TMP_DIR}/{temp_name(hint)}")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    try:
        if list(objects) == [""]:
            _write_file(tmp, objects[""])
        else:
            for key, parts in objects.items():
                _write_file(os.path.join(tmp, key), parts)
        sha = sha_future.result()
        if accept is not None and not accept(sha):
            _remove_local(tmp)
            return None
        name = name_for(sha)
        final = loc.path(name)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        if list(objects) == [""]:
            os.replace(tmp, final)
            return name, sha
        try:
            os.rename(tmp, final)
        except OSError:
            # Same name means same sha256 prefix: another writer (or an earlier run that
            # crashed before committing) already published these bytes. Keep theirs if equal.
            if os.path.isdir(final) and tree_sha256(read_objects(loc, name)) == sha:
                shutil.rmtree(tmp)
            else:
                shutil.rmtree(final, ignore_errors=True)
                os.rename(tmp, final)
        return name, sha
    except BaseException:
        sha_future.cancel()
        _remove_local(tmp)
        raise


def _remove_local(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _write_file(path: str, parts: list) -> None:  # tests replace this to simulate crashes
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.writelines(parts)
        f.flush()
        os.fsync(f.fileno())


def read_objects(loc: Location, name: str) -> dict[str, list]:
    """All bytes of a shard: {"": [bytes]} for a file, {relpath: [bytes]} for a directory."""
    p = loc.path(name)
    fs = loc.fs
    if not name.endswith(".zarr"):
        return {"": [fs.cat_file(p)]}
    files = fs.find(p)
    if not files:
        raise FileNotFoundError(p)
    prefix = p.rstrip("/") + "/"
    got = fs.cat(files) if len(files) > 1 else {files[0]: fs.cat_file(files[0])}
    return {f[len(prefix) :]: [v] for f, v in got.items()}


# ------------------------------------------------------------------ commit records


def write_commit(loc: Location, record: dict, signer=None) -> dict:
    """Write a shard's commit record (signed when a signer is given, storage/signing.py)."""
    record = dict(record, committed_at=now_iso(), writer={"host": socket.gethostname(), "pid": os.getpid()})
    record.pop("signature", None)
    if signer is not None:
        record["signature"] = signer.sign(record_payload(record))
    loc.write_bytes_atomic(commit_path(record["index"]), json.dumps(record, indent=1).encode())
    return record


def read_commits(loc: Location, backend: str) -> dict[int, dict]:
    """{shard index: commit record} for every committed shard, each record validated
    (its file name, index and path agree and the path stays inside the dataset). One LIST
    and one read per record: call it once per run (plan, finalize), never per shard."""
    names = [n for n in loc.listdir(COMMITS_DIR) if n.endswith(".json")]
    if not names:
        return {}
    paths = [loc.path(f"{COMMITS_DIR}/{n}") for n in names]
    raw = loc.fs.cat(paths) if len(paths) > 1 else {paths[0]: loc.fs.cat_file(paths[0])}
    out = {}
    for p, data in sorted(raw.items()):
        rec = parse_commit(loc, os.path.basename(p), data, backend)
        out[rec["index"]] = rec
    return out


def committed_indices(loc: Location) -> list[int]:
    """The shard indices whose commit record exists, from one listing (no record is read)."""
    out = []
    for n in loc.listdir(COMMITS_DIR):
        stem = n[: -len(".json")] if n.endswith(".json") else ""
        if stem.startswith("shard-") and stem[6:].isdigit() and stem == shard_basename(int(stem[6:])):
            out.append(int(stem[6:]))
    return sorted(out)


def read_commit(loc: Location, backend: str, index: int) -> dict | None:
    """Shard `index`'s commit record (validated), or None when it is not committed: one
    read, whatever the number of shards (a writer publishing shard i reads only this)."""
    name = f"{shard_basename(index)}.json"
    try:
        data = loc.read_bytes(f"{COMMITS_DIR}/{name}")
    except FileNotFoundError:
        return None
    return parse_commit(loc, name, data, backend)


def parse_commit(loc: Location, name: str, data: bytes, backend: str) -> dict:
    """A commit record's JSON, checked: its file name, index and path agree, the path stays
    inside the dataset, the sha256 matches the path, num_sequences is in range."""
    where = f"{loc.uri}: commit record {COMMITS_DIR}/{name}"
    try:
        rec = json.loads(data)
        idx = rec["index"]
    except (ValueError, KeyError, TypeError) as e:
        raise ManifestError(
            f"{where} is unreadable ({type(e).__name__}: {e}); delete it to rewrite that shard"
        ) from None
    if not isinstance(idx, int) or isinstance(idx, bool) or idx < 0 or name != f"{shard_basename(idx)}.json":
        raise ManifestError(f"{where}: index {idx!r} does not match the record's file name")
    check_shard_path(rec.get("path"), backend, idx, where)
    sha = rec.get("sha256")
    if not isinstance(sha, str) or len(sha) != 64 or rec["path"].split("-")[-1].split(".")[0] != sha[:16]:
        raise ManifestError(f"{where}: sha256 {sha!r} does not match its path {rec['path']!r}")
    ns, rows = rec.get("num_sequences"), rec.get("num_rows")
    if ns is not None and not (
        isinstance(ns, int) and not isinstance(ns, bool) and isinstance(rows, int) and 1 <= ns <= rows
    ):
        raise ManifestError(f"{where}: num_sequences {ns!r} must be an int in [1, num_rows={rows!r}]")
    return rec


def record_version(c: dict) -> int:
    """The format a commit record was written in: its `format_version` (3 on), else 2 when
    it carries a lineage (format 2 records always do), else 1."""
    v = c.get("format_version")
    return v if isinstance(v, int) and not isinstance(v, bool) else (2 if "lineage" in c else 1)


def plan_of(manifest: dict) -> dict:
    """What every format-3 commit record binds: the shards and samples the run planned."""
    return {"shards": manifest.get("planned_shards"), "samples": manifest.get("planned_samples")}


def commit_problem(i: int, entry: dict | None, c: dict | None, manifest: dict, lineage: str | None) -> str | None:
    """Why shard i's manifest entry and commit record disagree, or None. Besides the shard
    itself (path, checksum, rows), a record binds the dataset: its lineage (format >= 2),
    its format and the plan (format 3), so a manifest edited into an older format, or a
    dataset that drops shards consistently, no longer agrees with its own records."""
    if c is None:
        return f"shard {i} is in the manifest but has no commit record"
    if entry is None:
        return f"shard {i} is committed ({c['path']}) but not in the manifest"
    if (c["path"], c["sha256"]) != (entry["path"], entry["sha256"]):
        return f"shard {i}: the manifest names {entry['path']}, its commit record {c['path']}"
    if (c.get("num_sequences"), c.get("num_rows")) != (entry.get("num_sequences"), entry.get("num_rows")):
        return (
            f"shard {i} ({c['path']}): the manifest says num_sequences {entry.get('num_sequences')} / "
            f"num_rows {entry.get('num_rows')}, its commit record {c.get('num_sequences')} / {c.get('num_rows')}"
        )
    if (c.get("first_sample_id"), c.get("last_sample_id")) != (
        entry.get("first_sample_id"),
        entry.get("last_sample_id"),
    ):
        return (
            f"shard {i} ({c['path']}): the manifest says sample ids {entry.get('first_sample_id')}.."
            f"{entry.get('last_sample_id')}, its commit record {c.get('first_sample_id')}..{c.get('last_sample_id')}"
        )
    fv, rv = manifest["format_version"], record_version(c)
    if rv > fv:
        return (
            f"shard {i}: its commit record was written in format {rv}, the manifest claims format {fv}: "
            f"a newer dataset presented as an older one (the manifest was edited)"
        )
    if fv >= 2 and lineage is not None:
        if "lineage" not in c:
            return f"shard {i} ({c['path']}): its commit record has no lineage (every format-{fv} record has one)"
        if c["lineage"] != lineage:
            return (
                f"shard {i} ({c['path']}) was committed by a run labelling something else "
                f"(commit lineage {c.get('lineage')}, manifest {lineage}; writer {c.get('writer')})"
            )
    if fv >= 3:
        if rv != fv:
            return f"shard {i} ({c['path']}): its commit record is format {rv}, the manifest format {fv}"
        if c.get("plan") != plan_of(manifest):
            return (
                f"shard {i} ({c['path']}): its commit record binds a plan of {c.get('plan')}, the manifest "
                f"{plan_of(manifest)} (shards or samples dropped or added after labelling?)"
            )
    return None


def check_signatures(manifest: dict, records: list[dict], verifier, uri: str) -> None:
    """With a verifier, the manifest and these commit records must carry its valid
    signatures (storage/signing.py); ManifestError naming the first that does not."""
    if verifier is None:
        return
    check(verifier, manifest_payload(manifest), manifest.get("signature"), f"{uri}/{MANIFEST}")
    for c in records:
        check(verifier, record_payload(c), c.get("signature"), f"{uri}: commit record {commit_path(c['index'])}")


def commits_disagree(manifest: dict, entries: list[dict], commits: dict[int, dict], lineage: str | None) -> list[str]:
    """Why the committed shards and the manifest's entries disagree (empty when they agree)."""
    listed = {e["index"]: e for e in entries}
    out = []
    for i in sorted(set(listed) | set(commits)):
        p = commit_problem(i, listed.get(i), commits.get(i), manifest, lineage)
        if p is not None:
            out.append(p)
    return out


# ------------------------------------------------------------------ opening, with the integrity check

# Shards whose bytes this process has hashed: {(dataset uri, path): (sha256, stat signature)}.
# A shard is hashed once per process (and again if its files' sizes or mtimes change).
# Bounded (least recently used out): a run writing 10^6 shards must not hold 10^6 entries.
_VERIFIED: OrderedDict[tuple[str, str], tuple[str, tuple]] = OrderedDict()
_VERIFIED_LOCK = threading.Lock()
VERIFIED_CAP = 1 << 16


def _remember(key: tuple[str, str], value: tuple[str, tuple]) -> None:
    with _VERIFIED_LOCK:
        _VERIFIED[key] = value
        _VERIFIED.move_to_end(key)
        while len(_VERIFIED) > VERIFIED_CAP:
            _VERIFIED.popitem(last=False)


def _local_signature(root: str) -> tuple:
    if os.path.isdir(root):
        sig = []
        for d, _, files in os.walk(root):
            for f in files:
                st = os.stat(os.path.join(d, f))
                sig.append((os.path.relpath(os.path.join(d, f), root), st.st_size, st.st_mtime_ns))
        return tuple(sorted(sig))
    st = os.stat(root)
    return ((st.st_size, st.st_mtime_ns),)


def _hash_local_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        view = memoryview(buf)
        while True:
            n = f.readinto(buf)
            if not n:
                return h.hexdigest()
            h.update(view[:n])


def mark_verified(loc: Location, name: str, sha256: str) -> None:
    """The writer just published these bytes: this process need not hash them again."""
    if loc.is_local:
        _remember((loc.uri, name), (sha256, _local_signature(loc.path(name))))


def forget_verified() -> None:
    """Forget every shard this process has hashed (tests; benchmarks of a first open)."""
    with _VERIFIED_LOCK:
        _VERIFIED.clear()


def _mismatch(loc: Location, name: str, want: str, got: str) -> CorruptShardError:
    return CorruptShardError(
        f"{loc.uri}: shard {name} does not hold the bytes that were committed "
        f"(sha256 mismatch: recorded {want[:16]}…, found {got[:16]}…): it was damaged or "
        f"replaced. Run `distill inspect {loc.uri} --verify` for details; re-label to repair."
    )


def open_shard(
    loc: Location, entry: dict, backend: str, spec: list[Column], *, rehash: bool = False
) -> ParquetShard | ZarrShard:
    """A ParquetShard/ZarrShard over the manifest entry's shard, whose bytes are proved to
    hash to the entry's sha256 before the first read in this process (every time with
    rehash=True, as verify() does)."""
    name = check_shard_path(entry["path"], backend, entry.get("index"), f"{loc.uri}: manifest shard entry")
    want = entry["sha256"]
    label = f"{loc.uri}: shard {name}"
    try:
        if loc.is_local:
            root = loc.path(name)
            sig = _local_signature(root)
            key = (loc.uri, name)
            if rehash or _VERIFIED.get(key) != (want, sig):
                got = _hash_local_file(root) if backend == "parquet" else tree_sha256(read_objects(loc, name))
                if got != want:
                    raise _mismatch(loc, name, want, got)
                _remember(key, (want, sig))
            if backend == "parquet":
                return ParquetShard(root, spec, name=label)
            from zarr.storage import LocalStore

            return ZarrShard(
                LocalStore(root, read_only=True),
                spec,
                name=label,
                raw_get=lambda k: _read_local(os.path.join(root, k)),
                raw_has=lambda k: os.path.isfile(os.path.join(root, k)),
            )
        # Object store: fetch the shard once, hash it, and read from those very bytes.
        objects = read_objects(loc, name)
        got = tree_sha256(objects)
        if got != want:
            raise _mismatch(loc, name, want, got)
        if backend == "parquet":
            return ParquetShard(pa.py_buffer(objects[""][0]), spec, name=label)
        from zarr.storage import MemoryStore

        flat = {k: v[0] for k, v in objects.items()}
        from zarr.core.buffer import default_buffer_prototype

        proto = default_buffer_prototype()
        store = MemoryStore({k: proto.buffer.from_bytes(v) for k, v in flat.items()}, read_only=True)
        return ZarrShard(
            store, spec, name=label, raw_get=lambda k: _get_or_missing(flat, k), raw_has=lambda k: k in flat
        )
    except FileNotFoundError:
        raise CorruptShardError(f"{label} is missing") from None
    except (CorruptShardError, ManifestError):
        raise
    except Exception as e:  # pyarrow/zarr raise many types for damaged files
        raise CorruptShardError(f"{label} cannot be opened: {type(e).__name__}: {e}") from None


def _read_local(path: str):
    return np.fromfile(path, dtype=np.uint8)


def _get_or_missing(d: dict, key: str):
    try:
        return d[key]
    except KeyError:
        raise FileNotFoundError(key) from None


# ------------------------------------------------------------------ coverage


def read_id_columns(
    loc: Location, entries, backend: str, spec: list[Column]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_id, view, shard position) of every row, `entries` (the shards) in order."""
    sids, views, shard_of = [], [], []
    for pos, s in enumerate(entries):
        sh = open_shard(loc, s, backend, spec)
        try:
            cols = sh.read(0, sh.num_rows, ["sample_id", "view"])
        except CorruptShardError:
            raise
        except Exception as e:
            raise CorruptShardError(f"{loc.uri}: shard {s['path']} cannot be read: {type(e).__name__}: {e}") from None
        sids.append(cols["sample_id"])
        views.append(cols["view"])
        shard_of.append(np.full(len(cols["sample_id"]), pos, np.int32))
    if not sids:
        return np.zeros(0, np.int64), np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(sids), np.concatenate(views), np.concatenate(shard_of)


def check_coverage(sids: np.ndarray, views: np.ndarray, shard_of: np.ndarray, num_views: int, uri: str) -> int:
    """Every (sample_id, view) exactly once and every sample has views 0..V-1. Returns #samples."""
    order = np.lexsort((views, sids))
    s, v, sh = sids[order], views[order], shard_of[order]
    dup = np.flatnonzero((s[1:] == s[:-1]) & (v[1:] == v[:-1]))
    if len(dup):
        i = dup[0]
        raise CoverageError(
            f"{uri}: (sample_id {s[i]}, view {v[i]}) appears more than once "
            f"(shards {sh[i]} and {sh[i + 1]}); {len(dup)} duplicate row(s) in all"
        )
    uniq, start, counts = np.unique(s, return_index=True, return_counts=True)
    bad = np.flatnonzero(counts != num_views)
    if len(bad):
        sid = uniq[bad[0]]
        have = v[start[bad[0]] : start[bad[0]] + counts[bad[0]]].tolist()
        raise CoverageError(
            f"{uri}: sample_id {sid} has views {have}, expected all of 0..{num_views - 1}; "
            f"{len(bad)} sample(s) incomplete"
        )
    expected_views = np.tile(np.arange(num_views), len(uniq))
    if not np.array_equal(v, expected_views):
        i = int(np.flatnonzero(v != expected_views)[0])
        raise CoverageError(f"{uri}: sample_id {s[i]} has view {v[i]} where view {expected_views[i]} was expected")
    return int(len(uniq))
