"""Token-level LM labelling end to end (issue 11) with a tiny random Llama teacher on a
tiny corpus: label_corpus (top-k, sampled; parquet, zarr) against token_labels computed
directly, resume (simulated and a real SIGKILL), verify, refusals; the sequence stream
coverage over ranks, a student training step through the objective, the tokenizer refusal."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from _tiny_hf import WORDS, tiny_tokenizer

import pipeline.hf_files  # noqa: F401  (offline mode before transformers)
import storage
from pipeline.data.corpus import TokenCorpus
from pipeline.labelling.token_summaries import quantize_labels, sampled_token_labels, topk_token_labels
from pipeline.labelling.tokens import label_corpus, lm_teacher_forward
from pipeline.objectives.objective import Objective
from pipeline.training.stream import SequenceStream, open_label_stream

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny-llama-0"}
L, K, DRAWS, SHARD, BATCH = 16, 8, 16, 8, 3


def tiny_llama(vocab: int, seed: int = 0, max_pos: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
        bos_token_id=2,
        eos_token_id=3,
        pad_token_id=0,
        initializer_range=0.3,
    )  # peaked next-token distributions, not near-uniform
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from pipeline.hf_files import load_tokenizer

    root = tmp_path_factory.mktemp("lm")
    tok_dir = str(tiny_tokenizer(root / "tok"))
    tok = load_tokenizer(tok_dir)
    rng = np.random.default_rng(0)
    (root / "docs").mkdir()
    for d in range(3):  # ~420 tokens in 3 documents
        (root / "docs" / f"{d}.txt").write_text(" ".join(rng.choice(WORDS, 140)))
    corpus = TokenCorpus.from_text_files(
        root / "docs", tokenizer=tok, tokenizer_path=tok_dir, seq_len=L, cache_dir=str(root / "cache")
    )
    model = tiny_llama(len(tok))
    model_dir = str(root / "model")
    model.save_pretrained(model_dir)
    return {"root": root, "tok": tok, "tok_dir": tok_dir, "corpus": corpus, "model": model, "model_dir": model_dir}


def _label(env, uri, **kw):
    args = dict(representation="token_topk", k=K, shard_size=SHARD, batch_size=BATCH, teacher=TEACHER)
    args.update(kw)
    return label_corpus(env["model"], env["corpus"], str(uri), **args)


def _hashes(uri) -> list[str]:
    return [s["sha256"] for s in storage.open_soft_labels(str(uri)).shards]


def _direct_batches(env, shard: int | None = None) -> list[torch.Tensor]:
    """[(B, L, V)] teacher logits of the batches label_corpus runs (batches restart at
    each shard of `shard` windows) or, shard=None, lm_teacher_forward runs."""
    c, out = env["corpus"], []
    n = len(c)
    with torch.no_grad():
        for s in range(0, n, shard or n):
            for a in range(s, min(s + (shard or n), n), BATCH):
                x = c.encode(np.arange(a, min(a + BATCH, s + (shard or n), n)))
                out.append(env["model"](input_ids=x, attention_mask=torch.ones_like(x)).logits)
    return out


def _direct_logits(env) -> torch.Tensor:
    return torch.cat(_direct_batches(env))


def _direct_topk(env, k: int) -> dict:
    """topk_token_labels of the logits of label_corpus's own batches: a window's logits
    can differ in the last bit with the other windows of its forward's batch."""
    parts = [topk_token_labels(z, k=k) for z in _direct_batches(env, SHARD)]
    return {key: torch.cat([p[key] for p in parts]) for key in ("ids", "logprobs", "missing_mass")}


def _all_sequences(uri) -> dict:
    ds = storage.open_soft_labels(str(uri))
    parts = list(ds.iter_sequences(5, shuffle=False))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
