"""Cross-tokenizer distillation from stored labels (issue 23): byte spans recomputed from the
recorded tokenizer, windows of another tokenization aligned by bytes, chunks holding the same
bytes on both sides (multi-byte UTF-8, whitespace runs, tokens that split differently), the
labels' alignment fields, the objective's terms against a direct float64 computation with an
alignment re-derived here from bytes, bits per byte, and the refusals (a tokenizer without
byte fallback, labels without alignment fields, other text)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest
import torch
from _tiny_hf import WORDS
from test_lm_label import tiny_llama

import pipeline.hf_files  # noqa: F401  (offline mode before transformers)
import storage
from pipeline.data.alignment import SEPARATOR, aligned_windows, batch_alignment, byte_record, chunk_ids
from pipeline.data.corpus import TokenCorpus
from pipeline.data.tokenizing import byte_tokenizer, token_bytes, train_bpe
from pipeline.hf_files import load_tokenizer
from pipeline.labelling.tokens import label_corpus
from pipeline.models.causal_lm import perplexity
from pipeline.objectives.objective import Objective
from pipeline.training.stream import open_label_stream

L, K = 24, 8
EXTRAS = ["naïve", "café", "—", "日本語", "😀", "  ", "\t", "x  y", "ünïcödé", "ß"]
TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny-llama-xtok"}


def _docs(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        words = [str(w) for w in rng.choice(WORDS + EXTRAS, int(rng.integers(8, 30)))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", " 😀", "  —  end"]))
    return out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtok")
    docs = _docs(60, 0)
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    t_dir = train_bpe(_docs(200, 1), 400, str(root / "t_tok"))
    s_dir = train_bpe(_docs(200, 2), 300, str(root / "s_tok"))  # another vocabulary: tokens split differently
    b_dir = byte_tokenizer(str(root / "b_tok"))
    cache = str(root / "cache")
    teacher = TokenCorpus.from_jsonl(path, tokenizer_path=t_dir, seq_len=L, cache_dir=cache)
    parts = teacher.split(seed=0, sizes={"train": 12, "test": 4})
    students = {
        name: TokenCorpus.from_jsonl(path, tokenizer_path=d, seq_len=1, cache_dir=cache)
        for name, d in (("bpe", s_dir), ("bytes", b_dir))
    }
    model = tiny_llama(len(load_tokenizer(t_dir)), max_pos=512)
    out = {"root": root, "docs": docs, "path": path, "dirs": (t_dir, s_dir, b_dir), "teacher": teacher}
    return out | {"parts": parts, "students": students, "model": model, "cache": cache}


def _bytes_of(corpus: TokenCorpus, ids) -> list[bytes]:
    """Each token's bytes, found independently: the tokenizer's own strings through
    token_bytes, the separator as the documented one byte."""
    tb = token_bytes(load_tokenizer(corpus.describe()["tokenizer"]["path"]))
    sep = corpus.describe()["separator_id"]
    return [SEPARATOR if int(t) == sep else tb[int(t)] for t in ids]


def test_byte_record_is_the_text(env):
    want = SEPARATOR.join(d.encode("utf-8") for d in env["docs"])
    for c in [env["teacher"], *env["students"].values()]:
        rec = byte_record(c)
        assert rec["sha256"] == hashlib.sha256(want).hexdigest() and rec["num_bytes"] == len(want)
        assert b"".join(_bytes_of(c, np.asarray(c.tokens))) == want


def test_chunk_ids_by_hand():
    ct, cs, n = chunk_ids(np.array([0, 3, 5, 9]), np.array([0, 1, 3, 4, 5, 7, 9]))
    assert n == 3 and ct.tolist() == [0, 1, 2] and cs.tolist() == [0, 0, 1, 1, 2, 2]
    ct, cs, n = chunk_ids(np.array([2, 5, 8, 10]), np.array([0, 3, 5, 8]))  # starts and ends differ
    assert n == 1 and ct.tolist() == [-1, 0, -1] and cs.tolist() == [-1, -1, 0]


@pytest.mark.parametrize("student", ["bpe", "bytes"])
def test_windows_and_chunks_hold_the_same_bytes(env, student):
    part = env["parts"]["train"]
    al = aligned_windows(env["students"][student], part)
    assert np.array_equal(al.sample_ids, part.sample_ids)
    sid = part.sample_ids
    w_t, w_s = part.windows(np.arange(len(part))), al.windows(np.arange(len(al)))
    n_t, n_s = part.lengths(np.arange(len(part))), al.lengths(np.arange(len(al)))
    a = batch_alignment(part, al, sid, L, int(n_s.max()))
    longest = max(len(b) for b in token_bytes(load_tokenizer(al.describe()["tokenizer"]["path"])) if b)
    chunks_seen, splits_differ = 0, False
    for i in range(len(sid)):
        tb = _bytes_of(part, w_t[i, : n_t[i] + 1])
        sb = _bytes_of(al, w_s[i, : n_s[i] + 1])
        # the student window reads the teacher window's bytes, less a partial token at either end
        tbytes, sbytes = b"".join(tb), b"".join(sb)
        at = tbytes.find(sbytes)
        assert 0 <= at < len(tb[0]) + longest and len(tbytes) - at - len(sbytes) < longest
        ct, cs = a["xt_chunk_t"][i, : n_t[i]], a["xt_chunk_s"][i, : n_s[i]]
        for c in np.unique(ct[ct >= 0]):
            t_chunk = b"".join(tb[j + 1] for j in np.flatnonzero(ct == c))  # position j predicts token j + 1
            s_chunk = b"".join(sb[j + 1] for j in np.flatnonzero(cs == c))
            assert t_chunk == s_chunk and t_chunk, (i, c)
            splits_differ |= (ct == c).sum() != (cs == c).sum()
            chunks_seen += 1
        assert set(np.unique(cs[cs >= 0])) == set(np.unique(ct[ct >= 0]))
        # first positions: where each chunk starts, flat in (B, L)
        firsts_t = [i * L + int(np.flatnonzero(ct == c)[0]) for c in np.unique(ct[ct >= 0])]
        assert set(firsts_t) <= set(a["xt_first_t"].tolist())
    assert chunks_seen == len(a["xt_first_t"]) == len(a["xt_first_s"]) and splits_differ


def _target_bounds(part, al, i, n_t, n_s):
    """Byte offsets in window i's text (from the tokens' own bytes) of the teacher's and
    the student's target tokens: target j spans [bounds[j], bounds[j + 1])."""
    w_t, w_s = part.windows([i])[0], al.windows([i])[0]
    tl = [len(b) for b in _bytes_of(part, w_t[: n_t + 1])]
    sl = [len(b) for b in _bytes_of(al, w_s[: n_s + 1])]
    tbytes = b"".join(_bytes_of(part, w_t[: n_t + 1]))
    shift = tbytes.find(b"".join(_bytes_of(al, w_s[: n_s + 1])))  # the student's window starts this much later
    return np.cumsum([0] + tl)[1:], np.cumsum([0] + sl)[1:] + shift  # ends of tokens = starts of targets


