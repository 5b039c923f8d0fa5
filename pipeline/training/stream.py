"""Stored labels joined to their inputs: one stream for every label layout.

    stream = open_label_stream(uri, inputs, transform, batch_size=256, rank=r, world_size=w)
    loader = DataLoader(stream, batch_size=None, num_workers=4, persistent_workers=True)
    for epoch in range(E):
        stream.set_epoch(epoch)          # reaches persistent workers (shared memory)
        for batch in loader: ...

The base (LabelStream) owns what every layout shares: the manifest is read and checked in
the main process (a wrong URI or teacher fails before any worker starts), the epoch lives
in shared memory, each process (DataLoader worker) opens its own dataset, and rows are
split by rank x worker, every stored row (or sequence) a non-pad row exactly once per
epoch over all ranks. A layout adds how its rows are read and joined (small subclasses):

  RowStream (dense, topk: one row per (sample, view))
    the task's batch of the inputs by sample id, views regenerated exactly as the teacher
    saw them (x, y), and
    dense:   stored_logits (B, C) float32 = z/T exactly as stored (stream.temperature = T)
             more teachers: extra_stored_logits (K, B, C) (stream.extra_temperatures)
    topk:    topk_ids (B, k) int64, topk_logprobs (B, k) float32 = stored z/T minus the
             stored logsumexp: the teacher's log-probs at T over all C classes
    a stored feature: teacher_feature (B, F) float32
  SequenceStream (token_topk, token_sampled: one sequence of 1..L tokens per window)
    the corpus windows by sample id (x, y, mask: the task's batch, cut to the longest), and
    token_topk:    topk_ids (B, Lb, k) int64, topk_logprobs (B, Lb, k) float32 (log p at
                   T = 1 over the vocabulary), missing_mass (B, Lb) float32
    token_sampled: sample_ids (B, Lb, s) int64, sample_counts (B, Lb, s) int32 (0 = padding)

Every batch also has sample_id (B,) int64, view (B,) int64 and weight (B,) float32 (0 for
pad rows: repeats that only keep ranks in lock-step). No temperature math here: the
student's T' meets the stored T in one place, pipeline/objectives.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.tasks import task_of
from pipeline.training.batches import check_rank
from pipeline.views.transforms import transform_from_dict
from storage import Location, SoftLabelDataset, batches_per_partition, open_soft_labels

if TYPE_CHECKING:
    from pipeline.data.corpus import TokenCorpus
    from pipeline.data.datasets import Source
    from pipeline.views.base import Transform

# The row join handles up to this many bytes of label tensors per call (k whole batches,
# k <= MAX_JOIN_BATCHES): small batches amortize its per-call cost; many classes still go
# one batch at a time.
JOIN_CHUNK_BYTES = 4 << 20
MAX_JOIN_BATCHES = 16
TOKEN_KINDS = ("token_topk", "token_sampled")


def open_label_stream(uri: str, inputs: Any, transform: Transform | None = None, **kw: Any) -> LabelStream:
    """The stream for the labels at `uri`, by their layout (RowStream or SequenceStream);
    keyword arguments as LabelStream's."""
    manifest = open_soft_labels(
        uri, expect=kw.get("expect"), storage_options=kw.get("storage_options"), verifier=verifier(kw.get("public_key"))
    ).manifest
    cls = SequenceStream if manifest["representation"]["kind"] in TOKEN_KINDS else RowStream
    if getattr(inputs, "aligned_to", None) is not None:  # a student with its own tokenizer
        cls = ALIGNED_STREAM[0]
    return cls(uri, inputs, transform, manifest=manifest, **kw)


# the stream of windows aligned to another tokenization's (pipeline/data/alignment.py): set by
# training/cross_stream.py, which the package imports (it builds on this module's classes)
ALIGNED_STREAM: list[type] = []


