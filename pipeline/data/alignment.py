"""Byte spans of token windows, and two tokenizations of one text aligned by bytes
(cross-tokenizer distillation: a student with its own tokenizer learns from labels the
teacher stored for its tokenization).

The byte stream of a plain-text corpus: its documents' UTF-8 bytes in order, one
separator byte between consecutive documents (where the token stream holds its separator
token). Every token stands for exact bytes (pipeline/data/tokenizing.py token_bytes; the
separator token for its one byte), so token t of a stream spans bytes
[offsets[t], offsets[t + 1]) with offsets = (0, cumsum of the tokens' byte lengths):
recomputed exactly from the recorded tokenizer and the token stream, never stored. A
tokenization is lossless when those bytes are the text's own: `byte_record` checks it
once per corpus cache against the source documents and gives the stream's sha256, which
the labels' manifest records (`data.bytes`) and a student's text must match.

Windows of another tokenization (`aligned_windows`): teacher window i covers the bytes of
its tokens [s, s + n] (inputs and targets); the student's window i is every student token
lying inside those bytes, so both windows read the same text. Chunks (`chunk_ids`): the
bytes between consecutive boundaries that both tokenizations' target tokens share; every
target token of either side lies in exactly one chunk (or outside the common span, at the
edges), and the positions predicting a chunk's first token condition on the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os

import numpy as np

from pipeline.data.corpus import TokenCorpus, document_batches
from pipeline.data.tokenizing import byte_lengths, check_representable, token_bytes

SEPARATOR = b"\x1e"  # the byte a document boundary counts as (ASCII record separator)
RECORD_VERSION = 1


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from pipeline.hf_files import load_tokenizer

    return load_tokenizer(path)


def tokenizer_of(corpus: TokenCorpus):
    """The fast tokenizer a corpus was tokenized with (from its recorded path)."""
    path = corpus.describe()["tokenizer"].get("path")
    if path is None:
        raise ValueError(f"corpus {corpus.name!r} records no tokenizer path: open it with tokenizer_path=")
    return _tokenizer(os.fspath(path))


def byte_table(corpus: TokenCorpus) -> np.ndarray:
    """(V,) int64 bytes per token id of the corpus' tokenizer; its separator counts 1 byte."""
    if corpus.is_chat:
        raise ValueError(
            f"corpus {corpus.name!r} is a chat corpus: its text is rendered by the teacher's template, "
            f"so it has no byte stream a tokenizer of its own could share (use plain text)"
        )
    table = byte_lengths(tokenizer_of(corpus)).copy()
    table[corpus.describe()["separator_id"]] = len(SEPARATOR)
    return table


def offsets(corpus: TokenCorpus) -> np.ndarray:
    """(T + 1,) int64: the byte offset of every token of the corpus' whole stream, and its end."""
    off = corpus.__dict__.get("_byte_offsets")
    if off is None:
        lens = byte_table(corpus)[np.asarray(corpus.tokens)]
        off = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])
        corpus.__dict__["_byte_offsets"] = off
    return off


def byte_record(corpus: TokenCorpus) -> dict:
    """{"sha256", "num_bytes", "documents", "separator"} of the corpus' byte stream, after
    checking that its tokens give back the source documents' bytes exactly (ValueError
    naming the characters the tokenizer cannot represent, with their count). Kept beside
    the corpus cache (<key>.bytes.json): computed once per cache."""
    desc = corpus.describe()
    path = desc["cache"][: -len(".tokens.npy")] + ".bytes.json"
    try:
        with open(path) as f:
            rec = json.load(f)
        if rec.get("version") == RECORD_VERSION:
            return rec["bytes"]
    except (OSError, ValueError, KeyError):
        pass
    tok = tokenizer_of(corpus)
    tb, where = token_bytes(tok), desc["source"]["path"]
    stream = np.asarray(corpus.tokens)
    starts = corpus.document_starts()
    ends = np.append(starts[1:] - 1, len(stream))  # a separator token sits between documents

    def texts():
        for batch in document_batches(desc["format"], desc["source"]):
            yield from (t for t in batch if t is not None and t.strip())  # the documents the cache holds

    h, n, d = hashlib.sha256(), 0, -1
    # one document at a time (memory flat in the corpus' size): its tokens' bytes, its text's
    for d, text in enumerate(texts()):
        want = text.encode("utf-8")
        if d >= len(starts):
            break
        if b"".join(tb[t] or b"" for t in stream[starts[d] : ends[d]].tolist()) != want:
            # name what the tokenizer cannot represent, counted over the whole text
            check_representable(tok, texts(), name=desc["tokenizer"].get("path") or "?", where=where)
            raise ValueError(
                f"tokenizer {desc['tokenizer'].get('path')}: its tokens of document {d} of {where} do not give "
                f"back the text's bytes: byte spans are undefined for it"
            )
        h.update(SEPARATOR if d else b"")
        h.update(want)
        n += len(want) + (len(SEPARATOR) if d else 0)
    if d + 1 != len(starts):
        raise ValueError(f"{where}: {d + 1} documents, the corpus cache holds {len(starts)}: rebuild the cache")
    rec = {
        "sha256": h.hexdigest(),
        "num_bytes": n,
        "documents": int(desc["documents"]),
        "separator": "each document's UTF-8 bytes; one byte between documents",
    }
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump({"version": RECORD_VERSION, "bytes": rec}, f)
    os.replace(tmp, path)
    return rec


