"""verify(): re-check a dataset end to end, reporting every problem rather than the first.

Checks, in order: the manifest parses, matches its schema and its digest (tamper
evidence), is complete and of a known format_version; its shard entries and the commit
records agree (same shards, paths, checksums and lineage); each shard exists, its bytes
hash to the recorded sha256, it decodes with the columns the manifest describes, its row
count and first/last sample ids match the record, its float columns are finite; and
across shards every (sample_id, view) appears exactly once with views 0..V-1 per sample
and the totals match num_samples / num_rows. Token labels: every shard holds whole
sequences (positions 0..n-1 with 1 <= n <= seq_len, one (sample_id, view) per sequence,
as many as the entry's num_sequences; without it, all of seq_len tokens), ids <
vocab_size, log-probs <= 0, missing mass in [0, 1], counts summing to at most `draws`;
coverage is over sequences (a (sample_id, view) in two shards is reported with both) and
num_tokens must equal num_rows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import SoftLabelError
from .fs import Location
from .index import ShardIndex
from .layout import TOKEN_KINDS, columns_for
from .manifest import lineage_digest
from .shards import check_coverage, check_signatures, commits_disagree, open_shard, read_commits, read_manifest
from .token_sequences import bounds, position_problem
from .tokens import shard_problems


@dataclass
class VerifyReport:
    uri: str
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def __str__(self) -> str:
        head = (
            f"{self.uri}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'} "
            f"({self.shards_checked} shards, {self.rows_checked} rows checked)"
        )
        return "\n".join([head, *[f"  - {p}" for p in self.problems]])


def verify(uri: str, storage_options: dict | None = None, verifier: Any = None) -> VerifyReport:
    """Every check, over every shard; with a verifier (storage/signing.py) also the
    signatures of the manifest and of every commit record."""
    loc = Location(uri, storage_options)
    report = VerifyReport(loc.uri)
    try:
        m = read_manifest(loc)
    except SoftLabelError as e:
        report.problems.append(str(e))
        return report
    if m["status"] != "complete":
        report.problems.append(f"manifest status is {m['status']!r}, not 'complete'")
    try:
        entries = list(ShardIndex(loc, m).entries()) if m["status"] == "complete" else m.get("shards", [])
    except SoftLabelError as e:
        report.problems.append(str(e))
        return report
    try:
        commits = read_commits(loc, m["backend"])
        lineage = lineage_digest(m) if m["format_version"] >= 2 else None
        report.problems += [f"commit records: {p}" for p in commits_disagree(m, entries, commits, lineage)]
        check_signatures(m, list(commits.values()), verifier, loc.uri)
    except SoftLabelError as e:
        report.problems.append(str(e))
    spec = columns_for(m)
    token = m["representation"]["kind"] in TOKEN_KINDS
    L = int(m["seq_len"]) if token else 1
    sids, views, shard_of = [], [], []
    for s in entries:
        name = s["path"]
        try:
            sh = open_shard(loc, s, m["backend"], spec, rehash=True)
            report.shards_checked += 1
            cols = sh.read(0, sh.num_rows, [c.name for c in spec])
        except SoftLabelError as e:
            report.problems.append(f"shard {s['index']} ({name}): {e}")
            continue
        except Exception as e:
            report.problems.append(f"shard {s['index']} ({name}): cannot be decoded: {type(e).__name__}: {e}")
            continue
        n = len(cols["sample_id"])
        report.rows_checked += n
        if n != s["num_rows"]:
            report.problems.append(f"shard {s['index']} ({name}): {n} rows, manifest says {s['num_rows']}")
        if n and (
            int(cols["sample_id"][0]) != s["first_sample_id"] or int(cols["sample_id"][-1]) != s["last_sample_id"]
        ):
            report.problems.append(
                f"shard {s['index']} ({name}): first/last sample_id "
                f"{int(cols['sample_id'][0])}/{int(cols['sample_id'][-1])} differ from the "
                f"manifest's {s['first_sample_id']}/{s['last_sample_id']}"
            )
        for c in spec:
            a = cols[c.name]
            if a.dtype.kind == "f":
                bad = ~np.isfinite(a).reshape(n, -1).all(axis=1)
                if bad.any():
                    r = int(np.flatnonzero(bad)[0])
                    report.problems.append(
                        f"shard {s['index']} ({name}): column {c.name} has NaN/Inf in "
                        f"{int(bad.sum())} row(s), first at row {r}"
                    )
        keep = np.arange(n)
        if token:
            report.problems += [f"shard {s['index']} ({name}): {p}" for p in shard_problems(m, cols, s)]
            # coverage is over sequences: their first rows (when the positions make sense)
            keep = bounds(cols["position"])[0] if position_problem(cols["position"], L) is None else keep[:0]
        v = cols["view"]
        if ((v < 0) | (v >= m["num_views"])).any():
            report.problems.append(f"shard {s['index']} ({name}): view ids outside [0, {m['num_views']})")
        sids.append(cols["sample_id"][keep])
        views.append(v[keep])
        shard_of.append(np.full(len(keep), s["index"], np.int64))
    if sids and not report.problems:
        all_s, all_v, all_sh = np.concatenate(sids), np.concatenate(views), np.concatenate(shard_of)
        rows = report.rows_checked
        if token:
            if rows != m.get("num_tokens"):
                report.problems.append(f"totals differ: {rows} tokens found, manifest says {m.get('num_tokens')}")
        try:
            num_samples = check_coverage(all_s, all_v, all_sh, m["num_views"], loc.uri)
            if num_samples != m.get("num_samples") or rows != m.get("num_rows"):
                report.problems.append(
                    f"totals differ: {num_samples} samples / {rows} rows found, manifest "
                    f"says {m.get('num_samples')} / {m.get('num_rows')}"
                )
        except SoftLabelError as e:
            report.problems.append(str(e))
    if not entries:
        report.problems.append("manifest lists no shards")
    return report
