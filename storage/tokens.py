"""Per-token language-model labels (kinds `token_topk` and `token_sampled`): the
representation, the writer's input checks and encoding, the reader's decoding, and the
per-shard checks of verify(). Numpy only (see docs/format.md, "Token layouts").

A row is one token position: `sample_id` (the sequence), `view`, `position` (0..n-1),
plus the label columns of layout.columns_for. The rows of one sequence are contiguous in a
shard with positions ascending, a shard holds whole sequences, and a sequence has
1 <= n <= seq_len positions (seq_len is the maximum; fixed-length datasets have n = seq_len
everywhere). storage/token_sequences.py finds and pads the sequences of a shard.

Values are stored at T = 1: a student applies its own temperature at train time (the
top-k summary of a distribution is not exact at any other temperature).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from . import token_sequences as seqs
from .errors import CoverageError, InvalidLogitsError
from .layout import TOKEN_KINDS, TOKEN_VALUE_STORAGE
from .token_packing import (
    LOGPROB_STEP,
    bf16_bits,
    counts_bits,
    from_bf16_bits,
    from_logprob_codes,
    id_bits,
    logprob_codes,
    pack_ids,
    unpack_ids,
)

VALUE_DTYPES = tuple(TOKEN_VALUE_STORAGE)  # float16, bfloat16, uint8 (log-prob codes), float32
TAIL_DTYPES = ("float16", "float32")
ID_COLUMN = {"token_topk": "topk_ids", "token_sampled": "sample_ids"}


def is_token_kind(manifest_or_rep: dict) -> bool:
    rep = manifest_or_rep.get("representation", manifest_or_rep)
    return rep.get("kind") in TOKEN_KINDS


def make_representation(
    kind: str,
    *,
    vocab_size: int,
    k: int | None = None,
    dtype: str | None = None,
    tail_dtype: str | None = None,
    draws: int | None = None,
    s_max: int | None = None,
    tokens: bool = False,
    target_logprob: bool = False,
) -> dict:
    """The manifest's `representation` for a token kind (ValueError naming the bad argument).
    tokens=True: each row also stores `token`, the token at that position's target (the
    teacher's own generated text: labels of sequences no corpus holds). target_logprob=True:
    each row also stores `target_logprob` (float32), the teacher's log-prob of the token that
    actually follows (what cross-tokenizer chunk likelihoods sum)."""
    rep = _representation(
        kind, vocab_size=vocab_size, k=k, dtype=dtype, tail_dtype=tail_dtype, draws=draws, s_max=s_max
    )
    if tokens is not False:
        if tokens is not True:
            raise ValueError(f"tokens must be true or false, got {tokens!r}")
        rep["tokens"] = True
    if target_logprob is not False:  # cross-tokenizer alignment (docs/format.md)
        if target_logprob is not True:
            raise ValueError(f"target_logprob must be true or false, got {target_logprob!r}")
        rep["target_logprob"] = True
    return rep


def _representation(kind, *, vocab_size, k, dtype, tail_dtype, draws, s_max) -> dict:
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    bits = id_bits(vocab_size)
    ids = {"id_bits": bits, "id_storage": "uint16" if bits == 16 else "packed"}
    if kind == "token_topk":
        if not isinstance(k, int) or not 1 <= k <= vocab_size:
            raise ValueError(f"representation='token_topk' needs an int k in [1, vocab_size={vocab_size}], got k={k!r}")
        dtype = "uint8" if dtype is None else dtype
        if dtype not in VALUE_DTYPES:
            raise ValueError(f"dtype (the stored log-prob type) must be one of {list(VALUE_DTYPES)}, got {dtype!r}")
        tail_dtype = "float32" if tail_dtype is None else tail_dtype
        if tail_dtype not in TAIL_DTYPES:
            raise ValueError(f"tail_dtype (of missing_mass) must be one of {list(TAIL_DTYPES)}, got {tail_dtype!r}")
        if draws is not None or s_max is not None:
            raise ValueError("draws / s_max are only meaningful with representation='token_sampled'")
        rep = {"kind": kind, "k": k, "dtype": dtype, "tail_dtype": tail_dtype, **ids}
        if dtype == "uint8":
            rep["logprob_step"] = LOGPROB_STEP
        return rep
    if kind == "token_sampled":
        if not isinstance(draws, int) or not 1 <= draws <= 65_535:
            raise ValueError(f"representation='token_sampled' needs an int draws in [1, 65535], got draws={draws!r}")
        if not isinstance(s_max, int) or not 1 <= s_max <= min(draws, vocab_size):
            raise ValueError(
                f"representation='token_sampled' needs an int s_max (stored ids per token) in "
                f"[1, min(draws, vocab_size) = {min(draws, vocab_size)}], got s_max={s_max!r}"
            )
        if k is not None or dtype is not None or tail_dtype is not None:
            raise ValueError("k / dtype / tail_dtype are only meaningful with representation='token_topk'")
        return {
            "kind": kind,
            "k": None,
            "draws": draws,
            "s_max": s_max,
            "count_dtype": "uint8" if counts_bits(draws) == 8 else "uint16",
            **ids,
        }
    raise ValueError(f"unknown token representation {kind!r}; one of {list(TOKEN_KINDS)}")


def representation_problem(rep: dict, vocab_size: int) -> str | None:
    """Why a manifest's token representation is malformed (None when it is fine)."""
    try:
        want = make_representation(
            rep.get("kind"),
            vocab_size=vocab_size,
            k=rep.get("k"),
            dtype=rep.get("dtype"),
            tail_dtype=rep.get("tail_dtype"),
            draws=rep.get("draws"),
            s_max=rep.get("s_max"),
            tokens=rep.get("tokens", False),
            target_logprob=rep.get("target_logprob", False),
        )
    except (ValueError, TypeError) as e:
        return str(e)
    if rep != want:
        return f"{want} (implied by its kind, k / draws / s_max, dtypes and vocab_size)"
    return None


