"""What an attacker (or a careless script) with write access to a dataset can do: read its
manifest and shard table, edit them, and write them back CONSISTENTLY, every checksum and
digest recomputed (index files, the manifest digest), so that the only things left to
catch the edit are the cross-checks the format makes (commit records, shard bytes,
signatures). Tests use it to attack real datasets; nothing in distillery imports it."""

from __future__ import annotations

import json
import os

from storage.fs import Location
from storage.index import ShardIndex, entry_columns, write_index
from storage.manifest import COMMITS_DIR, MANIFEST, manifest_digest
from storage.shards import read_commits


def load(uri: str) -> tuple[dict, list[dict]]:
    """(manifest dict, shard entries) as stored, without the reader's checks."""
    loc = Location(uri)
    m = json.loads(loc.read_bytes(MANIFEST))
    entries = m["shards"] if m.get("format_version", 1) < 3 else list(ShardIndex(loc, m).entries())
    return m, [dict(e) for e in entries]


def save(uri: str, m: dict, entries: list[dict] | None = None, *, digest: bool = True) -> None:
    """Write `m` (and, format 3, `entries` as fresh index files) with the digest recomputed
    (digest=False: drop it, as a format-1 manifest has none)."""
    loc = Location(uri)
    m = dict(m)
    if entries is not None:
        if m.get("format_version", 1) >= 3:
            m["index"] = write_index(loc, m, entry_columns(entries, m))
            m.pop("shards", None)
        else:
            m["shards"] = entries
    m.pop("digest", None)
    if digest:
        m["digest"] = manifest_digest(m)
    loc.write_bytes_atomic(MANIFEST, (json.dumps(m, indent=2) + "\n").encode())


def commits(uri: str) -> dict[int, dict]:
    m = json.loads(Location(uri).read_bytes(MANIFEST))
    return read_commits(Location(uri), m["backend"])


def write_commit(uri: str, rec: dict) -> None:
    loc = Location(uri)
    loc.write_bytes_atomic(f"{COMMITS_DIR}/shard-{rec['index']:05d}.json", json.dumps(rec, indent=1).encode())


def drop_commit(uri: str, index: int) -> None:
    os.unlink(os.path.join(uri, COMMITS_DIR, f"shard-{index:05d}.json"))
