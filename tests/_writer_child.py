"""Run as a subprocess by the resume/concurrency tests: write a toy dataset, optionally
SIGKILL-ing ourselves in the middle of one shard.

usage: python _writer_child.py URI BACKEND KILL_AT_SHARD KILL_MODE [SHARDS...]
  KILL_MODE: none | mid-write (half of a file written) | before-commit (published, not committed)
"""

import os
import signal
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from conftest import DATA, TEACHER, toy_logits  # noqa: E402

import storage.shards as shards  # noqa: E402
from storage import SoftLabelWriter  # noqa: E402

N, C, NSHARDS = 400, 12, 5


def main():
    uri, backend, kill_at, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    only = [int(a) for a in sys.argv[5:]] or list(range(NSHARDS))
    state = {"shard": None}
    if mode == "mid-write":
        real = shards._write_file

        def half_then_die(path, data):
            if state["shard"] == kill_at:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                data = b"".join(data)  # a list of buffers
                with open(path, "wb") as f:
                    f.write(data[: len(data) // 2])
                    f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            real(path, data)

        shards._write_file = half_then_die
    elif mode == "before-commit":
        real_commit = shards.write_commit

        def die_before_commit(loc, record, *args, **kwargs):
            if state["shard"] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_commit(loc, record, *args, **kwargs)  # the writer keeps what was written

        shards.write_commit = die_before_commit
        import storage.writer as writer

        writer.write_commit = die_before_commit

    z = toy_logits(N, C, seed=7)
    bounds = np.linspace(0, N, NSHARDS + 1).astype(int)
    w = SoftLabelWriter(
        uri, backend=backend, num_classes=C, temperature=2.0, teacher=TEACHER, data=DATA, num_shards=NSHARDS
    )
    for i in w.pending(only):
        state["shard"] = i
        w.write_shard(i, np.arange(bounds[i], bounds[i + 1]), z[bounds[i] : bounds[i + 1]])
    if len(w.committed_shards()) == NSHARDS:
        w.finalize()
    print("committed", w.committed_shards(), flush=True)


if __name__ == "__main__":
    main()
