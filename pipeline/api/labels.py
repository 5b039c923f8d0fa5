"""Stored labels in a user's own PyTorch loop: a map-style dataset joining them to the user's
data by sample id, and the loss the built-in loop uses, as one call.

    labels = distillery.open_labels(uri)
    data = distillery.StoredLabels(labels, my_dataset, sample_ids=ids)   # ids[i]: item i's id
    for x, target in DataLoader(data, batch_size=128, shuffle=True):     # any sampler works
        loss = distillery.distill_loss(student(x), target, labels=labels)

Classifier labels (dense, top-k); token labels come with the LM half of the API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.objectives.losses import FAMILIES
from pipeline.objectives.objective import Objective
from pipeline.training.stream import row_labels
from storage import SoftLabelDataset, open_soft_labels


class StoredLabels(Dataset):
    """Item i: (data[i], the stored label of (sample_ids[i], views[i])), a dict of tensors:
    `sample_id`, `view` (the row's, for views_of(labels).apply), and dense `stored_logits`
    (C,) = z/T as stored; top-k `topk_ids` (k,), `topk_logprobs` (k,) (the teacher's
    log-probs at T). Map-style, so the user's own sampler, DistributedSampler
    and DataLoader workers work as with any dataset; a batch of indices is read at once
    (`__getitems__`). Every id is checked when the dataset is made: a missing one is named.

    labels: a dataset from open_labels, or its URI. data: any map-style dataset.
    sample_ids: (len(data),) ints, or a function of the index. views: 0 (the un-augmented
    input each sample was labelled with), an array, or a function of the index."""

    def __init__(
        self,
        labels: SoftLabelDataset | str,
        data: Any,
        sample_ids: Sequence[int] | np.ndarray | Callable[[int], int],
        views: int | Sequence[int] | np.ndarray | Callable[[int], int] = 0,
    ):
        self.labels = labels if isinstance(labels, SoftLabelDataset) else open_soft_labels(labels)
        self.kind = self.labels.manifest["representation"]["kind"]
        if FAMILIES.get(self.kind) not in ("dense", "topk") or self.labels.is_tokens:
            raise ValueError(f"{self.labels.uri}: StoredLabels joins classifier labels; these are {self.kind!r}")
        self.data, n = data, len(data)
        self.ids = _per_item(sample_ids, n, "sample_ids")
        self.views = _per_item(views, n, "views")
        self.labels.take(self.ids, self.views, columns=["sample_id"])  # names the first id not stored

    def __len__(self) -> int:
        return len(self.ids)

    def _labels(self, idx: list[int]) -> dict[str, torch.Tensor]:
        rows = self.labels.take(self.ids[idx], self.views[idx])
        # the row's own (sample_id, view): what views_of(labels).apply needs to replay its input
        ids = {"sample_id": torch.from_numpy(self.ids[idx]), "view": torch.from_numpy(self.views[idx])}
        return ids | row_labels(self.kind, rows)

    def __getitem__(self, i: int):
        lab = self._labels([i])
        return self.data[i], {k: v[0] for k, v in lab.items()}

    def __getitems__(self, idx: list[int]) -> list:
        lab = self._labels(list(idx))  # one read for the batch
        return [(self.data[i], {k: v[j] for k, v in lab.items()}) for j, i in enumerate(idx)]


def views_of(labels: SoftLabelDataset | str):
    """The view transform the labels were made with (rebuilt from the manifest: a ViewSpec,
    torchvision v2 pipeline, ...), or None for labels of plain inputs. `t.apply(x, sample_ids,
    views)` regenerates in a user's own loop exactly the inputs the teacher labelled (x: the
    un-augmented rows (B, ...), view 0 is x itself)."""
    from pipeline.views.transforms import transform_from_dict

    labels = labels if isinstance(labels, SoftLabelDataset) else open_soft_labels(labels)
    return transform_from_dict((labels.manifest.get("data") or {}).get("transform"))


def _per_item(v, n: int, what: str) -> np.ndarray:
    if callable(v):
        return np.fromiter((int(v(i)) for i in range(n)), np.int64, count=n)
    a = np.broadcast_to(np.asarray(v, dtype=np.int64), (n,)) if np.ndim(v) == 0 else np.asarray(v, dtype=np.int64)
    if a.shape != (n,):
        raise ValueError(f"{what} must give one value per item of data ({n}), got shape {a.shape}")
    return a


def distill_loss(
    student_logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    labels: SoftLabelDataset | None = None,
    loss: str | None = None,
    temperature: float | None = None,
    alpha: float = 0.0,
    y: torch.Tensor | None = None,
    kind: str | None = None,
    stored_temperature: float | None = None,
) -> torch.Tensor:
    """The built-in loop's loss (pipeline/objectives: the one owner of every formula):
    α·CE(y, student) + (1 − α)·KD, the KD term the registered `loss` (default: the labels'
    family's own; formulas and citations in distillery.LOSSES) at the student temperature
    T' (default: the stored T), a weighted mean over rows in fp32.

    Classifiers: student_logits (B, C), batch the StoredLabels targets; y (B,) the hard
    labels, needed only with alpha > 0. Language models: student_logits (B, L, V) and a
    batch of collate_tokens or the label stream (x, y, mask, weight and the token labels):
    only its real positions count. labels gives the kind and stored T (or kind= and
    stored_temperature=)."""
    obj = Objective.for_labels(
        labels, loss=loss, temperature=temperature, alpha=alpha, kind=kind, stored_temperature=stored_temperature
    )
    batch = dict(batch)
    batch.setdefault("weight", torch.ones(len(student_logits), dtype=torch.float32, device=student_logits.device))
    if y is not None:
        batch["y"] = y
    elif alpha > 0 and "y" not in batch:
        raise ValueError("distill_loss: alpha > 0 mixes in cross-entropy on hard labels: pass y")
    return obj.terms(student_logits, batch)["loss"]
