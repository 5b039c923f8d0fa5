"""Where a dataset lives: a local path or any fsspec URL, opened lazily per process.

Why lazily: DataLoader workers are forked, and an s3fs/aiohttp client inherited
across fork is broken. `Location.fs` re-creates the filesystem whenever the
process id changes, so a dataset object can be pickled or forked freely.

Why two publish paths: a local rename is atomic; on object stores a single PUT
of the complete object is atomic (a multipart upload too: the object appears
only on completion). Either way a reader never sees half an object.
"""

from __future__ import annotations

import os
import posixpath
import socket
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs


class Location:
    """A dataset root: `uri` plus `storage_options` (e.g. {"endpoint_url": ..., "key": ..., "secret": ...})."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        if not isinstance(uri, str) or not uri:
            raise ValueError(f"dataset URI must be a non-empty string, got {uri!r}")
        self.storage_options = dict(storage_options or {})
        self.is_local = "://" not in uri or uri.startswith("file://")
        if self.is_local:
            path = uri[len("file://") :] if uri.startswith("file://") else uri
            self.uri = os.path.abspath(os.path.expanduser(path))
            self.root = self.uri
        else:
            self.uri = uri.rstrip("/")
            self.root = None  # resolved with the filesystem
        self._fs: fsspec.AbstractFileSystem | None = None
        self._pid: int | None = None

    # pickling drops the live filesystem; it is re-opened on first use
    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fs"], state["_pid"] = None, None
        return state

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._fs is None or self._pid != os.getpid():
            if self.is_local:
                self._fs = fsspec.filesystem("file")
            else:
                # skip_instance_cache: never reuse a client created before a fork
                self._fs, root = url_to_fs(self.uri, skip_instance_cache=True, **self.storage_options)
                self.root = root.rstrip("/")
            self._pid = os.getpid()
        return self._fs

    def path(self, rel: str = "") -> str:
        """Path of `rel` inside the dataset, as the filesystem wants it."""
        _ = self.fs  # resolves self.root for remote URIs
        return posixpath.join(self.root, rel) if rel else self.root

    def url(self, rel: str = "") -> str:
        """Full URL (for zarr's FsspecStore) or local path of `rel`."""
        if self.is_local:
            return os.path.join(self.uri, rel) if rel else self.uri
        return f"{self.uri}/{rel}" if rel else self.uri

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def write_bytes_atomic(self, rel: str, data: bytes) -> None:
        """Publish `data` at `rel` so that readers see either nothing/the old object or all of it."""
        if self.is_local:
            final = self.path(rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = f"{final}.{temp_name('tmp')}"  # names its owner: finalize removes a dead writer's
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            self.fs.pipe_file(self.path(rel), data)

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) directly under `rel`; [] if it does not exist."""
        try:
            entries = (
                self.fs.ls(self.path(rel), detail=False, refresh=True)
                if not self.is_local
                else self.fs.ls(self.path(rel), detail=False)
            )
        except FileNotFoundError:
            return []
        return sorted(posixpath.basename(e.rstrip("/")) for e in entries)

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        try:
            self.fs.rm(p, recursive=True)
        except FileNotFoundError:
            pass

    def __repr__(self) -> str:
        return f"Location({self.uri!r})"


def temp_name(base: str) -> str:
    """`base.HOST.PID.RANDOM`: finalize() can tell a dead writer's leftovers from a live one's."""
    return f"{base}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"


def temp_owner_alive(name: str) -> bool | None:
    """True/False for a temp file made by a process on this host; None when unknown."""
    parts = name.rsplit(".", 3)
    if len(parts) != 4 or parts[1] != socket.gethostname() or not parts[2].isdigit():
        return None
    try:
        os.kill(int(parts[2]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_temp(name: str) -> bool:
    """A temp file of write_bytes_atomic or publish (`….tmp.HOST.PID.RAND`, `_tmp/…`)."""
    return ".tmp." in name
