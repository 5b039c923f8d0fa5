"""Language-model label streaming vs student training, side by side in one run.

The teacher (SmolLM2-135M, pipeline/models/gguf.py) labels --windows KJV windows once into
a top-k (uint8) and a sampled dataset (one forward for both). Then, for each layout:
  stream: the label stream (open_label_stream: a SequenceStream) over every stored
          sequence, shuffled, joined with the corpus windows (what the training loop
          consumes): tokens per second delivered, through
          a DataLoader with --workers workers, and in-process (0 workers);
  train:  the configs/lm.yaml student (2-layer Llama, hidden 128) training on the same
          stream: tokens per second of optimizer steps (forward, fused KD loss, backward,
          AdamW).
Target (issue 11): the stream delivers >= 10x the tokens per second the student trains at.

    python benchmarks/lm_stream_throughput.py [--windows 64] [--steps 12] [--workers 2]
                                              [--corpus-windows documents]

Tokens are real positions (the batch mask), so --corpus-windows documents (variable-length
sequences: each batch cut to its longest verse) is measured on the same footing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flows.assets import fetch_kjv  # noqa: E402
from pipeline.data.corpus import TokenCorpus  # noqa: E402
from pipeline.labelling.tokens import label_corpus_many, output_spec  # noqa: E402
from pipeline.models.gguf import gguf_teacher_dir, load_causal_lm  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from pipeline.objectives.objective import Objective  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.stream import open_label_stream  # noqa: E402


def stream_tokens_per_s(uri, corpus, batch_size, workers, epochs=3) -> float:
    from torch.utils.data import DataLoader

    stream = open_label_stream(uri, corpus, batch_size=batch_size, seed=0)
    loader = (
        stream
        if workers == 0
        else DataLoader(
            stream, batch_size=None, num_workers=workers, persistent_workers=True, multiprocessing_context="forkserver"
        )
    )
    n = 0
    it = iter(loader)  # start the workers outside the timed part
    first = next(it)
    n -= int(first["mask"].sum())
    t0 = time.perf_counter()
    n += int(first["mask"].sum())
    for b in it:
        n += int(b["mask"].sum())
    for e in range(1, epochs):
        stream.set_epoch(e)
        for b in loader:
            n += int(b["mask"].sum())
    return n / (time.perf_counter() - t0)


def train_tokens_per_s(uri, corpus, loss, steps, batch_size) -> float:
    stream = open_label_stream(uri, corpus, batch_size=batch_size, seed=0)
    torch.manual_seed(0)
    student = build_model(
        {"arch": "llama", "kwargs": {"layers": 2, "hidden": 128, "heads": 4, "max_length": corpus.seq_len}},
        in_shape=(corpus.seq_len,),
        num_classes=stream.vocab_size,
    ).train()
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)
    # the loss train() builds for this config: KD alone (alpha 0) at the stored T = 1
    objective = Objective.from_config(TrainConfig(loss=loss, batch_size=batch_size), stream=stream)
    batches, e = [], 0
    while len(batches) < steps + 2:
        stream.set_epoch(e)
        batches += list(stream)
        e += 1
    for b in batches[:2]:  # warm-up steps
        opt.zero_grad()
        objective(student, b)["loss"].backward()
        opt.step()
    t0 = time.perf_counter()
    n = 0
    for b in batches[2 : steps + 2]:
        opt.zero_grad()
        objective(student, b)["loss"].backward()
        opt.step()
        n += int(b["mask"].sum())
    return n / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument(
        "--corpus-windows",
        choices=["packed", "documents"],
        default="packed",
        help="documents: one KJV verse per window (variable-length sequences)",
    )
    a = ap.parse_args()
    path = gguf_teacher_dir()
    corpus = TokenCorpus.from_jsonl(
        str(fetch_kjv(quiet=True)), tokenizer_path=path, seq_len=a.seq_len, windows=a.corpus_windows
    )
    corpus = corpus.subset(list(range(a.windows)))
    ntok = corpus.num_positions
    root = tempfile.mkdtemp(prefix="distillery-lm-stream-bench-")
    t0 = time.perf_counter()
    label_corpus_many(
        load_causal_lm(path),
        corpus,
        [
            output_spec(uri=f"{root}/topk", k=32, value_dtype="uint8"),
            output_spec(uri=f"{root}/sampled", representation="token_sampled", draws=64),
        ],
        shard_size=16,
        batch_size=8,
        teacher={"name": "smollm2-135m", "fingerprint": "bench"},
    )
    shape = f"{a.windows} x {a.seq_len}" if a.corpus_windows == "packed" else f"{a.windows} verses (<= {a.seq_len})"
    print(
        f"SmolLM2-135M labelled {shape} = {ntok:,} tokens (top-32 uint8 + "
        f"64 draws) in {time.perf_counter() - t0:.1f}s; {torch.get_num_threads()} CPU threads"
    )
    print(f"{'layout':<8} {'stream tok/s':>13} {'(0 workers)':>12} {'train tok/s':>12} {'ratio':>7}")
    ok = True
    for layout, loss in (("topk", "topk_kl"), ("sampled", "sampled_kl")):
        uri = f"{root}/{layout}"
        s_w = stream_tokens_per_s(uri, corpus, a.batch_size, a.workers)
        s_0 = stream_tokens_per_s(uri, corpus, a.batch_size, 0)
        tr = train_tokens_per_s(uri, corpus, loss, a.steps, a.batch_size)
        ratio = s_w / tr
        ok &= ratio >= 10
        print(f"{layout:<8} {s_w:>13,.0f} {s_0:>12,.0f} {tr:>12,.0f} {ratio:>6.1f}x")
    print(f"target: stream >= 10x the student's training tokens/s: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