# ------------------------------------------------------------------ writing


def _per_token(a, n: int, lengths: np.ndarray, name: str, where: str, default=None) -> np.ndarray:
    """A per-token integer array of n rows from a per-token (n,) or per-sequence (S,) one
    ((S, L) is accepted for fixed-length sequences)."""
    if a is None:
        if default is None:
            raise InvalidLogitsError(f"{where}: {name} is required")
        return default
    a = np.asarray(a)
    S = len(lengths)
    if a.ndim == 2 and a.size == n and a.shape[0] == S:
        a = a.reshape(-1)
    if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer) or len(a) not in (n, S):
        raise InvalidLogitsError(
            f"{where}: {name} must be an integer array of {n} (per token) or {S} "
            f"(per sequence) entries, got shape {a.shape} dtype {a.dtype}"
        )
    return np.repeat(a, lengths) if len(a) != n else a


def _rows2d(a, name: str, where: str, width: int | None, n: int | None, kind: str):
    if a is None:
        raise InvalidLogitsError(f"{where}: {name} is required for this representation")
    a = np.asarray(a)
    if a.ndim == 3:  # (B, L, w) -> (B * L, w)
        a = a.reshape(-1, a.shape[-1])
    ok_kind = np.issubdtype(a.dtype, np.integer) if kind == "int" else np.issubdtype(a.dtype, np.floating)
    if a.ndim != 2 or not ok_kind or (n is not None and len(a) != n) or (width is not None and a.shape[1] != width):
        want = f"({n if n is not None else 'N'}, {width if width is not None else 'w'})"
        raise InvalidLogitsError(
            f"{where}: {name} must be {'an integer' if kind == 'int' else 'a float'} array of "
            f"shape {want} (or (B, L, w)), got {a.shape} {a.dtype}"
        )
    return a


def _first_bad(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(axis=1))[0])