def aligned_windows(student: TokenCorpus, teacher: TokenCorpus) -> TokenCorpus:
    """The student's tokenization of `teacher`'s windows: window i (the same sample id)
    holds every student token inside the bytes of teacher window i's tokens. Refuses
    other text (byte streams of different sha256) naming both."""
    t_rec, s_rec = byte_record(teacher), byte_record(student)
    if t_rec["sha256"] != s_rec["sha256"]:
        raise ValueError(
            f"the student's text ({student.describe()['source']['path']}, bytes sha256 {s_rec['sha256'][:16]}) "
            f"is not the teacher's ({t_rec['sha256'][:16]})"
        )
    t_off, s_off = offsets(teacher), offsets(student)
    ts, tn = teacher.window_table()
    b0, b1 = t_off[ts], t_off[ts + tn + 1]  # window i reads bytes [b0, b1)
    j0 = np.searchsorted(s_off[:-1], b0, "left")  # first student token starting in it
    j1 = np.searchsorted(s_off, b1, "right") - 1  # one past the last student token ending in it
    n = j1 - j0 - 1  # positions: its tokens but the last are inputs
    if (n < 1).any():
        i = int(np.flatnonzero(n < 1)[0])
        raise ValueError(f"teacher window {i} (bytes {b0[i]}..{b1[i]}) holds fewer than 2 whole student tokens")
    info = {"teacher_tokenizer": teacher.describe()["tokenizer"]["fingerprint"], "bytes_sha256": t_rec["sha256"]}
    info |= {"teacher_seq_len": teacher.seq_len, "teacher_windows": teacher.window_mode}
    return student.with_windows(j0, n, split_of=teacher, aligned_to=info)


def chunk_ids(t_bounds: np.ndarray, s_bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Chunks of one window pair. t_bounds (n_t + 1,): the byte offsets of the teacher's
    target tokens (token j spans [t_bounds[j], t_bounds[j + 1])); s_bounds likewise for
    the student. Returns (chunk of each teacher target (n_t,), of each student target
    (n_s,), number of chunks); -1 for a token outside the span both sides cover."""
    common = np.intersect1d(t_bounds, s_bounds)  # sorted boundaries both sides have
    nc = max(len(common) - 1, 0)

    def of(b: np.ndarray) -> np.ndarray:
        k = np.searchsorted(common, b[:-1], "right") - 1  # the chunk a token's start falls in
        return np.where((k >= 0) & (k < nc) & (b[1:] <= common[-1] if nc else False), k, -1)

    return of(t_bounds), of(s_bounds), nc


def batch_alignment(teacher: TokenCorpus, student: TokenCorpus, sample_ids: np.ndarray, Lt: int, Ls: int) -> dict:
    """The chunks of a batch of windows (the same sample ids on both sides), as numpy
    arrays: xt_chunk_t (B, Lt) / xt_chunk_s (B, Ls) int64, the batch-wide chunk of every
    target position (-1: none; a position j predicts token start + j + 1), and xt_first_t
    / xt_first_s (C,) the flat positions (row-major in (B, L)) predicting each chunk's first
    token: where both sides condition on the same bytes.

    And what the teacher's labels say about every student target token: xt_target_t (B,
    Lt) the teacher's target ids (-1 past a window's end); xt_row_t (B, Ls) the flat
    teacher position predicting the teacher token the student is reading when its token
    starts: the one its first byte falls in, or at a teacher boundary the one just read
    (-1: none); xt_depth (B, Ls) how many of that token's bytes the student has read (its
    whole length at a boundary; 0 only at a window's first teacher token)."""
    t_off, s_off = offsets(teacher), offsets(student)
    ts, tn = teacher.window_table()
    ss, sn = student.window_table()
    tokens = np.asarray(teacher.tokens)
    B = len(sample_ids)
    chunk_t, chunk_s = np.full((B, Lt), -1, np.int64), np.full((B, Ls), -1, np.int64)
    row_t, depth = np.full((B, Ls), -1, np.int64), np.full((B, Ls), -1, np.int64)
    target_t = np.full((B, Lt), -1, np.int64)
    first_t, first_s, base = [], [], 0
    for i, w in enumerate(np.asarray(sample_ids, np.int64)):
        a, n, c, m = ts[w], tn[w], ss[w], sn[w]
        t_bounds, s_bounds = t_off[a + 1 : a + n + 2], s_off[c + 1 : c + m + 2]
        ct, cs, nc = chunk_ids(t_bounds, s_bounds)
        chunk_t[i, :n] = np.where(ct >= 0, ct + base, -1)
        chunk_s[i, :m] = np.where(cs >= 0, cs + base, -1)
        for ids, L, out in ((ct, Lt, first_t), (cs, Ls, first_s)):
            j = np.flatnonzero((ids >= 0) & np.r_[True, ids[1:] != ids[:-1]])  # a chunk's first position
            out.append(i * L + j)
        base += nc
        target_t[i, :n] = tokens[a + 1 : a + n + 1]
        # the teacher target j with t_bounds[j] < a student token's first byte <= t_bounds[j + 1]
        # (at the window's first teacher token, j = 0 read to depth 0)
        b = s_bounds[:-1]  # (m,)
        j = np.maximum(np.searchsorted(t_bounds, b, "left") - 1, 0)
        jj = j.clip(0, max(n - 1, 0))
        ok = (j < n) & (b >= t_bounds[0]) & (b <= t_bounds[jj + 1])
        row_t[i, :m] = np.where(ok, i * Lt + jj, -1)
        depth[i, :m] = np.where(ok, b - t_bounds[jj], -1)
    return {
        "xt_chunk_t": chunk_t,
        "xt_chunk_s": chunk_s,
        "xt_first_t": np.concatenate(first_t).astype(np.int64),
        "xt_first_s": np.concatenate(first_s).astype(np.int64),
        "xt_target_t": target_t,
        "xt_row_t": row_t,
        "xt_depth": depth,
    }


