"""The store at 10^2 … 10^6 shards: is the cost per shard flat? (issue #19)

Three measurements, printed as tables:

1. local: one writer commits 1-sample dense shards (10 classes) up to the largest size;
   at each size N it reports the time per shard over the last shards written (the
   marginal cost at that depth), the once-per-run costs (re-opening the writer and
   listing what is committed, as a resumed run does; finalize), the metadata bytes
   (manifest.json + index files), and, in a fresh process, the time to open the dataset
   and the reader's peak memory above its baseline (imports done).
2. S3: the same against an S3 API server (moto on 127.0.0.1) that counts the requests it
   serves, by method: requests per shard written at each depth.
3. index: a simulated 10^6-shard index (one real shard, 10^6 entries; the shards
   themselves are not needed to open a dataset): manifest and index bytes, open time,
   the reader's peak memory, and one rank's plan (rank 0 of 8) with the entries of the
   first shards it opens.

    python benchmarks/store_scale.py [--local 100,1000,10000,100000] [--s3 100,1000,10000]
                                     [--index 1000000] [--window 200]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from storage import SoftLabelWriter  # noqa: E402

TEACHER = {"name": "t", "fingerprint": "t"}
DATA = {"name": "d", "split": "s", "fingerprint": "d", "transform": None}
C = 10

# the open, in a fresh process: seconds and peak RSS above the process after its imports
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import numpy as np
from storage import open_soft_labels
from storage.partition import partition_segments
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
so = json.loads(sys.argv[3]) if sys.argv[3] != "-" else None
def plan(ds):
    segs = partition_segments(ds.index.units, seed=0, epoch=0, shuffle=True, rank=0, world_size=8, worker=0,
                              num_workers=1, group=ds.index.group)
    return segs, [ds.index.entry(segs[i].shard) for i in range(min(64, len(segs)))]  # rank 0 opens these first
plan(open_soft_labels(sys.argv[4]))   # warm-up on a 1-shard dataset: lazy imports, allocator
if so:
    import s3fs  # noqa: F401
base = status("VmRSS")
t0 = time.perf_counter()
ds = open_soft_labels(sys.argv[2], storage_options=so)
opened = time.perf_counter() - t0
t0 = time.perf_counter()
segs, entries = plan(ds)
planned = time.perf_counter() - t0
print(json.dumps({"open_s": opened, "plan_s": planned, "segments": len(segs),
                  "peak": status("VmHWM") - base}))
"""


WARM: list[str] = []  # a 1-shard dataset the child opens first


def child_open(uri: str, storage_options: dict | None = None) -> dict:
    if not WARM:
        w = writer(os.path.join(tempfile.mkdtemp(prefix="distillery-warm-"), "ds"))
        w.write_shard(0, np.array([0]), np.zeros((1, C), np.float32))
        w.finalize()
        WARM.append(w.uri)
    out = subprocess.run(
        [sys.executable, "-c", CHILD, ROOT, uri, json.dumps(storage_options) if storage_options else "-", WARM[0]],
        capture_output=True,
        text=True,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout)


def tree_bytes(path: str, names: tuple[str, ...]) -> int:
    total = 0
    for n in names:
        p = os.path.join(path, n)
        if os.path.isfile(p):
            total += os.path.getsize(p)
        for d, _, fs in os.walk(p):
            total += sum(os.path.getsize(os.path.join(d, f)) for f in fs)
    return total


def writer(uri: str, storage_options: dict | None = None, n: int | None = None) -> SoftLabelWriter:
    """A labelling run's writer: it plans n shards of one sample each (as `distill label` does)."""
    return SoftLabelWriter(
        uri,
        backend="parquet",
        num_classes=C,
        temperature=2.0,
        teacher=TEACHER,
        data=DATA,
        storage_options=storage_options,
        num_shards=n,
        num_samples=n,
    )


def grow(w: SoftLabelWriter, start: int, stop: int, rng, cpu: bool = False):
    """Commit shards [start, stop) of one sample each; seconds per shard (and, cpu=True,
    this process's CPU seconds per shard: the client's own work, without the waits)."""
    z = rng.standard_normal((1, C), dtype=np.float32)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(start, stop):
        w.write_shard(i, np.array([i]), z)
    k = max(1, stop - start)
    wall = (time.perf_counter() - t0) / k
    return (wall, (time.process_time() - c0) / k) if cpu else wall


