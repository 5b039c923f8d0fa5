"""Teacher labelling throughput: samples/s of pipeline.label.label_dataset per device and
precision, side by side in one run (machines are noisy: compare ratios, not seconds).

Rows: CPU fp32; on CUDA also fp32, AMP bf16 and AMP fp16 (pinned host memory and
non-blocking copies are always on for CUDA). Each row labels the same inputs into a fresh
soft-label dataset, so the time includes view generation, the forward pass, the copy back,
scaling, checksumming and the atomic shard commit.

    python benchmarks/label_throughput.py [--samples 20000] [--arch resnet] [--views 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pipeline.data import ArrayDataset  # noqa: E402
from pipeline.label import label_dataset  # noqa: E402
from pipeline.models import build_model, model_stats  # noqa: E402
from pipeline.views import ViewSpec  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=32, help="image side (3 x size x size inputs)")
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--arch", default="resnet")
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    x = rng.random((a.samples, 3, a.size, a.size), dtype=np.float32)
    ds = ArrayDataset(name="synthetic", x=x, y=rng.integers(0, a.classes, a.samples), sample_ids=np.arange(a.samples),
                      num_classes=a.classes)
    torch.manual_seed(0)
    kw = {"width": a.width} if a.arch == "resnet" else {}
    model = build_model({"arch": a.arch, "kwargs": kw}, in_shape=ds.in_shape, num_classes=a.classes)
    stats = model_stats(model, in_shape=ds.in_shape)
    spec = ViewSpec(shift=2, hflip=True, seed=0) if a.views > 1 else None
    configs = [("cpu", None)]
    if torch.cuda.is_available():
        configs += [("cuda", None), ("cuda", "bf16"), ("cuda", "fp16")]
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(f"{a.arch} {stats['params'] / 1e6:.2f}M params, inputs {ds.in_shape}, {a.samples} samples x {a.views} views, "
          f"batch {a.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads")
    root = tempfile.mkdtemp(prefix="distillery-label-bench-")
    results = {}
    for r in range(a.repeats):
        for dev, amp in configs:
            uri = os.path.join(root, f"{dev}-{amp}-{r}")
            t0 = time.perf_counter()
            out = label_dataset(model, ds, uri, temperature=4.0, teacher={"name": a.arch, "fingerprint": "bench"},
                                num_views=a.views, view_spec=spec, shard_size=a.shard_size, batch_size=a.batch_size,
                                device=dev, amp=amp)
            if dev == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            results.setdefault((dev, amp), []).append(a.samples * a.views / dt)
            assert out["manifest"]["status"] == "complete"
    base = statistics.median(results[("cpu", None)])
    print(f"\n{'device':6s} {'precision':9s} {'rows/s':>10s} {'x cpu fp32':>10s}")
    for (dev, amp), v in results.items():
        med = statistics.median(v)
        print(f"{dev:6s} {amp or 'fp32':9s} {med:10,.0f} {med / base:10.2f}")


if __name__ == "__main__":
    main()
