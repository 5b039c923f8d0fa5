"""Tokenizers for cross-tokenizer distillation: the bytes behind each token id, whether a
tokenizer can represent a corpus, and the tokenizers distillery trains itself.

Token bytes. A student with its own tokenizer is aligned with the teacher through the text
both tokenize, and text is compared as UTF-8 bytes: a token can stand for part of a
character (an emoji split over byte tokens), so characters are too coarse and token
strings are not text at all in most vocabularies. `token_bytes(tok)[i]` is the exact bytes
token i stands for, read from how the tokenizer's decoder turns tokens back into text:

- ByteLevel (GPT-2, SmolLM2, Llama 3): each character of a token string is one byte under
  GPT-2's bytes_to_unicode table ("Ġ" is the space byte, "Ã©" the two bytes of "é").
- SentencePiece style (decoder Replace("▁", " ") / ByteFallback / Fuse / Strip, or Metaspace):
  "▁" is a space, `<0xNN>` the single byte NN, anything else its UTF-8.
- no decoder: the token string is the text (UTF-8).
- anything else (WordPiece's "##" continuations, BPE's end-of-word suffixes) decodes by
  rules that do not keep the text's bytes: refused with a ValueError.

Special tokens (EOS, PAD, chat markers) stand for no text: None. A tokenizer that adds a
space before the text (SentencePiece's dummy prefix, ByteLevel's add_prefix_space) gives
its first token a leading b" " the text lacks: `unrepresentable` allows for it (a
character is judged alone), but a document's tokens then spell one byte more than its
text, and alignment.byte_record refuses the tokenizer for byte spans.

Representability. A student tokenizer without byte fallback turns characters outside its
vocabulary into [UNK], and a normalizer (lowercase, accent stripping, whitespace cleanup)
changes the text before it is tokenized: either way the student's tokens no longer spell
the text, and nothing aligns with the teacher there. `unrepresentable` finds such
characters by tokenizing each distinct character of the corpus alone and comparing the
tokens' bytes with the character's UTF-8; `check_representable` refuses the tokenizer
with the worst ones named.

Trained tokenizers. `train_bpe` trains an N-token byte-level BPE on the corpus (every byte
is in its alphabet, so any text encodes losslessly); `byte_tokenizer` is 256 byte symbols
(token id == byte value) plus the end-of-document token "<|endoftext|>" (id 256). Both are
saved as Hugging Face fast tokenizers with pad = eos, so pipeline.hf_files.load_tokenizer
loads them like any other. `student_tokenizer` turns a config spec into a tokenizer
directory, training into the cache once per (spec, corpus). Note that the special token's
text, "<|endoftext|>", written in a document is encoded as the special token, as for the
teacher.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import re
import shutil
import tempfile
import weakref
from collections.abc import Callable, Iterable

import numpy as np

from pipeline.hf_files import resolve_model_path, tokenizer_fingerprint
from pipeline.paths import cache_root

EOS = "<|endoftext|>"
MIN_BPE_VOCAB = 257 + 1  # the 256 bytes and EOS, plus at least one merge (else it is the byte tokenizer)
MAX_BPE_VOCAB = 1_000_000
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# decoders that only glue or trim a SentencePiece-style token sequence: the bytes stay the tokens'
_SP_PASSIVE = {"Fuse", "Strip"}

# token_bytes per tokenizer fingerprint: the same tokenizer loaded twice shares one entry
_BYTES: dict[str, tuple] = {}
# fingerprint per tokenizer object: hashing the serialised tokenizer costs ~0.1 s, and
# token_bytes is called per batch; len(tok) is re-checked because add_tokens mutates it
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table: printable bytes map to themselves, the other 68
    (controls, space, 0x7F-0xA0, 0xAD) to chr(256 + n) in byte order, so every byte is a
    visible character and a byte string is a str the BPE can merge."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _name(tok) -> str:
    return getattr(tok, "name_or_path", "") or type(tok).__name__


def _fingerprint(tok) -> str:
    try:
        n, fp = _FINGERPRINTS[tok]
        if n == len(tok):
            return fp
    except (KeyError, TypeError):
        pass
    fp = tokenizer_fingerprint(tok)
    try:
        _FINGERPRINTS[tok] = (len(tok), fp)
    except TypeError:  # not weak-referenceable: just not memoised
        pass
    return fp


def _decoder_kind(tok) -> tuple[str, bool]:
    """("bytelevel" | "sentencepiece" | "plain", byte_fallback) from the backend's decoder;
    ValueError for a decoder whose tokens do not keep the text's bytes."""
    dec = json.loads(tok.backend_tokenizer.to_str()).get("decoder")
    if dec is None:
        return "plain", False
    if dec["type"] == "ByteLevel":
        return "bytelevel", False
    parts = dec["decoders"] if dec["type"] == "Sequence" else [dec]
    types = [p["type"] for p in parts]

    def sentencepiece_part(p) -> bool:
        if p["type"] == "Replace":
            return p.get("pattern") == {"String": "▁"} and p.get("content") == " "
        if p["type"] == "Metaspace":
            return p.get("replacement", "▁") == "▁"
        return p["type"] in _SP_PASSIVE or p["type"] == "ByteFallback"

    if all(sentencepiece_part(p) for p in parts) and not set(types) <= _SP_PASSIVE:
        return "sentencepiece", "ByteFallback" in types
    raise ValueError(
        f"tokenizer {_name(tok)}: decoder {'+'.join(types)}: byte spans of its tokens are not defined "
        f"(it does not keep the text's bytes); use a byte-level BPE or a byte tokenizer"
    )


