"""Training batches for language-model KD: stored token labels (pipeline/labelling/tokens.py)
joined to the corpus windows they were made from, a whole sequence at a time.

    stream = StoredTokenStream(uri, corpus, batch_size=8, rank=r, world_size=w)
    loader = DataLoader(stream, batch_size=None, num_workers=2)
    for epoch in range(E):
        stream.set_epoch(epoch)
        for batch in loader:
            logits = student(input_ids=batch["input_ids"]).logits            # (B, L, V)
            w = batch["weight"][:, None] * batch["mask"]                      # (B, L)
            out = lm_kd_loss(logits, batch, mask=batch["mask"], weights=w)

Every batch is a dict of tensors, B sequences cut to the longest one, Lb <= L tokens
(Lb = L unless the corpus' windows differ in length, windows="documents"):
    input_ids (B, L) int64, targets (B, L) int64 (the next tokens, from the corpus),
    mask (B, L) bool (real positions; False after a shorter sequence's end),
    sample_id (B,) int64 (the window index), view (B,) int64, weight (B,) float32 (0 for
    pad sequences: repeats that keep ranks in lock-step),
  token_topk:    topk_ids (B, L, k) int64, topk_logprobs (B, L, k) float32 (log p at T = 1
                 over the full vocabulary), missing_mass (B, L) float32;
  token_sampled: sample_ids (B, L, s) int64, sample_counts (B, L, s) int32 (0 = padding).

Sequences come from storage's iter_sequences: shuffled per (seed, epoch), partitioned by
rank and DataLoader worker, every stored sequence a non-pad row exactly once per epoch
over all ranks. The inputs are re-read from the corpus by sample id (never stored with
the labels), so the labels must have been made from this very corpus with this very
tokenizer: a different data fingerprint, or a different tokenizer fingerprint (a student
with another tokenizer: ids would name other tokens), is refused.
"""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from storage import Location, SoftLabelDataset, open_soft_labels

TOKEN_KINDS = ("token_topk", "token_sampled")
LABEL_KEYS = {"token_topk": ("topk_ids", "topk_logprobs", "missing_mass"),
              "token_sampled": ("sample_ids", "sample_counts")}


def check_token_lineage(manifest: dict, corpus, uri: str) -> None:
    """ValueError unless the labels at `uri` were made from `corpus` (same tokenizer, same
    windows). Messages name both fingerprints."""
    data = manifest.get("data") or {}
    stored_tok = ((data.get("inputs") or {}).get("tokenizer") or {}).get("fingerprint")
    tok = corpus.describe()["tokenizer"]["fingerprint"]
    if stored_tok != tok:
        raise ValueError(f"token labels at {uri} were made with tokenizer fingerprint {stored_tok}, but corpus "
                         f"{corpus.name!r} is tokenized with fingerprint {tok}: a student with another tokenizer "
                         f"is refused (its token ids would name other tokens than the teacher's)")
    if int(manifest["seq_len"]) != corpus.seq_len:
        raise ValueError(f"token labels at {uri} have seq_len {manifest['seq_len']}, corpus {corpus.name!r} has "
                         f"seq_len {corpus.seq_len}")
    fp = corpus.fingerprint()
    if data.get("fingerprint") != fp:
        raise ValueError(f"token labels at {uri} were made from data fingerprint {data.get('fingerprint')}, but "
                         f"corpus {corpus.name!r} has fingerprint {fp} (other text, split or windows): sample ids "
                         f"would pair labels with other tokens")


class StoredTokenStream(IterableDataset):
    def __init__(self, uri: str, corpus, *, batch_size: int, seed: int = 0, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, storage_options: dict | None = None, expect: dict | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size!r}), got rank={rank!r}")
        self.uri, self.corpus = uri, corpus
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.storage_options = storage_options
        # read and check the manifest in the main process, so a wrong URI or another
        # tokenizer fails before any worker starts; workers open their own dataset
        self.manifest = m = open_soft_labels(uri, expect=expect, storage_options=storage_options).manifest
        self.kind = m["representation"]["kind"]
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"soft labels at {uri} are {self.kind!r}, not token labels ({list(TOKEN_KINDS)})")
        check_token_lineage(m, corpus, uri)
        self.vocab_size, self.seq_len = int(m["vocab_size"]), int(m["seq_len"])
        self.draws = m["representation"].get("draws")
        self.worker_numpy = False          # as StoredLabelStream: numpy out of workers (collate_fn=keep_batch)
        self._epoch = mp.RawValue("q", 0)  # shared, so persistent workers see set_epoch()
        self._ds: SoftLabelDataset | None = None
        self._ds_pid: int | None = None

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_ds": None, "_ds_pid": None}

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = int(epoch)

    @property
    def epoch(self) -> int:
        return int(self._epoch.value)

    def _dataset(self) -> SoftLabelDataset:
        if self._ds is None or self._ds_pid != os.getpid():
            self._ds = SoftLabelDataset(Location(self.uri, self.storage_options), self.manifest)
            self._ds_pid = os.getpid()
        return self._ds

    def num_batches(self, num_workers: int = 0) -> int:
        """Batches this rank yields per epoch through a DataLoader with `num_workers`."""
        return self._dataset().num_sequence_batches(self.batch_size, world_size=self.world_size,
                                                    num_workers=max(int(num_workers), 1))

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        to_numpy = self.worker_numpy and info is not None
        for b in self._dataset().iter_sequences(self.batch_size, shuffle=self.shuffle, seed=self.seed,
                                                epoch=self.epoch, rank=self.rank, world_size=self.world_size,
                                                worker=worker, num_workers=num_workers):
            batch = self.join(b)
            yield {key: v.numpy() for key, v in batch.items()} if to_numpy else batch

    def join(self, b: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """Decoded stored sequences -> the batch: the corpus windows by sample id, the labels,
        all cut to the batch's longest sequence Lb."""
        sid = np.asarray(b["sample_id"], dtype=np.int64)                     # (B,)
        pos = self.corpus.index_of(sid)                                      # ValueError names missing ids
        n = np.asarray(b["length"], dtype=np.int64)                          # (B,) stored tokens per sequence
        want = self.corpus.lengths(pos)
        if not np.array_equal(n, want):
            i = int(np.flatnonzero(n != want)[0])
            raise ValueError(f"token labels at {self.uri}: sequence sample_id {sid[i]} holds {n[i]} tokens, but "
                             f"corpus {self.corpus.name!r} has {want[i]} in that window: labels of other windows")
        mb = self.corpus.lm_batch(pos)                                       # (B, Lb) ids, targets, mask
        Lb = mb["mask"].shape[1]
        out = {**mb, "sample_id": torch.from_numpy(sid),
               "view": torch.from_numpy(np.asarray(b["view"], dtype=np.int64)),
               "weight": torch.from_numpy((~np.asarray(b["pad"], bool)).astype(np.float32))}
        for key in LABEL_KEYS[self.kind]:
            out[key] = torch.from_numpy(np.ascontiguousarray(b[key][:, :Lb]))
        return out
