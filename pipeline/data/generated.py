"""The teacher's written answers as a token corpus: what students train on for
sequence-level KD (Kim & Rush 2016), with or without the stored per-token labels.

    corpus = generated_corpus(labels, prompt_corpus)   # labels: a generation dataset (label.generate)
    b = corpus.lm_batch(pos)    # window i: prompt + answer of sample i; mask: the answer's tokens

Sample i of a generation dataset is answer i % N to prompt i // N (labelling/generate.py);
window i here is that prompt (from the chat corpus the answers were written for) followed by
the answer's tokens (the dataset's `token` column) and the separator. The labelled positions
are those whose target is an answer token, so row r of sample i's stored labels lines up with
the r-th labelled position, like the labels of human conversations (pipeline/data/chat.py).
The corpus is a chat TokenCorpus over a small cache written once (key: the answers' tokens,
the prompts and the settings): every loss, perplexity and batch path works unchanged.

Lineage: the prompts' fingerprint and the generation settings are checked against the
dataset's manifest (another corpus, split, template or settings is refused); describe()
records them with the answers' sha256, so labels of another generation run are refused too.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import TYPE_CHECKING

import numpy as np

from pipeline.data.chat import chat_path
from pipeline.data.corpus import CORPUS_VERSION, TokenCorpus, corpus_root, docs_path
from pipeline.paths import save_npy_atomic

if TYPE_CHECKING:
    from storage import SoftLabelDataset


def generated_corpus(labels: SoftLabelDataset | str, prompt_corpus: TokenCorpus, *, cache_dir=None) -> TokenCorpus:
    """Prompt + written answer of every sample of the generation dataset `labels` (module doc)."""
    from pipeline.labelling.generate import GenerationPrompts
    from storage import open_soft_labels

    ds = labels if not isinstance(labels, str) else open_soft_labels(labels)
    m = ds.manifest
    gen = (m.get("data") or {}).get("generation")
    if not gen or not m["representation"].get("tokens"):
        raise ValueError(f"{ds.uri}: not a generation dataset (label.generate): it stores no written tokens")
    prompts = GenerationPrompts(prompt_corpus, gen["answers"], gen["prompts"], gen.get("prompts_at", "first"))
    if prompts.fingerprint() != m["data"]["fingerprint"]:
        raise ValueError(
            f"{ds.uri}: the answers were written for prompts with fingerprint {m['data']['fingerprint'][:16]}, "
            f"corpus {prompt_corpus.name!r} gives {prompts.fingerprint()[:16]} (another corpus, split or template)"
        )
    S = int(m["num_samples"])
    seqs = ds.take_sequences(np.arange(S, dtype=np.int64))  # (S, G) token, length
    answers = [seqs["token"][i, : int(seqs["length"][i])] for i in range(S)]
    sep = int(prompt_corpus.describe()["separator_id"])
    toks, masks, starts, n = [], [], [], 0
    for i, a in enumerate(answers):
        p = prompts.prompt(i)
        starts.append(n)
        toks += [p, a, [sep]]
        masks += [np.zeros(len(p), np.uint8), np.ones(len(a), np.uint8), np.zeros(1, np.uint8)]
        n += len(p) + len(a) + 1
    tokens = np.concatenate(toks).astype(np.int64)
    mask = np.concatenate(masks)
    answers_sha = hashlib.sha256(np.concatenate(answers).astype("<i8").tobytes()).hexdigest()
    src = prompt_corpus.describe()
    header = {
        "version": CORPUS_VERSION,
        "format": "generated",
        "content_sha256": answers_sha,
        "field": None,
        "tokenizer_fingerprint": src["tokenizer"]["fingerprint"],
        "separator_id": sep,
        "chat_template_sha256": src["chat"]["template_sha256"],
        "generated": {
            "answers_sha256": answers_sha,
            "prompts_fingerprint": prompts.fingerprint(),
            "settings": gen,  # the manifest's data.generation, as recorded
        },
    }
    key = hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()[:32]
    root = corpus_root(cache_dir)
    os.makedirs(root, exist_ok=True)
    tokens_path, json_path = os.path.join(root, f"{key}.tokens.npy"), os.path.join(root, f"{key}.json")
    dtype = np.uint16 if int(src["tokenizer"]["vocab_size"]) <= 1 << 16 else np.uint32
    h = hashlib.sha256(tokens.astype("<u4").tobytes())
    h.update(mask.tobytes())
    meta = header | {
        "source": {"path": ds.uri, "prompts": prompt_corpus.name},
        "num_tokens": int(len(tokens)),
        "documents": S,
        "empty_documents": 0,
        "rows_in_source": S,
        "messages": S,
        "assistant_tokens": int(mask.sum()),
        "dtype": np.dtype(dtype).name,
        "fingerprint": h.hexdigest(),
    }
    if not os.path.isfile(json_path):
        first = np.asarray(starts, np.int64)
        for path, a in (
            (docs_path(tokens_path), first),
            (chat_path(tokens_path, "turns"), first),  # one "message" per window: never cut
            (chat_path(tokens_path, "lines"), np.arange(S, dtype=np.int64)),
            (chat_path(tokens_path, "mask"), mask),
            (tokens_path, tokens.astype(dtype)),
        ):
            save_npy_atomic(path, a)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(meta, f, sort_keys=True)
        os.replace(tmp, json_path)  # last: the cache opens only when complete
    L = int(max(len(prompts.prompt(i)) + len(a) for i, a in enumerate(answers)))
    return TokenCorpus(
        name=f"{prompt_corpus.name}-answers",
        tokens_path=tokens_path,
        meta=meta,
        seq_len=L,
        tokenizer_info=src["tokenizer"],
        too_long=prompt_corpus.too_long,  # the prompts' lineage, as the labels record it
    )
