"""Map-style language-model data: corpus windows, optionally joined to their stored token
labels by sample id, and the collator that pads them into the batches every distillery
loss reads. For a user's own sampler and DataLoader, Hugging Face `Trainer` (which shards
a map-style dataset over ranks itself), and `datasets.Dataset` export. The iterable,
rank- and worker-aware stream of the same batches is training/stream.py's SequenceStream.

    data = TokenLabels(labels, corpus)          # corpus: the windows the labels were made from
    loader = DataLoader(data, batch_size=8, shuffle=True, collate_fn=collate_tokens)
    for batch in loader:                        # the SequenceStream batch keys, see collate_tokens
        logits = student(batch["x"])            # (B, Lb, V)
        loss = Objective(...).terms(logits, batch)["loss"]

An item is one window as Hugging Face models see a sequence, plus the teacher's rows:
    input_ids     (n + 1,) int64  the window's n input tokens and the token after the last
    sample_id     int             the window's id (the labels' key)
    token_topk:    topk_ids (n, k) int64, topk_logprobs (n, k) float32 (log p, T = 1),
                   missing_mass (n,) float32
    token_sampled: sample_ids (n, s) int64, sample_counts (n, s) int32 (0 = padding)
Row i of the teacher's columns is its distribution of input_ids[i + 1] given
input_ids[: i + 1]: a causal LM's logits[:, :-1] line up with it (the usual shift).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.training.stream import LABEL_KEYS, TOKEN_KINDS, check_token_lineage
from storage import SoftLabelDataset, open_soft_labels

if TYPE_CHECKING:
    from pipeline.data.corpus import TokenCorpus


class Windows(Dataset):
    """Item i: window i of `corpus` ({"input_ids" (n + 1,), "sample_id"}): next-token
    training without a teacher (the CE baseline), batched by collate_tokens."""

    def __init__(self, corpus: TokenCorpus):
        if getattr(corpus, "task", None) != "lm":
            raise ValueError(
                f"Windows/TokenLabels need a token corpus (pipeline.data.corpus), got {type(corpus).__name__}"
            )
        self.corpus = corpus

    def __len__(self) -> int:
        return len(self.corpus)

    def _windows(self, idx: list[int]) -> list[dict[str, Any]]:
        w, n = self.corpus.windows(idx), self.corpus.lengths(idx)  # (B, L + 1), (B,)
        sid = self.corpus.sample_ids[np.asarray(idx, dtype=np.int64)]
        items = [{"input_ids": w[j, : n[j] + 1], "sample_id": int(sid[j])} for j in range(len(idx))]
        if self.corpus.is_chat:  # which positions are labelled (assistant targets): collate_tokens reads it
            lm = self.corpus.label_mask(idx)
            for j, it in enumerate(items):
                it["loss_mask"] = lm[j, : n[j]]
        return items

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.__getitems__([int(i)])[0]

    def __getitems__(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        return self._windows(list(idx))


class TokenLabels(Windows):
    """Item i: window i of `corpus` with the teacher's stored rows for it (module doc).
    Map-style (a batch of indices is one read: __getitems__), so any sampler, a
    DistributedSampler and DataLoader workers work. The labels must have been made from
    this corpus: same tokenizer, windows and text (refused otherwise, naming both
    fingerprints); every window must be labelled (the first missing id is named).

    labels: a token-label dataset from open_labels, or its URI. corpus: the windows they
    were made from (pipeline.api.corpus_of(labels) rebuilds them from the manifest)."""

    def __init__(self, labels: SoftLabelDataset | str, corpus: TokenCorpus):
        super().__init__(corpus)
        self.labels = labels if isinstance(labels, SoftLabelDataset) else open_soft_labels(labels)
        m = self.labels.manifest
        self.kind = m["representation"]["kind"]
        if self.kind not in TOKEN_KINDS:
            raise ValueError(f"{self.labels.uri}: TokenLabels joins token labels; these are {self.kind!r}")
        check_token_lineage(m, corpus, self.labels.uri)
        self.keys = LABEL_KEYS[self.kind]
        missing = np.setdiff1d(corpus.sample_ids, self.labels.keys()[0])  # reads the id columns once
        if len(missing):
            raise ValueError(
                f"token labels at {self.labels.uri} hold no sequence for window sample_id {int(missing[0])} "
                f"of corpus {corpus.name!r} ({len(missing)} of {len(corpus)} windows unlabelled)"
            )

    def __getitems__(self, idx: Sequence[int]) -> list[dict[str, Any]]:
        idx = list(idx)
        items = self._windows(idx)
        sid = np.array([it["sample_id"] for it in items], dtype=np.int64)
        b = self.labels.take_sequences(sid, np.zeros(len(sid), np.int64))  # (B, L, ...) decoded
        for j, it in enumerate(items):
            n = int(it["loss_mask"].sum()) if "loss_mask" in it else len(it["input_ids"]) - 1
            if int(b["length"][j]) != n:
                raise ValueError(
                    f"token labels at {self.labels.uri}: sequence sample_id {sid[j]} holds {int(b['length'][j])} "
                    f"tokens, but corpus {self.corpus.name!r} labels {n} in that window: labels of other windows"
                )
            for key in self.keys:
                it[key] = b[key][j, :n]
        return items


# padding of each batch field past a window's end (masked out of every loss)
PAD = {"topk_ids": 0, "topk_logprobs": 0.0, "missing_mass": 0.0, "sample_ids": 0, "sample_counts": 0}
DTYPES = {
    "topk_ids": torch.int64,
    "topk_logprobs": torch.float32,
    "missing_mass": torch.float32,
    "sample_ids": torch.int64,
    "sample_counts": torch.int32,
}


def collate_tokens(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Items of Windows / TokenLabels (or rows of a datasets.Dataset made by to_hf_dataset)
    -> one batch, every window cut to the batch's longest Lb = max n and padded after its
    end: the keys of the SequenceStream's batches, so the same objective reads both:
        x (B, Lb) int64 inputs, y (B, Lb) int64 next tokens, mask (B, Lb) bool real
        positions, weight (B,) float32 ones, sample_id (B,) int64, view (B,) int64 zeros,
        and each label field (B, Lb, ...) padded with PAD (never read: masked).
    pad_id fills x and y past a window's end; causal attention keeps it out of every real
    position, so its value does not change a loss."""
    if not items:
        raise ValueError("collate_tokens: an empty batch")
    ids = [torch.as_tensor(np.asarray(it["input_ids"]), dtype=torch.int64) for it in items]
    n = torch.tensor([len(t) - 1 for t in ids])  # (B,) real positions
    if (n < 1).any():
        raise ValueError(
            f"collate_tokens: window sample_id {items[int((n < 1).nonzero()[0])].get('sample_id')} has no target"
        )
    B, Lb = len(items), int(n.max())
    window = torch.full((B, Lb + 1), int(pad_id), dtype=torch.int64)
    for j, t in enumerate(ids):
        window[j, : len(t)] = t
    mask = torch.arange(Lb)[None, :] < n[:, None]  # (B, Lb) real positions
    if "loss_mask" in items[0]:  # a chat window: only the positions with an assistant target
        for j, it in enumerate(items):
            mask[j, : int(n[j])] &= torch.as_tensor(np.asarray(it["loss_mask"], dtype=bool))
    batch = {
        "x": window[:, :-1].contiguous(),
        "y": window[:, 1:].contiguous(),
        "mask": mask,
        "weight": torch.ones(B, dtype=torch.float32),
        "sample_id": torch.tensor([int(it.get("sample_id", -1)) for it in items], dtype=torch.int64),
        "view": torch.zeros(B, dtype=torch.int64),
    }
    m = mask.sum(1)  # (B,) labelled positions: each window's label rows, in position order
    for key in (k for k in PAD if k in items[0]):
        rows = [torch.as_tensor(np.asarray(it[key]), dtype=DTYPES[key]) for it in items]
        out = torch.full((B, Lb, *rows[0].shape[1:]), PAD[key], dtype=DTYPES[key])
        for j, r in enumerate(rows):
            if len(r) != int(m[j]):
                raise ValueError(
                    f"collate_tokens: sample_id {int(batch['sample_id'][j])} has {int(m[j])} labelled positions "
                    f"but {len(r)} rows of {key!r}"
                )
            out[j][mask[j]] = r
        batch[key] = out
    return batch


def as_columns(items: Sequence[dict[str, Any]]) -> dict[str, list]:
    """Items -> columns of Python lists (datasets.Dataset.from_dict), with attention_mask."""
    cols: dict[str, list] = {"sample_id": [], "input_ids": [], "attention_mask": []}
    for it in items:
        cols["sample_id"].append(int(it["sample_id"]))
        cols["input_ids"].append(np.asarray(it["input_ids"]).tolist())
        cols["attention_mask"].append([1] * len(it["input_ids"]))
        if "loss_mask" in it:
            cols.setdefault("loss_mask", []).append(np.asarray(it["loss_mask"], dtype=np.int8).tolist())
        for key in (k for k in PAD if k in it):
            cols.setdefault(key, []).append(np.asarray(it[key]).tolist())
    return cols