def _direct_chunks(part, al, i, n_t, n_s):
    """Chunk membership of window i re-derived from bytes with Python sets (not chunk_ids)."""
    t_b, s_b = _target_bounds(part, al, i, n_t, n_s)
    common = sorted(set(t_b.tolist()) & set(s_b.tolist()))

    def member(bounds, n):
        out = []
        for j in range(n):  # target j spans [bounds[j], bounds[j + 1])
            lo, hi = bounds[j], bounds[j + 1]
            k = [c for c in range(len(common) - 1) if common[c] <= lo and hi <= common[c + 1]]
            out.append(k[0] if k else -1)
        return out

    return member(t_b, n_t), member(s_b, n_s)


def _f(x, y):  # the binary KL of ALM in float64
    return math.exp(x) * (x - y) + (1 - math.exp(x)) * (math.log(-math.expm1(x)) - math.log(-math.expm1(y)))


@pytest.mark.parametrize(
    "loss, student", [("alm", "bpe"), ("gold", "bpe"), ("uld", "bpe"), ("prefix_kl", "bpe"), ("prefix_kl", "bytes")]
)
def test_objective_terms_by_hand(env, tmp_path, loss, student):
    part = env["parts"]["train"]
    uri = tmp_path / "labels"
    label_corpus(env["model"], part, str(uri), k=K, shard_size=6, batch_size=4, teacher=TEACHER, target_logprob=True)
    ds = storage.open_soft_labels(str(uri))
    assert ds.manifest["data"]["bytes"]["sha256"] == byte_record(part)["sha256"]
    al = aligned_windows(env["students"][student], part)
    stream = open_label_stream(str(uri), al, batch_size=3, seed=0)
    batch = next(iter(stream))
    s_dir = env["dirs"][1 if student == "bpe" else 2]
    student = tiny_llama(len(load_tokenizer(s_dir)), seed=1, max_pos=1024)
    obj = Objective(loss=loss, alpha=0.5, kind="token_topk", stored_temperatures=[1.0])
    obj.maps = stream.maps
    with torch.no_grad():
        z = student(input_ids=batch["x"]).logits
        got = obj.terms(z, batch)
    logq = torch.log_softmax(z.double(), -1).numpy()  # (B, Ls, Vs)
    y, m = batch["y"].numpy(), batch["mask"].numpy()
    task = -np.mean([logq[b, j, y[b, j]] for b in range(len(y)) for j in range(y.shape[1]) if m[b, j]])
    assert float(got["task_loss"]) == pytest.approx(task, rel=1e-5)
    # the teacher's stored rows, read straight from the dataset by sample id
    rows = {}
    for r in ds.iter_sequences(64, shuffle=False):
        for b in range(len(r["sample_id"])):
            rows[int(r["sample_id"][b])] = {
                k: r[k][b] for k in ("topk_ids", "topk_logprobs", "missing_mass", "target_logprob")
            }
    t_tok, s_tok = load_tokenizer(env["dirs"][0]), load_tokenizer(s_dir)
    s_of = {b: i for i, b in enumerate(token_bytes(s_tok)) if b}
    twin = [s_of.get(b, -1) if b else -1 for b in token_bytes(t_tok)]
    t_bytes = token_bytes(t_tok)
    vals = []
    for b, sid in enumerate(batch["sample_id"].tolist()):
        pos_t, pos_s = part.index_of([sid])[0], al.index_of([sid])[0]
        n_t, n_s = int(part.lengths([pos_t])[0]), int(al.lengths([pos_s])[0])
        r = rows[sid]
        if loss == "prefix_kl":  # every student position: the teacher token it is reading (or just read)
            t_b, s_b = _target_bounds(part, al, pos_t, n_t, n_s)
            w_t = part.windows([pos_t])[0]

            def cands(j, r=r, w_t=w_t):  # row j's kept ids and its actual token (its own log-prob), {id: p}
                out = dict(zip(r["topk_ids"][j].tolist(), np.exp(r["topk_logprobs"][j].astype(np.float64)).tolist()))
                out.setdefault(int(w_t[j + 1]), math.exp(float(r["target_logprob"][j])))
                return out

            def first_token(bv, d):  # the longest student token beginning bv[d:], by brute force
                return max(((len(sb), i) for sb, i in s_of.items() if bv[d:].startswith(sb)), default=(0, -1))[1]

            for js in range(n_s):
                at = [j for j in range(n_t) if t_b[j] < s_b[js] <= t_b[j + 1]]
                jt = at[0] if at else 0 if s_b[js] == t_b[0] else None
                if jt is None:
                    continue
                d, read = s_b[js] - t_b[jt], t_bytes[w_t[jt + 1]] or b""  # bytes read of the token at jt
                buckets, e = {}, 0.0
                for v, pv in cands(jt).items():
                    bv = t_bytes[v] or b""
                    if bv[:d] != read[:d]:
                        continue  # disagrees with what the student has read
                    if len(bv) > d and first_token(bv, d) >= 0:
                        buckets[first_token(bv, d)] = buckets.get(first_token(bv, d), 0.0) + pv
                    elif len(bv) == d and d > 0:
                        e += pv  # ends here: then what the next row expects first
                g = {}
                if jt + 1 < n_t:
                    for v, pv in cands(jt + 1).items():
                        if first_token(t_bytes[v] or b"", 0) >= 0:
                            g[first_token(t_bytes[v], 0)] = g.get(first_token(t_bytes[v], 0), 0.0) + pv
                for s_, pv in g.items():
                    buckets[s_] = buckets.get(s_, 0.0) + e * pv / sum(g.values())
                buckets = {s_: pv for s_, pv in buckets.items() if pv > 0}
                if buckets and (e == 0 or jt + 1 < n_t):  # ending here with no next row: no target
                    norm = sum(buckets.values())
                    vals.append(sum(v / norm * (math.log(v / norm) - logq[b, js, s_]) for s_, v in buckets.items()))
            continue
        ct, cs = _direct_chunks(part, al, pos_t, n_t, n_s)
        for c in sorted(set(ct) - {-1}):
            jt, js = ct.index(c), cs.index(c)  # the positions predicting the chunk's first tokens
            p = np.exp(r["topk_logprobs"][jt].astype(np.float64))
            miss = float(r["missing_mass"][jt])
            q = np.exp(logq[b, js])
            if loss == "alm":
                a = sum(float(r["target_logprob"][j]) for j in range(n_t) if ct[j] == c)
                bb = sum(logq[b, j, y[b, j]] for j in range(n_s) if cs[j] == c)
                vals.append(_f(min(a, -1e-6), min(bb, -1e-6)))
                continue
            ids = r["topk_ids"][jt]
            tw = np.array([twin[i] for i in ids]) if loss == "gold" else np.full(K, -1)
            kl = sum(p[j] * (math.log(p[j]) - math.log(q[tw[j]])) for j in range(K) if tw[j] >= 0)
            p_rest = np.sort(np.where(tw >= 0, 0.0, p))[::-1]
            q_rest = q.copy()
            q_rest[tw[tw >= 0]] = 0.0
            q_top = np.sort(q_rest)[::-1][:K]
            m_s = 1 - q[tw[tw >= 0]].sum() - q_top.sum()
            vals.append(kl + np.abs(p_rest - q_top).sum() + abs(miss - m_s))
    if loss == "prefix_kl":  # nearly every student position has a target
        assert len(batch["xt_first_s"]) < len(vals) <= int(batch["mask"].sum())
    else:
        assert len(vals) == len(batch["xt_first_s"])
    assert float(got["kd_loss"]) == pytest.approx(np.mean(vals), rel=1e-4, abs=1e-6)
    assert float(got["loss"]) == pytest.approx(0.5 * task + 0.5 * np.mean(vals), rel=1e-4)


