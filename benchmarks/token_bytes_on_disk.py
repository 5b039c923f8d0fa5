"""Bytes per token ON DISK of token_topk shards (random labels: the incompressible case),
per column and in total, against storage.token_packing.bytes_per_token.

usage: python benchmarks/token_bytes_on_disk.py [--vocab 49152] [--k 32] [--seq-len 128] [--seqs 100]
"""

import argparse
import os
import sys
import tempfile

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from storage import SoftLabelWriter, open_soft_labels  # noqa: E402
from storage.token_packing import bytes_per_token, id_bits  # noqa: E402


def labels(n, V, k, rng):
    ids = np.argpartition(rng.random((n, V), np.float32), k, axis=1)[:, :k].astype(np.int64)  # k distinct ids
    z = rng.standard_normal((n, k)) * 2
    z[:, 0] += 4
    keep = rng.uniform(0.5, 0.999, n)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True) * keep[:, None]
    p = -np.sort(-p, axis=1)
    return ids, np.log(p).astype(np.float32), (1 - keep).astype(np.float32)


def du(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seqs", type=int, default=100)
    ap.add_argument("--compression", default="none", help="none | lz4 | zstd (of every column)")
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    n = a.seqs * a.seq_len
    ids, lp, mm = labels(n, a.vocab, a.k, rng)
    sid = np.repeat(np.arange(a.seqs), a.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in ("uint8", "float16", "bfloat16"):
            # stored label bytes: ids + values + a float16 missing mass (2 B)
            formula = bytes_per_token(k=a.k, id_bits=id_bits(a.vocab), value_dtype=dtype, tail=False) + 2
            for backend in ("parquet", "zarr"):
                uri = os.path.join(tmp, f"{dtype}-{backend}")
                with SoftLabelWriter(
                    uri,
                    backend=backend,
                    representation="token_topk",
                    vocab_size=a.vocab,
                    seq_len=a.seq_len,
                    k=a.k,
                    dtype=dtype,
                    tail_dtype="float16",
                    compression=a.compression,
                    teacher={"name": "bench", "fingerprint": "x"},
                    data={"name": "random", "split": "train", "fingerprint": "y", "transform": None},
                ) as w:
                    w.write_shard(0, sid, ids=ids, logprobs=lp, missing_mass=mm)
                ds = open_soft_labels(uri)
                m, path = ds.manifest, os.path.join(uri, ds.shards[0]["path"])
                total = du(path)
                per_col = {}
                if backend == "parquet":
                    md = pq.read_metadata(path)
                    for g in range(md.num_row_groups):
                        for j in range(md.num_columns):
                            c = md.row_group(g).column(j)
                            name = c.path_in_schema.split(".")[0]
                            per_col[name] = per_col.get(name, 0) + c.total_compressed_size
                else:
                    for name in m["columns"]:
                        per_col[name] = du(os.path.join(path, name))
                cols = " ".join(f"{k}={v / m['num_tokens']:.2f}" for k, v in per_col.items())
                print(
                    f"{backend:8s} values={dtype:8s} tokens={m['num_tokens']} shard={total} B "
                    f"-> {total / m['num_tokens']:.2f} B/token (formula {formula:g} + row columns) | {cols}"
                )


if __name__ == "__main__":
    main()
