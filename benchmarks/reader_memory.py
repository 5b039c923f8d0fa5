"""Peak memory of shuffled streaming vs the reader's shuffle budget (issue #12).

Writes a dataset of --mib MiB of dense float16 logits, then streams one shuffled epoch in
a fresh subprocess and reports its peak RSS above the RSS it had right after opening the
dataset (imports, manifest), next to SHUFFLE_BUDGET_BYTES. Unshuffled streaming is
measured the same way for reference.

    python benchmarks/reader_memory.py [--mib 382] [--classes 1000] [--backend parquet]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# VmHWM (this address space's peak), not ru_maxrss: ru_maxrss survives exec, so a child
# would report its parent's peak.
CHILD = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from storage import open_soft_labels
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key))
ds = open_soft_labels(sys.argv[2])
base = status("VmRSS")
rows = 0
for b in ds.iter_batches(int(sys.argv[3]), shuffle=sys.argv[4] == "1", seed=0):
    rows += len(b["sample_id"])
print(json.dumps({"base": base, "peak": status("VmHWM"), "rows": rows}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=382)
    ap.add_argument("--classes", type=int, default=1000)
    ap.add_argument("--backend", default="parquet", choices=["parquet", "zarr"])
    ap.add_argument("--batch-size", type=int, default=256)
    a = ap.parse_args()
    from storage import SoftLabelWriter, open_soft_labels
    from storage.reader import SHUFFLE_BUDGET_BYTES, TRANSIENT_BLOCKS, stream_memory_bound

    root = tempfile.mkdtemp(prefix="distillery-mem-")
    uri = os.path.join(root, "ds")
    n = a.mib * 2**20 // (2 * a.classes)
    rng = np.random.default_rng(0)
    with SoftLabelWriter(
        uri,
        backend=a.backend,
        num_classes=a.classes,
        temperature=2.0,
        teacher={"name": "t", "fingerprint": "t"},
        data={"name": "d", "split": "s", "fingerprint": "d", "transform": None},
    ) as w:
        step = 20_000
        for i, s in enumerate(range(0, n, step)):
            e = min(n, s + step)
            w.write_shard(i, np.arange(s, e), rng.standard_normal((e - s, a.classes), dtype=np.float32))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(uri, "data")) for f in fs)
    print(
        f"{a.backend}: {n:,} rows x {a.classes} classes float16, {size / 2**20:.0f} MiB on disk; "
        f"shuffle budget {SHUFFLE_BUDGET_BYTES / 2**20:.0f} MiB; batch {a.batch_size}"
    )
    ds = open_soft_labels(uri)
    block = ds.index.max_rows_per_block * ds.manifest["layout"]["row_bytes"]
    bound = stream_memory_bound(block)
    print(
        f"  documented bound: {bound / 2**20:.0f} MiB (budget - 3 blocks of {block / 2**20:.1f} MiB "
        f"+ {TRANSIENT_BLOCKS} in flight)"
    )
    for shuffle in (True, False):
        out = subprocess.run(
            [sys.executable, "-c", CHILD, ROOT, uri, str(a.batch_size), "1" if shuffle else "0"],
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout)
        assert r["rows"] == n
        extra = (r["peak"] - r["base"]) / 2**20
        print(
            f"  {'shuffled  ' if shuffle else 'in order  '} peak RSS {r['peak'] / 2**20:7.0f} MiB, "
            f"{extra:6.0f} MiB above the opened dataset ({extra / (SHUFFLE_BUDGET_BYTES / 2**20):.2f}x the budget, "
            f"{extra / (bound / 2**20):.2f}x the bound: {'PASS' if extra * 2**20 <= bound else 'FAIL'})"
        )
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
