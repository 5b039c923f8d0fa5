"""Vision input pipelines (issue 21): do torchvision views and PNG decoding keep up?

Side by side in one run (rows = (sample, view) pairs; best of --repeats, stages taking turns):

A. Labelling with torchvision views: Animal-MNIST (.assets/animal_mnist.parquet, 32x32 from the
   source's pixel cache), configs/vision.yaml's views (RandomResizedCrop, flip, RandAugment;
   6 per sample), a random timm resnet10t, batches of 512. "forward": the teacher alone on
   inputs made beforehand; "views": model_inputs alone on 1 thread; "label": everything
   labelling does but storing (pipeline.labelling.classify.teacher_outputs), the views made in
   0 (the labelling thread), 1 or 2 DataLoader workers; also the teacher on 1 thread with 1
   worker. Target: labelling with views in workers <= 1.05x the forward alone. On a CPU-only
   machine the workers' views and the forward share the cores, so the ratio's floor is about
   (forward CPU + views CPU) / (cores x forward wall); on a GPU the forward runs on the device
   and the workers' views overlap it. The script prints both.
B. The quickstart's student inputs from an image folder of 28x28 PNGs (Animal-MNIST written out
   as files): 16 shift views, dense float16 labels at T=4 (a random cnn labels --rows samples),
   batch 128. The built-in loop's stream (distillery.open_stream: read labels, join by sample
   id, encode, replay the stored view) in-process and through 2 DataLoader workers as
   pipeline/training/loop.py builds them, with pixel_cache off (PIL decodes every PNG for every
   view and epoch: before) and on (decoded once into a memory-mapped uint8 cache: after), vs
   the mlp-64 student's steps alone (forward + KD loss + backward + AdamW) on batches in memory.
   Target: input pipeline >= 3x the student's training throughput with workers. Also one epoch
   of stream + steps together and its share of time waiting for input.

    python benchmarks/vision_pipeline.py [--rows 2000] [--files 10000] [--repeats 3] [--threads N] [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from functools import partial

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import distillery  # noqa: E402
from pipeline.data.datasets import model_inputs  # noqa: E402
from pipeline.data.sources import open_table_source  # noqa: E402
from pipeline.labelling.classify import label_dataset, teacher_outputs  # noqa: E402
from pipeline.models.registry import build_model  # noqa: E402
from pipeline.training.stream import from_wire, keep_batch  # noqa: E402
from pipeline.views.images import ViewSpec  # noqa: E402
from pipeline.views.transforms import transform_from_config  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARQUET = os.path.join(ROOT, ".assets", "animal_mnist.parquet")
VISION_VIEWS = {  # configs/vision.yaml's views
    "kind": "torchvision",
    "seed": 0,
    "steps": [
        {"RandomResizedCrop": {"size": [32, 32], "scale": [0.6, 1.0], "ratio": [0.8, 1.25]}},
        {"RandomHorizontalFlip": {}},
        {"RandAugment": {"num_ops": 1, "magnitude": 5}},
    ],
}
verdict = {True: "PASS", False: "FAIL"}


def side_by_side(stages, repeats):
    """{name: (wall, process CPU)} of each stage's fastest run; the stages take turns in every
    repeat, so load from other processes falls on all of them alike. A stage is (fn, torch threads)."""
    out = {}
    for _ in range(repeats):
        for name, (fn, threads) in stages.items():
            torch.set_num_threads(threads)
            w0, c0 = time.perf_counter(), time.process_time()  # CPU: every thread of this process
            fn()
            run = (time.perf_counter() - w0, time.process_time() - c0)
            out[name] = min(out.get(name, run), run)
    return out


def part_a(a, tmp):
    spec = {"kind": "parquet", "path": PARQUET, "image_column": "image", "label_column": "label", "id_column": "id"}
    src = open_table_source(spec | {"image_size": [32, 32], "channels": 1}, cache_dir=os.path.join(tmp, "cache"))
    n, V, B = min(a.rows, len(src)), 6, 512
    src = src.subset(np.arange(n))
    views = transform_from_config(VISION_VIEWS)
    torch.manual_seed(0)
    teacher = build_model({"arch": "timm:resnet10t"}, in_shape=(1, 32, 32), num_classes=10).eval()
    pos, vw = np.repeat(np.arange(n), V), np.tile(np.arange(V), n)  # sample-major, as labelling
    R, cores, T = len(pos), os.cpu_count(), torch.get_num_threads()
    print(
        f"A. labelling: {n} Animal-MNIST images x {V} torchvision views = {R} rows, batch {B}, "
        f"timm resnet10t, {cores} cores, {T} torch threads"
    )

    # (3) the views alone, batch by batch as a worker makes them; kept as the forward's inputs
    xs = [model_inputs(src, pos[i : i + B], vw[i : i + B], views) for i in range(0, R, B)]
    with torch.inference_mode():  # warm-up: first-call allocations and kernel choices
        teacher(xs[0])

    def make_views():
        xs[:] = [model_inputs(src, pos[i : i + B], vw[i : i + B], views) for i in range(0, R, B)]

    def forward():  # (1) the teacher alone on inputs made beforehand
        with torch.inference_mode():
            for x in xs:
                teacher(x)

    kw = dict(start=0, stop=n, view_spec=views, num_views=V, num_classes=10, batch_size=B, device="cpu")

    def label(workers):  # (2) everything labelling does but storing, views in `workers` processes
        return lambda: teacher_outputs(teacher, src, workers=workers, **kw)

    stages = {
        "views alone (1 thread, as in a worker)": (make_views, 1),
        "forward alone": (forward, T),
        "label, views on the labelling thread": (label(0), T),
        "label, views in 1 worker": (label(1), T),
        "label, views in 2 workers": (label(2), T),
    }
    if T > 1:  # views and forward each on one core: the teacher on 1 thread, the views in 1 worker
        stages |= {"forward alone, 1 thread": (forward, 1), "label, 1 thread, views in 1 worker": (label(1), 1)}
    t = side_by_side(stages, a.repeats)
    torch.set_num_threads(T)
    (t_fwd, c_fwd), (t_fwd1, c_fwd1) = t["forward alone"], t.get("forward alone, 1 thread", t["forward alone"])
    print(f"  {'stage':<38} {'rows/s':>8} {'/ forward':>10} {'CPU (main)':>10}")
    for name, (wall, cpu) in t.items():
        base = t_fwd1 if "1 thread" in name else t_fwd  # 1-thread rows: vs the 1-thread forward
        print(f"  {name:<38} {R / wall:8,.0f} {wall / base:9.2f}x {cpu / wall:10.2f}")
    # Floors on a CPU-only machine: the workers' views need CPU time that a forward already using
    # every core cannot give them. Labelling does (forward CPU + views CPU) of work on `cores` cores.
    t_views, c_views = t["views alone (1 thread, as in a worker)"]
    ideal = 1 + c_views / c_fwd1  # if the forward kept every core busy at its 1-thread CPU cost per row
    here = max(1.0, (c_fwd + c_views) / (cores * t_fwd))  # vs the forward as measured (it used c_fwd / t_fwd cores)
    one_each = max(1.0, t_views / t_fwd1)  # 1 core each: the slower of the two sets the pace
    ratio = min(t["label, views in 1 worker"][0], t["label, views in 2 workers"][0]) / t_fwd
    print(
        f"  CPU-only floors: the views cost {c_views / c_fwd1:.2f}x the forward's CPU per row. Views and forward share "
        f"{cores} cores, so labelling >= {ideal:.2f}x a forward that keeps every core busy; >= {here:.2f}x the forward "
        f"measured here (it kept {c_fwd / t_fwd:.2f} of {cores} cores busy); one core each: >= {one_each:.2f}x the "
        "1-thread forward. On a GPU the forward runs on the device and the workers' views overlap it."
    )
    print(
        f"[{verdict[ratio <= 1.05]}] labelling with views in workers <= 1.05x the forward alone: {ratio:.2f}x "
        f"(CPU floor here {here:.2f}x)\n"
    )


def image_folder(tmp, files):
    """`files` 28x28 PNGs in class sub-folders: Animal-MNIST's PNG bytes as they are, its rows
    in a fixed shuffled order, cycled (so that a small folder still has every class)."""
    t = pq.read_table(PARQUET, columns=["image", "label"]).to_pydict()
    order = np.random.default_rng(0).permutation(len(t["image"]))
    folder = os.path.join(tmp, "animal-folder")
    for i in range(files):
        j = int(order[i % len(order)])
        os.makedirs(os.path.join(folder, t["label"][j]), exist_ok=True)
        with open(os.path.join(folder, t["label"][j], f"{i:05d}.png"), "wb") as f:
            f.write(t["image"][j])
    return folder


def loader(stream, workers):
    """The batches pipeline/training/loop.py trains on: the stream itself in-process, or a
    DataLoader over it whose CPU workers hand numpy arrays back (wrapped again in `epoch`)."""
    if workers == 0:
        return stream
    stream.worker_numpy = True
    return DataLoader(
        stream,
        batch_size=None,
        num_workers=workers,
        persistent_workers=True,
        multiprocessing_context="forkserver",
        collate_fn=keep_batch,
    )


def epoch(batches, stream, e, step=None):
    """Epoch e over `batches`: (wall, seconds waiting for input). step(batch): a training step."""
    stream.set_epoch(e)
    t0 = w0 = time.perf_counter()
    wait = 0.0
    for b in batches:
        b = from_wire(b) if isinstance(b["x"], np.ndarray) else b  # numpy from workers, as the loop does
        wait += time.perf_counter() - w0
        if step is not None:
            step(b)
        w0 = time.perf_counter()
    return time.perf_counter() - t0, wait


class Premade(torch.utils.data.IterableDataset):
    """Hands out copies of ready batches (numpy), split between workers: what 2 workers can
    deliver when making a batch costs nothing (the transport's ceiling)."""

    def __init__(self, batches, dtype=None):
        self.batches = [{k: (v.astype(dtype) if k == "x" and dtype else v) for k, v in b.items()} for b in batches]

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (0, 1) if info is None else (info.id, info.num_workers)
        for b in self.batches[w::n]:
            yield {k: v.copy() for k, v in b.items()}


def part_b(a, tmp):
    t0 = time.perf_counter()
    folder = image_folder(tmp, a.files)
    print(f"B. student inputs: an image folder of {a.files} 28x28 PNGs, written in {time.perf_counter() - t0:.1f} s")
    srcs = {}
    for on in (False, True):  # pixel_cache=True decodes every PNG once, here
        t0 = time.perf_counter()
        srcs[on] = open_table_source(
            {"kind": "image_folder", "path": folder, "pixel_cache": on}, cache_dir=os.path.join(tmp, "cache")
        )
        what = "decode every PNG once into the pixel cache" if on else "walk + Arrow cache of paths"
        print(f"   opened with pixel_cache={on!s:<5} in {time.perf_counter() - t0:5.2f} s ({what})")
    n, V, bs, C = min(a.rows, a.files), 16, 128, srcs[True].num_classes
    inputs = {on: srcs[on].subset(np.arange(n)) for on in (False, True)}  # the same rows, same ids
    views = ViewSpec(shift=2, seed=0)  # configs/quickstart.yaml's views
    torch.manual_seed(0)
    teacher = build_model({"arch": "cnn", "kwargs": {"channels": [16, 32]}}, in_shape=(1, 28, 28), num_classes=C)
    uri = os.path.join(tmp, "soft_labels")
    meta = {"teacher": {"name": "random-cnn", "fingerprint": "bench"}, "shard_size": 1000, "dtype": "float16"}
    label_dataset(teacher, inputs[True], uri, temperature=4.0, num_views=V, view_spec=views, **meta)
    labels = distillery.open_labels(uri)
    objective = distillery.Objective.for_labels(labels, loss="kd", temperature=4.0)  # the loop's loss
    R, T = n * V, torch.get_num_threads()
    print(
        f"   quickstart design: {n} samples x {V} shift views = {R} dense float16 rows (T=4), batch {bs}, "
        f"mlp-64 student, KD at T=4, AdamW, {T} torch threads"
    )

    def student():
        """A fresh mlp-64 student's training step: forward + KD loss + backward + AdamW."""
        torch.manual_seed(0)
        net = build_model({"arch": "mlp", "kwargs": {"width": 64, "depth": 1}}, in_shape=(1, 28, 28), num_classes=C)
        opt = torch.optim.AdamW(net.parameters(), lr=0.003)

        def step(b):
            loss = objective(net, b)["loss"]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    # every configuration's stream (and its persistent workers) up front, so that in each repeat
    # they take turns with the student's steps on batches already in memory
    configs = [(on, w) for on in (False, True) for w in (0, 2)]
    # distillery.open_stream: the built-in loop's stream; the views are replayed from the manifest
    streams = {c: distillery.open_stream(uri, inputs[c[0]], batch_size=bs, seed=0) for c in configs}
    loaders = {c: loader(streams[c], c[1]) for c in configs}
    in_memory, step = list(streams[True, 0]), student()
    stages = {"student steps alone (batches in memory)": (lambda: [step(b) for b in in_memory], T)}
    # the floor of any pipeline through workers here: 2 workers handing over ready batches of
    # the same shape, float32 pixels as the model takes them, and uint8 (a quarter of the bytes)
    as_numpy = [{k: v.numpy() for k, v in b.items()} for b in in_memory]
    for dt in ("float32", "uint8"):
        dl = DataLoader(
            Premade(as_numpy, None if dt == "float32" else np.uint8),
            batch_size=None,
            num_workers=2,
            persistent_workers=True,
            multiprocessing_context="forkserver",
            collate_fn=keep_batch,
        )
        stages[f"transport alone: 2 workers, {dt} pixels"] = (partial(epoch, dl, streams[True, 0], 1), T)
    for c in configs:
        name = f"input pipeline, pixel_cache={c[0]!s:<5} workers={c[1]}"
        stages[name] = (partial(epoch, loaders[c], streams[c], 1), T)
    side_by_side(stages, 1)  # warm-up: start the workers, fill the page cache, first-call costs
    t = side_by_side(stages, a.repeats)
    train = R / t["student steps alone (batches in memory)"][0]
    print(f"  {'stage':<44} {'rows/s':>8} {'/ student':>10} {'CPU (main)':>10}")
    for name, (wall, cpu) in t.items():
        print(f"  {name:<44} {R / wall:8,.0f} {R / wall / train:9.2f}x {cpu / wall:10.2f}")
    print("  one epoch of stream + student steps together (input: time waiting for the next batch):")
    for on, w in configs:
        wall, wait = epoch(loaders[on, w], streams[on, w], a.repeats + 1, student())
        print(f"    pixel_cache={on!s:<5} workers={w}: {R / wall:8,.0f} rows/s, {wait / wall:4.0%} waiting for input")
    before, after = (R / t[f"input pipeline, pixel_cache={on!s:<5} workers=2"][0] / train for on in (False, True))
    floor = {dt: R / t[f"transport alone: 2 workers, {dt} pixels"][0] / train for dt in ("float32", "uint8")}
    print(
        f"  floor with workers on this machine: 2 workers that only hand over ready batches deliver "
        f"{floor['float32']:.2f}x the student (float32 pixels), {floor['uint8']:.2f}x (uint8): no pipeline "
        f"through workers can be faster"
    )
    print(
        f"[{verdict[after >= 3]}] input pipeline >= 3x the student's training throughput with workers: "
        f"{after:.2f}x with the pixel cache (before, decoding PNGs in the workers: {before:.2f}x; "
        f"transport floor {floor['float32']:.2f}x)"
    )
    loaders.clear()  # ends the persistent workers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=2000, help="samples labelled in A and in B")
    ap.add_argument("--files", type=int, default=10000, help="PNGs in B's image folder")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes: under a minute")
    ap.add_argument("--part", choices=["a", "b", "both"], default="both")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: all)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.quick:
        a.rows, a.files, a.repeats = 256, 1000, 1
    # other processes on the machine stall multi-threaded torch (a thread waits for a preempted one)
    load = "load average {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())
    print(f"torch {torch.__version__}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {load}\n")
    with tempfile.TemporaryDirectory(prefix="distillery-vision-bench-") as tmp:
        if a.part in ("a", "both"):
            part_a(a, tmp)
        if a.part in ("b", "both"):
            part_b(a, tmp)
    print("\nload average at the end {:.1f} {:.1f} {:.1f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
