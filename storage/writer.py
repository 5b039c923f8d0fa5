"""SoftLabelWriter: turns raw teacher logits into a sharded soft-label dataset.

Lifecycle:
    w = SoftLabelWriter(uri, backend="parquet", num_classes=10, temperature=4.0,
                        teacher={...}, data={...})        # writes a partial manifest
    for i in w.pending(range(n)): w.write_shard(i, ids, logits)  # resume-safe
    w.finalize()                                            # checks coverage, writes complete manifest

Token labels of a language model (representation "token_topk" / "token_sampled", one row
per token position, stored at T = 1, sequences of 1..seq_len tokens; see storage/tokens.py):
    w = SoftLabelWriter(uri, backend="parquet", representation="token_topk", vocab_size=V,
                        seq_len=L, k=32, dtype="uint8", teacher={...}, data={...})
    w.write_shard(i, sample_ids, views=views, positions=positions, ids=ids, logprobs=logprobs,
                  missing_mass=missing_mass)     # flat per-token arrays; a sequence starts at each position 0

Re-opening the same URI with the same teacher/data/temperature fingerprints resumes;
committed shards are listed by `committed_shards()`. Anything else is refused unless
overwrite=True. See storage/shards.py for how concurrent writers stay safe.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from . import token_sequences as seqs
from . import tokens
from .errors import (
    CoverageError,
    IncompleteDatasetError,
    InvalidLogitsError,
    ManifestError,
    MismatchError,
    SoftLabelError,
)
from .fs import Location, is_temp, temp_owner_alive
from .index import EXT, INDEX_DIR, ShardIndex, entry_columns, index_files, shard_path, write_index
from .layout import (
    DATA_DIR,
    TOKEN_KINDS,
    columns_for,
    encode_parquet,
    encode_zarr,
    index_dtype,
    objects_nbytes,
    row_bytes,
    rows_per_block,
    seq_align,
    shard_basename,
)
from .manifest import (
    BACKENDS,
    COMMITS_DIR,
    COMPRESSIONS,
    DTYPES,
    FORMAT_VERSION,
    KINDS,
    MANIFEST,
    TMP_DIR,
    diff_fields,
    dump_manifest,
    identity_fields,
    lineage_digest,
    now_iso,
    parse_manifest,
    producer,
    validate_lineage,
)
from .parallel import for_row_blocks
from .shards import (
    check_coverage,
    commits_disagree,
    mark_verified,
    open_shard,
    plan_of,
    publish,
    read_commit,
    read_commits,
    read_id_columns,
    record_version,
    write_commit,
)
from .signing import Signer
from .topk import scaled_topk

# what a shard's manifest entry holds (its commit record adds lineage, format, plan, writer)
ENTRY_KEYS = (
    "index",
    "path",
    "num_rows",
    "first_sample_id",
    "last_sample_id",
    "sha256",
    "bytes",
    "rows_per_block",
    "num_sequences",
)

# finalize() deletes a temp file whose owner it cannot check (another host, an unknown name)
# only when it is older than this: that writer may still be writing it.
ORPHAN_AGE_S = 15 * 60


class SoftLabelWriter:
    def __init__(
        self,
        uri: str,
        *,
        backend: str,
        num_classes: int | None = None,
        temperature: float | None = None,
        representation: str = "dense",
        k: int | None = None,
        dtype: str | None = None,
        num_views: int = 1,
        teacher: dict,
        data: dict,
        storage_options: dict | None = None,
        overwrite: bool = False,
        num_shards: int | None = None,
        num_samples: int | None = None,
        feature: dict | None = None,
        compression: str = "none",
        extra: dict | None = None,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        tail_dtype: str | None = None,
        draws: int | None = None,
        s_max: int | None = None,
        store_tokens: bool = False,
        store_target_logprob: bool = False,
        signer: Signer | None = None,
    ):
        """signer: signs the manifest and every commit record (storage/signing.py;
        pipeline/keys.py load_signer makes an Ed25519 one from a PEM file). store_tokens
        (token kinds): every row also holds its target token (write_shard's token=), for
        sequences the teacher wrote itself."""
        _check_choice("backend", backend, BACKENDS)
        _check_choice("representation", representation, KINDS)
        _check_choice("compression", compression, COMPRESSIONS)
        token = representation in TOKEN_KINDS
        if token:
            if vocab_size is None:
                vocab_size = num_classes
            if num_classes is not None and num_classes != vocab_size:
                raise ValueError(
                    f"num_classes ({num_classes}) and vocab_size ({vocab_size}) differ; "
                    f"token labels need only vocab_size"
                )
            num_classes = vocab_size
            if temperature is None:
                temperature = 1.0
            if temperature != 1.0:
                raise ValueError(
                    f"token labels are stored at temperature 1.0, got temperature={temperature!r}: "
                    f"a student applies its own temperature at train time (top-k log-probs are "
                    f"exact only at the temperature they were computed at)"
                )
            if not isinstance(seq_len, int) or seq_len < 1:
                raise ValueError(
                    f"representation={representation!r} needs seq_len, an int >= 1 (the most tokens "
                    f"per sequence; sequences hold 1..seq_len), got {seq_len!r}"
                )
            if feature is not None:
                raise ValueError("feature= is not supported with token labels")
            rep = tokens.make_representation(
                representation,
                vocab_size=vocab_size,
                k=k,
                dtype=dtype,
                tail_dtype=tail_dtype,
                draws=draws,
                s_max=s_max,
                tokens=store_tokens,
                target_logprob=store_target_logprob,
            )
            dtype = rep.get("dtype") or "float16"
        else:
            for name, val in (
                ("vocab_size", vocab_size),
                ("seq_len", seq_len),
                ("tail_dtype", tail_dtype),
                ("draws", draws),
                ("s_max", s_max),
            ):
                if val is not None:
                    raise ValueError(f"{name}= is only meaningful with representation 'token_topk' / 'token_sampled'")
            if store_tokens or store_target_logprob:
                raise ValueError("store_tokens= / store_target_logprob= are only meaningful with token representations")
            if temperature is None:
                raise ValueError("temperature is required")
            if num_classes is None:
                raise ValueError("num_classes is required")
            dtype = "float16" if dtype is None else dtype
            _check_choice("dtype", dtype, DTYPES)
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not (isinstance(temperature, (int, float)) and np.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"num_views must be an int >= 1, got {num_views!r}")
        if representation == "topk":
            if not isinstance(k, int) or not 1 <= k <= num_classes:
                raise ValueError(f"representation='topk' needs an int k in [1, num_classes={num_classes}], got k={k!r}")
        elif k is not None and not token:
            raise ValueError(f"k={k!r} is only meaningful with representation='topk'")
        for name, val in (("num_shards", num_shards), ("num_samples", num_samples)):
            if val is not None and (not isinstance(val, (int, np.integer)) or val < 1):
                raise ValueError(f"{name} must be a positive int or None, got {val!r}")
        if feature is not None:
            if not (isinstance(feature, dict) and {"name", "shape"} <= feature.keys()):
                raise ValueError(
                    f"feature must be a dict with 'name' and 'shape' (and optional 'dtype'), got {feature!r}"
                )
            feature = {
                "name": str(feature["name"]),
                "shape": [int(s) for s in feature["shape"]],
                "dtype": feature.get("dtype", dtype),
            }
            _check_choice("feature dtype", feature["dtype"], DTYPES)
        validate_lineage(teacher, data)

        self.signer = signer
        self.loc = Location(uri, storage_options)
        self.uri = self.loc.uri
        if not token:
            rep = {"kind": representation, "dtype": dtype, "k": k}
            if representation == "topk":
                rep["index_dtype"] = index_dtype(num_classes)
        self._new = {
            "format_version": FORMAT_VERSION,
            "backend": backend,
            "status": "partial",
            "num_samples": None,
            "num_rows": None,
            "num_views": num_views,
            "num_classes": num_classes,
            "temperature": float(temperature),
            "representation": rep,
            "feature": feature,
            "teacher": dict(teacher),
            "data": dict(data),
            "num_shards": None,
            "planned_shards": None if num_shards is None else int(num_shards),
            "planned_samples": None if num_samples is None else int(num_samples),
            "columns": {},
            "layout": {},
            "index": None,
            "created_at": now_iso(),
            "producer": producer(),
            "extra": dict(extra or {}),
        }
        if token:
            self._new.update(vocab_size=vocab_size, seq_len=seq_len, num_tokens=None)
        self.align = seq_align(self._new)
        self.columns = columns_for(self._new)
        self._new["columns"] = {c.name: c.to_dict() for c in self.columns}
        self._new["layout"] = {
            "compression": compression,
            "target_block_bytes": 16 << 20,
            "row_bytes": row_bytes(self.columns),
            "shard_files": f"{DATA_DIR}/shard-NNNNN-<sha256[:16]>{EXT[backend]}",
        }
        self.compression = compression
        self.manifest = self._open(overwrite)
        self.lineage = lineage_digest(self.manifest)
        self._finalized = False

    # ------------------------------------------------------------------ open / resume

    def _open(self, overwrite: bool) -> dict:
        existing = None
        if self.loc.exists(MANIFEST):
            try:
                existing = parse_manifest(self.loc.read_bytes(MANIFEST), self.uri)
            except ManifestError:
                if not overwrite:
                    raise
        if existing is not None and not overwrite:
            diffs = diff_fields(existing, self._new, identity_fields(self._new))
            if diffs:
                lines = [f"  {f}: stored {found!r}, this writer {want!r}" for f, want, found in diffs]
                raise MismatchError(
                    f"{self.uri} already holds soft labels from a different run:\n"
                    + "\n".join(lines)
                    + "\nPass overwrite=True to replace it, or write to another URI."
                )
            return existing  # resume: keep created_at, committed shards, and a complete status
        if existing is not None or self.loc.exists(COMMITS_DIR):
            self._wipe()
        if self._new["backend"] == "zarr":
            # the root and data/ are Zarr groups, so zarr/xarray can open the whole tree
            group = b'{"zarr_format": 3, "node_type": "group", "attributes": {"distillery": "see manifest.json"}}'
            self.loc.write_bytes_atomic("zarr.json", group)
            self.loc.write_bytes_atomic(f"{DATA_DIR}/zarr.json", group)
        self.loc.write_bytes_atomic(MANIFEST, dump_manifest(self._new, self.signer))
        return dict(self._new)

    def _wipe(self) -> None:
        # Manifest first: a crash mid-wipe leaves "no dataset", never a complete manifest
        # pointing at deleted shards. Only names this format uses are deleted.
        self.loc.remove(MANIFEST)
        for name in self.loc.listdir():
            if name in (COMMITS_DIR, TMP_DIR, DATA_DIR, INDEX_DIR, "zarr.json") or (
                name.startswith("shard-") and name.endswith(tuple(EXT.values()))
            ):
                self.loc.remove(name)

    # ------------------------------------------------------------------ writing

    def commits(self) -> dict[int, dict]:
        """{shard index: commit record} of every committed shard (validated)."""
        return read_commits(self.loc, self.manifest["backend"])

    def commit(self, shard_index: int) -> dict | None:
        """Shard `shard_index`'s commit record, or None: one read, whatever the shard count."""
        return read_commit(self.loc, self.manifest["backend"], shard_index)

    def committed_shards(self) -> list[int]:
        """Indices of shards already committed (safe to skip on resume)."""
        return sorted(self.commits())

    def pending(self, indices: Iterable[int]) -> list[int]:
        done = set(self.committed_shards())
        return [i for i in indices if i not in done]

    def write_shard(
        self,
        shard_index: int,
        sample_ids: npt.ArrayLike,
        logits: npt.ArrayLike | None = None,
        views: npt.ArrayLike | None = None,
        *,
        features: npt.ArrayLike | None = None,
        ids: npt.ArrayLike | None = None,
        logprobs: npt.ArrayLike | None = None,
        missing_mass: npt.ArrayLike | None = None,
        counts: npt.ArrayLike | None = None,
        positions: npt.ArrayLike | None = None,
        token: npt.ArrayLike | None = None,
        target_logprob: npt.ArrayLike | None = None,
    ) -> dict:
        """Scale raw `logits` (n, C) by 1/T, encode, publish atomically, commit. Returns the commit record.

        Token labels take the per-token arrays instead of logits, rows = token positions of
        whole sequences (N = the tokens of the shard's sequences): token_topk `ids` (N, k)
        int, `logprobs` (N, k) float (<= 0, T = 1), `missing_mass` (N,) in [0, 1];
        token_sampled `ids` (N, u) and `counts` (N, u) (u <= s_max; 0 = padding; row sums
        <= draws). `positions` (N,): 0..n-1 per sequence, 1 <= n <= seq_len, a sequence
        starting at each position 0 (None: every sequence has seq_len tokens, N a multiple of
        it; (B, L, w) arrays are accepted then). `sample_ids` / `views` per token (N,) or per
        sequence (one entry per sequence). `token` (N,): each row's target token, when the
        dataset stores them (store_tokens); `target_logprob` (N,): the teacher's log-prob of
        each row's target token (store_target_logprob: cross-tokenizer alignment)."""
        if self.manifest["representation"]["kind"] in TOKEN_KINDS:
            if logits is not None or features is not None:
                raise InvalidLogitsError(
                    f"{self.uri} shard {shard_index}: token labels take ids=, logprobs=, "
                    f"missing_mass= / counts=, not logits or features"
                )
            self._check_index(shard_index)
            cols = tokens.prepare_columns(
                self._new,
                f"{self.uri} shard {shard_index}",
                sample_ids,
                views,
                positions,
                ids=ids,
                logprobs=logprobs,
                missing_mass=missing_mass,
                counts=counts,
                tokens=token,
                target_logprob=target_logprob,
            )
            return self._write_columns(shard_index, cols)
        if any(a is not None for a in (ids, logprobs, missing_mass, counts, positions, token, target_logprob)):
            raise InvalidLogitsError(
                f"{self.uri} shard {shard_index}: ids/logprobs/missing_mass/counts/positions "
                f"are for token representations; this dataset is "
                f"{self.manifest['representation']['kind']!r}"
            )
        if logits is None:
            raise InvalidLogitsError(f"{self.uri} shard {shard_index}: logits are required")
        cols = self._prepare(shard_index, sample_ids, logits, views, features)
        return self._write_columns(shard_index, cols)

    def _check_index(self, shard_index) -> None:
        if not isinstance(shard_index, (int, np.integer)) or shard_index < 0:
            raise ValueError(f"shard_index must be an int >= 0, got {shard_index!r}")
        planned = self.manifest.get("planned_shards")
        if planned is not None and shard_index >= planned:
            raise ValueError(f"{self.uri} shard {shard_index}: shard_index {shard_index} >= num_shards {planned}")

    def write_scaled_columns(self, shard_index: int, cols: dict[str, np.ndarray]) -> dict:
        """Write already-stored columns verbatim (used by convert(): no re-scaling, bit-exact)."""
        missing = [c.name for c in self.columns if c.name not in cols]
        if missing:
            raise InvalidLogitsError(f"shard {shard_index}: columns {missing} are missing")
        if self.align > 1:  # token rows: whole sequences of 1..seq_len
            bad = seqs.position_problem(np.asarray(cols["position"]), self.align)
            if bad is not None:
                raise InvalidLogitsError(
                    f"shard {shard_index}: position column: row {bad[0]} breaks the "
                    f"sequences of 1..seq_len={self.align} tokens ({bad[1]})"
                )
        return self._write_columns(shard_index, {c.name: cols[c.name] for c in self.columns})

    def _prepare(self, shard_index, sample_ids, logits, views, features) -> dict[str, np.ndarray]:
        m = self._new
        where = f"{self.uri} shard {shard_index}"
        self._check_index(shard_index)
        ids = np.asarray(sample_ids)
        if ids.ndim != 1 or len(ids) == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidLogitsError(
                f"{where}: sample_ids must be a non-empty 1-D integer array, got shape {ids.shape} dtype {ids.dtype}"
            )
        n, C = len(ids), m["num_classes"]
        z = np.asarray(logits)
        if z.shape != (n, C) or not np.issubdtype(z.dtype, np.floating):
            raise InvalidLogitsError(
                f"{where}: logits must be float of shape ({n}, {C}) (rows = len(sample_ids), num_classes), "
                f"got {z.shape} {z.dtype}"
            )
        if views is None:
            if m["num_views"] != 1:
                raise InvalidLogitsError(f"{where}: views are required when num_views={m['num_views']}")
            v = np.zeros(n, np.int32)
        else:
            v = np.asarray(views)
            if v.shape != (n,) or not np.issubdtype(v.dtype, np.integer):
                raise InvalidLogitsError(
                    f"{where}: views must be an integer array of shape ({n},), got {v.shape} {v.dtype}"
                )
            bad = np.flatnonzero((v < 0) | (v >= m["num_views"]))
            if len(bad):
                raise InvalidLogitsError(
                    f"{where}: row {bad[0]} has view {v[bad[0]]}, outside [0, num_views={m['num_views']})"
                )
        z32 = z.astype(np.float32, copy=False)
        # min and max are vectorised (float32 SIMD) and propagate NaN: a finite pair proves
        # every logit finite, and bounds |z/T| for the storage dtype's overflow check
        lo, hi = (float(z32.min()), float(z32.max())) if z32.size else (0.0, 0.0)
        if not (np.isfinite(lo) and np.isfinite(hi)):
            _refuse_nonfinite(z, ids, v, where, "logits")
        T = np.float32(m["temperature"])
        rep = m["representation"]
        bound = max(abs(lo), abs(hi)) / float(T)
        may_overflow = bound >= float(np.finfo(rep["dtype"]).max)
        cols: dict[str, np.ndarray] = {"sample_id": ids.astype(np.int64), "view": v.astype(np.int32)}
        if rep["kind"] == "dense":
            # s = z / T in float32 (correctly rounded), cast straight into the storage dtype:
            # one pass, no float32 temporary (fresh memory costs as much as the arithmetic)
            out = np.empty(z.shape, rep["dtype"])

            def block(a: int, b: int) -> None:
                with np.errstate(over="ignore"):  # overflow is reported just below, with the row
                    np.divide(z32[a:b], T, out=out[a:b], casting="unsafe")

            for_row_blocks(block, n, z32.size)
            cols["logits"] = out
            if may_overflow:
                _refuse_nonfinite(out, ids, v, where, f"logits/T (overflows {rep['dtype']})", full=True)
        else:
            scaled = z32 / T
            vals, idx, lse = scaled_topk(scaled, rep["k"])
            with np.errstate(over="ignore"):
                cols["topk_logits"] = vals.astype(rep["dtype"])
            if may_overflow:
                _refuse_nonfinite(cols["topk_logits"], ids, v, where, f"logits/T (overflows {rep['dtype']})", full=True)
            cols["topk_indices"] = idx.astype(rep["index_dtype"])
            cols["logsumexp"] = lse.astype(np.float32)
        feat = m.get("feature")
        if feat:
            if features is None:
                raise InvalidLogitsError(f"{where}: this dataset stores feature {feat['name']!r}; pass features=")
            f = np.asarray(features)
            if f.shape[0] != n or int(np.prod(f.shape[1:])) != int(np.prod(feat["shape"])):
                raise InvalidLogitsError(
                    f"{where}: features must have shape ({n}, {', '.join(map(str, feat['shape']))}), got {f.shape}"
                )
            f = f.reshape(n, -1)
            _refuse_nonfinite(f, ids, v, where, "features")
            cols["feature"] = f.astype(feat["dtype"])
        elif features is not None:
            raise InvalidLogitsError(f"{where}: features given but the writer was opened without feature=")
        order = np.lexsort((cols["view"], cols["sample_id"]))
        s, vv = cols["sample_id"][order], cols["view"][order]
        dup = np.flatnonzero((s[1:] == s[:-1]) & (vv[1:] == vv[:-1]))
        if len(dup):
            raise CoverageError(
                f"{where}: duplicate (sample_id, view) rows within the shard, e.g. ({s[dup[0]]}, {vv[dup[0]]})"
            )
        return cols

    def _write_columns(self, shard_index: int, cols: dict[str, np.ndarray]) -> dict:
        backend = self.manifest["backend"]
        encode = encode_parquet if backend == "parquet" else encode_zarr
        align, num_sequences = self.align, None
        if self.align > 1:
            # token rows: blocks are cut at sequence boundaries when every sequence has
            # seq_len tokens (the fixed-length layout, byte-identical to before), else anywhere
            num_sequences = int(np.count_nonzero(cols["position"] == 0))
            if num_sequences * self.align != len(cols["position"]):
                align = 1
        objects = encode(cols, self.columns, self.compression, align)
        existing = read_commit(self.loc, backend, shard_index)  # this shard's record only

        def accept(sha: str) -> bool:
            if existing is not None and existing.get("lineage", self.lineage) != self.lineage:
                raise MismatchError(self._replaced(existing))
            if existing is not None and existing["sha256"] != sha:
                raise SoftLabelError(
                    f"{self.uri}: shard {shard_index} is already committed with different content "
                    f"(sha256 {existing['sha256'][:16]}, new {sha[:16]}); skip committed_shards() on resume"
                )
            return existing is None  # the same bytes again: an idempotent retry, nothing to do

        if self.manifest["status"] == "complete" and existing is None:
            # Adding a shard to a complete dataset: it is no longer complete until finalize().
            self.manifest = dict(self.manifest, status="partial", index=None)
            self.manifest.pop("shards", None)
            self.loc.write_bytes_atomic(MANIFEST, dump_manifest(self.manifest, self.signer))
        published = publish(
            self.loc,
            objects,
            lambda sha: shard_path(shard_index, sha, backend),
            accept,
            hint=shard_basename(shard_index),
        )
        if published is None:
            return existing
        name, sha = published
        mark_verified(self.loc, name, sha)
        ids = cols["sample_id"]
        record = {
            "index": int(shard_index),
            "path": name,
            "num_rows": int(len(ids)),
            "first_sample_id": int(ids[0]),
            "last_sample_id": int(ids[-1]),
            "sha256": sha,
            "bytes": objects_nbytes(objects),
            "rows_per_block": rows_per_block(row_bytes(self.columns), len(ids), align),
            "lineage": self.lineage,
            "format_version": FORMAT_VERSION,
            "plan": plan_of(self.manifest),
        }
        if num_sequences is not None:
            record["num_sequences"] = num_sequences
        record = write_commit(self.loc, record, self.signer)
        if not self.loc.exists(name):
            # a concurrent finalize() removed it as an orphan between publish and commit
            publish(self.loc, objects, lambda _: name, hint=shard_basename(shard_index))
        return record

    # ------------------------------------------------------------------ finalize

    def finalize(self) -> dict:
        """Check that shards 0..n-1 cover every (sample_id, view) once (and the plan, when
        given); write the shard index and the complete manifest."""
        commits = read_commits(self.loc, self.manifest["backend"])
        if not commits:
            raise IncompleteDatasetError(f"{self.uri}: no shard has been committed; nothing to finalize")
        foreign = sorted(i for i, c in commits.items() if c.get("lineage", self.lineage) != self.lineage)
        if foreign:
            c = commits[foreign[0]]
            raise MismatchError(
                f"{self.uri}: shard(s) {foreign[:20]} were committed by a run labelling something else "
                f"(writer {c.get('writer')}, lineage {c.get('lineage')}; this run {self.lineage}). "
                f"Another `label` with different settings wrote here; re-run with overwrite once it has finished."
            )
        idx = sorted(commits)
        planned = self.manifest.get("planned_shards")
        expected = list(range(planned if planned is not None else idx[-1] + 1))
        missing = sorted(set(expected) - set(idx))
        if missing or len(idx) != len(expected):
            raise IncompleteDatasetError(
                f"{self.uri}: cannot finalize, shard(s) {missing[:20]} not committed "
                f"({len(idx)} of {len(expected)} committed)"
            )
        plan = plan_of(self.manifest)
        for i in idx:  # records of an older distillery (a resumed format-2 run) bind the dataset too
            c = commits[i]
            if record_version(c) < FORMAT_VERSION or c.get("plan") != plan or "lineage" not in c:
                commits[i] = write_commit(
                    self.loc, dict(c, lineage=self.lineage, format_version=FORMAT_VERSION, plan=plan), self.signer
                )
        entries = [{k: commits[i][k] for k in ENTRY_KEYS if k in commits[i]} for i in idx]
        m = dict(self.manifest)
        m.pop("shards", None)
        if self.align > 1:  # token rows: coverage is over sequences (each shard holds whole ones)
            sids, views, shard_of, _, lengths = seqs.sequence_keys(
                self.loc, m, entries, lambda p: open_shard(self.loc, entries[p], m["backend"], self.columns)
            )
            num_rows = int(lengths.sum())
        else:
            sids, views, shard_of = read_id_columns(self.loc, entries, m["backend"], self.columns)
            num_rows = int(len(sids))
        num_samples = check_coverage(sids, views, shard_of, m["num_views"], self.uri)
        want = m.get("planned_samples")
        if want is not None and num_samples != want:
            raise CoverageError(
                f"{self.uri}: the shards hold {num_samples} samples, the run planned {want}; "
                f"a dataset is complete only with its whole plan"
            )
        m.update(
            status="complete",
            num_shards=len(entries),
            num_samples=num_samples,
            num_rows=num_rows,
            finalized_at=now_iso(),
            format_version=FORMAT_VERSION,
            columns={c.name: c.to_dict() for c in self.columns},
        )
        if m["representation"]["kind"] in TOKEN_KINDS:
            m["num_tokens"] = num_rows
        m["index"] = write_index(self.loc, m, entry_columns(entries, m))
        self.loc.write_bytes_atomic(MANIFEST, dump_manifest(m, self.signer))
        self.manifest = m
        self._finalized = True
        self.confirm()  # a run that overwrote the dataset meanwhile: say so, never report success
        self.cleanup(entries)
        return m

    def confirm(self) -> None:
        """MismatchError unless the dataset at the URI still holds this run's labels: its
        manifest has this writer's lineage, and every commit record too (another run started
        with overwrite=True may have replaced them while this one was labelling)."""
        try:
            stored = parse_manifest(self.loc.read_bytes(MANIFEST), self.uri)
        except FileNotFoundError:
            raise MismatchError(f"{self.uri}: this run's labels were deleted (the manifest is gone)") from None
        records = read_commits(self.loc, stored["backend"])
        foreign = [c for c in records.values() if c.get("lineage", self.lineage) != self.lineage]
        if lineage_digest(stored) != self.lineage or foreign:
            raise MismatchError(self._replaced(foreign[0] if foreign else None, stored))

    def _replaced(self, record: dict | None, stored: dict | None = None) -> str:
        by = []
        if record is not None:
            w = record.get("writer") or {}
            by.append(f"writer {w.get('host')} pid {w.get('pid')}, committed {record.get('committed_at')}")
        if stored is not None:
            by.append(f"manifest created {stored.get('created_at')}, temperature {stored.get('temperature')}")
        return (
            f"{self.uri}: this run's labels were replaced by another run's ({'; '.join(by) or 'unknown'}; "
            f"lineage {record.get('lineage') if record else lineage_digest(stored or {})}, this run "
            f"{self.lineage}): a run started with overwrite=True while this one was labelling. Its "
            f"labels are the dataset now; re-run this one to replace them again, or write elsewhere."
        )

    def is_finalized_as_committed(self) -> bool:
        """The dataset is complete and its manifest names exactly the committed shards."""
        m = self.manifest
        if m["status"] != "complete":
            return False
        entries = list(ShardIndex(self.loc, m).entries())
        return not commits_disagree(m, entries, read_commits(self.loc, m["backend"]), self.lineage)

    def cleanup(self, entries: list[dict] | None = None) -> list[str]:
        """Remove what writers left behind (a SIGKILL between publish and commit, between
        commit and finalize, or during finalize): shard files no commit record or manifest
        entry names (a writer re-publishes if its file vanished), index files the manifest
        does not reference, and temp files (`_tmp/`, `*.tmp.HOST.PID.RAND`) of writers that
        are dead (same host) or older than ORPHAN_AGE_S. Called by finalize(), and by a run
        that finds the dataset already finalized. Returns the removed paths."""
        m = self.manifest
        if entries is None:
            entries = list(ShardIndex(self.loc, m).entries()) if m["status"] == "complete" else []
        removed = []

        def drop(rel: str) -> None:
            self.loc.remove(rel)
            removed.append(rel)

        def stale(rel: str) -> bool:  # a temp file (or an unreferenced index file) nobody is writing
            alive = temp_owner_alive(rel.rsplit("/", 1)[-1])
            if alive is None:
                try:
                    alive = time.time() - self.loc.fs.info(self.loc.path(rel))["mtime"] < ORPHAN_AGE_S
                except (FileNotFoundError, KeyError, TypeError):
                    alive = False
            return not alive

        keep = {s["path"] for s in entries}
        # listed now, not reused from the start of finalize(): a concurrent writer may
        # have committed since (once per run, like finalize's own listing)
        keep |= {c["path"] for c in read_commits(self.loc, m["backend"]).values()}
        referenced = index_files(m)
        for folder in ("", DATA_DIR, COMMITS_DIR, INDEX_DIR):
            for name in self.loc.listdir(folder):
                rel = f"{folder}/{name}" if folder else name
                if is_temp(name):
                    if stale(rel):
                        drop(rel)
                elif folder in ("", DATA_DIR) and name.startswith("shard-") and name.endswith(tuple(EXT.values())):
                    if rel not in keep:
                        drop(rel)
                elif folder == INDEX_DIR and rel not in referenced and (m["status"] == "complete" and stale(rel)):
                    drop(rel)  # an earlier finalize's index (a concurrent one's is younger than ORPHAN_AGE_S)
        for name in self.loc.listdir(TMP_DIR):
            if stale(f"{TMP_DIR}/{name}"):
                drop(f"{TMP_DIR}/{name}")
        if not self.loc.listdir(TMP_DIR):
            self.loc.remove(TMP_DIR)
        return removed

    def __enter__(self) -> SoftLabelWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Finalize only on success; after an error the partial dataset stays resumable.
        if exc_type is None and not self._finalized:
            self.finalize()


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _refuse_nonfinite(
    a: np.ndarray, ids: np.ndarray, views: np.ndarray, where: str, what: str, full: bool = False
) -> None:
    # min and max are vectorised and propagate NaN: a finite pair proves every value finite
    if a.dtype.kind == "f" and a.size and (full or not (np.isfinite(a.min()) and np.isfinite(a.max()))):
        finite = np.isfinite(a).reshape(len(a), -1).all(axis=1)
        if not finite.all():
            r = int(np.flatnonzero(~finite)[0])
            row = a[r].reshape(-1)
            kind = "NaN" if np.isnan(row).any() else "Inf"
            raise InvalidLogitsError(
                f"{where}: {what} row {r} (sample_id {int(ids[r])}, view {int(views[r])}) contains {kind}; "
                f"{int((~finite).sum())} bad row(s) in this shard. Nothing was written."
            )
