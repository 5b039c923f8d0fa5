"""manifest.json: the single source of truth of a soft-label dataset (see docs/format.md).

It is written twice: as `status: "partial"` when a writer first opens the URI (so that a
resumed or concurrent writer can check it labels the same thing), and as
`status: "complete"` by `finalize()`, last and atomically. Shards are recorded in
between by one small commit record each (`_commits/shard-NNNNN.json`), so writers of
different shards never read-modify-write a shared file.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import re
from typing import Any

from .errors import ManifestError, MismatchError
from .layout import DATA_DIR, TOKEN_KINDS, columns_for, index_dtype
from .tokens import representation_problem

# 2: shards under data/, 2-D Parquet columns as fixed_size_list, Zarr dimension_names,
#    a manifest digest, a lineage digest in every commit record.
# 3: the shard table in hashed index files (storage/index.py), not inline; commit records
#    carry format_version and the plan (planned shards and samples). 1 and 2 are still read.
FORMAT_VERSION = 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3)
MANIFEST = "manifest.json"
COMMITS_DIR = "_commits"
TMP_DIR = "_tmp"
BACKENDS = ("parquet", "zarr")
KINDS = ("dense", "topk") + TOKEN_KINDS  # token_*: one row per token position (storage/tokens.py)
DTYPES = ("float16", "float32")
COMPRESSIONS = ("none", "lz4", "zstd")

# Fields that decide whether two writers label *the same thing*. A resumed writer must
# match all of them; anything else (names, extra metadata) may differ.
IDENTITY_FIELDS = (
    "backend",
    "num_classes",
    "num_views",
    "temperature",
    "representation",
    "feature",
    "teacher.fingerprint",
    "data.fingerprint",
    "data.split",
    "data.transform",
)

# and, for the token kinds, these too (not part of older datasets' lineage digests)
TOKEN_IDENTITY_FIELDS = ("vocab_size", "seq_len")


def identity_fields(m: dict) -> tuple[str, ...]:
    """The identity fields of this manifest's kind."""
    kind = m.get("representation", {}).get("kind") if isinstance(m.get("representation"), dict) else None
    return IDENTITY_FIELDS + (TOKEN_IDENTITY_FIELDS if kind in TOKEN_KINDS else ())


REQUIRED_TEACHER = ("name", "fingerprint")
REQUIRED_DATA = ("name", "split", "fingerprint", "transform")


def now_iso() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


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
    """The manifest, checked: valid JSON, a known format_version, every field of the
    right type (named when not), safe shard paths, and an intact digest."""
    where = f"{uri}/{MANIFEST}"
    try:
        m = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ManifestError(f"{where} is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{where} must hold a JSON object, found {type(m).__name__}")
    v = m.get("format_version")
    if v not in SUPPORTED_FORMAT_VERSIONS:
        raise ManifestError(
            f"{where}: unknown format_version {v!r}; this distillery reads "
            f"{list(SUPPORTED_FORMAT_VERSIONS)} (upgrade distillery to read newer datasets)"
        )
    validate_manifest(m, where)
    if v >= 2:
        want = manifest_digest(m)
        if m.get("digest") != want:
            raise ManifestError(
                f"{where} was modified after distillery wrote it: its digest is "
                f"{m.get('digest')!r}, its content hashes to {want!r}. Restore it or re-label."
            )
    return m


