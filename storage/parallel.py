"""Row-parallel numpy for the writer's per-shard work (scale + cast, top-k, hashing).

numpy's ufuncs, partitions and hashlib release the GIL on large arrays, so a few threads
over row blocks use the cores a label run leaves idle while the next batch is on the
device. The pool is created lazily per process (never inherited across fork).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

MIN_ELEMENTS = 1 << 20  # below this, threads cost more than they save

_POOL: tuple[int, ThreadPoolExecutor] | None = None


def pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (
            os.getpid(),
            ThreadPoolExecutor(
                max_workers=max(1, min(4, os.cpu_count() or 1)), thread_name_prefix="distillery-storage"
            ),
        )
    return _POOL[1]


def for_row_blocks(fn: Callable[[int, int], object], n: int, elements: int) -> None:
    """Call fn(start, stop) over row blocks of [0, n), in parallel when the work is big."""
    workers = pool()._max_workers
    if elements < MIN_ELEMENTS or workers == 1 or n < 2:
        fn(0, n)
        return
    bounds = [n * i // workers for i in range(workers + 1)]
    for f in [pool().submit(fn, a, b) for a, b in zip(bounds, bounds[1:]) if b > a]:
        f.result()
