"""pipeline/training/lm_loop.py and pipeline/models/causal_lm.py on a tiny corpus and a tiny random Llama
teacher: perplexity against hand-computed cross-entropy, the schedule, equal steps for every
loss, determinism, a student that learns, and refusals."""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _tiny_hf import WORDS, tiny_tokenizer
from pipeline.data.corpus import TokenCorpus
from pipeline.labelling.tokens import label_corpus_many, output_spec
from pipeline.models.causal_lm import llama_student, param_count, perplexity
from pipeline.training.lm_loop import LMTrainConfig, lr_at, train_lm_student

TEACHER = {"name": "tiny-llama", "fingerprint": "sha256:tiny"}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from test_lm_label import tiny_llama
    from pipeline.hf_files import load_tokenizer
    root = tmp_path_factory.mktemp("lmtrain")
    tok_dir = str(tiny_tokenizer(root / "tok"))
    tok = load_tokenizer(tok_dir)
    rng = np.random.default_rng(1)
    (root / "docs").mkdir()
    for d in range(2):
        # a learnable text: word i is mostly followed by word i + 1
        idx = np.cumsum(rng.choice([1, 1, 1, 2], 300)) % len(WORDS)
        (root / "docs" / f"{d}.txt").write_text(" ".join(WORDS[i] for i in idx))
    corpus = TokenCorpus.from_text_files(root / "docs", tokenizer=tok, tokenizer_path=tok_dir, seq_len=16,
                                         cache_dir=str(root / "cache"))
    parts = corpus.split(seed=0, sizes={"train": 24, "val": 8})
    teacher = tiny_llama(len(tok))
    label_corpus_many(teacher, parts["train"], [output_spec(uri=str(root / "topk"), k=8),
                                                output_spec(uri=str(root / "sampled"),
                                                            representation="token_sampled", draws=16)],
                      shard_size=8, batch_size=4, teacher=TEACHER)
    return {"root": root, "V": len(tok), "train": parts["train"], "val": parts["val"], "teacher": teacher}


def _student(env, seed=0):
    return llama_student(vocab_size=env["V"], layers=1, hidden=16, heads=2, max_positions=16, seed=seed)


def test_perplexity_is_exp_of_the_hand_computed_cross_entropy(env):
    m, val = _student(env), env["val"]
    got = perplexity(m, val, batch_size=3)
    w = torch.from_numpy(val.windows(np.arange(len(val))))
    with torch.no_grad():
        logits = m(input_ids=w[:, :-1]).logits
    ce = F.cross_entropy(logits.reshape(-1, env["V"]).double(), w[:, 1:].reshape(-1)).item()
    assert got["tokens"] == len(val) * 16
    assert math.isclose(got["loss"], ce, rel_tol=1e-5) and math.isclose(got["perplexity"], math.exp(ce), rel_tol=1e-5)


def test_student_factory_is_seeded_and_ties_embeddings(env):
    a, b, c = _student(env, 0), _student(env, 0), _student(env, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert a.get_input_embeddings().weight is a.get_output_embeddings().weight
    assert param_count(a) == sum(p.numel() for p in a.parameters())     # tied weights counted once
    assert a.model.embed_tokens.padding_idx is None                   # every token row learns (pad = separator)
    with pytest.raises(ValueError, match="divisible"):
        llama_student(vocab_size=10, hidden=10, heads=3)


def test_learning_rate_warms_up_then_decays_to_a_tenth():
    cfg = LMTrainConfig(lr=1.0, warmup_steps=4)
    assert [lr_at(s, 20, cfg) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, 20, cfg) == pytest.approx(1.0) and lr_at(20, 20, cfg) == pytest.approx(0.1)
    assert lr_at(12, 20, cfg) == pytest.approx(0.55)


@pytest.mark.parametrize("loss,labels", [("ce", None), ("topk_kl", "topk"), ("sampled_kl", "sampled"),
                                         ("reverse_kl", "topk"), ("jsd", "topk")])
def test_every_loss_trains_with_equal_steps_and_is_deterministic(env, loss, labels):
    uri = None if labels is None else str(env["root"] / labels)
    cfg = LMTrainConfig(loss=loss, epochs=3, batch_size=4, lr=0.02, warmup_steps=2, seed=5)
    before = perplexity(_student(env), env["val"])["loss"]
    a = train_lm_student(_student(env), env["train"], env["val"], cfg, labels_uri=uri)
    b = train_lm_student(_student(env), env["train"], env["val"], cfg, labels_uri=uri)
    assert a["steps"] == 3 * 24 // 4 and a["tokens"] == 3 * 24 * 16
    assert a["val"]["loss"] == b["val"]["loss"]                       # same seed, same student
    if loss == "ce":
        assert a["val"]["loss"] < before                              # it learned the text
    else:   # the teacher is random, not the text: the student learns the teacher
        trained = _student(env)
        train_lm_student(trained, env["train"], env["val"], cfg, labels_uri=uri)
        assert _kl_to_teacher(env, trained) < 0.9 * _kl_to_teacher(env, _student(env))
    assert [h["step"] for h in a["history"]] == list(range(1, a["steps"] + 1))


def _kl_to_teacher(env, m) -> float:
    """KL(teacher ‖ student) over every position of the validation windows, dense."""
    x = env["val"].encode(np.arange(len(env["val"])))
    with torch.no_grad():
        p = torch.log_softmax(env["teacher"](input_ids=x).logits, -1)
        q = torch.log_softmax(m(input_ids=x).logits, -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def test_refusals(env):
    with pytest.raises(ValueError, match="labels_uri"):
        train_lm_student(_student(env), env["train"], env["val"], LMTrainConfig(loss="topk_kl"))
    with pytest.raises(ValueError, match="needs 'token_topk' labels"):
        train_lm_student(_student(env), env["train"], env["val"], LMTrainConfig(loss="topk_kl"),
                         labels_uri=str(env["root"] / "sampled"))
    with pytest.raises(ValueError, match="loss must be one of"):
        LMTrainConfig(loss="kd")
    with pytest.raises(ValueError, match="temperature"):
        LMTrainConfig(loss="sampled_kl", temperature=2.0)
    with pytest.raises(ValueError, match="fingerprint"):     # labels of other windows (the val split)
        train_lm_student(_student(env), env["val"], env["val"], LMTrainConfig(loss="topk_kl"),
                         labels_uri=str(env["root"] / "topk"))


def test_allocator_tuning_is_on_by_default_and_can_be_turned_off():
    import subprocess
    import sys
    code = "from pipeline.device import keep_large_blocks as k; print(k(), k())"
    env = dict(os.environ, DISTILLERY_MALLOC_TUNING="1")
    on = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    env["DISTILLERY_MALLOC_TUNING"] = "0"
    off = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert on.stdout.split() == ["True", "True"] and off.stdout.split() == ["False", "False"]
