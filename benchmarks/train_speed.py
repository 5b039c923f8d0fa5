"""Student training speed by label source: stored soft labels vs online KD vs hard labels.

One student (MLP width 32, depth 1 by default), one batch size, the same rows per epoch
(the MNIST-5k train split, 3,500 samples; the stored dataset has num_views=1, so rows =
samples, and no mode uses augmentation), trained with pipeline.training.loop.train():

    hard     loss "ce":       HardLabelBatches over the in-memory ArrayDataset, cross-entropy
    stored   labels=URI:      the label stream (open_label_stream: Parquet, dense float16),
                              num_workers=0 (same process as hard), KD loss
    online   teacher=model:   hard-label batches + a teacher forward on every batch, KD loss

Modes are measured interleaved (round r runs every mode once, the order rotated per
round) so load from other processes hits them alike. Each run trains --epochs epochs; the
first epoch of every run is warm-up and dropped (lazy opens, allocator, first-touch page
faults); the epoch time is the training-loop time of pipeline.training.loop (rows / throughput
from its per-epoch log record, so evaluation and logging are excluded). Reported: median
epoch time per mode and its ratio to hard. Target: stored <= 1.05 x hard.

If the target is missed (or with --profile) the script profiles one stored and one hard
run with cProfile and prints where the extra time per epoch goes.

    python benchmarks/train_speed.py [--quick] [--rounds 10] [--epochs 11] [--threads 1]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from torch.utils.data import DataLoader  # noqa: E402

from pipeline.data.datasets import load_mnist5k, split_dataset  # noqa: E402
from pipeline.labelling.classify import label_dataset  # noqa: E402
from pipeline.models.checkpoint import fingerprint  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from pipeline.objectives.objective import Objective  # noqa: E402
from pipeline.training.batches import HardLabelBatches  # noqa: E402
from pipeline.training.config import TrainConfig  # noqa: E402
from pipeline.training.loop import make_optimizer, make_schedule, train  # noqa: E402
from pipeline.training.stream import open_label_stream  # noqa: E402
from storage import open_soft_labels  # noqa: E402

SPLIT = {"train": 3500, "val": 500, "test": 1000}
TEACHER = {"arch": "cnn", "kwargs": {"channels": [16, 32]}}


def student(args, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(
        {"arch": "mlp", "kwargs": {"width": args.width, "depth": args.depth}}, in_shape=(1, 28, 28), num_classes=10
    )


def run_once(args, mode: str, tr, teacher, uri, log: str, *, num_workers: int = 0) -> dict:
    """One train() call of args.epochs epochs; returns per-epoch loop seconds and wall time."""
    if os.path.exists(log):
        os.remove(log)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=3e-3,
        temperature=4.0,
        alpha=0.0,
        loss="ce" if mode == "hard" else "kd",  # the loss picks the mode: ce = hard labels
        seed=0,
        device="cpu",
        num_workers=num_workers,
        log_path=log,
    )
    m = student(args)
    kw = {"labels": uri} if mode.startswith("stored") else {"teacher": teacher} if mode == "online" else {}
    t0 = time.perf_counter()
    res = train(m, cfg, train_data=tr, **kw)
    wall = time.perf_counter() - t0
    with open(log) as f:
        recs = [json.loads(line) for line in f]
    rows = len(tr)
    epoch_s = [rows / r["throughput"] for r in recs]  # = pipeline.training.loop's train_seconds
    assert res["steps"] == args.epochs * -(-rows // args.batch_size), res["steps"]
    return {"epochs": epoch_s[1:], "wall": wall}


def replica_epochs(args, kind: str, tr, uri, z_mem) -> list[float]:
    """pipeline.training.loop's inner loop, replicated so one thing changes at a time:
      hard    HardLabelBatches, cross-entropy                      (= train, loss "ce")
      memkd   HardLabelBatches + the SAME stored teacher logits (z/T, as stored) held in a
              numpy array, looked up by position, KD loss          (soft labels in memory)
      stored  the label stream iterated directly (as train() does with num_workers=0),
              KD loss                                              (= train, labels=URI)
    memkd - hard = the KD loss; stored - memkd = streaming the labels. Seconds per epoch,
    args.epochs epochs, the first dropped."""
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=3e-3,
        temperature=4.0,
        alpha=0.0,
        loss="ce" if kind == "hard" else "kd",
        seed=0,
        device="cpu",
    )
    m = student(args)
    opt = make_optimizer(m.parameters(), cfg)
    sched = make_schedule(opt, cfg, cfg.epochs * -(-len(tr) // args.batch_size))
    if kind == "stored":
        sampler = batches = open_label_stream(uri, tr, None, batch_size=args.batch_size, seed=0)
    else:
        sampler = batches = HardLabelBatches(tr, batch_size=args.batch_size, seed=0)
    hard = kind == "hard"
    objective = Objective(
        loss=cfg.loss,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        kind=None if hard else "dense",
        stored_temperatures=[] if hard else [z_mem[1]],
    )
    dev, out = torch.device("cpu"), []
    for epoch in range(args.epochs):
        t0 = time.perf_counter()
        sampler.set_epoch(epoch)
        m.train()
        loss_sum = torch.zeros((), dtype=torch.float64)
        w_sum = torch.zeros((), dtype=torch.float64)
        for batch in batches:
            batch = {k: v.to(dev, non_blocking=True) for k, v in batch.items()}
            if kind == "memkd":  # tr.sample_ids are sorted: searchsorted = position
                pos = np.searchsorted(tr.sample_ids, batch["sample_id"])
                batch["stored_logits"] = torch.from_numpy(z_mem[0][pos])
            loss = objective(m, batch)["loss"]  # forward + loss, as train() does
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bw = batch["weight"].sum()
            loss_sum += loss.detach().double() * bw
            w_sum += bw.double()
        out.append(time.perf_counter() - t0)
    return out[1:]


def stream_pieces(args, tr, uri) -> None:
    """The batch sources alone, no model, no profiler: each layer of the stored path added
    in turn, so the differences are the cost of each layer (median ms per epoch)."""
    from storage.shards import open_shard

    bs, E = args.batch_size, 30
    ds = open_soft_labels(uri)
    stream = open_label_stream(uri, tr, None, batch_size=bs, seed=0)
    loader = DataLoader(stream, batch_size=None, num_workers=0, generator=torch.Generator().manual_seed(0))
    hard = HardLabelBatches(tr, batch_size=bs, seed=0)

    def reader(e):
        for _ in ds.iter_batches(bs, shuffle=True, seed=0, epoch=e):
            pass

    def direct(e):  # the label stream's __iter__ = reader + join: what train() iterates
        stream.set_epoch(e)
        for _ in stream:
            pass

    def via_loader(e):  # what train() iterates with DataLoader workers, here in-process
        stream.set_epoch(e)
        for _ in loader:
            pass

    def in_memory(e):
        hard.set_epoch(e)
        for _ in hard:
            pass

    fns = {
        "storage reader (iter_batches)": reader,
        "+ join (label stream)": direct,
        "+ DataLoader(num_workers=0)": via_loader,
        "HardLabelBatches (reference)": in_memory,
    }
    # the stream reads and joins stream.join_batches() batches at a time, then cuts them
    t = {k: [] for k in fns}
    for e in range(E):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn(e)
            t[k].append(time.perf_counter() - t0)
    med = {k: 1e3 * statistics.median(v[1:]) for k, v in t.items()}
    steps = -(-len(tr) // bs)
    sid = tr.sample_ids[np.random.default_rng(0).permutation(len(tr))[:bs]]
    t0 = time.perf_counter()
    for _ in range(200):
        tr.index_of(sid)
    idx_ms = (time.perf_counter() - t0) / 200 * 1e3
    m = ds.manifest
    t0 = time.perf_counter()
    for _ in range(50):
        open_shard(ds.loc, ds.index.entry(0), m["backend"], ds.columns)
    open_ms = (time.perf_counter() - t0) / 50 * 1e3
    print(f"\n== batch sources alone, no model, no profiler (median ms/epoch over {E - 1} epochs, {steps} batches):")
    prev = None
    for k, v in med.items():
        extra = f"  ({v - prev:+.2f} ms for this layer)" if prev is not None and k.startswith("+") else ""
        print(f"  {k:32s} {v:7.2f} ms{extra}")
        prev = v
    print(
        f"  the join runs once per {stream.join_batches()} batches; ArrayDataset.index_of (cached sort) "
        f"{idx_ms:.3f} ms per {bs} ids; open_shard {open_ms:.2f} ms x {m['num_shards']} shards, once per "
        f"process (shards stay open across epochs)"
    )


def profile_modes(args, tr, teacher, uri, root) -> None:
    """cProfile one hard and one stored run; print per-epoch seconds of the functions that
    differ, and the top functions of the stored run by own time."""
    stats = {}
    for mode in ("hard", "stored"):
        prof = cProfile.Profile()
        prof.enable()
        run_once(args, mode, tr, teacher, uri, os.path.join(root, f"prof-{mode}.jsonl"))
        prof.disable()
        stats[mode] = pstats.Stats(prof)
    E = args.epochs

    def table(st):  # {(file, line, func): (own seconds, cumulative seconds, calls)}
        return {k: (v[2], v[3], v[1]) for k, v in st.stats.items()}

    hard, stored = table(stats["hard"]), table(stats["stored"])

    def name(k):
        f, line, fn = k
        for marker in ("/work/main/", "site-packages/"):
            if marker in f:
                f = f.split(marker, 1)[1]
        return f"{f}:{line}:{fn}"

    print(
        f"\n== profile: cProfile of one {E}-epoch run per mode (profiler overhead inflates "
        f"small calls; compare the two columns, not the absolute numbers)"
    )
    print("cumulative seconds per epoch of the per-batch path:")
    keys = [
        ("pipeline/training/loop.py", "train"),
        ("torch/utils/data/dataloader.py", "__next__"),
        ("pipeline/training/stream.py", "__iter__"),
        ("pipeline/training/stream.py", "_batches"),
        ("pipeline/training/stream.py", "join_labels"),
        ("pipeline/data/datasets.py", "index_of"),
        ("storage/reader.py", "iter_batches"),
        ("storage/reader.py", "_rebatch"),
        ("storage/reader.py", "_shuffle_blocks"),
        ("storage/reader.py", "_blocks"),
        ("storage/layout.py", "read"),
        ("storage/shards.py", "open_shard"),
        ("pipeline/objectives/objective.py", "__call__"),
        ("pipeline/objectives/objective.py", "terms"),
        ("pipeline/objectives/dense.py", "teacher_side"),
        ("pipeline/objectives/dense.py", "soft_kl_loss"),
        ("pipeline/objectives/objective.py", "_task_loss"),
        ("pipeline/training/loop.py", "<dictcomp>"),
        ("torch/_tensor.py", "backward"),
        ("torch/optim/optimizer.py", "wrapper"),
    ]
    seen = set()
    print(f"  {'function':64s} {'hard s/ep':>10s} {'stored s/ep':>11s} {'delta':>8s}")
    for fpart, fn in keys:
        for tab_keys in (stored, hard):
            for k in tab_keys:
                if k in seen or k[2] != fn or fpart not in k[0]:
                    continue
                seen.add(k)
                h = hard.get(k, (0, 0, 0))[1] / E
                s = stored.get(k, (0, 0, 0))[1] / E
                print(f"  {name(k)[:64]:64s} {h:10.4f} {s:11.4f} {s - h:+8.4f}")
    print("top 15 functions of the stored run by own time (seconds per epoch, calls per epoch):")
    for k, (own, cum, calls) in sorted(stored.items(), key=lambda kv: -kv[1][0])[:15]:
        h = hard.get(k, (0, 0, 0))
        print(f"  {name(k)[:70]:70s} own {own / E:.4f} (hard {h[0] / E:.4f})  cum {cum / E:.4f}  calls {calls / E:.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 rounds x 3 epochs")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=11, help="epochs per run (the first is warm-up, dropped)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: tiny ops do not pay thread sync on a shared 2-core box)",
    )
    ap.add_argument(
        "--workers", action="store_true", help="also time stored with num_workers=1 (informational, not the target)"
    )
    ap.add_argument("--profile", action="store_true", help="profile even if the target is met")
    ap.add_argument("--out", default=None, help="directory for the soft labels (default: a temp dir)")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.epochs = 2, 3
    if a.epochs < 2:
        ap.error("--epochs must be >= 2 (the first epoch of each run is dropped)")
    torch.set_num_threads(a.threads)
    root = a.out or tempfile.mkdtemp(prefix="distillery-speed-")
    os.makedirs(root, exist_ok=True)

    tr = split_dataset(load_mnist5k(), seed=0, sizes=SPLIT)["train"]
    torch.manual_seed(0)
    teacher = build_model(TEACHER, in_shape=tr.in_shape, num_classes=10)
    # teacher quality does not matter for speed: 1 epoch, just so the labels are not random
    train(teacher, TrainConfig(epochs=1, lr=2e-3, device="cpu"), train_data=tr)  # loss "ce": hard labels
    teacher.eval()
    uri = os.path.join(root, "labels")
    label_dataset(
        teacher,
        tr,
        uri,
        temperature=4.0,
        teacher={"name": "cnn", "fingerprint": fingerprint(teacher.state_dict())},
        num_views=1,
        view_spec=None,
        representation="dense",
        dtype="float16",
        backend="parquet",
        overwrite=True,
    )

    modes = ["hard", "stored", "online"] + (["stored-1worker"] if a.workers else [])
    nparams = sum(p.numel() for p in student(a).parameters())
    steps = -(-len(tr) // a.batch_size)
    print(
        f"student mlp width={a.width} depth={a.depth} ({nparams:,} params); teacher cnn {TEACHER['kwargs']} "
        f"(online only); rows/epoch={len(tr)} (MNIST-5k train split, stored num_views=1, no augmentation); "
        f"batch={a.batch_size} ({steps} steps/epoch); device=cpu, torch threads={a.threads}"
    )
    print(
        f"stored: Parquet dense float16 at {uri}, num_workers=0 (the stream in-process), loss kd T=4 alpha=0; "
        f"hard: in-memory HardLabelBatches, cross-entropy; online: teacher forward per batch, loss kd T=4"
    )
    print(
        f"{a.rounds} rounds x {len(modes)} modes interleaved (order rotated per round), {a.epochs} epochs per "
        f"run, first epoch of each run dropped -> {a.rounds * (a.epochs - 1)} epoch times per mode\n"
    )

    times = {m: [] for m in modes}
    walls = {m: [] for m in modes}
    kinds = ("hard", "memkd", "stored")
    parts = {k: [] for k in kinds}
    assert np.all(np.diff(tr.sample_ids) > 0)
    T = float(open_soft_labels(uri).manifest["temperature"])
    z = np.asarray(
        open_soft_labels(uri).take(tr.sample_ids, np.zeros(len(tr), np.int64), columns=["logits"])["logits"], np.float32
    )  # (N, C) stored z/T, row = position
    z_mem = (z, T)
    t_start = time.perf_counter()
    for r in range(a.rounds):
        order = modes[r % len(modes) :] + modes[: r % len(modes)]
        for m in order:
            out = run_once(
                a, m, tr, teacher, uri, os.path.join(root, f"{m}.jsonl"), num_workers=1 if m == "stored-1worker" else 0
            )
            times[m] += out["epochs"]
            walls[m].append(out["wall"])
        for kind in kinds if r % 2 == 0 else kinds[::-1]:
            parts[kind] += replica_epochs(a, kind, tr, uri, z_mem)
        print(
            f"round {r + 1}/{a.rounds}: "
            + ", ".join(f"{m} {1e3 * statistics.median(times[m][-(a.epochs - 1) :]):.1f} ms" for m in modes),
            flush=True,
        )

    med = {m: statistics.median(v) for m, v in times.items()}
    print(
        f"\n{'mode':15s} {'median ms/epoch':>15s} {'min':>8s} {'max':>8s} {'ms/step':>8s} {'rows/s':>9s} "
        f"{'x hard':>7s} {'median run wall s':>17s}"
    )
    for m in modes:
        v = times[m]
        print(
            f"{m:15s} {1e3 * med[m]:15.1f} {1e3 * min(v):8.1f} {1e3 * max(v):8.1f} {1e3 * med[m] / steps:8.2f} "
            f"{len(tr) / med[m]:9,.0f} {med[m] / med['hard']:7.3f} {statistics.median(walls[m]):17.2f}"
        )
    pm = {k: statistics.median(v) for k, v in parts.items()}
    d_loss, d_stream = pm["memkd"] - pm["hard"], pm["stored"] - pm["memkd"]
    print(
        f"\nattribution with a replica of pipeline.training.loop's inner loop (interleaved, median of "
        f"{len(parts['hard'])} epochs each; its stored number should match the stored row above):"
    )
    print(f"  hard labels, cross-entropy                          {1e3 * pm['hard']:6.1f} ms/epoch")
    print(
        f"  same teacher labels from numpy arrays, KD T=4       {1e3 * pm['memkd']:6.1f} ms/epoch  "
        f"-> KD loss vs CE: {1e3 * d_loss:+5.1f} ms ({100 * d_loss / pm['hard']:+.1f}% of hard)"
    )
    print(
        f"  stored labels streamed (open_label_stream), KD T=4  {1e3 * pm['stored']:6.1f} ms/epoch  "
        f"-> streaming vs in memory: {1e3 * d_stream:+5.1f} ms ({100 * d_stream / pm['hard']:+.1f}% of hard, "
        f"{100 * d_stream / pm['memkd']:+.1f}% of in-memory soft labels)"
    )
    ratio = med["stored"] / med["hard"]
    ok = ratio <= 1.05
    print(f"\nonline KD / stored = {med['online'] / med['stored']:.2f}x per epoch")
    s_ok = d_stream / pm["hard"] <= 0.05
    print(
        f"[{'PASS' if s_ok else 'FAIL'}] streaming the stored labels costs {100 * d_stream / pm['hard']:+.1f}% of a "
        f"hard-label epoch over the same labels held in memory (target <= +5.0%; replica loop)"
    )
    print(
        f"[{'PASS' if ok else 'FAIL'}] stored-label training as a whole (stream + KD loss) costs "
        f"{100 * (ratio - 1):+.1f}% per epoch vs hard labels in memory (strict reading of the target, <= +5.0%)"
    )
    print(
        f"[info] the rest is the KD loss itself (soft targets vs cross-entropy, labels in memory): "
        f"{100 * d_loss / pm['hard']:+.1f}% of a hard epoch, {1e6 * d_loss / steps:.0f} us per step"
    )
    print(f"total benchmark time {time.perf_counter() - t_start:.0f} s")
    if not ok or a.profile:
        stream_pieces(a, tr, uri)
        profile_modes(a, tr, teacher, uri, root)
    if a.out is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
