"""The input files of the table sources, streamed in record batches (pipeline/data/sources.py).

TableReader reads one Parquet file, one Arrow IPC file (file or stream format), or the arrow
files of a Hugging Face `save_to_disk` directory, batch by batch, never the whole table;
FolderReader walks an image folder (class sub-folders, or flat). Both say which files they read
(identity(): the cache key's view of the input) and yield at most BATCH_ROWS rows at a
time; pipeline/data/cache.py turns what they yield into the cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pyarrow as pa

BATCH_ROWS = 16384  # rows per streamed batch (and per cache record batch)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
KINDS = ("parquet", "arrow", "hf_disk", "image_folder")


# ---------------------------------------------------------------- small helpers


def few_values(values, n: int = 10) -> str:
    v = list(values)
    return str(v) if len(v) <= n else "[" + ", ".join(map(repr, v[: n - 1])) + f", ..., {v[-1]!r}]"


# ---------------------------------------------------------------- inputs: files streamed in batches


class TableReader:
    """A file-backed table streamed in record batches: one Parquet file, one Arrow IPC file
    (file or stream format), or the arrow files of a `datasets` save_to_disk directory."""

    def __init__(self, kind: str, path: str, split: str | None = None):
        self.kind, self.split = kind, split
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.hf_features: dict = {}
        if kind == "parquet":
            self._need_file()
            import pyarrow.parquet as pq

            try:
                self.schema = pq.ParquetFile(self.path).schema_arrow
            except (pa.ArrowInvalid, OSError) as e:
                raise ValueError(f"{self.path}: not a readable Parquet file ({e})") from None
            self.files, self.meta_files = [self.path], []
        elif kind == "arrow":
            self._need_file()
            self.files, self.meta_files = [self.path], []
            self.schema = self._arrow_schema(self.path)
        elif kind == "hf_disk":
            self._hf_files()
            self.schema = self._arrow_schema(self.files[0])
        else:
            raise ValueError(f"unknown table kind {kind!r}: expected one of {list(KINDS)}")
        self.where = self.path if split is None else f"{self.path} (split {split!r})"
        self.names = list(self.schema.names)

    def _need_file(self) -> None:
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"dataset file not found: {self.path}")
        if self.split is not None:
            raise ValueError(f"{self.path}: 'split' only applies to kind hf_disk (a DatasetDict directory)")

    def _hf_files(self) -> None:
        d = self.path
        if not os.path.isdir(d):
            raise FileNotFoundError(f"hf_disk: no such directory {d}")
        if os.path.isfile(os.path.join(d, "dataset_dict.json")):
            with open(os.path.join(d, "dataset_dict.json")) as f:
                splits = list(json.load(f).get("splits", []))
            if self.split is None:
                raise ValueError(f"{d} is a DatasetDict with splits {splits}: set `split:` to one of them")
            if self.split not in splits:
                raise ValueError(f"{d}: split {self.split!r} not found, splits are {splits}")
            d = os.path.join(d, self.split)
        elif self.split is not None:
            raise ValueError(f"{d} is a single Dataset (no dataset_dict.json): it has no split {self.split!r}")
        state = os.path.join(d, "state.json")
        if not os.path.isfile(state):
            raise ValueError(f"{d} is not a datasets save_to_disk directory (no state.json or dataset_dict.json)")
        with open(state) as f:
            st = json.load(f)
        self.files = [os.path.join(d, e["filename"]) for e in st.get("_data_files", [])]
        if not self.files:
            raise ValueError(f"{state} lists no data files")
        for p in self.files:
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{state} lists {os.path.basename(p)}, which is missing from {d}")
        self.meta_files = [state]
        info = os.path.join(d, "dataset_info.json")
        if os.path.isfile(info):
            self.meta_files.append(info)
            with open(info) as f:
                self.hf_features = json.load(f).get("features") or {}

    @staticmethod
    def _arrow_reader(path: str):
        f = pa.OSFile(path, "rb")  # read batch by batch into memory: no mapped pages left in RSS
        try:
            return pa.ipc.open_file(f), f
        except pa.ArrowInvalid:
            f.seek(0)
            try:
                return pa.ipc.open_stream(f), f
            except pa.ArrowInvalid as e:
                f.close()
                raise ValueError(f"{path}: not an Arrow IPC file or stream ({e})") from None

    def _arrow_schema(self, path: str) -> pa.Schema:
        reader, f = self._arrow_reader(path)
        try:
            return reader.schema
        finally:
            f.close()

    def identity(self) -> list:
        """[path, size, mtime_ns] of every file read: the cache key's view of the input."""
        out = []
        for p in self.files + self.meta_files:
            st = os.stat(p)
            out.append([p, st.st_size, st.st_mtime_ns])
        return out

    def batches(self, columns: list[str]) -> Iterator[pa.RecordBatch]:
        if self.kind == "parquet":
            import pyarrow.parquet as pq

            # buffered column reads, one row group at a time: iter_batches over the whole file
            # read ahead (measured: the pool grew with the file, 72 MB for 800k short texts)
            pf = pq.ParquetFile(self.path, buffer_size=1 << 22, pre_buffer=False)
            for g in range(pf.num_row_groups):
                yield from pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns, use_threads=False)
            return
        for path in self.files:
            reader, f = self._arrow_reader(path)
            try:
                if isinstance(reader, pa.ipc.RecordBatchFileReader):
                    it = (reader.get_batch(i) for i in range(reader.num_record_batches))
                else:
                    it = iter(reader)
                for b in it:
                    b = b.select(columns)
                    for a in range(0, b.num_rows, BATCH_ROWS):
                        yield b.slice(a, BATCH_ROWS)
            finally:
                f.close()

    def column(self, name: str | None, role: str) -> str | None:
        if name is not None and name not in self.names:
            raise ValueError(f"{role} {name!r} not found in {self.where}; columns are {self.names}")
        return name

    def type_of(self, name: str) -> pa.DataType:
        return self.schema.field(name).type