def local(sizes: list[int], window: int) -> None:
    root = tempfile.mkdtemp(prefix="distillery-scale-")
    rng = np.random.default_rng(0)
    print("\n## local disk: a run of N 1-sample dense shards; the last shards' cost at depth N\n")
    print(
        "| shards | write / shard (last shards) | resume: open + list (per shard) | finalize (per shard) "
        "| manifest + index | open | reader peak |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        uri = os.path.join(root, f"ds-{n}")
        w = writer(uri, n=n)
        a = max(0, n - window)
        grow(w, 0, a, rng)  # up to the window, untimed
        per = grow(w, a, n, rng)
        t0 = time.perf_counter()
        committed = len(writer(uri, n=n).committed_shards())
        resume = time.perf_counter() - t0
        assert committed == n
        t0 = time.perf_counter()
        w.finalize()
        fin = time.perf_counter() - t0
        meta = tree_bytes(uri, ("manifest.json", "_index"))
        o = child_open(uri)
        print(
            f"| {n:,} | {per * 1e3:.2f} ms | {resume:.2f} s ({resume / n * 1e3:.3f} ms) | {fin:.1f} s "
            f"({fin / n * 1e3:.3f} ms) | {meta / 1024:,.0f} KiB | {o['open_s'] * 1e3:.0f} ms | "
            f"{o['peak'] / 2**20:.1f} MiB |",
            flush=True,
        )
        shutil.rmtree(uri, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)


# The S3 API server runs in a process of its own, as a real one would (in this process its
# heap and threads would slow the client as objects accumulate). It counts the requests it
# serves, by method; GET /__counts returns them.
SERVER = r"""
import collections, json, sys, threading
from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import WSGIRequestHandler, make_server

class Quiet(WSGIRequestHandler):
    def log_request(self, *a, **k):
        pass

app = DomainDispatcherApplication(create_backend_app)
counts, lock = collections.Counter(), threading.Lock()

def counting(environ, start_response):
    if environ.get("PATH_INFO") == "/__counts":
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps(counts).encode()]
    with lock:
        counts[environ["REQUEST_METHOD"]] += 1
    return app(environ, start_response)

server = make_server("127.0.0.1", 0, counting, threaded=True, request_handler=Quiet)
print(server.server_port, flush=True)
server.serve_forever()
"""


def s3(sizes: list[int], window: int) -> None:
    import urllib.request

    import boto3

    proc = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    endpoint = f"http://127.0.0.1:{int(proc.stdout.readline())}"

    def counts() -> collections.Counter:
        with urllib.request.urlopen(f"{endpoint}/__counts") as r:
            return collections.Counter(json.loads(r.read()))

    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="scale")
    so = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    rng = np.random.default_rng(0)
    print("\n## S3 API (moto on 127.0.0.1, requests counted by the server): the last shards of a run of N\n")
    print(
        "| shards | write / shard | client CPU / shard | requests / shard written | by method | finalize requests "
        "| open (fresh process) |"
    )
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        uri = f"s3://scale/ds-{n}"
        w = writer(uri, so, n=n)
        a = max(0, n - window)
        grow(w, 0, a, rng)
        before = counts()
        per, cpu = grow(w, a, n, rng, cpu=True)
        delta = counts()
        delta.subtract(before)
        reqs = sum(delta.values()) / (n - a)
        before = counts()
        w.finalize()
        fin = counts()
        fin.subtract(before)
        before = counts()
        o = child_open(uri, so)
        opened = counts()
        opened.subtract(before)
        methods = ", ".join(f"{k} {v / (n - a):.1f}" for k, v in sorted(delta.items()) if v)
        print(
            f"| {n:,} | {per * 1e3:.1f} ms | {cpu * 1e3:.1f} ms | {reqs:.2f} | {methods} | {sum(fin.values()):,} "
            f"({sum(fin.values()) / n:.2f} / shard) | {o['open_s'] * 1e3:.0f} ms, {sum(opened.values())} requests |",
            flush=True,
        )
    proc.kill()


def index(n: int) -> None:
    """A real one-shard dataset whose index is replaced by n entries (entry 0 the real one)."""
    from storage.fs import Location
    from storage.index import INT_FIELDS, write_index
    from storage.manifest import MANIFEST, dump_manifest, now_iso, parse_manifest

    root = tempfile.mkdtemp(prefix="distillery-index-")
    uri = os.path.join(root, "ds")
    # a run that planned n shards of one sample each and committed shard 0 (the others are
    # simulated: opening a dataset reads shard 0's record, not the others)
    w = writer(uri, n=n)
    rec = w.write_shard(0, np.array([0]), np.zeros((1, C), np.float32))
    loc = Location(uri)
    real = {k: rec[k] for k in INT_FIELDS}
    sha0 = bytes.fromhex(rec["sha256"])
    m = dict(w.manifest, status="complete", finalized_at=now_iso())
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    cols = {
        "num_rows": np.full(n, 1, np.int64),
        "first_sample_id": np.arange(n, dtype=np.int64),
        "last_sample_id": np.arange(n, dtype=np.int64),
        "bytes": np.full(n, real["bytes"], np.int64),
        "rows_per_block": np.full(n, real["rows_per_block"], np.int64),
        "sha256": rng.integers(0, 256, (n, 32), dtype=np.uint8),
    }
    cols["sha256"][0] = np.frombuffer(sha0, np.uint8)
    m.update(num_shards=n, num_samples=n, num_rows=n)
    m["index"] = write_index(loc, m, cols)
    loc.write_bytes_atomic(MANIFEST, dump_manifest(m))
    parse_manifest(loc.read_bytes(MANIFEST), uri)
    built = time.perf_counter() - t0
    man = os.path.getsize(os.path.join(uri, MANIFEST))
    ix = tree_bytes(uri, ("_index",))
    o = child_open(uri)
    print(f"\n## a {n:,}-shard index (simulated: one real shard; built in {built:.1f} s)\n")
    print("| shards | manifest.json | index files | open | reader peak (open + rank 0/8 plan + 64 entries) | plan |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {n:,} | {man / 1024:.1f} KiB | {ix / 2**20:.1f} MiB in {len(m['index']['parts']) + 1} files | "
        f"{o['open_s'] * 1e3:.0f} ms | {o['peak'] / 2**20:.1f} MiB | {o['plan_s'] * 1e3:.0f} ms "
        f"({o['segments']:,} segments) |"
    )
    print(f"\nformat 2 would have listed them inline: ~{300 * n / 2**20:.0f} MiB of JSON parsed by every reader")
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--local", default="100,1000,10000,100000")
    ap.add_argument("--s3", default="100,1000,10000")
    ap.add_argument("--index", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=200, help="shards timed at each depth")
    a = ap.parse_args()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    print(f"# store scale ({time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs)")
    if a.index:
        index(a.index)
    if a.local:
        local(ints(a.local), a.window)
    if a.s3:
        s3(ints(a.s3), a.window)


if __name__ == "__main__":
    main()