def _positions(positions, n: int, L: int, where: str) -> np.ndarray:
    """The per-token position column: given, or 0..L-1 for each of n / L sequences."""
    if positions is None:
        if n == 0 or n % L:
            raise InvalidLogitsError(
                f"{where}: a shard holds whole sequences of seq_len={L} tokens; got {n} rows "
                f"(not a positive multiple of {L}); pass positions= for sequences of "
                f"variable length"
            )
        return np.tile(np.arange(L, dtype=np.int32), n // L)
    pos = np.asarray(positions)
    if pos.ndim == 2 and pos.size == n:
        pos = pos.reshape(-1)
    if pos.ndim != 1 or not np.issubdtype(pos.dtype, np.integer) or len(pos) != n:
        raise InvalidLogitsError(
            f"{where}: positions must be an integer array of {n} entries (one per token), "
            f"got shape {pos.shape} dtype {pos.dtype}"
        )
    if n == 0:
        raise InvalidLogitsError(f"{where}: a shard holds at least one sequence; got 0 rows")
    return pos


def prepare_columns(
    m: dict,
    where: str,
    sample_ids: npt.ArrayLike,
    views: npt.ArrayLike | None,
    positions: npt.ArrayLike | None,
    *,
    ids: npt.ArrayLike | None = None,
    logprobs: npt.ArrayLike | None = None,
    missing_mass: npt.ArrayLike | None = None,
    counts: npt.ArrayLike | None = None,
    tokens: npt.ArrayLike | None = None,
    target_logprob: npt.ArrayLike | None = None,
) -> dict[str, np.ndarray]:
    """The stored columns of one token shard, every input checked (InvalidLogitsError naming
    the field, the row and its sequence; nothing is written on error). Sequences start at
    the rows whose position is 0 and hold 1..seq_len tokens (positions None: seq_len each).
    `tokens` (N,): each row's target token, exactly when the representation stores them."""
    rep, L, V = m["representation"], int(m["seq_len"]), int(m["vocab_size"])
    topk = rep["kind"] == "token_topk"
    width = rep["k"] if topk else rep["s_max"]
    ids = _rows2d(ids, "ids", where, None, None, "int")
    n = len(ids)
    pos = _positions(positions, n, L, where)
    if topk and ids.shape[1] != width:
        raise InvalidLogitsError(f"{where}: ids must have k={width} columns, got {ids.shape[1]}")
    if not topk and ids.shape[1] > width:
        raise InvalidLogitsError(
            f"{where}: ids has {ids.shape[1]} columns, more than s_max={width} (the stored "
            f"ids per token); open the writer with a larger s_max"
        )
    starts, lengths = seqs.bounds(pos)
    problem = seqs.position_problem(pos, L)
    try:
        sid = _per_token(sample_ids, n, lengths, "sample_ids", where).astype(np.int64)
        if views is None and m["num_views"] != 1:
            raise InvalidLogitsError(f"{where}: views are required when num_views={m['num_views']}")
        v = _per_token(views, n, lengths, "views", where, default=np.zeros(n, np.int32))
    except InvalidLogitsError:
        if problem is None:
            raise
        sid = v = None  # per-sequence ids of broken sequences: report the positions first

    def token(r: int) -> str:
        if sid is None:
            return f"row {r} (position {int(pos[r])})"
        return f"row {r} (sample_id {int(sid[r])}, view {int(v[r])}, position {int(pos[r])})"

    if problem is not None and problem[1] == "gap":
        r = problem[0]
        raise InvalidLogitsError(
            f"{where}: positions must be 0..{L - 1}, ascending and contiguous per sequence "
            f"(a sequence of n <= seq_len={L} tokens has positions 0..n-1 and starts at "
            f"position 0): {token(r)} has position {int(pos[r])}, expected {problem[2]}"
        )
    seq = np.repeat(np.arange(len(starts)), lengths)
    if problem is not None:  # "long": a sequence past seq_len
        r = problem[0]
        s0 = int(starts[seq[r]])
        who = "" if sid is None else f" (sample_id {int(sid[s0])}, view {int(v[s0])})"
        raise InvalidLogitsError(
            f"{where}: positions: the sequence starting at row {s0}{who} has "
            f"{int(lengths[seq[r]])} tokens, more than seq_len={L}; {token(r)} is past its end"
        )
    bad = np.flatnonzero((v < 0) | (v >= m["num_views"]))
    if len(bad):
        raise InvalidLogitsError(
            f"{where}: views: {token(bad[0])} has view {int(v[bad[0]])}, outside [0, num_views={m['num_views']})"
        )
    seq_s, seq_v = sid[starts], v[starts]
    bad = np.flatnonzero((sid != seq_s[seq]) | (v != seq_v[seq]))
    if len(bad):
        r = int(bad[0])
        raise InvalidLogitsError(
            f"{where}: sample_ids/views: the {int(lengths[seq[r]])} rows of a sequence must "
            f"share one (sample_id, view); {token(r)} differs from its sequence's first row "
            f"(sample_id {int(seq_s[seq[r]])}, view {int(seq_v[seq[r]])})"
        )
    order = np.lexsort((seq_v, seq_s))
    ss, vv = seq_s[order], seq_v[order]
    dup = np.flatnonzero((ss[1:] == ss[:-1]) & (vv[1:] == vv[:-1]))
    if len(dup):
        raise CoverageError(
            f"{where}: sequence (sample_id {ss[dup[0]]}, view {vv[dup[0]]}) appears more than once in the shard"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= V:
        r = _first_bad((ids < 0) | (ids >= V))
        raise InvalidLogitsError(
            f"{where}: ids: {token(r)} has id {int(ids[r][(ids[r] < 0) | (ids[r] >= V)][0])}, "
            f"outside [0, vocab_size={V})"
        )
    cols = {"sample_id": sid, "view": v.astype(np.int32), "position": pos.astype(np.int32)}
    _optional_column(rep, "tokens", tokens, "each row's target token", where)
    if tokens is not None:
        t = np.asarray(tokens)
        if t.shape != (n,) or not np.issubdtype(t.dtype, np.integer):
            raise InvalidLogitsError(
                f"{where}: tokens must be an integer array of {n} entries, got {t.shape} {t.dtype}"
            )
        bad = np.flatnonzero((t < 0) | (t >= V))
        if len(bad):
            raise InvalidLogitsError(
                f"{where}: tokens: {token(bad[0])} is {int(t[bad[0]])}, outside [0, vocab_size={V})"
            )
        cols["token"] = t.astype(np.int32)
    _optional_column(rep, "target_logprob", target_logprob, "the teacher's log-prob of each row's target", where)
    if target_logprob is not None:
        tl = np.asarray(target_logprob)
        if tl.reshape(-1).shape != (n,) or not np.issubdtype(tl.dtype, np.floating):
            raise InvalidLogitsError(
                f"{where}: target_logprob must be a float array of {n} entries, got {tl.shape} {tl.dtype}"
            )
        tl = tl.reshape(-1).astype(np.float32)
        bad = np.flatnonzero(~(tl <= 0))  # also NaN; -inf is a log-prob of an impossible token: refused too
        bad = np.union1d(bad, np.flatnonzero(np.isinf(tl)))
        if len(bad):
            raise InvalidLogitsError(
                f"{where}: target_logprob: {token(int(bad[0]))} is {float(tl[bad[0]])}, not a finite log-prob <= 0"
            )
        cols["target_logprob"] = tl
    bits = int(rep["id_bits"])
    if topk:
        lp = _rows2d(logprobs, "logprobs", where, width, n, "float")
        lp32 = lp.astype(np.float32, copy=False)
        if np.isnan(lp32).any() or np.isinf(lp32).any():
            r = _first_bad(~np.isfinite(lp32))
            raise InvalidLogitsError(f"{where}: logprobs: {token(r)} contains NaN or Inf")
        if (lp32 > 0).any():
            r = _first_bad(lp32 > 0)
            raise InvalidLogitsError(
                f"{where}: logprobs: {token(r)} has log-prob {float(lp32[r].max())} > 0 "
                f"(log-probabilities over the full vocabulary are <= 0)"
            )
        mm = np.asarray(missing_mass) if missing_mass is not None else None
        if mm is None or mm.reshape(-1).shape != (n,) or not np.issubdtype(mm.dtype, np.floating):
            raise InvalidLogitsError(
                f"{where}: missing_mass must be a float array of {n} entries (one per token), "
                f"got {None if mm is None else (mm.shape, mm.dtype)}"
            )
        mm = mm.reshape(-1).astype(np.float32, copy=False)
        bad = np.flatnonzero(~((mm >= 0) & (mm <= 1)))  # also NaN
        if len(bad):
            raise InvalidLogitsError(
                f"{where}: missing_mass: {token(bad[0])} is {float(mm[bad[0]])}, outside [0, 1] "
                f"(1 - the kept probabilities)"
            )
        cols["topk_ids"] = encode_ids(ids, bits)
        cols["topk_logprobs"] = encode_values(lp32, rep["dtype"])
        cols["missing_mass"] = mm.astype(rep["tail_dtype"])
        return cols
    c = _rows2d(counts, "counts", where, ids.shape[1], n, "int")
    if (c < 0).any():
        r = _first_bad(c < 0)
        raise InvalidLogitsError(f"{where}: counts: {token(r)} has a negative count")
    total = c.sum(axis=1, dtype=np.int64)
    bad = np.flatnonzero(total > rep["draws"])
    if len(bad):
        raise InvalidLogitsError(
            f"{where}: counts: {token(bad[0])} sums to {int(total[bad[0]])} > draws={rep['draws']}"
        )
    if ids.shape[1] < width:  # pad to s_max with (id 0, count 0)
        ids = np.concatenate([ids, np.zeros((n, width - ids.shape[1]), ids.dtype)], axis=1)
        c = np.concatenate([c, np.zeros((n, width - c.shape[1]), c.dtype)], axis=1)
    cols["sample_ids"] = encode_ids(ids, bits)
    cols["sample_counts"] = c.astype(rep["count_dtype"])
    return cols


def _optional_column(rep: dict, key: str, value, what: str, where: str) -> None:
    """A column the representation flags (`tokens`, `target_logprob`): given exactly when stored."""
    if bool(rep.get(key)) != (value is not None):
        state = "is required: this dataset stores it" if rep.get(key) else "is given, but this dataset stores none"
        raise InvalidLogitsError(f"{where}: {key}= ({what}) {state}")


def encode_ids(ids: np.ndarray, bits: int) -> np.ndarray:
    return ids.astype(np.uint16) if bits == 16 else pack_ids(ids, bits)


def encode_values(lp32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_bits(lp32)
    if dtype == "uint8":
        return logprob_codes(lp32)
    return lp32.astype(dtype)


# ------------------------------------------------------------------ reading


def decode(m: dict, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Stored token columns (leading shape (B,) rows or (B, L) sequences) -> ids int64,
    log-probs float32 (bf16 bits and uint8 codes decoded), missing mass float32, counts
    int32. Other keys pass through unchanged."""
    rep = m["representation"]
    out = dict(cols)
    idc = ID_COLUMN[rep["kind"]]
    width = rep["k"] if rep["kind"] == "token_topk" else rep["s_max"]
    if idc in cols:
        a = cols[idc]
        lead = a.shape[:-1]
        if rep["id_storage"] == "uint16":
            out[idc] = a.astype(np.int64)
        else:
            n = int(np.prod(lead))
            out[idc] = unpack_ids(a.reshape(n, a.shape[-1]), rep["id_bits"], (n, width)).reshape(*lead, width)
    if "topk_logprobs" in cols:
        a, dt = cols["topk_logprobs"], rep["dtype"]
        out["topk_logprobs"] = (
            from_bf16_bits(a)
            if dt == "bfloat16"
            else from_logprob_codes(a, rep.get("logprob_step", LOGPROB_STEP))
            if dt == "uint8"
            else a.astype(np.float32)
        )
    if "missing_mass" in cols:
        out["missing_mass"] = cols["missing_mass"].astype(np.float32)
    if "sample_counts" in cols:
        out["sample_counts"] = cols["sample_counts"].astype(np.int32)
    if "token" in cols:
        out["token"] = cols["token"].astype(np.int64)
    if "target_logprob" in cols:
        out["target_logprob"] = cols["target_logprob"].astype(np.float32)
    return out


# ------------------------------------------------------------------ verify


def shard_problems(m: dict, cols: dict[str, np.ndarray], entry: dict | None = None) -> list[str]:
    """What verify() reports about one decoded token shard (empty when fine): sequences of
    1..seq_len tokens with positions 0..n-1, one (sample_id, view) per sequence, as many
    sequences as the entry's num_sequences (without it: all of seq_len tokens), ids <
    vocab_size, log-probs <= 0, missing mass in [0, 1], counts summing to at most draws."""
    L, V, rep = int(m["seq_len"]), int(m["vocab_size"]), m["representation"]
    n = len(cols["sample_id"])
    out = []
    pos = cols["position"]
    ns = None if entry is None else entry.get("num_sequences")
    problem = seqs.position_problem(pos, L)
    if problem is not None:
        r, what, want = problem
        got = int(pos[r]) if n else None
        out.append(
            f"a sequence longer than seq_len={L} (row {r} has position {got})"
            if what == "long"
            else f"positions are not 0..n-1 contiguous per sequence (row {r} has position {got}, expected {want})"
        )
    else:
        starts, lengths = seqs.bounds(pos)
        seq = np.repeat(np.arange(len(starts)), lengths)
        s, v = cols["sample_id"], cols["view"]
        bad = np.flatnonzero((s != s[starts][seq]) | (v != v[starts][seq]))
        if len(bad):
            out.append(f"the rows of a sequence do not share one (sample_id, view) (row {int(bad[0])})")
        if ns is None and (n % L or (lengths != L).any()):
            out.append(
                f"{n} rows is not a whole number of sequences of seq_len={L} (the shard entry has no "
                f"num_sequences: a fixed-length shard)"
                if n % L
                else f"sequences shorter than seq_len={L}, but the shard entry has no num_sequences "
                f"(a fixed-length shard)"
            )
        elif ns is not None and len(starts) != ns:
            out.append(f"{len(starts)} sequences, the manifest says num_sequences {ns}")
    d = decode(m, {k: cols[k] for k in (ID_COLUMN[rep["kind"]], "topk_logprobs", "sample_counts") if k in cols})
    ids = d[ID_COLUMN[rep["kind"]]]
    if ids.size and (ids.min() < 0 or ids.max() >= V):
        out.append(f"token ids outside [0, vocab_size={V})")
    if "topk_logprobs" in d and (d["topk_logprobs"] > 0).any():
        out.append("log-probs > 0")
    if "target_logprob" in cols and not (np.isfinite(cols["target_logprob"]) & (cols["target_logprob"] <= 0)).all():
        out.append("target log-probs that are not finite and <= 0")
    if "missing_mass" in cols:
        mm = cols["missing_mass"].astype(np.float32)
        if ((mm < 0) | (mm > 1)).any():
            out.append("missing_mass outside [0, 1]")
    if "token" in cols and len(cols["token"]) and (cols["token"].min() < 0 or cols["token"].max() >= V):
        out.append(f"generated tokens outside [0, vocab_size={V})")
    if "sample_counts" in d and (d["sample_counts"].sum(axis=1) > rep["draws"]).any():
        out.append(f"sample counts summing to more than draws={rep['draws']}")
    return out
