"""TokenCorpus: documents -> one token stream -> windows of seq_len + 1 with next-token
targets, a memory-mapped cache, stable window ids, fingerprints, splits (tiny tokenizer)."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from _tiny_hf import tiny_tokenizer

from pipeline.data import corpus as corpus_mod
from pipeline.data.corpus import TokenCorpus
from pipeline.data.datasets import Source

DOCS = [
    "the dress is very good",
    "",
    "i love this top and the fabric is soft",
    "bad fit , too tight",
    "   ",
    "nice color but cheap fabric so i return it",
    "great skirt",
]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from pipeline.hf_files import load_tokenizer

    return load_tokenizer(str(tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")))


def _jsonl(path, docs, field="text"):
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"citation": "x", field: d}) + "\n")
    return path


def _open(path, tok, cache, seq_len=4, **kw):
    return TokenCorpus.from_jsonl(path, tokenizer=tok, tokenizer_path="tiny", seq_len=seq_len, cache_dir=cache, **kw)


def _stream(tok, docs):
    out = []
    for d in (d for d in docs if d.strip()):
        if out:
            out.append(tok.sep_token_id)  # the tiny tokenizer has no EOS: SEP separates
        out += tok(d, add_special_tokens=False)["input_ids"]
    return np.asarray(out)


def test_windows_are_the_stream_cut_every_seq_len_with_next_token_targets(tok, tmp_path):
    c = _open(_jsonl(tmp_path / "c.jsonl", DOCS), tok, tmp_path / "cache", seq_len=4)
    s = _stream(tok, DOCS)
    assert isinstance(c, Source) and c.input_kind == "tokens" and c.y is None and c.num_classes is None
    assert np.array_equal(np.asarray(c.tokens), s) and c.tokens.dtype == np.uint16
    n = (len(s) - 1) // 4
    assert len(c) == n and np.array_equal(c.sample_ids, np.arange(n))
    x, t = c.encode(np.arange(n)), c.targets(np.arange(n))
    assert x.shape == t.shape == (n, 4) and str(x.dtype) == str(t.dtype) == "torch.int64"
    assert np.array_equal(x.numpy().reshape(-1), s[: 4 * n]) and np.array_equal(t.numpy().reshape(-1), s[1 : 4 * n + 1])
    assert np.array_equal(x[1:, 0].numpy(), t[:-1, -1].numpy())  # consecutive windows share one token
    d = c.describe()
    assert d["num_tokens"] == len(s) and d["dropped_tokens"] == len(s) - 1 - 4 * n
    assert d["documents"] == 5 and d["empty_documents"] == 2 and d["separator_id"] == tok.sep_token_id
    assert d["tokenizer"]["fingerprint"] and d["chunks"] == n and d["in_shape"] == [4]
    fp = d["tokenizer"]["fingerprint"]  # students from weights check their tokenizer against it
    assert c.model_args() == {
        "vocab_size": len(tok),
        "pad_id": 0,
        "max_length": 4,
        "in_shape": (4,),
        "tokenizer_fingerprint": fp,
    }
    assert c.encode([-1]).tolist() == x[-1:].tolist()
    with pytest.raises(IndexError, match="out of range"):
        c.encode([n])


def test_reopening_maps_the_cache_with_the_same_ids_and_rows(tok, tmp_path, monkeypatch):
    path, cache = _jsonl(tmp_path / "c.jsonl", DOCS), tmp_path / "cache"
    a = _open(path, tok, cache)
    files = sorted(os.listdir(cache))
    assert len(files) == 3 and files[0].endswith(".docs.npy") and files[1].endswith(".json")
    assert files[2].endswith(".tokens.npy")
    monkeypatch.setattr(corpus_mod, "build_cache", lambda *a, **k: pytest.fail("tokenized again"))
    b = _open(path, tok, cache)
    assert isinstance(b.tokens, np.memmap)
    assert np.array_equal(a.sample_ids, b.sample_ids) and a.fingerprint() == b.fingerprint()
    assert np.array_equal(a.encode([0, 2]), b.encode([0, 2]))
    c8 = _open(path, tok, cache, seq_len=8)  # the stream does not depend on seq_len
    assert c8.content_fingerprint() == a.content_fingerprint() and c8.fingerprint() != a.fingerprint()
    assert sorted(os.listdir(cache)) == files
    moved = tmp_path / "elsewhere.jsonl"
    os.replace(path, moved)
    assert _open(moved, tok, cache).fingerprint() == a.fingerprint()  # places are not content


def test_fingerprint_changes_with_the_text_and_the_tokenizer(tok, tmp_path):
    from pipeline.hf_files import load_tokenizer

    cache = tmp_path / "cache"
    a = _open(_jsonl(tmp_path / "a.jsonl", DOCS), tok, cache)
    b = _open(_jsonl(tmp_path / "b.jsonl", DOCS[:-1] + ["great dress"]), tok, cache)
    assert a.fingerprint() != b.fingerprint() and a.content_fingerprint() != b.content_fingerprint()
    other = load_tokenizer(str(tiny_tokenizer(tmp_path / "tok2", words=["the", "dress", "is", "good"])))
    c = TokenCorpus.from_jsonl(tmp_path / "a.jsonl", tokenizer=other, tokenizer_path="t2", seq_len=4, cache_dir=cache)
    assert c.fingerprint() != a.fingerprint()
    assert c.describe()["tokenizer"]["fingerprint"] != a.describe()["tokenizer"]["fingerprint"]
    sep = _open(tmp_path / "a.jsonl", tok, cache, separator_id=tok.cls_token_id)
    assert sep.fingerprint() != a.fingerprint() and len(os.listdir(cache)) == 12  # 4 streams x (tokens, docs, sidecar)


def test_splits_are_deterministic_disjoint_and_keep_ids(tok, tmp_path):
    c = _open(_jsonl(tmp_path / "c.jsonl", DOCS * 10), tok, tmp_path / "cache", seq_len=3)
    p1 = c.split(seed=0, fractions={"train": 0.75, "test": 0.25})
    p2 = c.split(seed=0, fractions={"train": 0.75, "test": 0.25}, stratify=True)
    assert all(np.array_equal(p1[k].sample_ids, p2[k].sample_ids) for k in p1)
    tr, te = p1["train"], p1["test"]
    assert len(tr) + len(te) == len(c) and not set(tr.sample_ids) & set(te.sample_ids)
    assert json.loads(tr.split_spec)["stratify"] is False and tr.fingerprint() != te.fingerprint()
    assert c.split(seed=1, fractions={"train": 0.75, "test": 0.25})["test"].fingerprint() != te.fingerprint()
    pos = te.index_of(te.sample_ids[[3, 0]])
    assert pos.tolist() == [3, 0]
    assert np.array_equal(te.encode([3]), c.encode(c.index_of(te.sample_ids[[3]])))
    with pytest.raises(ValueError, match="not found"):
        te.index_of(tr.sample_ids[:1])


def test_pickles_small_without_the_map_or_a_tokenizer(tok, tmp_path):
    c = _open(_jsonl(tmp_path / "c.jsonl", DOCS * 50), tok, tmp_path / "cache")
    c.encode([0])
    blob = pickle.dumps(c)
    assert len(blob) < 2000, len(blob)
    r = pickle.loads(blob)
    assert r.fingerprint() == c.fingerprint() and np.array_equal(r.encode([5]), c.encode([5]))
    part = c.split(seed=0, sizes={"a": 10})["a"]
    rp = pickle.loads(pickle.dumps(part))
    assert np.array_equal(rp.sample_ids, part.sample_ids) and np.array_equal(rp.targets([9]), part.targets([9]))


def test_empty_or_too_short_text_is_refused(tok, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match="holds no text"):
        _open(_jsonl(tmp_path / "e.jsonl", ["", "  ", None]), tok, cache)
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no text"):
        _open(tmp_path / "blank.jsonl", tok, cache)
    assert not cache.exists() or not [f for f in os.listdir(cache) if not f.startswith(".")]
    assert not cache.exists() or os.listdir(cache) == []  # no temporaries left
    with pytest.raises(ValueError, match="fewer than one window of seq_len \\+ 1 = 101"):
        _open(_jsonl(tmp_path / "s.jsonl", ["the dress"]), tok, cache, seq_len=100)
    with pytest.raises(ValueError, match="larger than the model's context of 8"):
        _open(tmp_path / "s.jsonl", tok, cache, seq_len=16, max_positions=8)
    with pytest.raises(ValueError, match="line 1 has no field 'body'"):
        _open(tmp_path / "s.jsonl", tok, cache, text_field="body")
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        _open(tmp_path / "bad.jsonl", tok, cache)
    with pytest.raises(ValueError, match="corpus file not found"):
        _open(tmp_path / "missing.jsonl", tok, cache)
    with pytest.raises(ValueError, match="seq_len must be a positive integer"):
        _open(tmp_path / "s.jsonl", tok, cache, seq_len=0)


def test_a_failed_build_leaves_no_cache(tok, tmp_path, monkeypatch):
    path, cache = _jsonl(tmp_path / "c.jsonl", DOCS * 3000), tmp_path / "cache"
    calls = []

    def dying(texts, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return tok(texts, **kw)

    monkeypatch.setattr(corpus_mod, "BATCH_DOCS", 64)
    with pytest.raises(KeyboardInterrupt):
        corpus_mod.build_cache(
            corpus_mod._jsonl_texts(str(path), "text"),
            dying,
            3,
            np.uint16,
            str(cache / "k.tokens.npy"),
            str(cache / "k.json"),
            {"source": {"path": str(path)}},
        )
    assert os.listdir(cache) == []


def test_text_folder_and_parquet_give_the_same_stream_as_jsonl(tok, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path / "cache"
    ref = _open(_jsonl(tmp_path / "c.jsonl", DOCS), tok, cache)
    folder = tmp_path / "docs"
    folder.mkdir()
    for i, d in enumerate(DOCS):
        (folder / f"{i:03d}.txt").write_text(d)
    (folder / "notes.md").write_text("ignored")
    f = TokenCorpus.from_text_files(folder, tokenizer=tok, tokenizer_path="tiny", seq_len=4, cache_dir=cache)
    assert f.content_fingerprint() == ref.content_fingerprint() and f.name == "docs"
    assert f.describe()["format"] == "text_files" and f.describe()["source"]["files"] == len(DOCS)
    pq.write_table(
        pa.table({"body": DOCS[:1] + [None] + DOCS[2:], "n": list(range(len(DOCS)))}),
        tmp_path / "t.parquet",
        row_group_size=2,
    )
    t = TokenCorpus.from_table(
        tmp_path / "t.parquet", "body", tokenizer=tok, tokenizer_path="tiny", seq_len=4, cache_dir=cache
    )
    assert t.content_fingerprint() == ref.content_fingerprint() and t.describe()["empty_documents"] == 2
    assert np.array_equal(t.encode(np.arange(len(t))), ref.encode(np.arange(len(ref))))
    with pytest.raises(ValueError, match="text column 'text' not found"):
        TokenCorpus.from_table(tmp_path / "t.parquet", "text", tokenizer=tok, seq_len=4, cache_dir=cache)
    with pytest.raises(ValueError, match="column 'n' is int64, expected text"):
        TokenCorpus.from_table(tmp_path / "t.parquet", "n", tokenizer=tok, seq_len=4, cache_dir=cache)
    (tmp_path / "none").mkdir()
    with pytest.raises(ValueError, match="holds no \\*.txt file"):
        TokenCorpus.from_text_files(tmp_path / "none", tokenizer=tok, seq_len=4, cache_dir=cache)


def test_the_default_cache_is_under_distillery_cache(tok, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "dc"))
    c = TokenCorpus.from_jsonl(_jsonl(tmp_path / "c.jsonl", DOCS), tokenizer=tok, seq_len=4)
    assert c.describe()["cache"].startswith(str(tmp_path / "dc" / "corpus") + os.sep)


# ---------------------------------------------------------------- windows="documents"


def _docs_ids(tok, docs):
    return [tok(d, add_special_tokens=False)["input_ids"] for d in docs if d.strip()]


def test_document_windows_never_cross_a_document_and_end_with_the_separator(tok, tmp_path):
    c = _open(_jsonl(tmp_path / "c.jsonl", DOCS), tok, tmp_path / "cache", seq_len=4, windows="documents")
    sep = tok.sep_token_id
    # by hand: each document d = its ids + [sep]; positions len(ids); windows of <= 4 positions
    want = []
    for ids in _docs_ids(tok, DOCS):
        t = ids + [sep]
        for j in range(0, len(ids), 4):
            n = min(4, len(ids) - j)
            want.append((t[j : j + n], t[j + 1 : j + n + 1]))
    assert len(c) == len(want) and c.describe()["dropped_tokens"] == 0
    n = c.lengths(np.arange(len(c)))
    assert n.tolist() == [len(x) for x, _ in want] and n.min() >= 1 and n.max() == 4 and (n < 4).any()
    w = c.windows(np.arange(len(c)))
    for i, (x, t) in enumerate(want):
        assert w[i, : n[i]].tolist() == x and w[i, 1 : n[i] + 1].tolist() == t
        assert (w[i, n[i] + 1 :] == sep).all()  # padding after the window
    b = c.lm_batch([0, len(c) - 1])
    assert b["mask"].sum(1).tolist() == n[[0, len(c) - 1]].tolist()
    assert b["input_ids"].shape == b["targets"].shape == b["mask"].shape == (2, int(n[[0, len(c) - 1]].max()))
    assert c.num_positions == sum(len(i) for i in _docs_ids(tok, DOCS))  # every document token once as input


def test_document_windows_have_their_own_fingerprint_and_survive_pickling_and_splits(tok, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", DOCS)
    packed = _open(path, tok, tmp_path / "cache", seq_len=4)
    docs = _open(path, tok, tmp_path / "cache", seq_len=4, windows="documents")
    assert docs.fingerprint() != packed.fingerprint() and docs.content_fingerprint() == packed.content_fingerprint()
    parts = docs.split(seed=0, sizes={"train": 3, "val": 2})
    back = pickle.loads(pickle.dumps(parts["train"]))
    assert np.array_equal(back.windows(np.arange(3)), parts["train"].windows(np.arange(3)))
    assert np.array_equal(back.lengths(np.arange(3)), docs.lengths(parts["train"].sample_ids))
    with pytest.raises(ValueError, match="windows must be one of"):
        _open(path, tok, tmp_path / "cache", seq_len=4, windows="sliding")


def test_a_cache_without_document_starts_is_rebuilt(tok, tmp_path):
    path = _jsonl(tmp_path / "c.jsonl", DOCS)
    c = _open(path, tok, tmp_path / "cache", seq_len=4)
    os.remove(corpus_mod.docs_path(c.describe()["cache"]))  # a cache from before documents mode
    d = _open(path, tok, tmp_path / "cache", seq_len=4, windows="documents")
    assert len(d) == sum(-(-len(i) // 4) for i in _docs_ids(tok, DOCS))