def test_vocab_maps_of_a_byte_student(env):
    from pipeline.data.alignment import vocab_maps

    part, al = env["parts"]["train"], aligned_windows(env["students"]["bytes"], env["parts"]["train"])
    maps = vocab_maps(part, al)
    pre, heads = maps["prefix"], maps["heads"]
    tb = [b or b"" for b in token_bytes(load_tokenizer(env["dirs"][0]))]  # special tokens stand for no text
    D = max(map(len, tb))
    assert pre.shape == (len(tb), D) and heads.shape == (len(tb), D + 1)
    for v, b in enumerate(tb):
        assert pre[v].tolist() == list(b) + [-1] * (D - len(b))  # byte tokenizer: id == byte
    # heads: equal numbers for equal first-d-byte strings, and only for those
    rng = np.random.default_rng(0)
    for v, u in rng.integers(len(tb), size=(3000, 2)):
        for d in range(D + 1):
            both = d <= len(tb[v]) and d <= len(tb[u])
            assert (heads[v, d] >= 0) == (d <= len(tb[v]))
            assert (both and heads[v, d] == heads[u, d]) == (both and tb[v][:d] == tb[u][:d])


def test_target_logprob_is_the_teachers(env, tmp_path):
    part = env["parts"]["train"]
    uri = tmp_path / "labels"
    label_corpus(env["model"], part, str(uri), k=K, shard_size=6, batch_size=4, teacher=TEACHER, target_logprob=True)
    ds = storage.open_soft_labels(str(uri))
    assert ds.manifest["representation"]["target_logprob"] is True
    assert storage.verify(str(uri)).ok
    for r in ds.iter_sequences(64, shuffle=False):
        for b, sid in enumerate(r["sample_id"].tolist()):
            pos = part.index_of([sid])
            with torch.no_grad():
                z = env["model"](input_ids=part.encode(pos)).logits[0].double()
            want = torch.log_softmax(z, -1).gather(1, part.targets(pos)[0][:, None])[:, 0].numpy()
            np.testing.assert_allclose(r["target_logprob"][b][:L], want, atol=2e-5)


