"""Which torch device a stage runs on; one rule for training and labelling."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import warnings

import torch
import torch.distributed as dist


def resolve_device(device: str) -> torch.device:
    """ "auto" -> CUDA if available, else CPU. "cuda" -> this process's GPU (LOCAL_RANK under
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


_ALLOCATOR_TUNED = False


def keep_large_blocks() -> bool:
    """Let glibc's malloc keep large freed blocks for reuse instead of unmapping them.

    Language-model steps allocate and free logits of batch x length x vocabulary floats
    (8 x 128 x 49,152 fp32 = 200 MB) several times per step. By default glibc serves each
    block over its mmap threshold (128 KB, adapting up to 32 MB) with a fresh mmap and
    returns it on free, so every step page-faults and zeroes hundreds of MB in the
    kernel: measured on 2 cores, a 2-layer
    student's CE step ran at 1,591 tokens/s with 4.1 s of system time per 8 steps, and at
    2,770 tokens/s with 0.8 s after this call (M_MMAP_THRESHOLD 1 GiB, M_TRIM_THRESHOLD 2
    GiB: blocks come from the heap and stay there). Peak memory is unchanged; freed memory
    is kept by the process. Once per process; a no-op off glibc, or when
    DISTILLERY_MALLOC_TUNING=0. Returns whether the setting is in effect."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if os.environ.get("DISTILLERY_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1 and libc.mallopt(m_trim_threshold, (1 << 31) - 1) == 1
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = ok
    return ok


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str | None, dev: torch.device) -> str | None:
    """Validate `amp`; it only applies on CUDA (warn and drop it elsewhere)."""
    if amp not in (None, *AMP_DTYPES):
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)} or None, got {amp!r}")
    if amp and dev.type != "cuda":
        warnings.warn(f"amp={amp!r} is only used on CUDA; labelling on {dev} in float32", stacklevel=3)
        return None
    return amp
