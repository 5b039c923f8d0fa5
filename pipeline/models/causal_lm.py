"""Language-model students and their yardstick: a small Llama that shares the teacher's
vocabulary, and validation perplexity on held-out corpus windows.

    student = llama_student(vocab_size=49152, layers=2, hidden=128, heads=4, max_positions=128)
    ppl = perplexity(student, val_corpus, batch_size=16)       # {"loss", "perplexity", "tokens"}
    save_student(student, "runs/lm/students/llama-2x128-topk", tokenizer_dir=teacher_dir)

The student must share the teacher's vocabulary exactly: its logits are compared id by id
with the teacher's stored top-k / sampled ids, so vocab_size is the teacher's V (the
width of its logits), never chosen freely. Input and output embeddings are tied by
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


def llama_student(*, vocab_size: int, layers: int = 2, hidden: int = 128, heads: int = 4, kv_heads: int | None = None,
                  intermediate: int | None = None, max_positions: int = 512, tie_embeddings: bool = True,
                  seed: int = 0, special_ids: dict | None = None):
    """A randomly initialised transformers LlamaForCausalLM (seeded: the same arguments give
    the same weights). intermediate defaults to 4 * hidden, kv_heads to heads."""
    from transformers import LlamaConfig, LlamaForCausalLM
    for name, v in (("vocab_size", vocab_size), ("layers", layers), ("hidden", hidden), ("heads", heads),
                    ("max_positions", max_positions)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"llama_student: {name} must be a positive integer, got {v!r}")
    kv = kv_heads or heads
    if hidden % heads or heads % kv:
        raise ValueError(f"llama_student: hidden ({hidden}) must be divisible by heads ({heads}), and heads by "
                         f"kv_heads ({kv})")
    ids = special_ids or {}
    # no pad_token_id: it would become the embedding's padding_idx, a row that never
    # learns; windows hold no padding, and the pad id is often the document separator
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate or 4 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                      max_position_embeddings=max_positions, tie_word_embeddings=tie_embeddings,
                      bos_token_id=ids.get("bos"), eos_token_id=ids.get("eos"), pad_token_id=None)
    g = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(g)
    return model


def param_count(model) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def causal_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) int64 -> (B, L, V) logits. Windows hold no padding: the mask is all ones
    (a pad id may equal the document separator inside the text, so ids never build it)."""
    return model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits


@torch.inference_mode()
def perplexity(model, corpus, *, batch_size: int = 16, device: str | torch.device = "cpu",
               max_windows: int | None = None) -> dict:
    """exp(mean next-token cross-entropy) over every target token of `corpus`' windows
    (the first max_windows of them when given), in fp32: {"loss" (nats/token),
    "perplexity", "tokens"}."""
    n = len(corpus) if max_windows is None else min(len(corpus), int(max_windows))
    if n == 0:
        raise ValueError(f"perplexity: corpus {corpus.name!r} has no windows")
    dev = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for a in range(0, n, batch_size):
            b = corpus.lm_batch(np.arange(a, min(a + batch_size, n)))                          # (B, Lb)
            logits = causal_logits(model, b["input_ids"].to(dev))                                # (B, Lb, V)
            keep = b["mask"].to(dev).reshape(-1)                                                 # real positions
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1])[keep],
                                 b["targets"].to(dev).reshape(-1)[keep], reduction="sum")
            total += float(ce)
            count += int(keep.sum())
    finally:
        model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": count}


def save_student(model, out_dir: str, *, tokenizer_dir: str | None = None, extra: dict | None = None) -> str:
    """model.save_pretrained(out_dir) (config.json + model.safetensors), plus the tokenizer
    files of `tokenizer_dir` so `AutoTokenizer.from_pretrained(out_dir)` works, plus
    distillery.json with `extra` (how it was trained). Written to a temporary directory
    and renamed, so a killed save leaves no half-written student."""
    import json
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
