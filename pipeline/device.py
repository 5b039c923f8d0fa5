"""Which torch device a stage runs on; one rule for training and labelling."""
from __future__ import annotations

import os

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
