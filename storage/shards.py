"""Shard I/O shared by the writer, reader and verifier: publish, commit records, open.

A shard file is named `shard-NNNNN-<sha16>.parquet` (or a `.zarr` directory): the name
carries the first 16 hex digits of its sha256, so two writers that produce different
bytes for one shard never overwrite each other's file. The shard becomes part of the
dataset only when its commit record `_commits/shard-NNNNN.json` (one small object,
written atomically) names it. That record is the per-shard ownership rule: last
committer wins, and whichever wins names a file whose bytes match its checksum.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import uuid

import numpy as np

from .errors import CorruptShardError, ManifestError
from .fs import Location
from .layout import Column, ParquetShard, ZarrShard, shard_basename
from .manifest import COMMITS_DIR, TMP_DIR, now_iso

EXT = {"parquet": ".parquet", "zarr": ".zarr"}


def shard_filename(index: int, sha256: str, backend: str) -> str:
    return f"{shard_basename(index)}-{sha256[:16]}{EXT[backend]}"


def commit_path(index: int) -> str:
    return f"{COMMITS_DIR}/{shard_basename(index)}.json"


def publish(loc: Location, name: str, objects: dict[str, bytes]) -> None:
    """Make `name` (a file, or a directory of objects) appear complete or not at all."""
    if not loc.is_local:
        if list(objects) == [""]:
            loc.fs.pipe_file(loc.path(name), objects[""])  # one PUT: atomic
        else:
            # Object stores have no directory rename; the objects become part of the
            # dataset only through the commit record written after them.
            loc.fs.pipe({loc.path(f"{name}/{k}"): v for k, v in objects.items()})
        return
    final = loc.path(name)
    tmp = loc.path(f"{TMP_DIR}/{name}.{uuid.uuid4().hex[:12]}")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    if list(objects) == [""]:
        _write_file(tmp, objects[""])
        os.replace(tmp, final)
        return
    for key, data in objects.items():
        _write_file(os.path.join(tmp, key), data)
    try:
        os.rename(tmp, final)
    except OSError:
        # Same name means same sha256 prefix: another writer (or an earlier run that
        # crashed before committing) already published these bytes. Keep theirs if equal.
        if os.path.isdir(final) and read_objects(loc, name) == objects:
            shutil.rmtree(tmp)
        else:
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)


def _write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def read_objects(loc: Location, name: str) -> dict[str, bytes]:
    """All bytes of a shard: {"": bytes} for a file, {relpath: bytes} for a directory."""
    p = loc.path(name)
    fs = loc.fs
    if not name.endswith(".zarr"):
        return {"": fs.cat_file(p)}
    files = fs.find(p)
    if not files:
        raise FileNotFoundError(p)
    prefix = p.rstrip("/") + "/"
    got = fs.cat(files) if len(files) > 1 else {files[0]: fs.cat_file(files[0])}
    return {f[len(prefix):]: v for f, v in got.items()}


def write_commit(loc: Location, record: dict) -> dict:
    record = dict(record, committed_at=now_iso(), writer={"host": socket.gethostname(), "pid": os.getpid()})
    loc.write_bytes_atomic(commit_path(record["index"]), json.dumps(record, indent=1).encode())
    return record


def read_commits(loc: Location) -> dict[int, dict]:
    """{shard index: commit record} for every committed shard."""
    names = [n for n in loc.listdir(COMMITS_DIR) if n.endswith(".json") and n.startswith("shard-")]
    out = {}
    if not names:
        return out
    paths = [loc.path(f"{COMMITS_DIR}/{n}") for n in names]
    raw = loc.fs.cat(paths) if len(paths) > 1 else {paths[0]: loc.fs.cat_file(paths[0])}
    for p, data in raw.items():
        try:
            rec = json.loads(data)
            out[int(rec["index"])] = rec
        except (ValueError, KeyError, TypeError) as e:
            raise ManifestError(f"{loc.uri}: commit record {p} is unreadable ({e}); delete it to rewrite that shard") from None
    return out


def open_shard(loc: Location, name: str, backend: str, spec: list[Column]):
    """A ParquetShard/ZarrShard reading `name` under `loc`."""
    try:
        if backend == "parquet":
            src = loc.path(name) if loc.is_local else loc.fs.open(loc.path(name), "rb", block_size=8 << 20)
            return ParquetShard(src, spec)
        from zarr.storage import FsspecStore, LocalStore
        root = loc.path(name)
        if loc.is_local:
            store = LocalStore(root, read_only=True)
            raw_get = lambda key: np.fromfile(os.path.join(root, key), dtype=np.uint8)  # noqa: E731
        else:
            store = FsspecStore.from_url(loc.url(name), storage_options=loc.storage_options, read_only=True)
            raw_get = lambda key: loc.fs.cat_file(f"{root}/{key}")  # noqa: E731
        return ZarrShard(store, spec, raw_get=raw_get)
    except FileNotFoundError:
        raise CorruptShardError(f"{loc.uri}: shard {name} is missing") from None
    except Exception as e:  # pyarrow/zarr raise many types for damaged files
        raise CorruptShardError(f"{loc.uri}: shard {name} cannot be opened: {type(e).__name__}: {e}") from None
