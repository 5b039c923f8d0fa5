"""Model checkpoints: weights + how to rebuild them + where they came from.

A checkpoint is one torch.save'd dict, loadable with weights_only=True:
    {"format": "distillery.model", "version": 1,
     "arch": {"arch": "cnn", "kwargs": {...}},        # models.ModelSpec dict
     "in_shape": [1, 28, 28], "num_classes": 10,        # what build_model needs besides arch
     "state_dict": {...},
     "metadata": {"fingerprint": "sha256:...", "created_at": ..., "data": {...},
                  "metrics": {...}, ...}}               # JSON-serialisable

`fingerprint(state_dict)` is the teacher identity recorded in soft-label manifests: a
student trained months later can check (via `expect=`) that its labels came from
exactly these weights. It hashes tensor names, dtypes, shapes and bytes, so it is
independent of pickling details, file paths and the device the weights live on.

(Training-state checkpoints, with optimizer and RNG state for mid-run resume, are
written by pipeline/training/loop.py; this file is the durable artifact of a finished run.)

Trust: torch.load(weights_only=True) unpickles tensors and plain containers only, so
reading a checkpoint runs no code. Building its model can: an `arch` that is an import
path "pkg.mod:factory" would be imported and called. load_model therefore builds
built-in archs (models.ARCHS) from any file, but an import-path arch only when the
caller names it in `trusted_factories` (the factories of the user's own config) or
passes trust_code=True. `checkpoint_info` reads and verifies a checkpoint's metadata
without building anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import uuid
from collections.abc import Collection

import torch
import torch.nn as nn

from pipeline.models.registry import ModelSpec, build_model, check_factory_trusted
from storage import now_iso

FORMAT = "distillery.model"
VERSION = 1


def fingerprint(state_dict: dict) -> str:
    """ "sha256:<hex>" over the sorted entries' names, dtypes, shapes and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        v = state_dict[name]
        if torch.is_tensor(v):
            t = v.detach().cpu().contiguous()
            header = {"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
            h.update(json.dumps(header, sort_keys=True).encode() + b"\0")
            # view as bytes: works for every dtype, including bfloat16 / bool
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # rare non-tensor entries (get_extra_state): hash their JSON form
            h.update(json.dumps({"name": name, "value": v}, sort_keys=True, default=repr).encode() + b"\0")
    return "sha256:" + h.hexdigest()


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def atomic_torch_save(obj, path: str) -> None:
    """torch.save to a temp file in the same directory, fsync, then os.replace:
    a crash leaves the previous file or the new one, never half of one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(
    path: str,
    model: nn.Module,
    *,
    arch: dict | ModelSpec,
    in_shape: tuple[int, ...],
    num_classes: int,
    metadata: dict | None = None,
) -> dict:
    """Write model weights + arch + metadata atomically. Returns the metadata written
    (with "fingerprint" and "created_at" filled in)."""
    spec = arch if isinstance(arch, ModelSpec) else ModelSpec.from_dict(arch)
    state = {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}
    meta = dict(metadata or {})
    meta["fingerprint"] = fingerprint(state)
    meta.setdefault("created_at", now_iso())
    try:
        json.dumps(meta)
    except TypeError as e:
        raise ValueError(f"checkpoint metadata must be JSON-serialisable: {e}") from None
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "arch": spec.to_dict(),
        "in_shape": [int(s) for s in in_shape],
        "num_classes": int(num_classes),
        "state_dict": state,
        "metadata": meta,
    }
    atomic_torch_save(payload, path)
    return meta


def load_checkpoint(path: str, *, map_location: str | torch.device = "cpu") -> dict:
    """The raw checkpoint dict, checked for format and version."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except OSError:
        raise  # permissions, I/O: already name the file
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:  # a real pickle naming code: the classic checkpoint attack
            raise ValueError(
                f"{path}: refused: the file pickles {found.group(1)}, an object other than "
                f"tensors and plain containers, which a distillery checkpoint never holds "
                f"(torch.load weights_only=True)"
            ) from None
        raise ValueError(f"{path} is not a torch checkpoint file (unreadable pickle)") from None
    except Exception as e:  # torch raises RuntimeError/EOFError/... for a non-checkpoint file
        raise ValueError(
            f"{path} is not a torch checkpoint file (torch.load: {type(e).__name__}: {_first_line(e)})"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a distillery model checkpoint "
            f"(format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})"
        )
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: unsupported checkpoint version {payload.get('version')!r}, expected {VERSION}")
    missing = [k for k in ("arch", "in_shape", "num_classes", "state_dict", "metadata") if k not in payload]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return payload


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _verify(path: str, payload: dict) -> None:
    meta = payload["metadata"]
    if "fingerprint" in meta:
        found = fingerprint(payload["state_dict"])
        if found != meta["fingerprint"]:
            raise ValueError(
                f"{path}: weights fingerprint {found} does not match the recorded "
                f"{meta['fingerprint']} (file modified or corrupt)"
            )


def _info(payload: dict) -> dict:
    meta = dict(payload["metadata"])
    meta.update(arch=payload["arch"], in_shape=list(payload["in_shape"]), num_classes=payload["num_classes"])
    return meta


def checkpoint_info(path: str, *, verify: bool = True) -> dict:
    """The metadata load_model returns (arch, in_shape, num_classes included), without
    building the model: no factory is imported, whatever the file names."""
    path = os.fspath(path)
    payload = load_checkpoint(path)
    if verify:
        _verify(path, payload)
    return _info(payload)


def load_model(
    path: str,
    *,
    map_location: str | torch.device = "cpu",
    verify: bool = True,
    trusted_factories: Collection[str] = (),
    trust_code: bool = False,
) -> tuple[nn.Module, dict]:
    """Rebuild the model with build_model and load its weights. Returns (model in eval
    mode, metadata). verify=True re-computes the fingerprint and refuses a mismatch.

    A built-in arch loads from any file. An import-path arch ("pkg.mod:factory") is code
    the file names: it is built only if it is in trusted_factories (pass the factories
    your own config names) or trust_code=True, and refused before any import otherwise."""
    path = os.fspath(path)
    payload = load_checkpoint(path, map_location=map_location)
    spec = ModelSpec.from_dict(payload["arch"])
    trusted = None if trust_code else frozenset(trusted_factories)
    check_factory_trusted(spec.arch, trusted, source=f"checkpoint {path}")
    model = build_model(
        spec, in_shape=tuple(payload["in_shape"]), num_classes=payload["num_classes"], trusted_factories=trusted
    )
    model.load_state_dict(payload["state_dict"])
    if verify:
        _verify(path, payload)
    return model.eval(), _info(payload)
