"""The bytes of labelled shards are pinned: the same config and seeds give shard files with
the same sha256 as the code they were pinned on (issue 18: the one-core redesign must not
change what is stored). A tiny classifier run (teacher trained from the config, dense and
top-k labels of 2 views) and a tiny language-model run (a seeded random Llama teacher,
top-k and sampled token labels) go through `distill label` and their shards' sha256 (as
recorded in the manifests, and re-hashed by verify) are compared with the pins.

The pins were computed on commit d1732de (before the redesign) with torch 2.13.0 (CPU),
pyarrow 26.0.1, one torch thread. A change that alters the format or the numbers on
purpose (another torch, a new layout version) updates them and says why in its commit.
"""

import os

import numpy as np
import pytest
import torch
import yaml
from _tiny_hf import WORDS, tiny_tokenizer
from conftest import TINY

import storage

pytestmark = pytest.mark.usefixtures("prefect_harness")

CLASSIFY_PINS = {
    "dense": [
        "e50b7b93ba4a104f39d13c545b6fe0de0f90356fdb5a23c0d3ee58369ed03baa",
        "6ae438e16cbf0a6bbaf17a75dbf222d893009c2a8c69f04e341afbcc38896f42",
        "b25ec35559741d893fdc7c8ff42011ca9cfa95e9a3accd8f8b0b4d1b8b9463ef",
    ],
    "topk": [
        "02b09fd95b6915260d6989c90e97b3ab294a354fb8466a59c1d47bdbb49dddaf",
        "7ec5899c05bd015b274185492094ba0b76af4f044df89518b39710db10aa3927",
        "84f8301b27339a3c55944c7541ee42f5dfb7875f09c2f25fa14171bcfa481f3b",
    ],
}
LM_PINS = {
    "topk": [
        "ea42835586fd9df21f8e62897e0c4a562421733d3eb58ba744bd2b7c089f5c78",
        "0b56eebdf482831b36c1aa9ae38e7ed4ba925b063f1b291cc3bc0ab1e34174bb",
        "6e11a0c9986124db2f028701c3b01fdfc260f5c66dc5ecb19fdfb256490be516",
    ],
    "sampled": [
        "707dffd7571143b891c2589100986d20c7d6daf60d8a4c38997d345b8fd91528",
        "122d603d85b73d0c50069858ddca0e07ad6628135bab067307e7ff49cd0ab046",
        "65b571a13907390ff589379d1a92900209a9cea43b13aad067dd658c9e722ffd",
    ],
}


def _hashes(uri: str) -> list[str]:
    report = storage.verify(uri)
    assert report.ok, report.problems
    return [s["sha256"] for s in storage.open_soft_labels(uri).shards]


def _label(path: str) -> None:
    from flows.cli import main

    assert main(["label", path]) == 0


def test_classifier_shards_keep_their_bytes(tmp_path, one_thread):
    from flows.cli import main

    cfg = yaml.safe_load(open(TINY))
    cfg["runs_dir"] = str(tmp_path / "runs")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["teacher", "train", str(path)]) == 0
    got = {}
    for rep, extra in (
        ("dense", []),
        ("topk", ["label.representation=topk", "label.k=4", "students.losses=[topk_kl]"]),
    ):
        uri = str(tmp_path / f"labels-{rep}")
        assert main(["label", str(path), f"label.uri={uri}", *extra]) == 0
        got[rep] = _hashes(uri)
    assert got == CLASSIFY_PINS


def _tiny_lm(tmp_path) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.hf_files import load_tokenizer

    docs = tmp_path / "docs"
    docs.mkdir()
    rng = np.random.default_rng(0)
    for d in range(3):
        (docs / f"{d}.txt").write_text(" ".join(rng.choice(WORDS, 200)))
    teacher = tmp_path / "teacher"
    vocab = len(load_tokenizer(str(tiny_tokenizer(tmp_path / "tok"))))
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
        initializer_range=0.3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(os.fspath(teacher))
    tiny_tokenizer(teacher)
    raw = {
        "task": "lm",
        "name": "pinlm",
        "runs_dir": str(tmp_path / "runs"),
        "corpus": {"kind": "text_files", "path": str(docs), "seq_len": 16, "sizes": {"train": 20, "val": 4}},
        "teacher": {"name": "tiny-llama", "path": str(teacher)},
        "label": {
            "uri": str(tmp_path / "labels"),
            "topk": {"k": 8, "dtype": "uint8"},
            "sampled": {"draws": 16},
            "shard_size": 8,
            "batch_size": 3,
            "device": "cpu",
        },
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_language_model_shards_keep_their_bytes(tmp_path, one_thread):
    path = _tiny_lm(tmp_path)
    _label(path)
    got = {layout: _hashes(str(tmp_path / "labels" / layout)) for layout in ("topk", "sampled")}
    assert got == LM_PINS
