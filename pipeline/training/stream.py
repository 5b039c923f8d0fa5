"""Training batches: stored soft labels joined to their inputs, and plain hard-label batches.

StoredLabelStream streams a soft-label dataset (storage/) for this (rank, worker)
partition, joins every row to its input by sample_id, and regenerates the exact view
pixels the teacher saw (pipeline/views/images.py). Use it as

    stream = StoredLabelStream(uri, inputs, spec, batch_size=256, rank=r, world_size=w)
    loader = DataLoader(stream, batch_size=None, num_workers=4, persistent_workers=True)
    for epoch in range(E):
        stream.set_epoch(epoch)          # reaches persistent workers (shared memory)
        for batch in loader: ...

Every batch is a dict of tensors, B rows:
    x (B, ...) float32, y (B,) int64 (-1 unlabeled), sample_id (B,) int64, view (B,) int64,
    weight (B,) float32 (0 for pad rows: repeats that only keep ranks in lock-step),
  dense labels:  stored_logits (B, C) float32 = z/T exactly as stored (stream.temperature = T)
  more teachers: extra_stored_logits (K, B, C) float32, each z_k/T_k as stored
                 (stream.extra_temperatures = [T_1, ..., T_K])
  top-k labels:  topk_indices (B, k) int64, topk_logits (B, k) float32 (= z/T, as stored),
                 logsumexp (B,) float32 (of all C scaled logits)
  with a stored feature: teacher_feature (B, F) float32

Only stored data: no temperature math here. The student's temperature T' is applied in
one place, pipeline/objectives/objective.py (`rescale`: z/T' = s·T/T').

HardLabelBatches yields the same keys minus the teacher fields, from an in-memory
ArrayDataset, with the same rank split and padding rule as storage/partition.py.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage import SoftLabelDataset, open_soft_labels
from storage import Location, batches_per_partition

from pipeline.data.datasets import Source, model_inputs
from pipeline.views.transforms import transform_from_dict

# The label join handles up to this many bytes of label tensors per call (k whole batches,
# k <= MAX_JOIN_BATCHES): small batches amortize its per-call cost; many classes still go
# one batch at a time.
JOIN_CHUNK_BYTES = 4 << 20
MAX_JOIN_BATCHES = 16


def _check_rank(rank: int, world_size: int, batch_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size!r}), got rank={rank!r}")


def _resolve_views(view_spec, manifest: dict, uri: str):
    """The view transform to regenerate. pipeline/labelling/classify.py records data.transform =
    transform.to_dict(): a given transform must equal it; with none given, the stored one
    is rebuilt (pipeline/views/transforms.py; a user function is imported by its path)."""
    stored = (manifest.get("data") or {}).get("transform")
    if not isinstance(stored, dict):
        return view_spec
    if view_spec is not None:
        if view_spec.to_dict() != stored:
            raise ValueError(f"view transform {view_spec.to_dict()} differs from the transform the soft labels at {uri} "
                             f"were made with ({stored}); views would not match their labels")
        return view_spec
    try:
        return transform_from_dict(stored)
    except (TypeError, ValueError) as e:
        raise ValueError(f"soft labels at {uri}: cannot rebuild their view transform {stored}: {e}") from None


def _labels(inputs: Source, pos: np.ndarray) -> torch.Tensor:
    if inputs.y is None:
        return torch.full((len(pos),), -1, dtype=torch.int64)
    return torch.from_numpy(inputs.y[pos])


class StoredLabelStream(IterableDataset):
    def __init__(self, soft_label_uri: str, inputs: Source, view_spec=None, *,
                 batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1,
                 storage_options: dict | None = None, expect: dict | None = None,
                 extra_soft_labels: list[str] | None = None):
        """extra_soft_labels: more teachers' dense soft labels for the SAME inputs and views
        (multi-teacher KD); each row of the primary dataset is joined to theirs by
        (sample_id, view) and batches gain `extra_stored_logits` (K, B, C), as stored."""
        _check_rank(rank, world_size, batch_size)
        # In a DataLoader worker, yield numpy arrays instead of tensors (the loader then needs
        # collate_fn=keep_batch, and the consumer wraps them with torch.as_tensor). A tensor
        # crosses the process boundary as a shared-memory fd, one socket round trip per tensor:
        # measured ~4x slower than pickling the arrays of a 128-row MNIST batch.
        self.worker_numpy = False
        self.uri, self.inputs = soft_label_uri, inputs
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.storage_options = storage_options
        # Read and check the manifest here, in the main process, so that a wrong URI or
        # mismatched teacher fails before any worker starts. Only the manifest dict is
        # kept: workers open their own dataset (and filesystem) after fork.
        self.manifest = open_soft_labels(soft_label_uri, expect=expect, storage_options=storage_options).manifest
        m = self.manifest
        self.temperature = float(m["temperature"])
        self.num_classes = int(m["num_classes"])
        self.num_views = int(m["num_views"])
        self.kind = m["representation"]["kind"]
        if inputs.num_classes is not None and inputs.num_classes not in (0, self.num_classes):
            raise ValueError(f"inputs {inputs.name!r} have num_classes={inputs.num_classes} but the soft labels "
                             f"at {self.uri} have num_classes={self.num_classes}")
        self.view_spec = view_spec = _resolve_views(view_spec, m, self.uri)
        if self.num_views > 1 and view_spec is None:
            raise ValueError(f"soft labels at {self.uri} hold {self.num_views} views per sample; pass the "
                             f"ViewSpec they were labelled with (view_spec=None only works for 1 view)")
        self.extra_uris = list(extra_soft_labels or [])
        self.extra_manifests = [self._check_extra(u) for u in self.extra_uris]
        self.extra_temperatures = [float(m["temperature"]) for m in self.extra_manifests]
        self._extra_ds: list[SoftLabelDataset] | None = None
        # shared memory, so persistent workers see set_epoch(); a RawValue has no lock, so it can
        # go to workers of any start method (one writer: the main process)
        self._epoch = mp.RawValue("q", 0)
        self._ds: SoftLabelDataset | None = None
        self._ds_pid: int | None = None

    def __getstate__(self) -> dict:
        # opened datasets (files, S3 clients) stay in the process that opened them: a worker
        # started after in-process iteration opens its own
        return self.__dict__ | {"_ds": None, "_extra_ds": None, "_ds_pid": None}

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this rank yields per epoch through a DataLoader with `num_workers`
        (0 = in the main process, one partition)."""
        parts = max(int(num_workers), 1)
        return parts * batches_per_partition(int(self.manifest["num_rows"]), self.world_size * parts,
                                             self.batch_size, False)

    def _check_extra(self, uri: str) -> dict:
        m = open_soft_labels(uri, storage_options=self.storage_options).manifest
        me = self.manifest
        if m["representation"]["kind"] != "dense" or self.kind != "dense":
            raise ValueError(f"multi-teacher KD needs dense soft labels; {uri} or {self.uri} is top-k")
        for field in ("num_classes", "num_views"):
            if m[field] != me[field]:
                raise ValueError(f"soft labels at {uri} have {field}={m[field]}, but {self.uri} has {me[field]}")
        for field in ("fingerprint", "transform"):
            if m["data"].get(field) != me["data"].get(field):
                raise ValueError(f"soft labels at {uri} were made from other inputs (data.{field} "
                                 f"{m['data'].get(field)!r} vs {me['data'].get(field)!r} at {self.uri})")
        return m

    def _dataset(self) -> SoftLabelDataset:
        # opened lazily, once per process: after fork each worker gets its own filesystem
        if self._ds is None or self._ds_pid != os.getpid():
            self._ds = SoftLabelDataset(Location(self.uri, self.storage_options), self.manifest)
            self._extra_ds = [SoftLabelDataset(Location(u, self.storage_options), m)
                              for u, m in zip(self.extra_uris, self.extra_manifests)]
            self._ds_pid = os.getpid()
        return self._ds

    def join_batches(self) -> int:
        """Batches whose labels are joined per storage read: the label join's fixed per-call
        cost (id lookup, dtype conversions, tensor wrapping) is paid once per
        chunk of up to JOIN_CHUNK_BYTES of label tensors; inputs are still gathered per batch
        (they stay in cache for the forward pass). Rows and order: exactly iter_batches(B)'s."""
        stored = int(self.manifest.get("layout", {}).get("row_bytes") or 2 * self.num_classes)  # one stored row
        extra = len(self.extra_uris)                                   # (B, C) fp32 tensors more
        label_bytes = 2 * stored + 4 * self.num_classes * extra  # float16 -> float32 doubles the stored bytes
        return int(min(MAX_JOIN_BATCHES, max(1, JOIN_CHUNK_BYTES // (label_bytes * self.batch_size))))

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        ds = self._dataset()
        to_numpy = self.worker_numpy and info is not None
        B, k = self.batch_size, self.join_batches()
        # chunks of k whole batches from the same row stream (same shuffle window as batches
        # of B), so cutting them at multiples of B gives exactly iter_batches(B)'s batches
        for chunk in ds.iter_batches(B * k, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                                     rank=self.rank, world_size=self.world_size, worker=worker,
                                     num_workers=num_workers, shuffle_buffer=ds.default_shuffle_buffer(B)):
            labels, pos = self.join_labels(chunk)
            # views of the chunk's tensors, (B, ...) each; extra_stored_logits is (K, B, C)
            parts = {key: torch.split(v, B, dim=1 if key == "extra_stored_logits" else 0)
                     for key, v in labels.items()}
            for i, a in enumerate(range(0, len(pos), B)):
                batch = {key: v[i] for key, v in parts.items()}
                batch["x"] = self.inputs_of(pos[a:a + B], batch["sample_id"].numpy(), batch["view"].numpy())
                yield {key: v.numpy() for key, v in batch.items()} if to_numpy else batch

    def inputs_of(self, pos: np.ndarray, sid: np.ndarray, view: np.ndarray) -> torch.Tensor:
        """The input rows at positions `pos`, as the views (sample_id, view) name: (B, ...)."""
        if self.view_spec is None and view.any():
            raise ValueError(f"soft labels at {self.uri} contain view {int(view.max())} but view_spec is None")
        return model_inputs(self.inputs, pos, view, self.view_spec)  # view 0 stays the identity

    def join_labels(self, b: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Storage rows -> every batch field but x, and the rows' positions in the inputs."""
        sid = np.array(b["sample_id"], dtype=np.int64)          # (B,)
        view = np.array(b["view"], dtype=np.int64)              # (B,)
        pos = self.inputs.index_of(sid)                         # ValueError names missing ids
        out = {"y": _labels(self.inputs, pos), "sample_id": torch.from_numpy(sid),
               "view": torch.from_numpy(view),
               "weight": torch.from_numpy((~np.asarray(b["pad"], bool)).astype(np.float32))}
        if self.kind == "dense":                                # stored s = z / T, as stored
            out["stored_logits"] = torch.from_numpy(np.array(b["logits"], dtype=np.float32))  # (B, C), a new array
        else:
            out["topk_indices"] = torch.from_numpy(np.asarray(b["topk_indices"]).astype(np.int64))
            out["topk_logits"] = torch.from_numpy(np.array(b["topk_logits"], dtype=np.float32))
            out["logsumexp"] = torch.from_numpy(np.array(b["logsumexp"], dtype=np.float32))
        if self.extra_uris:  # other teachers' logits for the same (sample_id, view) rows
            self._dataset()
            out["extra_stored_logits"] = torch.from_numpy(np.stack([
                np.asarray(ds.take(sid, view, columns=["logits"])["logits"], np.float32)
                for ds in self._extra_ds]))                              # (K, B, C) z_k / T_k
        if "feature" in b:  # the teacher's stored intermediate feature, (B, F), for hint/RKD losses
            out["teacher_feature"] = torch.from_numpy(np.array(b["feature"], dtype=np.float32))
        return out, pos


def keep_batch(batch):
    """DataLoader collate_fn that passes a worker's batch on unchanged (numpy stays numpy)."""
    return batch


class HardLabelBatches:
    """Batches from a Source for hard-label training (baseline, teacher).

    Each epoch: rows are permuted by rng(seed, epoch) (the same order on every rank);
    rank r takes positions [r*M, (r+1)*M) of that order, M = ceil(N / world_size),
    wrapping around with pad rows (weight 0) so every rank yields ceil(M / batch_size)
    batches. With a view_spec, each row gets a view id drawn from rng(seed, epoch):
    uniform in [0, num_views) if num_views is given (e.g. the teacher's stored views),
    otherwise a fresh id in [1, 2**31) so every epoch sees new augmentations.
    """

    def __init__(self, data: Source, *, batch_size: int, view_spec=None,
                 num_views: int | None = None, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1):
        _check_rank(rank, world_size, batch_size)
        if len(data) == 0:
            raise ValueError(f"dataset {data.name!r} is empty")
        if num_views is not None and (not isinstance(num_views, int) or num_views < 1):
            raise ValueError(f"num_views must be a positive int or None, got {num_views!r}")
        self.data, self.view_spec, self.num_views = data, view_spec, num_views
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def num_batches(self, num_workers: int = 0) -> int:
        return math.ceil(math.ceil(len(self.data) / self.world_size) / self.batch_size)

    def __len__(self) -> int:
        return self.num_batches()

    def __iter__(self):
        n = len(self.data)
        rng = np.random.default_rng([self.seed, self.epoch, 0xBA7C4])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.view_spec is None:
            views = np.zeros(n, np.int64)
        elif self.num_views is not None:
            views = rng.integers(0, self.num_views, n)
        else:
            views = rng.integers(1, 2**31, n)
        views = views[order]  # views[i] belongs to the row at order[i]; drawn for all ranks alike
        m = math.ceil(n / self.world_size)
        gpos = np.arange(self.rank * m, (self.rank + 1) * m)    # positions in the epoch order
        pad = gpos >= n
        pos, vws = order[gpos % n], views[gpos % n]
        for a in range(0, m, self.batch_size):
            p, v = pos[a:a + self.batch_size], vws[a:a + self.batch_size]
            sid = self.data.sample_ids[p]
            x = model_inputs(self.data, p, v if self.view_spec is not None else np.zeros_like(v), self.view_spec)
            yield {"x": x, "y": _labels(self.data, p), "sample_id": torch.from_numpy(sid),
                   "view": torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64)),
                   "weight": torch.from_numpy((~pad[a:a + self.batch_size]).astype(np.float32))}
