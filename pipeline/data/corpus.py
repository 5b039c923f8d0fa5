"""A token corpus for language-model distillation: documents -> one token stream -> fixed
windows with next-token targets (a pipeline.data.datasets.Source, input_kind "tokens").

    tok = pipeline.hf_files.load_tokenizer(teacher_dir)
    corpus = TokenCorpus.from_jsonl(".assets/kjv.jsonl", tokenizer=tok, tokenizer_path=teacher_dir,
                                    seq_len=128)
    parts = corpus.split(seed=0, fractions={"train": 0.9, "test": 0.1}, stratify=False)
    x = parts["train"].encode(pos)          # (B, 128) int64 inputs
    t = parts["train"].targets(pos)         # (B, 128) int64: x shifted by one (next token)

Documents (a JSONL file's `text_field` per line, every sorted *.txt file of a folder, or a
Parquet text column per row) are tokenized with the fast tokenizer without special tokens,
and joined into one stream with one separator token between consecutive documents
(`separator_id`, default the tokenizer's EOS, else its SEP). Empty or whitespace-only
documents (and nulls) are skipped and counted; a corpus with no text is refused.

Windows: window i is stream[i*L : i*L + L + 1] (L = seq_len): inputs its first L tokens,
targets its last L. Consecutive windows share one token, so every token of the stream but
the first is a target exactly once. The tokens after the last full window are dropped and
counted (describe()["dropped_tokens"]).

windows="documents" instead keeps documents apart: each document's positions (its
tokens as inputs, the next token as target, the separator as the last target) are cut into
windows of at most L, the last one of a document shorter, and no window crosses a document
boundary (document_windows). windows() pads short windows with the separator id;
lengths() gives each window's real positions and lm_batch() the batch with its mask. The
labels of such a corpus are variable-length sequences (docs/format.md, "Token layouts").

Sample ids: the window index i. They are stable for the same content, tokenizer, separator
and seq_len (re-opening, re-tokenizing, another process), and only then: windows cross
document boundaries, so editing, inserting or removing a document renumbers every window
after it. Such a change changes the token ids and with them fingerprint(), so labels stored
for the old corpus fail the lineage check rather than silently pairing with other text.

The cache: the stream is tokenized once into `<cache_dir>/<key>.tokens.npy` (uint16 when
the vocabulary fits, else uint32; cache_dir = $DISTILLERY_CACHE/corpus, else
~/.cache/distillery/corpus) with a JSON sidecar `<key>.json` (counts; the content
fingerprint, sha256 of the token ids). The key hashes the input files' sha256, the
tokenizer fingerprint, the text field and the separator, not seq_len: every seq_len maps
the same stream. `<key>.docs.npy` holds each document's first stream offset. Tokens then
sidecar are os.replace'd from temporary names, so a killed build leaves no cache that
opens. Opening maps the .npy (np.load mmap_mode="r"); pickling drops the map (the
receiver maps it again) and holds no tokenizer.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import json
import os
import shutil
import tempfile

import numpy as np
import torch

from pipeline.data import chat
from pipeline.data.chat import chat_path, turn_windows
from pipeline.data.datasets import split_dataset
from pipeline.data.jsonl import field_values
from pipeline.data.table import TableSource, cached_fingerprint
from pipeline.paths import cache_root, file_sha256, save_npy_atomic

CORPUS_VERSION = 1
BATCH_DOCS = 1024
WINDOWS = ("packed", "documents")


def corpus_root(cache_dir=None) -> str:
    """cache_dir, else $DISTILLERY_CACHE/corpus, else ~/.cache/distillery/corpus."""
    return cache_root("corpus", cache_dir)


def _sha256(path: str) -> str:
    return file_sha256(path)


def _file(path) -> str:
    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isfile(p):
        raise ValueError(f"corpus file not found: {path} ({p})")
    return p


# ---------------------------------------------------------------- readers: batches of texts (None = null)


def _jsonl_texts(path: str, field: str):
    batch = []
    for n, text in field_values(path, field, "text_field"):
        if text is not None and not isinstance(text, str):
            raise ValueError(f"{path}: line {n}: field {field!r} is {type(text).__name__}, expected text")
        batch.append(text)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def _txt_texts(files: list[str]):
    for p in files:
        try:
            with open(p, encoding="utf-8") as f:
                yield [f.read()]
        except UnicodeDecodeError as e:
            raise ValueError(f"{p}: not UTF-8 text ({e})") from None


def _parquet_texts(path: str, column: str):
    import pyarrow.parquet as pq
    import pyarrow.types as pat

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if column not in names:
        raise ValueError(f"{path}: text column {column!r} not found, columns are {names}")
    t = pf.schema_arrow.field(column).type
    if not (pat.is_string(t) or pat.is_large_string(t)):
        raise ValueError(f"{path}: column {column!r} is {t}, expected text (string)")
    for batch in pf.iter_batches(batch_size=BATCH_DOCS, columns=[column]):
        yield batch.column(0).to_pylist()


def document_batches(fmt: str, source: dict):
    """The documents of a corpus again, as the cache was built from them: batches of texts
    (None = null) of a source recorded in its sidecar ({"path", "text_field" | "text_column"});
    plain text only (a chat corpus is rendered by a template)."""
    if fmt == "jsonl":
        return _jsonl_texts(source["path"], source["text_field"])
    if fmt == "parquet":
        return _parquet_texts(source["path"], source["text_column"])
    if fmt == "text_files":
        return _txt_texts(sorted(glob.glob(os.path.join(glob.escape(source["path"]), "*.txt"))))
    raise ValueError(f"corpus format {fmt!r} holds no plain documents (a chat corpus is rendered by its template)")


# ---------------------------------------------------------------- building the stream


def build_cache(batches, tokenizer, sep: int, dtype, tokens_path: str, json_path: str, header: dict) -> dict:
    """Tokenize every document, write the stream and the sidecar atomically; the sidecar."""
    root = os.path.dirname(tokens_path)
    os.makedirs(root, exist_ok=True)
    fd, raw = tempfile.mkstemp(dir=root, prefix=".raw-")
    h = hashlib.sha256()
    docs = empty = rows = n = 0
    starts: list[int] = []  # stream offset of each document's first token
    try:
        with os.fdopen(fd, "wb") as f:
            for texts in batches:
                rows += len(texts)
                keep = [t for t in texts if t is not None and t.strip()]
                enc = (
                    tokenizer(
                        keep,
                        add_special_tokens=False,
                        return_attention_mask=False,
                        return_token_type_ids=False,
                        verbose=False,
                    )["input_ids"]
                    if keep
                    else []
                )
                flat: list[int] = []
                for ids in enc:
                    if not ids:
                        continue
                    if docs:
                        flat.append(sep)
                    starts.append(n + len(flat))
                    flat.extend(ids)
                    docs += 1
                empty += len(texts) - sum(1 for ids in enc if ids)
                arr = np.asarray(flat, dtype=np.int64)
                h.update(arr.astype("<u4").tobytes())
                f.write(arr.astype(dtype).tobytes())
                n += len(arr)
        if docs == 0:
            raise ValueError(
                f"{header['source']['path']}: the corpus holds no text ({rows} document(s), all "
                f"empty, whitespace-only or null)"
            )
        fd2, tmp_npy = tempfile.mkstemp(dir=root, prefix=".tokens-", suffix=".npy")
        try:
            with os.fdopen(fd2, "wb") as out, open(raw, "rb") as src:
                np.lib.format.write_array_header_1_0(
                    out, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": (n,)}
                )
                shutil.copyfileobj(src, out, 1 << 22)
            os.replace(tmp_npy, tokens_path)
        finally:
            if os.path.exists(tmp_npy):
                os.remove(tmp_npy)
        save_npy_atomic(docs_path(tokens_path), np.asarray(starts, dtype=np.int64))
    finally:
        os.remove(raw)
    meta = {
        **header,
        "num_tokens": n,
        "documents": docs,
        "empty_documents": empty,
        "rows_in_source": rows,
        "dtype": np.dtype(dtype).name,
        "fingerprint": h.hexdigest(),
    }
    _write_json_atomic(json_path, meta)
    return meta


def _write_json_atomic(path: str, meta: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".meta-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(meta, f, sort_keys=True)
    os.replace(tmp, path)


def docs_path(tokens_path: str) -> str:
    """The document starts beside a token stream: <key>.docs.npy (int64 stream offsets)."""
    return tokens_path[: -len(".tokens.npy")] + ".docs.npy"


def document_windows(doc_starts: np.ndarray, num_tokens: int, L: int) -> tuple[np.ndarray, np.ndarray]:
    """windows="documents": (stream start, length n <= L) of every window, documents in
    order. Document d is the stream's tokens [s_d, e_d) (e_d its separator, or the stream's
    end) and has e_d - s_d positions: inputs t[i], targets t[i + 1] with t[e_d] the
    separator (the last target of a document is "end of document"). Its positions are cut
    into windows of L, the last one shorter: no window crosses a document boundary."""
    s = np.asarray(doc_starts, dtype=np.int64)
    e = np.append(s[1:] - 1, num_tokens)  # separators sit between documents
    m = e - s  # positions per document (>= 1)
    per = -(-m // L)  # windows per document
    first = np.repeat(np.cumsum(per) - per, per)  # window index of its document's first
    j = np.arange(int(per.sum())) - first  # window number inside its document
    doc = np.repeat(np.arange(len(s)), per)
    start = s[doc] + j * L
    return start, np.minimum(L, m[doc] - j * L)


class TokenCorpus:
    """Fixed token windows of a tokenized corpus (see the module docstring). Open one with
    from_jsonl / from_text_files / from_table."""

    input_kind = "tokens"
    task = "lm"  # pipeline/tasks: windows are trained as next-token prediction
    y = None
    num_classes = None

    def __init__(
        self,
        *,
        name: str,
        tokens_path: str,
        meta: dict,
        seq_len: int,
        tokenizer_info: dict,
        windows: str = "packed",
        too_long: str = "refuse",
        labelled: str = "assistant",
    ):
        if windows not in WINDOWS:
            raise ValueError(f"windows must be one of {list(WINDOWS)}, got {windows!r}")
        self.name = name
        self.split_spec = "full"
        self.seq_len = int(seq_len)
        self.window_mode = windows
        self._tokens_path = tokens_path
        self._meta = meta
        self._tok_info = tokenizer_info
        self._tokens = None
        self._full = True
        n = meta["num_tokens"]
        self._win = None  # documents / turns: (stream start, length) per window
        self._mask = self._mask_cumsum = None  # chat: the assistant mask over the stream (uint8, mmap)
        self._conv = None  # chat: each window's conversation
        self.aligned_to = None  # with_windows: the windows of another tokenization they cover (alignment.py)
        self.teacher_windows = None
        if "assistant_tokens" in meta:  # a chat corpus: windows of whole turns (pipeline/data/chat.py)
            self.window_mode = "turns"
            unit = "row" if meta["format"] == "chat_parquet" else "line"
            s0, n0, conv = turn_windows(
                np.load(docs_path(tokens_path)),
                np.load(chat_path(tokens_path, "turns")),
                np.load(chat_path(tokens_path, "lines")),
                n,
                self.seq_len,
                meta["source"]["path"],
                unit,
                skip_long=too_long == "skip",
            )
            self.too_long, self.labelled = too_long, labelled
            # a window of user turns only has nothing to learn: left out (the labels hold >= 1 row per window)
            cs = self._assistant_before()
            some = (cs[s0 + n0 + 1] > cs[s0 + 1]) | (labelled == "all")
            self._win, self._conv = (s0[some], n0[some]), conv[some]
            self.chunks_in_source = len(self._win[0])
        elif windows == "documents":
            self._win = document_windows(np.load(docs_path(tokens_path)), n, self.seq_len)
            self.chunks_in_source = len(self._win[0])
        else:
            self.chunks_in_source = max(n - 1, 0) // self.seq_len
        if self.chunks_in_source == 0:
            raise ValueError(
                f"{meta['source']['path']}: the corpus has {n} token(s), fewer than one window of "
                f"seq_len + 1 = {self.seq_len + 1}; use a smaller seq_len or more text"
            )
        self.sample_ids = np.arange(self.chunks_in_source, dtype=np.int64)

    # -- opening
    @classmethod
    def from_jsonl(
        cls, path, *, tokenizer=None, tokenizer_path=None, seq_len: int, text_field: str = "text", **kw
    ) -> TokenCorpus:
        """One document per JSON line: its `text_field`."""
        p = _file(path)
        return cls._open(
            "jsonl",
            p,
            {"path": p, "text_field": text_field},
            _sha256(p),
            lambda: _jsonl_texts(p, text_field),
            tokenizer,
            tokenizer_path,
            seq_len,
            **kw,
        )

    @classmethod
    def from_text_files(cls, folder, *, tokenizer=None, tokenizer_path=None, seq_len: int, **kw) -> TokenCorpus:
        """One document per *.txt file of `folder` (not recursive), in sorted name order."""
        d = os.path.abspath(os.path.expanduser(os.fspath(folder)))
        if not os.path.isdir(d):
            raise ValueError(f"corpus folder not found: {folder} ({d})")
        files = sorted(glob.glob(os.path.join(glob.escape(d), "*.txt")))
        if not files:
            raise ValueError(f"corpus folder {d} holds no *.txt file")
        h = hashlib.sha256()
        for p in files:
            h.update(f"{os.path.basename(p)}\0{_sha256(p)}\n".encode())
        return cls._open(
            "text_files",
            d,
            {"path": d, "files": len(files)},
            h.hexdigest(),
            lambda: _txt_texts(files),
            tokenizer,
            tokenizer_path,
            seq_len,
            **kw,
        )

    @classmethod
    def from_table(
        cls, parquet_path, text_column: str, *, tokenizer=None, tokenizer_path=None, seq_len: int, **kw
    ) -> TokenCorpus:
        """One document per row of a Parquet file: its `text_column` (nulls skipped)."""
        p = _file(parquet_path)
        return cls._open(
            "parquet",
            p,
            {"path": p, "text_column": text_column},
            _sha256(p),
            lambda: _parquet_texts(p, text_column),
            tokenizer,
            tokenizer_path,
            seq_len,
            **kw,
        )

    @classmethod
    def from_chat(
        cls, path, *, messages_field: str = "messages", tokenizer=None, tokenizer_path=None, seq_len: int, **kw
    ) -> TokenCorpus:
        """One conversation per JSON line (its `messages_field`: [{role, content}, ...]) or
        per row of a Parquet column of such lists, rendered with the tokenizer's chat
        template; labelled positions are those whose target is an assistant token
        (pipeline/data/chat.py)."""
        p = _file(path)
        parquet = p.endswith(".parquet")
        return cls._open(
            "chat_parquet" if parquet else "chat_jsonl",
            p,
            {"path": p, "messages_field": messages_field},
            _sha256(p),
            (lambda: chat.read_parquet(p, messages_field)) if parquet else (lambda: chat.read_jsonl(p, messages_field)),
            tokenizer,
            tokenizer_path,
            seq_len,
            **kw,
        )

    @classmethod
    def _open(
        cls,
        fmt,
        path,
        source,
        content_sha,
        batches,
        tokenizer,
        tokenizer_path,
        seq_len,
        *,
        cache_dir=None,
        max_positions: int | None = None,
        separator_id: int | None = None,
        name: str | None = None,
        windows: str = "packed",
        too_long: str = "refuse",
        labelled: str = "assistant",
    ) -> TokenCorpus:
        from pipeline.hf_files import load_tokenizer, tokenizer_info

        if too_long not in ("refuse", "skip"):
            raise ValueError(f"too_long must be 'refuse' or 'skip', got {too_long!r}")
        if labelled not in ("assistant", "all"):
            raise ValueError(f"labelled must be 'assistant' or 'all', got {labelled!r}")
        if int(seq_len) != seq_len or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, found {seq_len!r}")
        if max_positions is not None and seq_len > int(max_positions):
            raise ValueError(f"seq_len {seq_len} is larger than the model's context of {max_positions} positions")
        if tokenizer is None:
            if tokenizer_path is None:
                raise ValueError("give tokenizer= (a fast tokenizer) or tokenizer_path=")
            tokenizer = load_tokenizer(tokenizer_path)
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("the corpus needs a fast tokenizer (tokenizer.json)")
        info = tokenizer_info(tokenizer, None if tokenizer_path is None else os.fspath(tokenizer_path))
        sep = (
            separator_id
            if separator_id is not None
            else (tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id)
        )
        if sep is None:
            raise ValueError("the tokenizer has no EOS or SEP token to separate documents; give separator_id=")
        vocab = info["vocab_size"]
        if not 0 <= int(sep) < vocab:
            raise ValueError(f"separator_id {sep} is outside the tokenizer's vocabulary of {vocab}")
        dtype = np.uint16 if vocab <= 1 << 16 else np.uint32
        field = source.get("text_field", source.get("text_column", source.get("messages_field")))
        header = {
            "version": CORPUS_VERSION,
            "format": fmt,
            "content_sha256": content_sha,
            "field": field,
            "tokenizer_fingerprint": info["fingerprint"],
            "separator_id": int(sep),
        }
        is_chat = fmt.startswith("chat_")
        if is_chat:  # the template decides the text and the mask: part of the cache key
            where = os.fspath(tokenizer_path) if tokenizer_path is not None else "tokenizer="
            header["chat_template_sha256"] = chat.template_sha256(chat.template_of(tokenizer, where))
        key = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:32]
        root = corpus_root(cache_dir)
        tokens_path, json_path = os.path.join(root, f"{key}.tokens.npy"), os.path.join(root, f"{key}.json")
        extra = [chat.chat_path(tokens_path, w) for w in ("mask", "turns", "lines")] if is_chat else []
        if all(os.path.isfile(q) for q in (json_path, tokens_path, docs_path(tokens_path), *extra)):
            with open(json_path) as f:
                meta = json.load(f)
        elif is_chat:
            os.makedirs(root, exist_ok=True)
            meta = {**header, "source": source}
            docs_file = docs_path(tokens_path)
            meta |= chat.build_chat_cache(batches(), tokenizer, int(sep), dtype, tokens_path, docs_file, meta)
            _write_json_atomic(json_path, meta)  # last: the cache opens only when complete
        else:
            meta = build_cache(
                batches(), tokenizer, int(sep), dtype, tokens_path, json_path, {**header, "source": source}
            )
        meta = {**meta, "source": source}  # the place it was opened from this time
        nm = name or os.path.splitext(os.path.basename(path.rstrip(os.sep)))[0]
        return cls(
            name=nm,
            tokens_path=tokens_path,
            meta=meta,
            seq_len=int(seq_len),
            tokenizer_info=info,
            windows=windows,
            too_long=too_long,
            labelled=labelled,
        )

    # -- state
    @property
    def tokens(self) -> np.ndarray:
        """The whole token stream, memory-mapped (uint16 / uint32)."""
        if self._tokens is None:
            self._tokens = np.load(self._tokens_path, mmap_mode="r")
            if len(self._tokens) != self._meta["num_tokens"]:
                raise ValueError(
                    f"corpus cache {self._tokens_path} holds {len(self._tokens)} tokens, its sidecar "
                    f"says {self._meta['num_tokens']}: remove both files to rebuild"
                )
        return self._tokens

    def __getstate__(self) -> dict:
        drop = ("_tokens", "_mask", "_mask_cumsum", "_index_cache", "_byte_offsets")
        drop += ("sample_ids",) if self._full else ()
        return {k: v for k, v in self.__dict__.items() if k not in drop}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._tokens = self._mask = self._mask_cumsum = None
        if self._full:
            self.sample_ids = np.arange(self.chunks_in_source, dtype=np.int64)

    # -- the Source protocol
    def __len__(self) -> int:
        return len(self.sample_ids)

    def _positions(self, pos) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64).reshape(-1)
        n = len(self)
        if pos.size and (pos.min() < -n or pos.max() >= n):
            bad = pos[(pos < -n) | (pos >= n)][:10].tolist()
            raise IndexError(f"corpus {self.name!r}: position(s) {bad} out of range for {n} windows")
        return pos

    def lengths(self, pos) -> np.ndarray:
        """(B,) int64 real positions of each window: seq_len, except the last window of a
        document with windows="documents"."""
        pos = self._positions(pos)
        if self._win is None:
            return np.full(len(pos), self.seq_len, np.int64)
        return self._win[1][self.sample_ids[pos]]

    def windows(self, pos) -> np.ndarray:
        """(B, seq_len + 1) int64: the windows at positions pos (inputs + the next token).
        A window shorter than seq_len (windows="documents") is padded after its n + 1
        tokens with the separator id; lengths(pos) says where its real positions end."""
        pos = self._positions(pos)
        tok, w = self.tokens, self.seq_len + 1
        if self._win is None:
            starts = self.sample_ids[pos] * self.seq_len
            out = np.empty((len(pos), w), np.int64)
            for i, s in enumerate(starts):
                out[i] = tok[s : s + w]
            return out
        starts, ns = self._win[0][self.sample_ids[pos]], self._win[1][self.sample_ids[pos]]
        out = np.full((len(pos), w), self._meta["separator_id"], np.int64)
        for i, (s, n) in enumerate(zip(starts, ns)):
            seg = tok[s : s + n + 1]  # the last document's final target is past the stream
            out[i, : len(seg)] = seg
        return out

    @property
    def is_chat(self) -> bool:
        return "assistant_tokens" in self._meta

    def label_mask(self, pos) -> np.ndarray:
        """(B, seq_len) bool: the labelled positions of the windows at pos, the positions
        every loss, perplexity and stored label counts: a window's real positions, and in a
        chat corpus only those whose target is an assistant token."""
        pos = self._positions(pos)
        n = self.lengths(pos)
        real = np.arange(self.seq_len)[None, :] < n[:, None]
        if not self.is_chat or self.labelled == "all":
            return real
        starts, mask = self._win[0][self.sample_ids[pos]], self.assistant_mask
        out = np.zeros_like(real)
        for i, (s, k) in enumerate(zip(starts, n)):
            out[i, :k] = mask[s + 1 : s + k + 1] != 0  # position j predicts token s + j + 1
        return out

    @property
    def assistant_mask(self) -> np.ndarray:
        """A chat corpus' (num_tokens,) uint8 stream mask, memory-mapped: 1 = assistant token."""
        if self._mask is None:
            self._mask = np.load(chat_path(self._tokens_path, "mask"), mmap_mode="r")
            if len(self._mask) != self._meta["num_tokens"]:
                raise ValueError(
                    f"corpus cache {self._tokens_path}: its assistant mask holds {len(self._mask)} entries for "
                    f"{self._meta['num_tokens']} tokens: remove the cache files to rebuild"
                )
        return self._mask

    def prompts(self, at: str = "first") -> tuple[np.ndarray, list[np.ndarray]]:
        """A chat corpus: (conversation ids (P,), their prompts), int64 token arrays, for the
        conversations of this split in order. at "first": each conversation's tokens up to
        its first assistant message; "every": up to each assistant message (from the start
        of the window holding it: the context a student sees there). A prompt ends with the
        template's assistant header (ChatML's "<|im_start|>assistant\n"): what a teacher answers."""
        if not self.is_chat:
            raise ValueError(f"corpus {self.name!r} is not a chat corpus: prompts come from conversations")
        if at not in ("first", "every"):
            raise ValueError(f"prompts: at must be 'first' or 'every', got {at!r}")
        every = np.arange(len(self))
        conv = self.conversations(every)
        pick = every if at == "every" else every[np.r_[True, conv[1:] != conv[:-1]]]  # first window of each
        tok, starts = self.tokens, self._win[0][self.sample_ids[pick]]
        mask = self.assistant_mask
        ids, out = [], []
        for j, s in zip(pick, starts):
            n = int(self._win[1][self.sample_ids[j]])
            m = np.asarray(mask[s : s + n + 1]) != 0  # tokens of the window (and its last target)
            opens = np.flatnonzero(m & ~np.r_[False, m[:-1]])  # first token of each answer
            opens = opens[opens > 0][: None if at == "every" else 1]
            for t in opens:
                ids.append(conv[j])
                out.append(np.asarray(tok[s : s + t], dtype=np.int64))
        return np.asarray(ids, dtype=np.int64), out

    def conversations(self, pos) -> np.ndarray:
        """A chat corpus: (B,) int64 the conversation (its order in the file, from 0) of each window."""
        if not self.is_chat:
            raise ValueError(f"corpus {self.name!r} is not a chat corpus")
        return self._conv[self.sample_ids[self._positions(pos)]]

    def label_counts(self, pos) -> np.ndarray:
        """(B,) int64 labelled positions per window: the rows its stored labels hold."""
        if not self.is_chat or self.labelled == "all":
            return self.lengths(pos)
        pos = self._positions(pos)
        cs = self._assistant_before()
        s, n = self._win[0][self.sample_ids[pos]], self._win[1][self.sample_ids[pos]]
        return cs[s + n + 1] - cs[s + 1]  # targets s + 1 .. s + n

    def _assistant_before(self) -> np.ndarray:
        """(T + 1,) int64: the assistant tokens before each stream offset (computed once per process)."""
        if self._mask_cumsum is None:
            self._mask_cumsum = np.concatenate([[0], np.cumsum(self.assistant_mask, dtype=np.int64)])
        return self._mask_cumsum

    def lm_batch(self, pos) -> dict[str, torch.Tensor]:
        """The windows at pos as one training/eval batch, cut to its longest window Lb:
        {"input_ids" (B, Lb), "targets" (B, Lb) int64, "mask" (B, Lb) bool (labelled
        positions: real ones, in a chat corpus those with an assistant target)}."""
        w, n = self.windows(pos), self.lengths(pos)
        Lb = int(n.max()) if len(n) else self.seq_len
        mask = self.label_mask(pos)[:, :Lb]
        return {
            "input_ids": torch.from_numpy(np.ascontiguousarray(w[:, :Lb])),
            "targets": torch.from_numpy(np.ascontiguousarray(w[:, 1 : Lb + 1])),
            "mask": torch.from_numpy(mask),
        }

    def encode(self, pos) -> torch.Tensor:
        """(B, seq_len) int64 input token ids."""
        return torch.from_numpy(np.ascontiguousarray(self.windows(pos)[:, :-1]))

    def targets(self, pos) -> torch.Tensor:
        """(B, seq_len) int64 next-token targets: encode(pos) shifted left by one."""
        return torch.from_numpy(np.ascontiguousarray(self.windows(pos)[:, 1:]))

    @property
    def in_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    def model_args(self) -> dict:
        """Windows hold no padding; pad_id is the tokenizer's (the separator when it has none)."""
        pad = self._tok_info["pad_id"]
        return {
            "vocab_size": int(self._tok_info["vocab_size"]),
            "pad_id": int(self._meta["separator_id"] if pad is None else pad),
            "max_length": self.seq_len,
            "in_shape": self.in_shape,
            "tokenizer_fingerprint": self._tok_info["fingerprint"],
        }

    @property
    def dropped_tokens(self) -> int:
        if self._win is not None:
            return 0
        return self._meta["num_tokens"] - 1 - self.chunks_in_source * self.seq_len

    @property
    def num_positions(self) -> int:
        """Labelled (input, target) positions over this set's windows (label_counts)."""
        return int(self.label_counts(np.arange(len(self))).sum())

    def describe(self) -> dict:
        m = self._meta
        return {
            "kind": "tokens",
            "format": m["format"],
            "source": dict(m["source"]),
            "cache": self._tokens_path,
            "tokenizer": dict(self._tok_info),
            "separator_id": m["separator_id"],
            "num_tokens": m["num_tokens"],
            "documents": m["documents"],
            "empty_documents": m["empty_documents"],
            "seq_len": self.seq_len,
            "stride": self.seq_len,
            "targets": "next token (the window shifted by one)",
            "chunks": len(self),
            "chunks_in_source": self.chunks_in_source,
            "dropped_tokens": self.dropped_tokens,
            "in_shape": [self.seq_len],
            **(
                {"windows": "documents (one document per window run, the last window shorter)"}
                if self.window_mode == "documents"
                else {}
            ),
            **({"aligned_to": dict(self.aligned_to)} if self.aligned_to is not None else {}),
            **({"chat": self._chat_describe()} if self.is_chat else {}),
            **({"generated": m["generated"]} if "generated" in m else {}),
        }

    def _chat_describe(self) -> dict:
        """The lineage of a chat corpus' mask: template, what is labelled, and how much."""
        m, every = self._meta, np.arange(len(self))
        real = int(self.lengths(every).sum())
        labelled = int(self.label_counts(every).sum())
        return {
            "template_sha256": m["chat_template_sha256"],
            "mask": self.labelled,  # corpus.labelled: assistant | all
            "labelled": (
                "positions whose target is an assistant token (content and end of turn)"
                if self.labelled == "assistant"
                else "every position (the whole conversation)"
            ),
            "windows": "one conversation, or a run of its whole messages when longer than seq_len",
            "conversations": m["documents"],
            "conversations_here": int(len(np.unique(self._conv[self.sample_ids]))),  # in this split
            "skipped_without_assistant": m["empty_documents"],
            "too_long": self.too_long,  # a message longer than seq_len: refused, or its conversation skipped
            "skipped_too_long": m["documents"] - len(np.unique(self._conv)),
            "messages": m["messages"],
            "assistant_tokens": m["assistant_tokens"],
            "positions": real,
            "labelled_positions": labelled,
            "labelled_share": labelled / max(real, 1),
        }

    def content_fingerprint(self) -> str:
        """sha256 of the whole token stream (from the sidecar; nothing re-read)."""
        return self._meta["fingerprint"]

    def fingerprint(self) -> str:
        """Over the token stream's hash, the split, describe() and the window ids (table.py)."""
        return cached_fingerprint(self)

    def subset(self, idx, *, split_spec: str | None = None) -> TokenCorpus:
        """Windows at positions idx, keeping their sample ids (the map is shared)."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        new = copy.copy(self)
        new.__dict__.pop("_index_cache", None)  # the mask's cumsum is over the stream: shared
        new.sample_ids = self.sample_ids[idx]
        new._full = False
        new.split_spec = self.split_spec if split_spec is None else split_spec
        return new

    def split(
        self,
        *,
        seed: int,
        fractions: dict[str, float] | None = None,
        sizes: dict[str, int] | None = None,
        stratify: bool = False,
    ) -> dict[str, TokenCorpus]:
        """split_dataset(self, ...): no labels, so never stratified. A chat corpus splits
        whole conversations (sizes / fractions count conversations), so no conversation
        has windows in two splits."""
        if not self.is_chat:
            return split_dataset(self, seed=seed, fractions=fractions, sizes=sizes, stratify=False)
        conv = self._conv[self.sample_ids]  # (len,) each window's conversation
        ids = np.unique(conv)
        if fractions is not None:
            from pipeline.data.datasets import sizes_from_fractions

            sizes = sizes_from_fractions(dict(fractions), len(ids))
        sizes = dict(sizes or {})
        if sum(sizes.values()) > len(ids):
            raise ValueError(
                f"corpus.sizes asks for {sum(sizes.values()):,} conversations ({sizes}) but {self.name!r} "
                f"holds {len(ids):,} (with an assistant message)"
            )
        order = ids[np.random.default_rng(int(seed)).permutation(len(ids))]
        out, a = {}, 0
        for name, size in sizes.items():
            chosen = order[a : a + int(size)]
            a += int(size)
            spec = {"split": name, "seed": int(seed), "sizes": sizes, "order": list(sizes), "by": "conversation"}
            spec |= {"n": len(ids), "parent": self.split_spec}
            out[name] = self.subset(np.flatnonzero(np.isin(conv, chosen)), split_spec=json.dumps(spec, sort_keys=True))
        return out

    def document_starts(self) -> np.ndarray:
        """(D,) int64: each document's first stream offset (the cache's <key>.docs.npy)."""
        return np.load(docs_path(self._tokens_path))

    def window_table(self) -> tuple[np.ndarray, np.ndarray]:
        """(starts, positions) of every window of the source, by sample id: window i reads
        stream tokens [starts[i], starts[i] + positions[i]]."""
        if self._win is None:
            n = self.chunks_in_source
            return np.arange(n, dtype=np.int64) * self.seq_len, np.full(n, self.seq_len, np.int64)
        return self._win

    def with_windows(
        self, starts: np.ndarray, lengths: np.ndarray, *, split_of: TokenCorpus, aligned_to: dict
    ) -> TokenCorpus:
        """This tokenization's stream cut into given windows: window i = tokens
        [starts[i], starts[i] + lengths[i]] (lengths[i] positions), with the sample ids,
        split and positions of `split_of` (another tokenization of the same text, whose
        window i covers the same bytes: pipeline/data/alignment.py). Short windows are
        padded like windows="documents"; seq_len is the longest window."""
        starts, lengths = np.asarray(starts, np.int64), np.asarray(lengths, np.int64)
        if len(starts) != split_of.chunks_in_source or (lengths < 1).any():
            raise ValueError(f"with_windows: {len(starts)} windows for {split_of.chunks_in_source}, or an empty one")
        new = copy.copy(self)
        new.__dict__.pop("_index_cache", None)
        new._win, new.window_mode, new.chunks_in_source = (starts, lengths), "aligned", len(starts)
        new.seq_len = int(lengths.max())
        new.sample_ids, new._full = split_of.sample_ids.copy(), False
        new.split_spec, new.name = split_of.split_spec, f"{self.name}-{split_of.name}"
        new.aligned_to, new.teacher_windows = dict(aligned_to), split_of
        return new

    # positions of sample ids, ValueError naming missing ones: the same lookup as the table sources
    index_of = TableSource.index_of

    def __repr__(self) -> str:
        return (
            f"TokenCorpus(name={self.name!r}, windows={len(self)}, seq_len={self.seq_len}, "
            f"split={self.split_spec[:60]!r})"
        )


def corpus_splits(section: dict, tokenizer_dir: str) -> dict[str, TokenCorpus]:
    """The windows of a corpus section ({kind, path, text_field | messages_field, seq_len,
    windows, sizes, seed}: the config's `corpus`, or the one a manifest records as data.recipe.corpus),
    tokenized with the tokenizer at tokenizer_dir and split by `sizes` in its key order
    (deterministic in `seed`). Cached per process."""
    return _splits(json.dumps(section), os.fspath(tokenizer_dir))


def open_corpus(c: dict, tokenizer_dir: str, seq_len: int | None = None) -> TokenCorpus:
    """The whole corpus of a corpus section, tokenized with the tokenizer at tokenizer_dir
    (seq_len: the section's unless given)."""
    common = {
        "tokenizer_path": tokenizer_dir,
        "seq_len": seq_len or c["seq_len"],
        "windows": c.get("windows", "packed"),
    }
    if c["kind"] == "chat":
        return TokenCorpus.from_chat(
            c["path"],
            messages_field=c.get("messages_field", "messages"),
            too_long=c.get("too_long", "refuse"),
            labelled=c.get("labelled", "assistant"),
            **common,
        )
    if c["kind"] == "jsonl":
        return TokenCorpus.from_jsonl(c["path"], text_field=c.get("text_field", "text"), **common)
    if c["kind"] == "text_files":
        return TokenCorpus.from_text_files(c["path"], **common)
    return TokenCorpus.from_table(c["path"], c.get("text_field", "text"), **common)


@functools.lru_cache(maxsize=4)
def _splits(section_json: str, tokenizer_dir: str) -> dict[str, TokenCorpus]:
    c = json.loads(section_json)
    corpus = open_corpus(c, tokenizer_dir)
    if c["kind"] == "chat":  # sizes count conversations; split() checks them
        return corpus.split(seed=c.get("seed", 0), sizes=dict(c["sizes"]))
    need = sum(c["sizes"].values())
    if need > len(corpus):
        raise ValueError(
            f"corpus.sizes asks for {need:,} windows ({c['sizes']}) but {c['path']} gives "
            f"{len(corpus):,} windows of {c['seq_len']} tokens: lower corpus.sizes or corpus.seq_len"
        )
    return corpus.split(seed=c.get("seed", 0), sizes=dict(c["sizes"]))
