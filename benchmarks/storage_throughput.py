"""Storage throughput: write and streaming read of soft labels vs np.save / np.load.

N rows x C classes, dense float16 and top-k (k=16), Parquet and Zarr. Every number is
measured in this run, interleaved with its np.save/np.load baseline of the same arrays
(machines are noisy; only the ratios are meant to be compared), median of --repeats.

Writes: the writer gets the teacher's raw float32 logits and does everything a label run
does (divide by T, cast, check finiteness, encode, sha256, fsync, commit, finalize);
np.save writes the already-cast arrays into a NEW file each time, as the writer does
(rewriting an existing .npy reuses its page-cache pages and runs ~8x faster here; that
number is printed too). Reads: steady state (every shard already verified by this
process, as in epoch 2+ of training) and "first" = the first open in a process, which
also hashes every shard against its recorded sha256.

    python benchmarks/storage_throughput.py [--rows 100000] [--classes 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from storage import SoftLabelWriter, open_soft_labels  # noqa: E402
from storage.shards import forget_verified  # noqa: E402
from storage.topk import index_dtype, scaled_topk  # noqa: E402

TEACHER = {"name": "bench", "fingerprint": "sha256:bench"}
DATA = {"name": "bench", "split": "all", "fingerprint": "sha256:bench", "transform": None}


def logits(n: int, c: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    z = rng.standard_normal((n, c), dtype=np.float32) * 2.0
    z[np.arange(n), rng.integers(0, c, n)] += 10.0  # one confident class per row, like a trained teacher
    return z


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def dir_bytes(path: str) -> int:
    data = os.path.join(path, "data")
    return sum(
        os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(data) for f in fs if f != "zarr.json" or d != data
    )


def write(uri, backend, z, rep, k, shard_rows, T):
    shutil.rmtree(uri, ignore_errors=True)
    with SoftLabelWriter(
        uri,
        backend=backend,
        num_classes=z.shape[1],
        temperature=T,
        representation=rep,
        k=k,
        dtype="float16",
        teacher=TEACHER,
        data=DATA,
    ) as w:
        for i, a in enumerate(range(0, len(z), shard_rows)):
            w.write_shard(i, np.arange(a, min(a + shard_rows, len(z))), z[a : a + shard_rows])


def stream(uri, batch_size, shuffle, first=False):
    if first:
        forget_verified()  # as in a fresh process: every shard is hashed before its first read
    ds = open_soft_labels(uri)
    rows = 0
    for b in ds.iter_batches(batch_size, shuffle=shuffle, seed=0):
        rows += len(b["sample_id"])
    assert rows == len(ds), (rows, len(ds))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--shard-rows", type=int, default=25_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    a = ap.parse_args()
    N, C, T = a.rows, a.classes, 4.0
    root = a.dir or tempfile.mkdtemp(prefix="distillery-bench-")
    os.makedirs(root, exist_ok=True)
    z = logits(N, C)
    dense = (z / T).astype(np.float16)  # what the dense store holds
    vals, idx, lse = scaled_topk(z / T, a.k)
    topk = {
        "topk_logits": vals.astype(np.float16),
        "topk_indices": idx.astype(index_dtype(C)),
        "logsumexp": lse.astype(np.float32),
        "sample_id": np.arange(N),
        "view": np.zeros(N, np.int32),
    }
    dense_arrays = {"logits": dense, "sample_id": np.arange(N), "view": np.zeros(N, np.int32)}

    def np_save(arrays, tag):
        for name, arr in arrays.items():
            np.save(os.path.join(root, f"{tag}-{name}.npy"), arr)

    def np_cast_save_fsync(tag):
        """The least any durable float16 store of the teacher's raw logits must do: z/T cast
        to float16 (top-k: the same numpy top-k the writer uses), np.save, fsync."""
        if tag == "dense":
            out = {"logits": (z / T).astype(np.float16)}
        else:
            v, i, lse = scaled_topk(z / T, a.k)
            out = {"topk_logits": v.astype(np.float16), "topk_indices": i.astype(index_dtype(C)), "logsumexp": lse}
        for name, arr in out.items():
            path = os.path.join(root, f"{tag}-floor-{name}.npy")
            with open(path, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
            os.remove(path)

    def hash_save_fsync(arrays, tag):
        """What is left of the durable, content-addressed store when the cast is not the
        writer's (done on the teacher's device): sha256 of the ready float16 rows (threads,
        one per shard as the writer does), np.save and fsync."""
        from storage.parallel import pool

        for name, arr in arrays.items():
            flat = memoryview(np.ascontiguousarray(arr)).cast("B")
            step = -(-len(flat) // max(1, -(-N // a.shard_rows)))
            digests = [
                pool().submit(lambda m: hashlib.sha256(m).digest(), flat[i : i + step])
                for i in range(0, len(flat), step)
            ]
            path = os.path.join(root, f"{tag}-hfloor-{name}.npy")
            with open(path, "wb") as f:
                np.save(f, arr)
                f.flush()
                os.fsync(f.fileno())
            [d.result() for d in digests]
            os.remove(path)

    def np_load(arrays, tag):
        for name in arrays:
            np.load(os.path.join(root, f"{tag}-{name}.npy"))

    results = []
    print(
        f"rows={N} classes={C} k={a.k} shard_rows={a.shard_rows} batch={a.batch_size} repeats={a.repeats} "
        f"(median of repeats; page cache warm for every reader)"
    )
    for rep, arrays in (("dense", dense_arrays), ("topk", topk)):
        nbytes = sum(v.nbytes for v in arrays.values())
        k = a.k if rep == "topk" else None
        times = {key: [] for key in ("np.save", "np.save-rewrite", "floor", "hfloor", "np.load")}
        for backend in ("parquet", "zarr"):
            for key in ("write", "read", "read-shuffled", "read-first"):
                times[f"{backend}:{key}"] = []
        # writes: every repeat writes from scratch (np.save too: new files, like the writer)
        for _ in range(a.repeats):
            for name in arrays:
                if os.path.exists(os.path.join(root, f"{rep}-{name}.npy")):
                    os.remove(os.path.join(root, f"{rep}-{name}.npy"))
            times["np.save"].append(timed(lambda: np_save(arrays, rep)))
            times["np.save-rewrite"].append(timed(lambda: np_save(arrays, rep)))
            times["floor"].append(timed(lambda: np_cast_save_fsync(rep)))
            times["hfloor"].append(timed(lambda: hash_save_fsync(arrays, rep)))
            for backend in ("parquet", "zarr"):
                uri = os.path.join(root, f"{rep}-{backend}")
                times[f"{backend}:write"].append(timed(lambda: write(uri, backend, z, rep, k, a.shard_rows, T)))
        # reads: steady state, as in epoch 2+ of training; one untimed pass of each first
        # (the first pass in a process pays page faults for fresh memory, np.load too)
        readers = {"np.load": lambda: np_load(arrays, rep)}
        for backend in ("parquet", "zarr"):
            uri = os.path.join(root, f"{rep}-{backend}")
            readers[f"{backend}:read"] = lambda uri=uri: stream(uri, a.batch_size, False)
            readers[f"{backend}:read-shuffled"] = lambda uri=uri: stream(uri, a.batch_size, True)
        for fn in readers.values():
            fn()
        for _ in range(a.repeats):
            for key, fn in readers.items():
                times[key].append(timed(fn))
        # first open in a process: every shard hashed before its first read (forgets all
        # verifications, so it runs after the steady-state loop), interleaved with np.load
        for _ in range(a.repeats):
            times["np.load"].append(timed(readers["np.load"]))
            for backend in ("parquet", "zarr"):
                uri = os.path.join(root, f"{rep}-{backend}")
                times[f"{backend}:read-first"].append(timed(lambda: stream(uri, a.batch_size, False, first=True)))
        med = {key: statistics.median(v) for key, v in times.items()}
        npy_bytes = sum(os.path.getsize(os.path.join(root, f"{rep}-{n}.npy")) for n in arrays)
        print(
            f"\n== {rep}{f' (k={k})' if k else ''}: {nbytes / N:.1f} payload bytes/row, "
            f"np.save {nbytes / med['np.save'] / 1e9:.2f} GB/s to new files "
            f"({nbytes / med['np.save-rewrite'] / 1e9:.2f} GB/s rewriting them), "
            f"np.load {nbytes / med['np.load'] / 1e9:.2f} GB/s; cast+np.save+fsync from the raw float32 logits "
            f"{nbytes / med['floor'] / 1e9:.2f} GB/s; without the cast (sha256 + np.save + fsync of the ready "
            f"rows) {nbytes / med['hfloor'] / 1e9:.2f} GB/s = {med['np.save'] / med['hfloor']:.2f}x np.save"
        )
        print(
            f"{'backend':8s} {'write GB/s':>10s} {'x np.save':>9s} {'read GB/s':>10s} {'x np.load':>9s} "
            f"{'shuffled':>9s} {'x np.load':>9s} {'first':>7s} {'x np.load':>9s} {'rows/s read':>12s} {'bytes/row':>9s}"
        )
        for backend in ("parquet", "zarr"):
            uri = os.path.join(root, f"{rep}-{backend}")
            bpr = dir_bytes(uri) / N
            w, r, rs = med[f"{backend}:write"], med[f"{backend}:read"], med[f"{backend}:read-shuffled"]
            rf = med[f"{backend}:read-first"]
            print(
                f"{backend:8s} {nbytes / w / 1e9:10.2f} {med['np.save'] / w:9.2f} {nbytes / r / 1e9:10.2f} "
                f"{med['np.load'] / r:9.2f} {nbytes / rs / 1e9:9.2f} {med['np.load'] / rs:9.2f} "
                f"{nbytes / rf / 1e9:7.2f} {med['np.load'] / rf:9.2f} {N / r:12,.0f} {bpr:9.1f}"
            )
            results.append((rep, backend, bpr, med["np.load"] / r, med["np.save"] / w, med["floor"] / w))
        print(
            f"{'npy':8s} {'':10s} {'':9s} {'':10s} {'':9s} {'':9s} {'':9s} {N / med['np.load']:12,.0f} "
            f"{npy_bytes / N:9.1f}"
        )
    print()
    for backend in ("parquet", "zarr"):
        d = next(r for r in results if r[0] == "dense" and r[1] == backend)
        t = next(r for r in results if r[0] == "topk" and r[1] == backend)
        print(
            f"{backend}: dense float16 streaming read = {d[3]:.2f}x np.load (target >= 0.5x: "
            f"{'met' if d[3] >= 0.5 else 'NOT met'}); dense write = {d[4]:.2f}x np.save (target >= 0.3x: "
            f"{'met' if d[4] >= 0.3 else 'NOT met'}) = {d[5]:.2f}x cast+np.save+fsync; "
            f"top-k write = {t[4]:.2f}x np.save = {t[5]:.2f}x its cast+np.save+fsync; "
            f"top-k bytes/row = {100 * t[2] / d[2]:.1f}% of dense "
            f"(target <= 5%: {'met' if t[2] / d[2] <= 0.05 else 'NOT met'})"
        )
    if a.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