def manifest_digest(m: dict) -> str:
    """sha256 of the manifest's canonical JSON without its `digest` and `signature` fields."""
    body = {k: v for k, v in m.items() if k not in ("digest", "signature")}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def lineage_digest(m: dict) -> str:
    """What a commit record carries to say which labelling it belongs to: a hash of the
    identity fields (teacher, data, transform, temperature, representation, ...)."""
    ident = {f: _get_or(m, f) for f in identity_fields(m)}
    return "sha256:" + hashlib.sha256(json.dumps(ident, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# five digits, more from shard 100,000 on (shard_basename's "shard-{i:05d}"; no leading zeros beyond five)
_SHARD_NAME = re.compile(rf"^(?:{DATA_DIR}/)?shard-(\d{{5}}|[1-9]\d{{5,}})-([0-9a-f]{{16}})\.(parquet|zarr)$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def check_shard_path(path: Any, backend: str, index: int | None, where: str) -> str:
    """A shard path must be a plain relative name inside the dataset (`data/shard-NNNNN-<sha16>.ext`,
    or at the root for format 1): never absolute, never `..`, never another URL."""
    m = _SHARD_NAME.match(path) if isinstance(path, str) else None
    ext = {"parquet": "parquet", "zarr": "zarr"}.get(backend)
    if m is None or m.group(3) != ext or (index is not None and int(m.group(1)) != index):
        raise ManifestError(
            f"{where}: shard path {path!r} is not allowed: shards are named "
            f"{DATA_DIR}/shard-{'NNNNN' if index is None else f'{index:05d}'}-<16 hex>.{ext} "
            f"inside the dataset (no absolute paths, '..' or URLs)"
        )
    return path


def _need(cond: bool, where: str, field: str, what: str, value: Any) -> None:
    if not cond:
        shown = repr(value) if not isinstance(value, (dict, list)) or len(repr(value)) < 80 else type(value).__name__
        raise ManifestError(f"{where}: field {field!r} must be {what}, found {shown}")


def _is_int(x: Any, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def validate_manifest(m: dict, where: str) -> None:
    """Structure and types of every field (the manifest schema, docs/format.md)."""
    v3 = m.get("format_version", 1) >= 3
    for key in (
        "backend",
        "status",
        "num_classes",
        "num_views",
        "temperature",
        "representation",
        "teacher",
        "data",
    ) + (() if v3 else ("shards",)):
        if key not in m:
            raise ManifestError(f"{where}: required field {key!r} is missing")
    _need(m["backend"] in BACKENDS, where, "backend", f"one of {list(BACKENDS)}", m["backend"])
    _need(m["status"] in ("partial", "complete"), where, "status", "'partial' or 'complete'", m["status"])
    C = m["num_classes"]
    _need(_is_int(C, 2), where, "num_classes", "an int >= 2", C)
    _need(_is_int(m["num_views"], 1), where, "num_views", "an int >= 1", m["num_views"])
    T = m["temperature"]
    _need(
        isinstance(T, (int, float)) and not isinstance(T, bool) and math.isfinite(T) and T > 0,
        where,
        "temperature",
        "a finite number > 0",
        T,
    )
    rep = m["representation"]
    _need(isinstance(rep, dict), where, "representation", "an object {kind, dtype, k}", rep)
    _need(rep.get("kind") in KINDS, where, "representation.kind", f"one of {list(KINDS)}", rep.get("kind"))
    token = rep["kind"] in TOKEN_KINDS
    if token:
        _validate_token_fields(m, where)
    else:
        _need(rep.get("dtype") in DTYPES, where, "representation.dtype", f"one of {list(DTYPES)}", rep.get("dtype"))
    if rep["kind"] == "topk":
        _need(
            _is_int(rep.get("k"), 1) and rep["k"] <= C,
            where,
            "representation.k",
            f"an int in [1, num_classes={C}]",
            rep.get("k"),
        )
        _need(
            rep.get("index_dtype", index_dtype(C)) == index_dtype(C),
            where,
            "representation.index_dtype",
            repr(index_dtype(C)),
            rep.get("index_dtype"),
        )
    elif not token:
        _need(rep.get("k") is None, where, "representation.k", "null for a dense representation", rep.get("k"))
    feat = m.get("feature")
    if feat is not None:
        _need(
            isinstance(feat, dict)
            and isinstance(feat.get("name"), str)
            and isinstance(feat.get("shape"), list)
            and feat["shape"]
            and all(_is_int(d, 1) for d in feat["shape"])
            and feat.get("dtype") in DTYPES,
            where,
            "feature",
            "null or {name, shape: [ints >= 1], dtype}",
            feat,
        )
    for sec, req in (("teacher", REQUIRED_TEACHER), ("data", REQUIRED_DATA)):
        d = m[sec]
        _need(isinstance(d, dict), where, sec, "an object", d)
        for k in req:
            _need(k in d, where, f"{sec}.{k}", "present", "<missing>")
    for key in ("num_samples", "num_rows", "num_shards"):
        _need(m.get(key) is None or _is_int(m[key]), where, key, "null or an int >= 0", m.get(key))
    for key in ("planned_shards", "planned_samples"):
        _need(m.get(key) is None or _is_int(m[key], 1), where, key, "null or an int >= 1", m.get(key))
    cols = m.get("columns")
    if cols is not None:
        want = {c.name: c.to_dict() for c in columns_for(m)}
        _need(cols == want, where, "columns", f"{want} (implied by num_classes, representation and feature)", cols)
    _validate_layout(m.get("layout"), where)
    if m["status"] == "complete":
        for key in ("num_samples", "num_rows", "num_shards"):
            _need(_is_int(m.get(key)), where, key, "an int in a complete manifest", m.get(key))
        for key, got in (("planned_shards", m["num_shards"]), ("planned_samples", m["num_samples"])):
            _need(
                m.get(key) is None or m[key] == got,
                where,
                key,
                f"null or what the dataset holds ({got}: a complete dataset holds its whole plan)",
                m.get(key),
            )
    if v3:
        _need("shards" not in m, where, "shards", "absent in format 3 (the shard table is in `index`)", "<present>")
        if m["status"] == "complete":
            _validate_index(m, where, token)
            if not token:
                _check_rows(m, where)
            else:
                _check_tokens(m, where)
        else:
            _need(m.get("index") is None, where, "index", "null while the dataset is partial", m.get("index"))
        return
    shards = m["shards"]
    _need(isinstance(shards, list), where, "shards", "a list of shard entries", shards)
    for pos, e in enumerate(shards):
        f = f"shards[{pos}]"
        _need(isinstance(e, dict), where, f, "an object", e)
        _need(
            e.get("index") == pos and _is_int(e.get("index")),
            where,
            f"{f}.index",
            f"{pos} (entries in index order)",
            e.get("index"),
        )
        check_shard_path(e.get("path"), m["backend"], pos, f"{where}: {f}.path")
        _need(
            isinstance(e.get("sha256"), str) and bool(_HEX64.match(e["sha256"])),
            where,
            f"{f}.sha256",
            "64 hex digits",
            e.get("sha256"),
        )
        _need(
            e["path"].split("-")[-1].split(".")[0] == e["sha256"][:16],
            where,
            f"{f}.path",
            f"named after its sha256 ({e['sha256'][:16]})",
            e["path"],
        )
        for k in ("num_rows", "rows_per_block"):
            _need(_is_int(e.get(k), 1), where, f"{f}.{k}", "an int >= 1", e.get(k))
        for k in ("first_sample_id", "last_sample_id", "bytes"):
            _need(_is_int(e.get(k), -(1 << 63)), where, f"{f}.{k}", "an int", e.get(k))
        ns = e.get("num_sequences")
        if not token:
            _need("num_sequences" not in e, where, f"{f}.num_sequences", "absent (token kinds only)", ns)
        elif ns is None:  # written before num_sequences existed: sequences of exactly seq_len
            _need(
                e["num_rows"] % m["seq_len"] == 0,
                where,
                f"{f}.num_rows",
                f"a multiple of seq_len={m['seq_len']} when the entry has no num_sequences (a fixed-length shard)",
                e["num_rows"],
            )
        else:
            lo = -(-e["num_rows"] // m["seq_len"])
            _need(
                _is_int(ns, 1) and lo <= ns <= e["num_rows"],
                where,
                f"{f}.num_sequences",
                f"an int in [{lo}, {e['num_rows']}] (its num_rows tokens in sequences of 1..seq_len={m['seq_len']})",
                ns,
            )
    if m["status"] == "complete":
        _need(
            m["num_shards"] == len(shards) and shards,
            where,
            "num_shards",
            f"the number of shard entries ({len(shards)}, at least 1)",
            m["num_shards"],
        )
        total = sum(e["num_rows"] for e in shards)
        _need(m["num_rows"] == total, where, "num_rows", f"the sum of the shards' num_rows ({total})", m["num_rows"])
        if token:
            _check_tokens(m, where)
            L = m["seq_len"]
            seqs = sum(e["num_rows"] // L if e.get("num_sequences") is None else e["num_sequences"] for e in shards)
            _need(
                m["num_samples"] * m["num_views"] == seqs,
                where,
                "num_samples",
                f"the sequences / num_views: sum(shards[].num_sequences) / {m['num_views']} = {seqs} / "
                f"{m['num_views']} (every (sample_id, view) is one sequence)",
                m["num_samples"],
            )
            _need(
                seqs <= m["num_rows"] <= seqs * L,
                where,
                "num_rows",
                f"between sum(shards[].num_sequences) and that x seq_len ({seqs} .. {seqs * L})",
                m["num_rows"],
            )
        else:
            _check_rows(m, where)


def _check_tokens(m: dict, where: str) -> None:
    _need(m.get("num_tokens") == m["num_rows"], where, "num_tokens", f"num_rows ({m['num_rows']})", m.get("num_tokens"))


def _check_rows(m: dict, where: str) -> None:
    _need(
        m["num_rows"] == m["num_samples"] * m["num_views"],
        where,
        "num_rows",
        f"num_samples x num_views ({m['num_samples']} x {m['num_views']})",
        m["num_rows"],
    )


_INDEX_FILE = re.compile(r"^_index/(units|part-(\d{5}))-([0-9a-f]{16})\.parquet$")


def _validate_index(m: dict, where: str, token: bool) -> None:
    """The `index` section of a complete format-3 manifest (storage/index.py): file names
    inside the dataset and named after their sha256, parts covering shards 0..n-1 in
    order, their row counts summing to num_rows."""
    ix = m.get("index")
    _need(isinstance(ix, dict), where, "index", "an object {part_shards, units, parts, max_rows_per_block}", ix)
    _need(_is_int(ix.get("part_shards"), 1), where, "index.part_shards", "an int >= 1", ix.get("part_shards"))
    _need(
        _is_int(ix.get("max_rows_per_block"), 1),
        where,
        "index.max_rows_per_block",
        "an int >= 1",
        ix.get("max_rows_per_block"),
    )

    def file_ok(e: Any, field: str, kind: str, part: int | None = None) -> None:
        ok = isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
        g = _INDEX_FILE.match(e["path"]) if ok else None
        ok = (
            g is not None
            and bool(_HEX64.match(e["sha256"]))
            and g.group(3) == e["sha256"][:16]
            and (g.group(1) == "units" if kind == "units" else g.group(2) is not None and int(g.group(2)) == part)
        )
        _need(ok, where, field, f"{{path: _index/{kind}-...-<sha256[:16]>.parquet, sha256: 64 hex}}", e)

    file_ok(ix.get("units"), "index.units", "units")
    parts = ix.get("parts")
    _need(isinstance(parts, list) and parts, where, "index.parts", "a non-empty list", parts)
    P, start, rows = ix["part_shards"], 0, 0
    for p, e in enumerate(parts):
        f = f"index.parts[{p}]"
        file_ok(e, f, "part", p)
        _need(e.get("first_shard") == start, where, f"{f}.first_shard", f"{start}", e.get("first_shard"))
        last = p == len(parts) - 1
        _need(
            _is_int(e.get("num_shards"), 1) and (e["num_shards"] == P or last and e["num_shards"] <= P),
            where,
            f"{f}.num_shards",
            f"{P} (fewer only in the last part)",
            e.get("num_shards"),
        )
        _need(_is_int(e.get("num_rows"), 1), where, f"{f}.num_rows", "an int >= 1", e.get("num_rows"))
        _need(_is_int(e.get("bytes")), where, f"{f}.bytes", "an int >= 0", e.get("bytes"))
        start += e["num_shards"]
        rows += e["num_rows"]
    _need(start == m["num_shards"], where, "num_shards", f"the shards the index parts hold ({start})", m["num_shards"])
    _need(rows == m["num_rows"], where, "num_rows", f"the rows the index parts hold ({rows})", m["num_rows"])


def _validate_layout(layout: Any, where: str) -> None:
    if layout is None:
        return
    _need(
        isinstance(layout, dict), where, "layout", "an object {compression, target_block_bytes, row_bytes, ...}", layout
    )
    if "compression" in layout:
        _need(
            layout["compression"] in COMPRESSIONS,
            where,
            "layout.compression",
            f"one of {list(COMPRESSIONS)}",
            layout["compression"],
        )
    for key in ("target_block_bytes", "row_bytes"):
        if key in layout:
            _need(_is_int(layout[key], 1), where, f"layout.{key}", "an int >= 1", layout[key])


def _validate_token_fields(m: dict, where: str) -> None:
    V, L = m.get("vocab_size"), m.get("seq_len")
    _need(
        _is_int(V, 2) and V == m["num_classes"],
        where,
        "vocab_size",
        f"an int >= 2 equal to num_classes ({m['num_classes']})",
        V,
    )
    _need(_is_int(L, 1), where, "seq_len", "an int >= 1 (the most tokens per sequence)", L)
    _need(
        m.get("num_tokens") is None or _is_int(m["num_tokens"]),
        where,
        "num_tokens",
        "null or an int >= 0",
        m.get("num_tokens"),
    )
    _need(m["temperature"] == 1.0, where, "temperature", "1.0 for token labels (stored at T = 1)", m["temperature"])
    _need(m.get("feature") is None, where, "feature", "null for token labels", m.get("feature"))
    problem = representation_problem(m["representation"], V)
    _need(problem is None, where, "representation", problem or "", m["representation"])


def dump_manifest(m: dict, signer=None) -> bytes:
    """The manifest's bytes, with its digest recomputed, signed over the digest when a
    signer is given (storage/signing.py)."""
    m = dict(m, format_version=FORMAT_VERSION)
    m.pop("signature", None)
    m["digest"] = manifest_digest(m)
    if signer is not None:
        m["signature"] = signer.sign(m["digest"].encode())
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
