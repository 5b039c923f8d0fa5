"""What a killed writer leaves inside a dataset is removed by the next finalize, or by the
next run that finds the dataset already finalized (issue #19): temp files of dead writers
(`_tmp/`, `*.tmp.HOST.PID.RAND` of commit records, manifests and index files) and shard
files no commit record names; a live writer's temp files are kept."""

import os
import socket
import subprocess
import sys

import numpy as np
from conftest import DATA, TEACHER

from storage import SoftLabelWriter, open_soft_labels, verify


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def leave_leftovers(uri: str, pid: int) -> list[str]:
    host = socket.gethostname()
    names = [
        f"_tmp/shard-00001.{host}.{pid}.deadbeef",
        f"_commits/shard-00001.json.tmp.{host}.{pid}.deadbeef",
        f"manifest.json.tmp.{host}.{pid}.deadbeef",
        f"_index/units-0123456789abcdef.parquet.tmp.{host}.{pid}.deadbeef",
        "data/shard-00001-0123456789abcdef.parquet",  # published, never committed
    ]
    for n in names:
        os.makedirs(os.path.dirname(os.path.join(uri, n)) or uri, exist_ok=True)
        with open(os.path.join(uri, n), "wb") as f:
            f.write(b"partial")
    return names


def writer(uri):
    return SoftLabelWriter(
        uri, backend="parquet", num_classes=4, temperature=2.0, teacher=TEACHER, data=DATA, num_shards=2, num_samples=20
    )


def test_finalize_and_a_later_run_remove_a_dead_writers_leftovers(tmp_path):
    uri = str(tmp_path / "ds")
    w = writer(uri)
    z = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    w.write_shard(0, np.arange(10), z[:10])
    w.write_shard(1, np.arange(10, 20), z[10:])
    dead = leave_leftovers(uri, dead_pid())
    live = f"_commits/shard-00000.json.tmp.{socket.gethostname()}.{os.getpid()}.cafecafe"
    open(os.path.join(uri, live), "wb").write(b"being written")
    w.finalize()
    assert not any(os.path.exists(os.path.join(uri, n)) for n in dead)
    assert os.path.exists(os.path.join(uri, live))  # its owner (this process) is alive
    os.unlink(os.path.join(uri, live))
    assert verify(uri).ok

    # killed after the final manifest: a re-run finds it finalized and still cleans up
    dead = leave_leftovers(uri, dead_pid())
    again = writer(uri)
    assert again.is_finalized_as_committed()
    removed = again.cleanup()
    assert sorted(removed) == sorted(dead)
    assert sorted(os.listdir(uri)) == ["_commits", "_index", "data", "manifest.json"]
    assert open_soft_labels(uri).num_batches(8) == 3