def twin_ids(teacher: TokenCorpus, student: TokenCorpus) -> np.ndarray:
    """(V_T,) int64: for each teacher token id, the student id standing for exactly the
    same bytes, or -1 (special tokens have none): the shared vocabulary of the GOLD hybrid."""
    s_ids = ids_by_bytes(student)
    return np.asarray([s_ids.get(b, -1) if b else -1 for b in token_bytes(tokenizer_of(teacher))], np.int64)


def ids_by_bytes(corpus: TokenCorpus) -> dict[bytes, int]:
    """{the bytes a token stands for: its id} of the corpus' tokenizer (special tokens left out)."""
    return {b: i for i, b in enumerate(token_bytes(tokenizer_of(corpus))) if b}


def aligned_splits(section: dict, teacher_dir: str, student_tokenizer_dir: str) -> dict[str, TokenCorpus]:
    """Every split of a corpus section (corpus_splits with the teacher's tokenizer) in the
    student's tokenization: {split: aligned_windows(student corpus, teacher split)}."""
    return _aligned(json.dumps(section), os.fspath(teacher_dir), os.fspath(student_tokenizer_dir))


@functools.lru_cache(maxsize=8)
def _aligned(section_json: str, teacher_dir: str, student_dir: str) -> dict[str, TokenCorpus]:
    from pipeline.data.corpus import corpus_splits, open_corpus

    section = json.loads(section_json)
    student = open_corpus(section, student_dir, seq_len=1)  # the whole stream; windows come from the teacher's
    return {name: aligned_windows(student, part) for name, part in corpus_splits(section, teacher_dir).items()}


def vocab_maps(teacher: TokenCorpus, student: TokenCorpus) -> dict[str, np.ndarray]:
    """The cross-tokenizer losses' vocabulary maps, computed once per tokenizer pair:
    twin (V_T,), prefix (V_T, D) and heads (V_T, D + 1), D the teacher's longest token."""
    return {"twin": twin_ids(teacher, student), "prefix": prefix_ids(teacher, student), "heads": head_ids(teacher)}


def head_ids(teacher: TokenCorpus) -> np.ndarray:
    """(V_T, D + 1) int64: heads[v, d] numbers the string of teacher token v's first d bytes
    (equal numbers: equal strings; -1 for d past v's end): two tokens agree on their first
    d bytes iff heads[v, d] == heads[u, d] >= 0, one gather instead of comparing bytes.
    Special tokens stand for no bytes (only d = 0)."""
    tb = [b or b"" for b in token_bytes(tokenizer_of(teacher))]
    number: dict[bytes, int] = {}
    out = np.full((len(tb), max(map(len, tb), default=0) + 1), -1, np.int64)
    for v, b in enumerate(tb):
        for d in range(len(b) + 1):
            out[v, d] = number.setdefault(b[:d], len(number))
    return out


def prefix_ids(teacher: TokenCorpus, student: TokenCorpus) -> np.ndarray:
    """(V_T, D) int64, D the teacher's longest token in bytes: prefix[v, d] the longest
    student token that begins teacher token v's bytes from byte d on, or -1 (d past v's
    end, special tokens, no student token fits). Column 0: the student's first token of
    v's text (exactly its first byte for a byte-level student); column d: its next token
    once it has read d bytes of v."""
    s_ids = ids_by_bytes(student)
    longest = max(map(len, s_ids), default=0)
    tb = [b or b"" for b in token_bytes(tokenizer_of(teacher))]
    out = np.full((len(tb), max(map(len, tb), default=0) or 1), -1, np.int64)
    for v, b in enumerate(tb):
        for d in range(len(b)):
            for n in range(min(len(b) - d, longest), 0, -1):
                i = s_ids.get(b[d : d + n])
                if i is not None:
                    out[v, d] = i
                    break
    return out
