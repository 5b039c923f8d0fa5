"""Small shared helpers with one owner each: where distillery's caches live, a file's
sha256, an array saved atomically, and importing an object named `package.module:attr` (model factories and view
functions: both are code the user's config names)."""

from __future__ import annotations

import hashlib
import importlib
import os

_HASHES: dict[tuple, str] = {}


def cache_root(kind: str, cache_dir=None) -> str:
    """Where caches of `kind` ("sources", "models", "corpus") live: cache_dir if given,
    else $DISTILLERY_CACHE/<kind>, else ~/.cache/distillery/<kind>."""
    if cache_dir is not None:
        return os.path.abspath(os.path.expanduser(os.fspath(cache_dir)))
    base = os.environ.get("DISTILLERY_CACHE") or os.path.join("~", ".cache", "distillery")
    return os.path.join(os.path.abspath(os.path.expanduser(base)), kind)


def file_sha256(path) -> str:
    """sha256 hex of a file, read in 4 MiB blocks, memoised per process by (path, size, mtime)."""
    path = os.fspath(path)
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def absolute_if_exists(p):
    """A local path that exists, made absolute (`~` expanded); anything else (a dataset name,
    a `pkg:` path, None) unchanged. For what a manifest records: a path relative to the
    labelling run's working directory means nothing to a reader elsewhere."""
    if isinstance(p, str) and not p.startswith("pkg:") and os.path.exists(os.path.expanduser(p)):
        return os.path.abspath(os.path.expanduser(p))
    return p


def import_object(path: str, *, what: str, noun: str):
    """The callable named by `path` ("package.module:attr", attr may be dotted). Errors are
    ValueErrors naming `what` (e.g. "model arch", "view function") and the path."""
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise ValueError(f"{what} import path must look like 'package.module:{noun}', found {path!r}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ValueError(f"{what} {path!r}: cannot import module {mod_name!r}: {e}") from e
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{what} {path!r}: module {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{what} {path!r}: {attr!r} is not callable")
    return obj


def save_npy_atomic(path: str, a) -> None:
    """np.save to a temporary name beside `path`, then os.replace: a killed write leaves no
    file at `path` (caches check for their files before opening them)."""
    import tempfile

    import numpy as np

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".part-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, a)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