class FolderReader:
    """An image folder: one sub-folder per class (classes = sorted sub-folder names), or flat
    (unlabeled). Sorted walk; hidden entries skipped; other extensions skipped and counted."""

    def __init__(self, path: str, classes: list[str] | None):
        self.path = os.path.abspath(os.path.expanduser(os.fspath(path)))
        self.where = self.path
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"image folder not found: {self.path}")
        top = sorted(e for e in os.listdir(self.path) if not e.startswith("."))
        dirs = [e for e in top if os.path.isdir(os.path.join(self.path, e))]
        files = [e for e in top if os.path.isfile(os.path.join(self.path, e))]
        self.skipped = 0
        self.entries: list[tuple[str, int, int, int]] = []  # (relative path, label, size, mtime_ns)
        top_images = [e for e in files if e.lower().endswith(IMAGE_EXTENSIONS)]
        self.skipped += len(files) - len(top_images)
        if dirs:
            if top_images:
                raise ValueError(
                    f"{self.path}: holds both class sub-folders {few_values(dirs)} and image files at the "
                    f"top level {few_values(top_images)}; put every image in its class folder (or use a "
                    f"flat folder for an unlabeled set)"
                )
            if classes is not None:
                unknown = [d for d in dirs if d not in classes]
                if unknown:
                    raise ValueError(f"{self.path}: class folder(s) {few_values(unknown)} are not in classes {classes}")
            self.classes = list(classes) if classes is not None else dirs
            empty = []
            for d in dirs:
                n0 = len(self.entries)
                self._walk(d, self.classes.index(d))
                if len(self.entries) == n0:
                    empty.append(d)
            if empty and classes is None:
                raise ValueError(
                    f"{self.path}: class folder(s) {few_values(empty)} hold no image "
                    f"({', '.join(IMAGE_EXTENSIONS)}); remove them, or list the classes with "
                    f"`classes:` if they exist but have no sample here"
                )
            self.labeled = True
        else:
            if classes is not None:
                raise ValueError(
                    f"{self.path}: a flat image folder is unlabeled; `classes` needs one sub-folder per class"
                )
            self.classes = None
            for name in top_images:
                self._add(name, -1)
            self.labeled = False
        if not self.entries:
            raise ValueError(f"{self.path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found")

    def _add(self, rel: str, label: int) -> None:
        st = os.stat(os.path.join(self.path, rel))
        self.entries.append((rel, label, st.st_size, st.st_mtime_ns))

    def _walk(self, d: str, label: int) -> None:
        for root, subdirs, names in os.walk(os.path.join(self.path, d)):
            subdirs[:] = sorted(s for s in subdirs if not s.startswith("."))
            for name in sorted(names):
                if name.startswith("."):
                    continue
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    self.skipped += 1
                    continue
                rel = os.path.relpath(os.path.join(root, name), self.path).replace(os.sep, "/")
                self._add(rel, label)

    def identity(self) -> list:
        return [[rel, size, mtime] for rel, _, size, mtime in self.entries]

    def batches(self) -> Iterator[list[tuple[str, int, int, int]]]:
        """The entries, BATCH_ROWS at a time."""
        for a in range(0, len(self.entries), BATCH_ROWS):
            yield self.entries[a : a + BATCH_ROWS]
