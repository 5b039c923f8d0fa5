"""Causal language models behind distillery's model seam, and their yardstick.

    student = build_model({"arch": "llama", "kwargs": {"layers": 2, "hidden": 128}},
                          in_shape=(128,), num_classes=49152)      # a CausalLM: ids -> logits
    ppl = perplexity(student, val_corpus, batch_size=16)       # {"loss", "perplexity", "tokens"}
    save_pretrained(student, "runs/lm/students/llama-2x128-topk", tokenizer_dir=teacher_dir)

The student must share the teacher's vocabulary exactly: its logits are compared id by id
with the teacher's stored top-k / sampled ids, so its vocabulary is the teacher's V (the
width of the stored labels, num_classes), never chosen freely. Input and output embeddings are tied by
default (Press & Wolf 2017): with V = 49,152 and hidden 128 the embedding alone is 6.3M
parameters, more than all the layers of a small student.
"""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class CausalLM(nn.Module):
    """A Hugging Face causal LM behind distillery's model seam: token ids (B, L) int64 ->
    next-token logits (B, L, V). Windows hold no padding, so the attention mask is all ones
    (a pad id may equal the document separator inside the text: ids never build it); a
    shorter window's padding sits after its end, where causal attention keeps it out of
    every real position."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits


def as_causal_lm(model: nn.Module) -> CausalLM:
    """`model` behind the seam (a CausalLM is returned as it is)."""
    return model if isinstance(model, CausalLM) else CausalLM(model)


def llama(
    *,
    num_classes: int,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_length: int = 512,
    tie_embeddings: bool = True,
) -> CausalLM:
    """A randomly initialised transformers Llama (arch "llama"): num_classes is the
    teacher's vocabulary V (the width of the stored labels: a student is compared with them
    id by id), max_length its context (the corpus' seq_len, from the data). intermediate
    defaults to 4 * hidden, kv_heads to heads. The caller seeds torch (pipeline.training
    seeds under GLOBAL_RNG_LOCK, so students built in parallel threads are reproducible)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, v in (
        ("num_classes (vocab)", num_classes),
        ("layers", layers),
        ("hidden", hidden),
        ("heads", heads),
        ("max_length", max_length),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"llama: {name} must be a positive integer, got {v!r}")
    kv = kv_heads or heads
    if hidden % heads or heads % kv:
        raise ValueError(f"llama: hidden ({hidden}) must be divisible by heads ({heads}), and heads by kv_heads ({kv})")
    # no pad_token_id: it would become the embedding's padding_idx, a row that never
    # learns; windows hold no padding, and the pad id is often the document separator
    cfg = LlamaConfig(
        vocab_size=num_classes,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=max_length,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=None,
    )
    return CausalLM(LlamaForCausalLM(cfg))


llama.input_kind = "tokens"


@torch.inference_mode()
def perplexity(
    model, corpus, *, batch_size: int = 16, device: str | torch.device = "cpu", max_windows: int | None = None
) -> dict:
    """exp(mean next-token cross-entropy) over every target token of `corpus`' windows
    (the first max_windows of them when given), in fp32: {"loss" (nats/token),
    "perplexity", "tokens"}, and where the tokens stand for bytes of the text "bytes" (of
    the targets) and "bits_per_byte" (the same nats per byte, in bits)."""
    n = len(corpus) if max_windows is None else min(len(corpus), int(max_windows))
    if n == 0:
        raise ValueError(f"perplexity: corpus {corpus.name!r} has no windows")
    dev = torch.device(device)
    lm = as_causal_lm(model)
    was_training = model.training
    model.eval()
    total, count, nbytes = 0.0, 0, 0
    table = bytes_per_token(corpus)  # (V,) or None: bits per byte where the tokens have bytes
    try:
        for a in range(0, n, batch_size):
            b = corpus.lm_batch(np.arange(a, min(a + batch_size, n)))  # (B, Lb)
            if table is not None:
                nbytes += int(table[b["targets"].numpy()][b["mask"].numpy()].sum())
            logits = lm(b["input_ids"].to(dev))  # (B, Lb, V)
            keep = b["mask"].to(dev).reshape(-1)  # real positions
            ce = F.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1])[keep],
                b["targets"].to(dev).reshape(-1)[keep],
                reduction="sum",
            )
            total += float(ce)
            count += int(keep.sum())
    finally:
        model.train(was_training)
    loss = total / count
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}
    if table is not None:  # nats over the targets' bytes, in bits: comparable across tokenizers
        out |= {"bytes": nbytes, "bits_per_byte": total / math.log(2) / max(nbytes, 1)}
    return out


def bytes_per_token(corpus) -> np.ndarray | None:
    """(V,) bytes each token id stands for in the corpus' text (pipeline/data/alignment.py),
    or None where that is undefined (a chat template's markup, a tokenizer whose tokens do
    not keep the text's bytes, a corpus without a tokenizer path)."""
    from pipeline.data.alignment import byte_table

    if not hasattr(corpus, "is_chat"):
        return None
    try:
        return byte_table(corpus)
    except ValueError:
        return None


def save_pretrained(model, out_dir: str, *, tokenizer_dir: str | None = None, extra: dict | None = None) -> str:
    """The causal LM (a CausalLM or the Hugging Face model in it) as a Hugging Face
    directory: save_pretrained (config.json + model.safetensors), the tokenizer files of
    `tokenizer_dir` so `AutoTokenizer.from_pretrained(out_dir)` works (and the config's
    bos/eos ids set from them), and distillery.json with `extra` (how it was trained).
    Written to a temporary directory and renamed: a killed save leaves no half-written model."""
    import json

    model = model.model if isinstance(model, CausalLM) else model
    if tokenizer_dir is not None:
        from pipeline.hf_files import load_tokenizer

        tok = load_tokenizer(tokenizer_dir)
        model.config.bos_token_id, model.config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer_dir is not None:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            src = os.path.join(tokenizer_dir, f)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(tmp, f))
    with open(os.path.join(tmp, "distillery.json"), "w") as f:
        json.dump(extra or {}, f, indent=2, sort_keys=True, default=str)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)
    return out_dir
