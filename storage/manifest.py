"""manifest.json: the single source of truth of a soft-label dataset (see docs/format.md).

It is written twice: as `status: "partial"` when a writer first opens the URI (so that a
resumed or concurrent writer can check it labels the same thing), and as
`status: "complete"` by `finalize()`, last and atomically. Shards are recorded in
between by one small commit record each (`_commits/shard-NNNNN.json`), so writers of
different shards never read-modify-write a shared file.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from typing import Any

from .errors import ManifestError, MismatchError

FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
MANIFEST = "manifest.json"
COMMITS_DIR = "_commits"
TMP_DIR = "_tmp"
BACKENDS = ("parquet", "zarr")
KINDS = ("dense", "topk")
DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "lz4", "zstd")

# Fields that decide whether two writers label *the same thing*. A resumed writer must
# match all of them; anything else (names, extra metadata) may differ.
IDENTITY_FIELDS = (
    "format_version", "backend", "num_classes", "num_views", "temperature",
    "representation", "feature", "teacher.fingerprint", "data.fingerprint",
    "data.split", "data.transform",
)

REQUIRED_TEACHER = ("name", "fingerprint")
REQUIRED_DATA = ("name", "split", "fingerprint", "transform")


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def producer() -> dict[str, str]:
    try:
        from importlib.metadata import version
        v = version("distillery")
    except Exception:  # running from a source tree that is not installed
        v = "0+unknown"
    return {"name": "distillery", "version": v}


def get_field(d: dict, dotted: str) -> Any:
    cur: Any = d
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            raise KeyError(dotted)
        cur = cur[part]
    return cur


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return math.isclose(float(a), float(b), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


def _flatten(expect: dict, prefix: str = "") -> dict[str, Any]:
    """{"teacher": {"fingerprint": x}} -> {"teacher.fingerprint": x}; dotted keys pass through.

    Dicts are flattened only one level into known nested sections so that a whole
    `representation` dict can still be compared as a value.
    """
    out: dict[str, Any] = {}
    for k, v in expect.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k in ("teacher", "data", "producer") and not prefix:
            out.update(_flatten(v, prefix=f"{key}."))
        else:
            out[key] = v
    return out


def diff_fields(manifest: dict, wanted: dict, fields: tuple[str, ...] | None = None) -> list[tuple[str, Any, Any]]:
    """[(field, wanted_value, found_value)] for every field that differs (missing counts as different)."""
    flat = _flatten(wanted)
    keys = fields if fields is not None else tuple(flat)
    out = []
    for f in keys:
        want = flat[f] if fields is None else _get_or(wanted, f)
        found = _get_or(manifest, f)
        if not _equal(want, found):
            out.append((f, want, found))
    return out


_MISSING = "<missing>"


def _get_or(d: dict, dotted: str) -> Any:
    try:
        return get_field(d, dotted)
    except KeyError:
        return _MISSING


def check_expect(manifest: dict, expect: dict | None, uri: str) -> None:
    """Raise MismatchError naming every field whose value differs from `expect`."""
    if not expect:
        return
    diffs = diff_fields(manifest, expect)
    if diffs:
        lines = [f"  {f}: expected {w!r}, found {v!r}" for f, w, v in diffs]
        raise MismatchError(f"soft-label dataset at {uri} does not match what the caller expects:\n" + "\n".join(lines))


def parse_manifest(raw: bytes, uri: str) -> dict:
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{uri}/{MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{uri}/{MANIFEST} must hold a JSON object, found {type(m).__name__}")
    v = m.get("format_version")
    if v not in SUPPORTED_FORMAT_VERSIONS:
        raise ManifestError(
            f"{uri}/{MANIFEST}: unknown format_version {v!r}; this distillery reads "
            f"{list(SUPPORTED_FORMAT_VERSIONS)} (upgrade distillery to read newer datasets)")
    for key in ("backend", "status", "num_classes", "num_views", "temperature", "representation", "teacher", "data"):
        if key not in m:
            raise ManifestError(f"{uri}/{MANIFEST}: required field {key!r} is missing")
    if m["backend"] not in BACKENDS:
        raise ManifestError(f"{uri}/{MANIFEST}: backend {m['backend']!r} is not one of {list(BACKENDS)}")
    if m["status"] not in ("partial", "complete"):
        raise ManifestError(f"{uri}/{MANIFEST}: status {m['status']!r} is not 'partial' or 'complete'")
    return m


def dump_manifest(m: dict) -> bytes:
    return (json.dumps(m, indent=2, sort_keys=False) + "\n").encode()


def validate_lineage(teacher: Any, data: Any) -> None:
    """The manifest must say exactly which teacher and data produced the labels."""
    for what, d, req in (("teacher", teacher, REQUIRED_TEACHER), ("data", data, REQUIRED_DATA)):
        if not isinstance(d, dict):
            raise ValueError(f"{what} must be a dict with keys {list(req)}, got {type(d).__name__}")
        missing = [k for k in req if k not in d]
        if missing:
            raise ValueError(f"{what} is missing required key(s) {missing} (needs {list(req)})")
        try:
            json.dumps(d)
        except TypeError as e:
            raise ValueError(f"{what} must be JSON-serialisable: {e}") from None