def _piece_bytes(s: str, kind: str, byte_fallback: bool) -> bytes:
    if kind == "bytelevel":
        try:
            return bytes(_UNICODE_TO_BYTE[c] for c in s)
        except KeyError as e:
            raise ValueError(f"token {s!r} has a character outside the ByteLevel alphabet: {e.args[0]!r}") from None
    if kind == "sentencepiece":
        m = _BYTE_TOKEN.fullmatch(s) if byte_fallback else None
        return bytes([int(m.group(1), 16)]) if m else s.replace("▁", " ").encode("utf-8")
    return s.encode("utf-8")


def token_bytes(tok) -> list[bytes | None]:
    """For each id in range(len(tok)) the exact bytes the token stands for in the text;
    None for special tokens (they stand for no text) and for ids without a token.
    ValueError for a decoder that does not keep the text's bytes (module docstring)."""
    fp = _fingerprint(tok)
    if fp not in _BYTES:
        kind, byte_fallback = _decoder_kind(tok)
        added = tok.added_tokens_decoder
        special = set(tok.all_special_ids) | {i for i, t in added.items() if t.special}
        backend = tok.backend_tokenizer
        out: list[bytes | None] = []
        for i in range(len(tok)):
            s = backend.id_to_token(i)
            if s is None or i in special:
                out.append(None)
            elif i in added:  # an added token matches its content in the raw text, not in byte-level form
                out.append(added[i].content.encode("utf-8"))
            else:
                try:
                    out.append(_piece_bytes(s, kind, byte_fallback))
                except ValueError as e:
                    raise ValueError(f"tokenizer {_name(tok)}: id {i}: {e}") from None
        _BYTES[fp] = tuple(out)
    return list(_BYTES[fp])  # a copy: callers may edit theirs, the cache stays right


def byte_lengths(tok) -> np.ndarray:
    """(V,) int64: the byte length of each token, 0 for special tokens."""
    return np.fromiter((len(b) if b is not None else 0 for b in token_bytes(tok)), dtype=np.int64)


def _spell(tok, pieces: list[bytes | None], ids) -> bytes | None:
    """The bytes a token sequence stands for; None when one of them stands for no text."""
    parts = [pieces[i] if 0 <= i < len(pieces) else None for i in ids]
    return None if any(p is None for p in parts) else b"".join(parts)


def unrepresentable(tok, texts: Iterable[str]) -> collections.Counter:
    """{character: occurrences} of the characters of `texts` that `tok` cannot spell: the
    tokens of the character alone do not stand for its UTF-8 bytes (an [UNK], a normalizer
    that changed it). Each distinct character is tokenized once."""
    counts: collections.Counter = collections.Counter()
    for t in texts:
        counts.update(t)
    pieces = token_bytes(tok)
    # a tokenizer that adds a space before the text spells "a" as b" a": allow that prefix
    probe = _spell(tok, pieces, tok("a", add_special_tokens=False)["input_ids"]) or b""
    prefix = probe[:-1] if probe.endswith(b"a") and probe[:-1] in (b"", b" ") else b""
    chars, bad = [], collections.Counter()
    for c in counts:
        try:
            c.encode("utf-8")
            chars.append(c)
        except UnicodeEncodeError:  # a lone surrogate (JSON allows "\ud800"): no UTF-8 text at all
            bad[c] = counts[c]
    if chars:
        for c, ids in zip(chars, tok(chars, add_special_tokens=False)["input_ids"], strict=True):
            if _spell(tok, pieces, ids) != prefix + c.encode("utf-8"):
                bad[c] = counts[c]
    return bad


