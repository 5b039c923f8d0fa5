"""pipeline.data.tokenizing: token bytes, representability, the tokenizers distillery trains."""

import json
import os
import string
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pipeline.data.tokenizing import (
    byte_lengths,
    byte_tokenizer,
    check_representable,
    student_tokenizer,
    token_bytes,
    train_bpe,
    unrepresentable,
)
from pipeline.hf_files import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KJV = os.path.join(ROOT, ".assets", "kjv.jsonl")
TEXTS = [
    "naïve café — 日本語 😀",
    "  multiple   spaces\n\ttabs",
    "emoji 🦜😀 and a math letter 𝔘, ß, Ω, ½",
    "<tag> ﬁ ligature, \u00a0nbsp, \u200b zero width",
]


@pytest.fixture(scope="module")
def teacher():
    # resolved before any test points DISTILLERY_CACHE elsewhere: the converted teacher is cached
    from flows.config import load_config
    from flows.lm import ensure_teacher

    return load_tokenizer(ensure_teacher(load_config(os.path.join(ROOT, "configs/lm.yaml")))["dir"])


@pytest.fixture(scope="module")
def corpus():
    if not os.path.exists(KJV):
        pytest.skip(".assets/kjv.jsonl is absent")
    with open(KJV, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(2000), f, strict=False)]


def spelled(tok, text: str) -> bytes:
    pieces = token_bytes(tok)
    return b"".join(pieces[i] for i in tok(text, add_special_tokens=False)["input_ids"])


def wrap(backend, **special) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=backend, **special)


# ------------------------------------------------------------------ token_bytes


@pytest.mark.parametrize("text", TEXTS)
def test_teacher_tokens_spell_the_text(teacher, text):
    assert spelled(teacher, text) == text.encode("utf-8")


def test_teacher_splits_an_emoji_over_byte_tokens(teacher):
    pieces = token_bytes(teacher)
    ids = teacher("😀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1 and b"".join(pieces[i] for i in ids) == "😀".encode()
    for i in ids:  # each piece alone is part of a character: not valid UTF-8
        with pytest.raises(UnicodeDecodeError):
            pieces[i].decode("utf-8")


def test_teacher_special_ids_and_lengths(teacher):
    pieces = token_bytes(teacher)
    assert len(pieces) == len(teacher) == 49152
    special = set(teacher.all_special_ids) | {i for i, t in teacher.added_tokens_decoder.items() if t.special}
    assert special and {i for i, b in enumerate(pieces) if b is None} == special
    # the Hugging Face decoder, token by token, agrees wherever a token is whole characters
    decoded = teacher.backend_tokenizer.decode_batch([[i] for i in range(len(teacher))], skip_special_tokens=False)
    whole = [i for i, d in enumerate(decoded) if i not in special and "\ufffd" not in d]
    assert len(whole) > 40_000
    assert all(pieces[i] == decoded[i].encode("utf-8") for i in whole)
    lengths = byte_lengths(teacher)
    assert lengths.shape == (49152,) and lengths.dtype.name == "int64"
    assert lengths.tolist() == [0 if b is None else len(b) for b in pieces]
    # the cache hands out copies: editing one does not change the next
    pieces[300] = b"edited"
    assert token_bytes(teacher)[300] != b"edited"


def test_sentencepiece_style_with_byte_fallback_and_dummy_prefix():
    # a Llama-2-like tokenizer: "▁" for spaces, a space prepended, bytes for unknown characters
    byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
    vocab = {p: i for i, p in enumerate(["<unk>", *byte_pieces, "▁", *string.ascii_letters])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok = wrap(tk, unk_token="<unk>", pad_token="<unk>")
    pieces = token_bytes(tok)
    assert pieces[0] is None and pieces[1 + 0xC3] == b"\xc3" and pieces[257] == b" "
    text = "naïve café 😀"
    assert spelled(tok, text) == b" " + text.encode()  # the dummy prefix is the one extra byte
    assert not unrepresentable(tok, [text])


# ------------------------------------------------------------------ representability


def test_wordpiece_has_no_byte_spans():
    vocab = {t: i for i, t in enumerate(["[UNK]", "[PAD]", "hello", "world", "##s", "a", "b"])}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tk.decoder = decoders.WordPiece()
    tok = wrap(tk, unk_token="[UNK]", pad_token="[PAD]")
    with pytest.raises(ValueError, match=r"decoder WordPiece: byte spans of its tokens are not defined.*byte-level"):
        token_bytes(tok)
    with pytest.raises(ValueError, match="decoder WordPiece"):
        check_representable(tok, ["hello"], name="wp", where="the corpus")


def test_bpe_without_byte_fallback_counts_unknown_characters():
    letters = string.ascii_letters + " "
    vocab = {t: i for i, t in enumerate(["[UNK]", *letters])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))  # no pre-tokenizer, no decoder
    tok = wrap(tk, unk_token="[UNK]", pad_token="[UNK]")
    texts = ["Café — naïve 😀 Zoë", "plain ascii only", "über ñ ñ ñ"]
    expected = Counter(c for t in texts for c in t if c not in letters)
    assert expected and unrepresentable(tok, texts) == expected
    assert unrepresentable(tok, ["only letters and spaces"]) == Counter()
    with pytest.raises(ValueError) as e:
        check_representable(tok, texts, name="tiny", where="corpus kjv")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"student tokenizer tiny: cannot represent {sum(expected.values())} characters of corpus kjv")
    assert "'ñ' ×3" in msg and msg.index("'ñ' ×3") < msg.index("'é'")  # most common first
    assert "and 2 more distinct" in msg  # 7 distinct, 5 shown
    check_representable(tok, ["fine"], name="tiny", where="corpus kjv")


