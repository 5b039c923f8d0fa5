"""Variable-length sequences end to end (issue 11): a corpus of documents of mixed lengths
cut with windows="documents" (no window crosses a document, the last window of each is
shorter), labelled by a tiny random Llama into variable-length token datasets (top-k and
sampled, Parquet and Zarr), streamed back with masks, and trained on with masked losses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _tiny_hf import WORDS, tiny_tokenizer

import pipeline.hf_files  # noqa: F401  (offline mode before transformers)
import storage
from pipeline.data.corpus import TokenCorpus
from pipeline.labelling.token_summaries import topk_token_labels
from pipeline.labelling.tokens import label_corpus, label_corpus_many, output_spec
from pipeline.models.causal_lm import perplexity
from pipeline.models.registry import build_model
from pipeline.objectives.objective import Objective
from pipeline.training.config import TrainConfig
from pipeline.training.loop import train
from pipeline.training.stream import open_label_stream

L, K, DRAWS = 16, 8, 16
TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny-llama-0"}
DOC_WORDS = [3, 40, 17, 1, 16, 29, 8, 55, 12, 2]  # words per document: windows of 1..16 positions


def _student(env, seed=0):
    torch.manual_seed(seed)
    return build_model(
        {"arch": "llama", "kwargs": {"layers": 1, "hidden": 16, "heads": 2, "max_length": L}},
        in_shape=(L,),
        num_classes=len(env["tok"]),
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_lm_label import tiny_llama

    from pipeline.hf_files import load_tokenizer

    root = tmp_path_factory.mktemp("varlen")
    tok_dir = str(tiny_tokenizer(root / "tok"))
    tok = load_tokenizer(tok_dir)
    rng = np.random.default_rng(0)
    (root / "docs").mkdir()
    for d, n in enumerate(DOC_WORDS):
        (root / "docs" / f"{d:02d}.txt").write_text(" ".join(rng.choice(WORDS, n)))
    corpus = TokenCorpus.from_text_files(
        root / "docs",
        tokenizer=tok,
        tokenizer_path=tok_dir,
        seq_len=L,
        cache_dir=str(root / "cache"),
        windows="documents",
    )
    return {"root": root, "tok": tok, "tok_dir": tok_dir, "corpus": corpus, "model": tiny_llama(len(tok))}


def _label(env, uri, **kw):
    args = dict(representation="token_topk", k=K, shard_size=4, batch_size=3, teacher=TEACHER)
    return label_corpus(env["model"], env["corpus"], str(uri), **(args | kw))


def test_the_corpus_has_windows_of_many_lengths(env):
    n = env["corpus"].lengths(np.arange(len(env["corpus"])))
    assert n.min() == 1 and n.max() == L and len(set(n.tolist())) >= 5


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_topk_labels_of_each_window_are_its_own_forward(env, tmp_path, backend):
    c = env["corpus"]
    m = _label(env, tmp_path / "ds", backend=backend)["manifest"]
    n = c.lengths(np.arange(len(c)))
    assert m["num_tokens"] == m["num_rows"] == int(n.sum()) == c.num_positions and m["num_samples"] == len(c)
    assert storage.verify(str(tmp_path / "ds")).ok
    ds = storage.open_soft_labels(str(tmp_path / "ds"))
    got = ds.take_sequences(c.sample_ids)
    assert got["length"].tolist() == n.tolist()
    for i in range(len(c)):
        # the window alone, unpadded: padding after a window never changes its labels
        x = c.encode([i])[:, : n[i]]
        with torch.no_grad():
            ref = topk_token_labels(env["model"](input_ids=x, attention_mask=torch.ones_like(x)).logits, k=K)
        lp = got["topk_logprobs"][i, : n[i]]
        np.testing.assert_allclose(lp, ref["logprobs"].numpy().astype(np.float16), atol=2e-3)
        np.testing.assert_allclose(got["missing_mass"][i, : n[i]], ref["missing_mass"].numpy(), atol=1e-5)
        clear = np.diff(ref["logprobs"].numpy(), axis=1).min(1) < -1e-3  # rows without near-ties
        assert np.array_equal(got["topk_ids"][i, : n[i]][clear], ref["ids"].numpy()[clear])
        assert not got["topk_ids"][i, n[i] :].any() and not got["missing_mass"][i, n[i] :].any()  # padding


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_sampled_draws_do_not_depend_on_the_batch_a_window_came_in(env, tmp_path, backend):
    kw = dict(representation="token_sampled", k=None, draws=DRAWS, backend=backend, seed=5)
    _label(env, tmp_path / "a", **kw)
    _label(env, tmp_path / "b", batch_size=1, shard_size=3, **kw)  # every window alone
    a = storage.open_soft_labels(str(tmp_path / "a")).take_sequences(env["corpus"].sample_ids)
    b = storage.open_soft_labels(str(tmp_path / "b")).take_sequences(env["corpus"].sample_ids)
    for i, n in enumerate(a["length"]):
        assert (a["sample_counts"][i, :n].sum(1) == DRAWS).all() and not a["sample_counts"][i, n:].any()
    # same draws wherever the window's probabilities are bit-identical: compare the counts
    # per window; a batch can move a logit by an ulp, so allow a rare differing row
    same = [(a["sample_ids"][i] == b["sample_ids"][i]).all() for i in range(len(a["length"]))]
    assert np.mean(same) >= 0.8


def test_resume_after_interruption_gives_the_same_bytes(env, tmp_path):
    full = _label(env, tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_after_two(stats):
        if stats["shard"] == 1:
            raise Stop

    with pytest.raises(Stop):
        _label(env, tmp_path / "cut", progress=stop_after_two)
    again = _label(env, tmp_path / "cut")
    assert again["skipped"] == [0, 1]
    hashes = [[s["sha256"] for s in storage.open_soft_labels(str(tmp_path / d)).shards] for d in ("full", "cut")]
    assert hashes[0] == hashes[1]
    assert len(hashes[0]) == full["manifest"]["num_shards"] == again["manifest"]["num_shards"]


def test_stream_batches_are_cut_to_the_longest_sequence_with_a_mask(env, tmp_path):
    c = env["corpus"]
    _label(env, tmp_path / "ds")
    stream = open_label_stream(str(tmp_path / "ds"), c, batch_size=4, seed=0)
    seen = []
    for b in stream:
        n = c.lengths(c.index_of(b["sample_id"].numpy()))
        Lb = int(n.max())
        assert b["x"].shape == b["y"].shape == b["mask"].shape == (len(n), Lb)
        assert b["topk_ids"].shape == (len(n), Lb, K) and b["missing_mass"].shape == (len(n), Lb)
        assert b["mask"].sum(1).tolist() == n.tolist()
        assert torch.equal(b["x"], c.encode(c.index_of(b["sample_id"].numpy()))[:, :Lb])
        assert not b["topk_logprobs"][~b["mask"]].any()
        seen += b["sample_id"][b["weight"] > 0].tolist()
    assert sorted(seen) == sorted(c.sample_ids.tolist())
    # labels of the packed windows of the same text are other sequences: refused
    packed = TokenCorpus.from_text_files(
        env["root"] / "docs",
        tokenizer=env["tok"],
        tokenizer_path=env["tok_dir"],
        seq_len=L,
        cache_dir=str(env["root"] / "cache"),
    )
    with pytest.raises(ValueError, match="data fingerprint"):
        open_label_stream(str(tmp_path / "ds"), packed, batch_size=4)


def test_padding_never_reaches_a_loss(env, tmp_path):
    """Garbage in every padded position (inputs, targets, labels) leaves each loss unchanged."""
    c = env["corpus"]
    _label(env, tmp_path / "ds")
    batch = next(iter(open_label_stream(str(tmp_path / "ds"), c, batch_size=6, seed=0, shuffle=False)))
    assert not batch["mask"].all()
    pad = ~batch["mask"]
    dirty = dict(batch)
    g = torch.Generator().manual_seed(0)
    for key in ("x", "y", "topk_ids"):
        t = batch[key].clone()
        t[pad] = torch.randint(0, len(env["tok"]), t[pad].shape, generator=g)
        dirty[key] = t
    lp = batch["topk_logprobs"].clone()
    lp[pad] = -0.01
    dirty["topk_logprobs"] = lp
    student = _student(env)
    for loss in ("ce", "topk_kl"):
        obj = Objective(
            loss=loss, alpha=0.5, **({} if loss == "ce" else {"kind": "token_topk", "stored_temperatures": [1.0]})
        )
        clean = obj(student, batch)["loss"]
        assert torch.allclose(clean, obj(student, dirty)["loss"], rtol=1e-5, atol=1e-6)


def test_students_train_on_documents_with_equal_steps(env, tmp_path):
    c = env["corpus"]
    parts = c.split(seed=0, sizes={"train": 13, "val": 4})
    label_corpus_many(
        env["model"],
        parts["train"],
        [
            output_spec(uri=str(tmp_path / "topk"), k=K),
            output_spec(uri=str(tmp_path / "sampled"), representation="token_sampled", draws=DRAWS),
        ],
        shard_size=4,
        batch_size=3,
        teacher=TEACHER,
    )
    steps, tokens = set(), set()
    for loss, uri in (("ce", None), ("topk_kl", "topk"), ("sampled_kl", "sampled")):
        student = _student(env)
        cfg = TrainConfig(
            loss=loss,
            alpha=0.5,
            epochs=3,
            batch_size=4,
            lr=3e-3,
            warmup_steps=2,
            device="cpu",
            log_path=str(tmp_path / f"{loss}.jsonl"),
        )
        out = train(
            student,
            cfg,
            train_data=parts["train"],
            val_data=parts["val"],
            labels=None if uri is None else str(tmp_path / uri),
        )
        steps.add(out["steps"])
        tokens.add(out["units"])
        log = [json.loads(x) for x in open(cfg.log_path)]
        first, last = log[0]["train_loss"], log[-1]["train_loss"]
        assert np.isfinite(last) and last < first, (loss, first, last)
        assert out["best_val"] == pytest.approx(perplexity(student, parts["val"])["perplexity"])
    assert steps == {3 * -(-13 // 4)} and tokens == {3 * parts["train"].num_positions}


def test_perplexity_counts_only_real_positions(env):
    c = env["corpus"]
    student = _student(env)
    got = perplexity(student, c, batch_size=4)
    total = 0.0
    with torch.no_grad():
        for i in range(len(c)):  # one window at a time, unpadded: the hand-computed reference
            n = int(c.lengths([i])[0])
            w = torch.from_numpy(c.windows([i]))[:, : n + 1]
            z = student(w[:, :-1]).float()
            total += float(torch.nn.functional.cross_entropy(z[0], w[0, 1:], reduction="sum"))
    assert got["tokens"] == c.num_positions
    assert got["loss"] == pytest.approx(total / c.num_positions, rel=1e-5)