def test_bits_per_byte(env):
    # bytes: one byte per target token (the separator too), so bits/byte = total nats / ln 2 / targets
    al = aligned_windows(env["students"]["bytes"], env["parts"]["test"])
    model = tiny_llama(257, seed=3, max_pos=512)
    p = perplexity(model, al)
    assert p["bytes"] == p["tokens"]
    assert p["bits_per_byte"] == pytest.approx(p["loss"] / math.log(2), rel=1e-9)
    # the teacher's tokens: the bytes of its target tokens, counted independently
    part = env["parts"]["test"]
    p = perplexity(env["model"], part)
    w = part.windows(np.arange(len(part)))
    want = sum(len(b) for i in range(len(part)) for b in _bytes_of(part, w[i, 1:]))
    assert p["bytes"] == want and p["bits_per_byte"] == pytest.approx(p["loss"] * p["tokens"] / math.log(2) / want)


# ---------------------------------------------------------------- refusals


def test_refusals(env, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    part = env["parts"]["train"]
    # a tokenizer without byte fallback: the corpus' non-ASCII characters are named, counted
    vocab = {"[UNK]": 0, "[PAD]": 1}
    for ch in sorted({c for d in env["docs"] for c in d if ord(c) < 128}):
        vocab.setdefault(ch, len(vocab))
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    d = tmp_path / "ascii"
    PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="[UNK]", pad_token="[PAD]", eos_token="[PAD]"
    ).save_pretrained(d)
    bad = TokenCorpus.from_jsonl(env["path"], tokenizer_path=str(d), seq_len=1, cache_dir=env["cache"])
    n = sum(1 for doc in env["docs"] for c in doc if ord(c) >= 128)
    with pytest.raises(ValueError, match=f"cannot represent {n:,} characters") as e:
        aligned_windows(bad, part)
    assert "\n" not in str(e.value)
    # labels without the alignment fields: one line saying how to relabel
    old = tmp_path / "old"
    label_corpus(env["model"], part, str(old), k=K, shard_size=6, batch_size=4, teacher=TEACHER)
    al = aligned_windows(env["students"]["bpe"], part)
    with pytest.raises(ValueError, match="no alignment fields.*relabel with label.target_logprob") as e:
        open_label_stream(str(old), al, batch_size=3)
    assert "\n" not in str(e.value)
    # other text: a changed character is refused by the bytes' fingerprint
    edited = tmp_path / "edited.jsonl"
    edited.write_text(env["path"].read_text().replace("a", "o", 1))
    other = TokenCorpus.from_jsonl(edited, tokenizer_path=env["dirs"][1], seq_len=1, cache_dir=env["cache"])
    with pytest.raises(ValueError, match="is not the teacher's"):
        aligned_windows(other, part)