@pytest.mark.parametrize("value_dtype", ["float32", "float16"])
def test_topk_labels_equal_direct_computation(env, tmp_path, backend, value_dtype):
    c = env["corpus"]
    out = _label(env, tmp_path / "ds", backend=backend, value_dtype=value_dtype)
    m = out["manifest"]
    n = len(c)
    assert m["status"] == "complete" and m["num_samples"] == n and m["num_tokens"] == n * L
    assert m["vocab_size"] == len(env["tok"]) and m["seq_len"] == L and m["num_shards"] == -(-n // SHARD)
    assert m["data"]["fingerprint"] == c.fingerprint() and m["data"]["transform"] is None
    assert m["data"]["inputs"]["tokenizer"]["fingerprint"] == c.describe()["tokenizer"]["fingerprint"]
    logits = _direct_logits(env)
    ref = quantize_labels(_direct_topk(env, K), value_dtype)
    got = _all_sequences(tmp_path / "ds")
    assert got["sample_id"].tolist() == list(range(n))
    assert np.array_equal(got["topk_ids"].reshape(-1, K), ref["ids"].numpy())
    assert np.array_equal(got["topk_logprobs"].reshape(-1, K), ref["logprobs"].numpy())
    # missing mass: float32 tail, 1 - sum of the kept probabilities (float64 reference)
    p = torch.softmax(logits.double(), -1).reshape(-1, logits.shape[-1])
    kept = p.gather(1, torch.as_tensor(got["topk_ids"].reshape(-1, K))).sum(1)
    np.testing.assert_allclose(got["missing_mass"].reshape(-1), (1 - kept).numpy(), rtol=1e-5, atol=1e-7)
    assert storage.verify(str(tmp_path / "ds")).ok
    # the forward-only path runs the same batches; with labels it returns the same summaries
    fw = lm_teacher_forward(env["model"], c, batch_size=BATCH, representation="token_topk", k=K)
    assert fw["tokens"] == n * L and np.array_equal(fw["labels"]["ids"], ref["ids"].numpy())
    assert lm_teacher_forward(env["model"], c, batch_size=BATCH)["labels"] is None


@pytest.mark.parametrize("backend", ["parquet", "zarr"])
def test_sampled_labels_are_draws_from_the_teacher(env, tmp_path, backend):
    c = env["corpus"]
    out = _label(env, tmp_path / "ds", representation="token_sampled", k=None, draws=DRAWS, backend=backend, seed=3)
    rep = out["manifest"]["representation"]
    assert rep["kind"] == "token_sampled" and rep["draws"] == DRAWS
    got = _all_sequences(tmp_path / "ds")
    ids, counts = got["sample_ids"].reshape(-1, rep["s_max"]), got["sample_counts"].reshape(-1, rep["s_max"])
    assert (counts.sum(1) == DRAWS).all()
    # exactly token_labels' draws on the teacher's logits, one rng block per window
    logits = _direct_logits(env)
    V = logits.shape[-1]
    ref = sampled_token_labels(logits, draws=DRAWS, seed=3, row_offset=0, rng_block=L)
    u = ref["ids"].shape[1]
    assert np.array_equal(ids[:, :u], ref["ids"].numpy()) and np.array_equal(counts[:, :u], ref["counts"].numpy())
    assert not counts[:, u:].any()
    # and they follow the teacher: draws land where it puts mass (far above uniform)
    p = torch.softmax(logits.double(), -1).reshape(-1, V).numpy()
    assert (np.take_along_axis(p, ids, 1) * counts).sum() / counts.sum() > 3.0 / V
    # reproducible, independent of batch_size and shard_size (rng blocks = one window each)
    _label(
        env,
        tmp_path / "again",
        representation="token_sampled",
        k=None,
        draws=DRAWS,
        backend=backend,
        seed=3,
        batch_size=5,
        shard_size=SHARD,
    )
    again = _all_sequences(tmp_path / "again")
    assert np.array_equal(again["sample_counts"], got["sample_counts"])
    assert np.array_equal(again["sample_ids"], got["sample_ids"]) and len(got["sample_id"]) == len(c)


def test_resume_after_interruption_gives_the_same_bytes(env, tmp_path):
    full = _label(env, tmp_path / "full")
    assert not full["skipped"]

    class Stop(Exception):
        pass

    def interrupt(stats):
        raise Stop()

    with pytest.raises(Stop):
        _label(env, tmp_path / "cut", progress=interrupt)  # shard 0 committed, then stopped
    assert storage.read_manifest(storage.Location(str(tmp_path / "cut")))["status"] == "partial"
    again = _label(env, tmp_path / "cut")
    assert again["skipped"] == [0] and [s["shard"] for s in again["shards"]] == list(
        range(1, len(_hashes(tmp_path / "full")))
    )
    assert _hashes(tmp_path / "cut") == _hashes(tmp_path / "full")
    assert _label(env, tmp_path / "cut")["shards"] == []  # complete: no teacher work


CHILD = """
import sys, time
sys.path[:0] = [{root!r}, {tests!r}]
import pipeline.hf_files
from pipeline.data.corpus import TokenCorpus
from pipeline.labelling.tokens import label_corpus
from pipeline.models.gguf import load_causal_lm
from pipeline.hf_files import load_tokenizer
tok = load_tokenizer({tok_dir!r})
c = TokenCorpus.from_text_files({docs!r}, tokenizer=tok, tokenizer_path={tok_dir!r}, seq_len={L}, cache_dir={cache!r})
m = load_causal_lm({model_dir!r})
label_corpus(m, c, {uri!r}, representation="token_topk", k={K}, shard_size={shard}, batch_size={batch},
             teacher={teacher!r}, progress=lambda s: time.sleep(0.5))
"""


def test_sigkill_mid_run_then_resume(env, tmp_path):
    full = tmp_path / "full"
    _label(env, full, shard_size=4)
    uri = tmp_path / "killed"
    code = CHILD.format(
        root=ROOT,
        tests=os.path.join(ROOT, "tests"),
        tok_dir=env["tok_dir"],
        docs=str(env["root"] / "docs"),
        L=L,
        cache=str(env["root"] / "cache"),
        model_dir=env["model_dir"],
        uri=str(uri),
        K=K,
        shard=4,
        batch=BATCH,
        teacher=TEACHER,
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    deadline = time.time() + 240
    try:
        while not (uri / "_commits").is_dir() or not any(n.endswith(".json") for n in os.listdir(uri / "_commits")):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the child committed no shard in time"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    committed = [n for n in os.listdir(uri / "_commits") if n.endswith(".json")]
    n_shards = len(_hashes(full))
    assert 1 <= len(committed) < n_shards
    assert storage.read_manifest(storage.Location(str(uri)))["status"] == "partial"
    again = _label(env, uri, shard_size=4)
    assert len(again["skipped"]) == len(committed)
    assert _hashes(uri) == _hashes(full)
    assert storage.verify(str(uri)).ok


def test_verify_catches_a_flipped_byte(env, tmp_path):
    uri = tmp_path / "ds"
    _label(env, uri)
    shard = uri / storage.open_soft_labels(str(uri)).shards[1]["path"]
    b = bytearray(shard.read_bytes())
    b[len(b) // 2] ^= 0x01
    shard.write_bytes(bytes(b))
    rep = storage.verify(str(uri))
    assert not rep.ok and any("shard" in p for p in rep.problems)


def test_refusals(env, tmp_path):
    c, V = env["corpus"], len(env["tok"])
    with pytest.raises(ValueError, match=rf"{V} ids.*vocabulary of {V - 5}"):
        label_corpus(tiny_llama(V - 5), c, str(tmp_path / "a"), k=K, teacher=TEACHER)
    with pytest.raises(ValueError, match="max_position_embeddings 8"):
        label_corpus(tiny_llama(V, max_pos=8), c, str(tmp_path / "b"), k=K, teacher=TEACHER)
    with pytest.raises(ValueError, match=rf"k must be in \[1, V={V}\]"):
        label_corpus(env["model"], c, str(tmp_path / "c"), k=V + 1, teacher=TEACHER)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def stored(env, tmp_path_factory):
    uri = tmp_path_factory.mktemp("stored") / "ds"
    _label(env, uri, value_dtype="float32")
    return str(uri)


def test_stream_epoch_covers_every_sequence_once_over_two_ranks(env, stored):
    c = env["corpus"]
    seen = []
    for rank in range(2):
        s = open_label_stream(stored, c, batch_size=4, seed=1, shuffle=True, rank=rank, world_size=2)
        assert isinstance(s, SequenceStream)
        s.set_epoch(2)
        batches = list(s)
        assert len(batches) == s.num_batches()
        for b in batches:
            assert b["x"].shape == b["y"].shape == b["mask"].shape == (len(b["weight"]), L)
            assert b["topk_ids"].shape == b["topk_logprobs"].shape == (len(b["weight"]), L, K)
            assert b["missing_mass"].shape == (len(b["weight"]), L)
            assert torch.equal(b["x"], c.encode(b["sample_id"].numpy()))
            assert torch.equal(b["y"], c.targets(b["sample_id"].numpy()))
            seen += b["sample_id"][b["weight"] > 0].tolist()
    assert sorted(seen) == list(range(len(c)))


def test_student_step_lowers_the_kd_loss(env, stored):
    from pipeline.models.causal_lm import CausalLM

    student = CausalLM(tiny_llama(len(env["tok"]), seed=7)).train()
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    stream = open_label_stream(stored, env["corpus"], batch_size=8, seed=0)
    objective = Objective(loss="topk_kl", alpha=0.1, kind="token_topk", stored_temperatures=[1.0])
    losses = []
    for step in range(20):
        stream.set_epoch(step)
        b = next(iter(stream))
        out = objective(student, b)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["kd_loss"].item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_stream_refuses_another_tokenizer(env, stored, tmp_path):
    from pipeline.hf_files import load_tokenizer

    other_dir = str(tiny_tokenizer(tmp_path / "tok2", words=list(reversed(WORDS))))
    other = TokenCorpus.from_text_files(
        env["root"] / "docs",
        tokenizer=load_tokenizer(other_dir),
        tokenizer_path=other_dir,
        seq_len=L,
        cache_dir=str(tmp_path / "cache"),
    )
    fp_old = env["corpus"].describe()["tokenizer"]["fingerprint"]
    fp_new = other.describe()["tokenizer"]["fingerprint"]
    assert fp_old != fp_new
    with pytest.raises(ValueError, match="a student with another tokenizer is refused") as e:
        open_label_stream(stored, other, batch_size=4)
    assert fp_old in str(e.value) and fp_new in str(e.value)
    # same tokenizer, other windows (another seq_len): refused too
    short = TokenCorpus.from_text_files(
        env["root"] / "docs",
        tokenizer=env["tok"],
        tokenizer_path=env["tok_dir"],
        seq_len=L // 2,
        cache_dir=str(env["root"] / "cache"),
    )
    with pytest.raises(ValueError, match="seq_len"):
        open_label_stream(stored, short, batch_size=4)