def check_representable(tok, texts: Iterable[str], *, name: str, where: str) -> None:
    """ValueError (one line) naming the characters of `texts` that `tok` cannot represent,
    most common first; the ValueError of token_bytes for a decoder without byte spans."""
    bad = unrepresentable(tok, texts)
    if not bad:
        return
    top = bad.most_common(5)
    shown = ", ".join(f"{c!r} ×{n}" for c, n in top)
    more = f", and {len(bad) - len(top)} more distinct" if len(bad) > len(top) else ""
    raise ValueError(
        f"student tokenizer {name}: cannot represent {sum(bad.values())} characters of {where} "
        f"(no byte fallback, or a normalizer that changes text): {shown}{more}"
    )


# ------------------------------------------------------------------ trained tokenizers


def _save(backend, out_dir: str) -> str:
    """Save `backend` as a Hugging Face fast tokenizer (eos = pad = EOS, no BOS) into a
    temporary directory beside out_dir, then rename it into place: a killed save leaves no
    out_dir, so an existing out_dir is always complete. FileExistsError when out_dir exists
    and is not empty (another writer finished first, or an older tokenizer is there)."""
    from transformers import PreTrainedTokenizerFast

    out_dir = os.path.abspath(os.path.expanduser(os.fspath(out_dir)))
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"tokenizer directory {out_dir} exists and is not empty")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        fast = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS)
        fast.save_pretrained(tmp)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if os.path.isdir(out_dir) and os.listdir(out_dir):
                raise FileExistsError(f"tokenizer directory {out_dir} exists and is not empty") from None
            raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str) -> str:
    """A byte-level BPE of `vocab_size` tokens (256 bytes, EOS, merges) trained on `texts`,
    saved into out_dir (returned). The same texts give the same tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int):
        raise ValueError(f"vocab_size must be an integer, found {vocab_size!r}")
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise ValueError(
            f"vocab_size must be in [{MIN_BPE_VOCAB}, {MAX_BPE_VOCAB:,}] (256 bytes + EOS + at least "
            f"one merge), found {vocab_size}"
        )
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        # every byte in the vocabulary, seen in the corpus or not: no text ever needs [UNK]
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return _save(tk, out_dir)


def byte_tokenizer(out_dir: str) -> str:
    """The byte tokenizer: ids 0..255 are the byte values, 256 is EOS (also pad); saved
    into out_dir (returned)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # a BPE without merges over GPT-2's byte alphabet, each symbol's id its byte value
    vocab = {c: b for b, c in bytes_to_unicode().items()}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    # no regex split: with no merges every pre-token ends up as single bytes anyway
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([EOS])  # id 256: the next free id
    return _save(tk, out_dir)


def _check_spec(spec) -> None:
    allowed = (
        "a tokenizer directory or pkg:<module>/<dir> path, {'train': 'bpe', 'vocab_size': N} "
        f"({MIN_BPE_VOCAB} <= N <= {MAX_BPE_VOCAB:,}) or {{'train': 'bytes'}}"
    )
    if isinstance(spec, dict):
        if spec == {"train": "bytes"}:
            return
        if spec.get("train") == "bpe" and set(spec) == {"train", "vocab_size"}:
            n = spec["vocab_size"]
            if isinstance(n, int) and not isinstance(n, bool) and MIN_BPE_VOCAB <= n <= MAX_BPE_VOCAB:
                return
    raise ValueError(f"student tokenizer {spec!r}: must be {allowed}")


def student_tokenizer(spec, *, texts_factory: Callable[[], Iterable[str]], source_key: str, cache_dir=None) -> str:
    """The directory of the student tokenizer `spec`: a path (a directory or
    `pkg:<module>/<dir>`) as it is, or a tokenizer distillery trains, built once into
    <cache_root("tokenizers")>/<key> and reused. `texts_factory()` gives the corpus texts
    and is called only to train a BPE; `source_key` names the corpus (its fingerprint)."""
    if isinstance(spec, str):
        return resolve_model_path(spec, what="student tokenizer")
    _check_spec(spec)
    import tokenizers

    # the byte tokenizer does not depend on the corpus: one directory serves every corpus
    source = source_key if spec["train"] == "bpe" else None
    body = json.dumps({"spec": spec, "source": source, "tokenizers": tokenizers.__version__}, sort_keys=True)
    out = os.path.join(cache_root("tokenizers", cache_dir), hashlib.sha256(body.encode()).hexdigest()[:24])
    if os.path.isfile(os.path.join(out, "tokenizer.json")):
        return out  # written by an atomic rename: present means complete
    try:
        if spec["train"] == "bpe":
            return train_bpe(texts_factory(), spec["vocab_size"], out)
        return byte_tokenizer(out)
    except FileExistsError:
        # another process built the same key meanwhile: the same spec and corpus, the same tokenizer
        if os.path.isfile(os.path.join(out, "tokenizer.json")):
            return out
        raise