def verifier(public_key: Any):
    """The verifier of an Ed25519 public key (a PEM path or bytes; pipeline/keys.py), or None."""
    if public_key is None:
        return None
    from pipeline.keys import load_verifier

    return load_verifier(public_key)


def row_labels(kind: str, b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Stored rows of a dense or top-k dataset (storage columns) -> the objective's label
    fields (see the module docstring): the one place they are converted, for the stream
    and for distillery.StoredLabels."""
    out = {}
    if kind == "dense":  # stored s = z / T, as stored
        out["stored_logits"] = torch.from_numpy(np.array(b["logits"], dtype=np.float32))  # (B, C), a new array
    else:  # the teacher's log-probs at T: stored z/T minus the stored logsumexp of all C
        lse = np.asarray(b["logsumexp"], dtype=np.float32)
        out["topk_ids"] = torch.from_numpy(np.asarray(b["topk_indices"]).astype(np.int64))
        out["topk_logprobs"] = torch.from_numpy(np.asarray(b["topk_logits"], np.float32) - lse[:, None])
    if "feature" in b:  # the teacher's stored intermediate feature, (B, F), for hint/RKD losses
        out["teacher_feature"] = torch.from_numpy(np.array(b["feature"], dtype=np.float32))
    return out


def keep_batch(batch: dict[str, np.ndarray | torch.Tensor]) -> dict[str, np.ndarray | torch.Tensor]:
    """DataLoader collate_fn that passes a worker's batch on unchanged (numpy stays numpy)."""
    return batch


# Images made of 8-bit pixels (float32 k/255, by division or by multiplying with 1/255) cross
# from a DataLoader worker as uint8: a quarter of the bytes. The pickle, not the pipeline,
# bounded a fast student's workers (2 workers handing over ready 128 x 784 batches: ~160k
# rows/s as float32, ~520k as uint8, benchmarks/vision_pipeline.py). The receiver rebuilds
# the same float32 bits; a batch that is not exactly such pixels crosses as it is.
PIXEL_OPS = {
    "div": lambda u: u.astype(np.float32) / np.float32(255),
    "mul": lambda u: u.astype(np.float32) * np.float32(1.0 / 255.0),
}


def to_wire(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A worker's numpy batch with x as uint8 when that is exact (x_pixels names the op)."""
    x = batch.get("x")
    if x is None or x.dtype != np.float32 or x.ndim != 4 or x.size == 0:
        return batch
    u = np.rint(x * np.float32(255))  # (B, C, H, W) float32; NaN or out of range: not pixels
    if not (u.min() >= 0 and u.max() <= 255):
        return batch
    u8 = u.astype(np.uint8)
    for name, op in PIXEL_OPS.items():
        if np.array_equal(op(u8), x):  # bit for bit what the model would have got
            return batch | {"x": u8, "x_pixels": np.array(list(PIXEL_OPS).index(name))}
    return batch


def from_wire(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors of a worker's numpy batch (to_wire undone: x float32 again, the same bits)."""
    batch = dict(batch)
    op = batch.pop("x_pixels", None)
    if op is not None:
        batch["x"] = list(PIXEL_OPS.values())[int(op)](batch["x"])
    return {k: torch.from_numpy(v) for k, v in batch.items()}


class LabelStream(IterableDataset):
    """What every layout's stream shares (see the module docstring)."""

    def __init__(
        self,
        uri: str,
        inputs: Any,
        transform: Transform | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        storage_options: dict | None = None,
        expect: dict | None = None,
        extra_soft_labels: list[str] | None = None,
        manifest: dict | None = None,
        public_key: str | bytes | None = None,
    ):
        check_rank(rank, world_size, batch_size)
        # In a DataLoader worker, yield numpy arrays instead of tensors (the loader then needs
        # collate_fn=keep_batch, and the consumer turns them into tensors with from_wire). A tensor
        # crosses the process boundary as a shared-memory fd, one socket round trip per tensor:
        # measured ~4x slower than pickling the arrays of a 128-row MNIST batch.
        self.worker_numpy = False
        self.uri, self.inputs, self.task = uri, inputs, task_of(inputs)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.storage_options = storage_options
        # only the manifest dict is kept: workers open their own dataset (and filesystem)
        self.manifest = m = (
            manifest
            if manifest is not None
            else open_soft_labels(
                uri, expect=expect, storage_options=storage_options, verifier=verifier(public_key)
            ).manifest
        )
        # a signed dataset (storage/signing.py): every worker checks the records it reads
        self.verifier = verifier(public_key)
        self.temperature = float(m["temperature"])
        self.kind = m["representation"]["kind"]
        self.extra_uris = list(extra_soft_labels or [])
        self.extra_temperatures: list[float] = []
        self.transform = transform
        # shared memory, so persistent workers see set_epoch(); a RawValue has no lock, so it can
        # go to workers of any start method (one writer: the main process)
        self._epoch = mp.RawValue("q", 0)
        self._ds: SoftLabelDataset | None = None
        self._ds_pid: int | None = None

    def __getstate__(self) -> dict:
        # opened datasets (files, S3 clients) stay in the process that opened them: a worker
        # started after in-process iteration opens its own
        return self.__dict__ | {"_ds": None, "_ds_pid": None}

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def _dataset(self) -> SoftLabelDataset:
        # opened lazily, once per process: after fork each worker gets its own filesystem
        if self._ds is None or self._ds_pid != os.getpid():
            self._ds = SoftLabelDataset(Location(self.uri, self.storage_options), self.manifest, verifier=self.verifier)
            self._ds_pid = os.getpid()
            self._opened()
        return self._ds

    def _opened(self) -> None:
        """A subclass opens what else it reads (other teachers' datasets)."""

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this rank yields per epoch through a DataLoader with `num_workers`
        (0 = in the main process, one partition)."""
        raise NotImplementedError

    def _batches(self, ds: SoftLabelDataset, worker: int, num_workers: int):
        """This (rank, worker)'s joined batches of the current epoch."""
        raise NotImplementedError

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        to_numpy = self.worker_numpy and info is not None
        for batch in self._batches(self._dataset(), worker, num_workers):
            yield to_wire({key: v.numpy() for key, v in batch.items()}) if to_numpy else batch

    def _common(self, b: dict) -> dict[str, torch.Tensor]:
        return {
            "sample_id": torch.from_numpy(np.array(b["sample_id"], dtype=np.int64)),
            "view": torch.from_numpy(np.array(b["view"], dtype=np.int64)),
            "weight": torch.from_numpy((~np.asarray(b["pad"], bool)).astype(np.float32)),
        }


# ---------------------------------------------------------------- one row per (sample, view)


def _resolve_views(transform, manifest: dict, uri: str):
    """The view transform to regenerate. Labelling records data.transform =
    transform.to_dict(): a given transform must equal it; with none given, the stored one
    is rebuilt (pipeline/views; a user function is imported by its path)."""
    stored = (manifest.get("data") or {}).get("transform")
    if not isinstance(stored, dict):
        return transform
    if transform is not None:
        if transform.to_dict() != stored:
            raise ValueError(
                f"view transform {transform.to_dict()} differs from the transform the soft labels at "
                f"{uri} were made with ({stored}); views would not match their labels"
            )
        return transform
    try:
        return transform_from_dict(stored)
    except (TypeError, ValueError) as e:
        raise ValueError(f"soft labels at {uri}: cannot rebuild their view transform {stored}: {e}") from None


class RowStream(LabelStream):
    """dense / topk labels: rows joined to their inputs by sample id, in chunks of whole
    batches. extra_soft_labels: more teachers' dense labels of the SAME inputs and views
    (multi-teacher KD), joined to each row by (sample_id, view)."""

    def __init__(self, uri: str, inputs: Source, transform: Transform | None = None, **kw: Any):
        super().__init__(uri, inputs, transform, **kw)
        m = self.manifest
        self.num_classes, self.num_views = int(m["num_classes"]), int(m["num_views"])
        if inputs.num_classes is not None and inputs.num_classes not in (0, self.num_classes):
            raise ValueError(
                f"inputs {inputs.name!r} have num_classes={inputs.num_classes} but the soft labels "
                f"at {self.uri} have num_classes={self.num_classes}"
            )
        self.transform = _resolve_views(transform, m, self.uri)
        if self.num_views > 1 and self.transform is None:
            raise ValueError(
                f"soft labels at {self.uri} hold {self.num_views} views per sample; pass the "
                f"transform they were labelled with (None only works for 1 view)"
            )
        self.extra_manifests = [self._check_extra(u) for u in self.extra_uris]
        self.extra_temperatures = [float(e["temperature"]) for e in self.extra_manifests]
        self._extra_ds: list[SoftLabelDataset] | None = None

    def __getstate__(self) -> dict:
        return super().__getstate__() | {"_extra_ds": None}

    def _check_extra(self, uri: str) -> dict:
        m = open_soft_labels(uri, storage_options=self.storage_options, verifier=self.verifier).manifest
        me = self.manifest
        if m["representation"]["kind"] != "dense" or self.kind != "dense":
            raise ValueError(f"multi-teacher KD needs dense soft labels; {uri} or {self.uri} is top-k")
        for field in ("num_classes", "num_views"):
            if m[field] != me[field]:
                raise ValueError(f"soft labels at {uri} have {field}={m[field]}, but {self.uri} has {me[field]}")
        for field in ("fingerprint", "transform"):
            if m["data"].get(field) != me["data"].get(field):
                raise ValueError(
                    f"soft labels at {uri} were made from other inputs (data.{field} "
                    f"{m['data'].get(field)!r} vs {me['data'].get(field)!r} at {self.uri})"
                )
        return m

    def _opened(self) -> None:
        self._extra_ds = [
            SoftLabelDataset(Location(u, self.storage_options), m, verifier=self.verifier)
            for u, m in zip(self.extra_uris, self.extra_manifests)
        ]

    def num_batches(self, num_workers: int = 0) -> int:
        parts = max(int(num_workers), 1)
        return parts * batches_per_partition(
            int(self.manifest["num_rows"]), self.world_size * parts, self.batch_size, False
        )

    def join_batches(self) -> int:
        """Batches whose labels are joined per storage read: the label join's fixed per-call
        cost (id lookup, dtype conversions, tensor wrapping) is paid once per chunk of up to
        JOIN_CHUNK_BYTES of label tensors; inputs are still gathered per batch (they stay in
        cache for the forward pass). Rows and order: exactly iter_batches(B)'s."""
        stored = int(self.manifest.get("layout", {}).get("row_bytes") or 2 * self.num_classes)  # one stored row
        extra = len(self.extra_uris)  # (B, C) fp32 tensors more
        label_bytes = 2 * stored + 4 * self.num_classes * extra  # float16 -> float32 doubles the stored bytes
        return int(min(MAX_JOIN_BATCHES, max(1, JOIN_CHUNK_BYTES // (label_bytes * self.batch_size))))

    def _batches(self, ds: SoftLabelDataset, worker: int, num_workers: int):
        B, k = self.batch_size, self.join_batches()
        # chunks of k whole batches from the same row stream (same shuffle window as batches
        # of B), so cutting them at multiples of B gives exactly iter_batches(B)'s batches
        for chunk in ds.iter_batches(
            B * k,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
            shuffle_buffer=ds.default_shuffle_buffer(B),
        ):
            labels, pos = self.join_labels(chunk)
            # views of the chunk's tensors, (B, ...) each; extra_stored_logits is (K, B, C)
            parts = {key: torch.split(v, B, dim=1 if key == "extra_stored_logits" else 0) for key, v in labels.items()}
            for i, a in enumerate(range(0, len(pos), B)):
                batch = {key: v[i] for key, v in parts.items()}
                view = batch["view"].numpy()
                if self.transform is None and view.any():
                    raise ValueError(f"soft labels at {self.uri} contain view {int(view.max())} but no transform")
                yield self.task.batch(self.inputs, pos[a : a + B], view, self.transform) | batch

    def join_labels(self, b: dict[str, np.ndarray]) -> tuple[dict[str, torch.Tensor], np.ndarray]:
        """Storage rows -> every batch field but the task's, and the rows' positions in the inputs."""
        out = self._common(b) | row_labels(self.kind, b)
        pos = self.inputs.index_of(out["sample_id"].numpy())  # ValueError names missing ids
        if self.extra_uris:  # other teachers' logits for the same (sample_id, view) rows
            self._dataset()
            sid, view = out["sample_id"].numpy(), out["view"].numpy()
            out["extra_stored_logits"] = torch.from_numpy(
                np.stack(
                    [np.asarray(ds.take(sid, view, columns=["logits"])["logits"], np.float32) for ds in self._extra_ds]
                )
            )  # (K, B, C) z_k / T_k
        return out, pos


# ---------------------------------------------------------------- one sequence per window

LABEL_KEYS = {
    "token_topk": ("topk_ids", "topk_logprobs", "missing_mass"),
    "token_sampled": ("sample_ids", "sample_counts"),
}


def check_token_lineage(manifest: dict, corpus: TokenCorpus, uri: str) -> None:
    """ValueError unless the labels at `uri` were made from `corpus` (same tokenizer, same
    windows). Messages name both fingerprints."""
    data = manifest.get("data") or {}
    stored_tok = ((data.get("inputs") or {}).get("tokenizer") or {}).get("fingerprint")
    tok = corpus.describe()["tokenizer"]["fingerprint"]
    if stored_tok != tok:
        raise ValueError(
            f"token labels at {uri} were made with tokenizer fingerprint {stored_tok}, but corpus "
            f"{corpus.name!r} is tokenized with fingerprint {tok}: a student with another tokenizer "
            f"is refused (its token ids would name other tokens than the teacher's)"
        )
    desc = corpus.describe()
    stored_chat = (data.get("inputs") or {}).get("chat") or {}
    chat = desc.get("chat") or {}
    if (stored_chat.get("template_sha256"), stored_chat.get("too_long"), stored_chat.get("mask")) != (
        chat.get("template_sha256"),
        chat.get("too_long"),
        chat.get("mask"),
    ):

        def what(c):
            if not c:
                return "no chat mask"
            how = f"labelled {c.get('mask')}, too_long {c.get('too_long')}"
            return f"chat template {c['template_sha256'][:16]} ({how})"

        raise ValueError(
            f"token labels at {uri} were made with {what(stored_chat)}, but corpus {corpus.name!r} has "
            f"{what(chat)}: its labelled positions are not the ones the labels hold"
        )
    gen = data.get("generation")
    if gen is not None or "generated" in desc:  # the teacher's written answers
        have = desc.get("generated") or {}
        if gen is None or have.get("prompts_fingerprint") != data.get("fingerprint") or have.get("settings") != gen:
            raise ValueError(
                f"token labels at {uri} are "
                + ("labels of a corpus" if gen is None else "answers the teacher wrote")
                + f", corpus {corpus.name!r} "
                + ("holds written answers" if gen is None else "holds other prompts or answers of other settings")
                + ": build it with distillery.generated_corpus(labels, prompt_corpus)"
            )
        return
    if int(manifest["seq_len"]) != corpus.seq_len:
        raise ValueError(
            f"token labels at {uri} have seq_len {manifest['seq_len']}, corpus {corpus.name!r} has "
            f"seq_len {corpus.seq_len}"
        )
    fp = corpus.fingerprint()
    if data.get("fingerprint") != fp:
        raise ValueError(
            f"token labels at {uri} were made from data fingerprint {data.get('fingerprint')}, but "
            f"corpus {corpus.name!r} has fingerprint {fp} (other text, split or windows): sample ids "
            f"would pair labels with other tokens"
        )


class SequenceStream(LabelStream):
    """token_topk / token_sampled labels: whole sequences joined to the corpus windows they
    were made from (same tokenizer, same windows: refused otherwise, naming fingerprints)."""

    def __init__(self, uri: str, inputs: TokenCorpus, transform: Transform | None = None, **kw: Any):
        super().__init__(uri, inputs, transform, **kw)
        if self.extra_uris:
            raise ValueError("several teachers' token labels (extra_soft_labels) are not supported")
        check_token_lineage(self.manifest, inputs, uri)
        self.vocab_size, self.seq_len = int(self.manifest["vocab_size"]), int(self.manifest["seq_len"])

    def num_batches(self, num_workers: int = 0) -> int:
        return self._dataset().num_sequence_batches(
            self.batch_size, world_size=self.world_size, num_workers=max(int(num_workers), 1)
        )

    def _batches(self, ds: SoftLabelDataset, worker: int, num_workers: int):
        for b in ds.iter_sequences(
            self.batch_size,
            shuffle=self.shuffle,
            seed=self.seed,
            epoch=self.epoch,
            rank=self.rank,
            world_size=self.world_size,
            worker=worker,
            num_workers=num_workers,
        ):
            yield self.join(b)

    def positions(self, corpus: TokenCorpus, sid: np.ndarray, b: dict) -> tuple[np.ndarray, np.ndarray]:
        """The positions in `corpus` of a batch's sample ids (ValueError naming a missing one)
        and the stored tokens per sequence (B,), refused unless each is its window's
        labelled count (labels of other windows)."""
        pos = corpus.index_of(sid)
        n = np.asarray(b["length"], dtype=np.int64)
        want = corpus.label_counts(pos)
        if not np.array_equal(n, want):
            i = int(np.flatnonzero(n != want)[0])
            raise ValueError(
                f"token labels at {self.uri}: sequence sample_id {sid[i]} holds {n[i]} tokens, but "
                f"corpus {corpus.name!r} labels {want[i]} in that window: labels of other windows"
            )
        return pos, n

    def join(self, b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Decoded stored sequences -> the batch: the corpus windows by sample id, the labels,
        all cut to the batch's longest sequence Lb."""
        out = self._common(b)
        sid = out["sample_id"].numpy()  # (B,)
        pos, n = self.positions(self.inputs, sid, b)
        batch = self.task.batch(self.inputs, pos, out["view"].numpy(), None)  # (B, Lb) x, y, mask
        for key in LABEL_KEYS[self.kind]:
            batch[key] = place_rows(b[key], n, batch["mask"])
        return batch | out


def place_rows(rows, counts: np.ndarray, mask: torch.Tensor) -> torch.Tensor:
    """A batch's stored label rows (B, Lr, ...), counts[j] of them real for window j, at its
    labelled positions: (B, Lb, ...) with window j's r-th row at its r-th True of mask
    (B, Lb) (the rows' order is the positions' order), zeros elsewhere (masked out of
    every loss). A window labelled at every real position (plain text) is a prefix: a slice."""
    rows = torch.as_tensor(np.ascontiguousarray(rows))
    B, Lb = mask.shape
    n = torch.as_tensor(np.asarray(counts, dtype=np.int64))
    prefix = torch.arange(Lb)[None, :] < n[:, None]
    if rows.shape[1] >= Lb and torch.equal(mask, prefix):
        return rows[:, :Lb].contiguous()
    out = rows.new_zeros((B, Lb, *rows.shape[2:]))
    out[mask] = rows[torch.arange(rows.shape[1])[None, :] < n[:, None]]  # (M, ...) in window-major order
    return out
