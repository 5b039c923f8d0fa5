"""Which torch device a stage runs on; one rule for training and labelling."""
from __future__ import annotations

import contextlib
import os
import threading

import torch
import torch.distributed as dist


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA if available, else CPU. "cuda" -> this process's GPU (LOCAL_RANK under
    torchrun/DDP, else the current device). "cpu" and "cuda:N" are taken as given."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for CUDA but no CUDA device is available")
        if dev.index is None:
            ddp = dist.is_available() and dist.is_initialized()
            dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) if ddp else torch.cuda.current_device())
    return dev


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_SAVED = 0


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Pin torch's intra-op thread count to `n` for the block (None: leave it).

    Parallel sweeps run several students in threads of one process. torch's thread count is
    process-wide, and CPU kernels split reductions by it, so results depend on it; fixing it
    for the whole sweep makes every student bit-reproducible, and cores // students threads
    each avoids oversubscribing the cores (OpenMP threads spin). Nested users share the
    setting; the previous count comes back when the last one leaves."""
    global _THREADS_USERS, _THREADS_SAVED
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"torch threads must be >= 1, got {n}")
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_SAVED = torch.get_num_threads()
        torch.set_num_threads(n)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                torch.set_num_threads(_THREADS_SAVED)


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS says)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