def test_lossy_normalizer_is_unrepresentable():
    vocab = {t: i for i, t in enumerate(["[UNK]", *string.ascii_lowercase, " "])}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    tk.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase()])
    tok = wrap(tk, unk_token="[UNK]", pad_token="[UNK]")
    # the tokens spell "cafe hi": the text's capitals and its accent are gone
    assert unrepresentable(tok, ["Café Hi"]) == Counter({"C": 1, "é": 1, "H": 1})


# ------------------------------------------------------------------ trained tokenizers


def test_byte_tokenizer(tmp_path):
    d = byte_tokenizer(str(tmp_path / "bytes"))
    tok = load_tokenizer(d)
    assert len(tok) == 257 and tok.eos_token_id == tok.pad_token_id == 256
    assert token_bytes(tok) == [bytes([b]) for b in range(256)] + [None]
    for text in [*TEXTS, "", "\x00\x7f control", "".join(chr(c) for c in range(32, 0x250))]:
        ids = tok(text)["input_ids"]
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok("a" + tok.eos_token)["input_ids"] == [97, 256]
    assert not unrepresentable(tok, TEXTS)
    with pytest.raises(FileExistsError):
        byte_tokenizer(d)  # never overwrites a saved tokenizer


def test_train_bpe(tmp_path, corpus):
    a = train_bpe(corpus, 1000, str(tmp_path / "a"))
    b = train_bpe(iter(corpus), 1000, str(tmp_path / "b"))  # any iterable: a generator too
    assert Path(a, "tokenizer.json").read_bytes() == Path(b, "tokenizer.json").read_bytes()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary directory left
    tok = load_tokenizer(a)
    assert len(tok) == 1000 and tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok("in the beginning")["input_ids"] == tok("in the beginning", add_special_tokens=False)["input_ids"]
    # merges were learned: the corpus takes far fewer tokens than bytes
    sample = " ".join(corpus[:50])
    assert len(tok(sample)["input_ids"]) < len(sample.encode()) / 2.5
    for text in TEXTS:  # unseen characters: byte-level never loses text
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and spelled(tok, text) == text.encode()
    assert not unrepresentable(tok, TEXTS)
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(corpus, 257, str(tmp_path / "c"))


def test_student_tokenizer(tmp_path, monkeypatch, corpus):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "cache"))
    calls = []

    def factory():
        if calls:
            raise AssertionError("texts_factory called again: the trained tokenizer was not reused")
        calls.append(1)
        return iter(corpus[:300])

    spec = {"train": "bpe", "vocab_size": 300}
    d = student_tokenizer(spec, texts_factory=factory, source_key="kjv-a")
    assert d.startswith(str(tmp_path / "cache" / "tokenizers")) and len(load_tokenizer(d)) == 300
    assert student_tokenizer(dict(spec), texts_factory=factory, source_key="kjv-a") == d
    assert calls == [1]

    def no_texts():
        raise AssertionError("the byte tokenizer needs no corpus")

    b = student_tokenizer({"train": "bytes"}, texts_factory=no_texts, source_key="kjv-a")
    assert b != d and len(load_tokenizer(b)) == 257
    assert student_tokenizer({"train": "bytes"}, texts_factory=no_texts, source_key="other") == b
    assert student_tokenizer(d, texts_factory=no_texts, source_key="x") == d
    other = tmp_path / "own"
    byte_tokenizer(str(other))
    assert student_tokenizer(str(other), texts_factory=no_texts, source_key="x") == str(other)

    for bad in [
        {"train": "bpe"},
        {"train": "bpe", "vocab_size": 257},
        {"train": "bpe", "vocab_size": 2_000_000},
        {"train": "bpe", "vocab_size": True},
        {"train": "bpe", "vocab_size": 300, "extra": 1},
        {"train": "wordpiece"},
        ["bytes"],
        None,
    ]:
        with pytest.raises(ValueError, match="must be a tokenizer directory"):
            student_tokenizer(bad, texts_factory=no_texts, source_key="x")
    with pytest.raises(ValueError, match="no such directory"):
        student_tokenizer(str(tmp_path / "missing"), texts_factory=no_texts, source_key="x")
