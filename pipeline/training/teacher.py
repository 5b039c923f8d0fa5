"""Teacher training and transfer learning: train() on hard labels (loss "ce") plus a model checkpoint.

train_teacher: build the arch (seeded), train with cross-entropy on fresh augmented
views every epoch, write a checkpoint (pipeline/models/checkpoint.py) whose fingerprint is
the identity recorded in the soft-label manifests the teacher later produces.

finetune: load a checkpoint, optionally replace the head for a new number of classes,
freeze parameter-name prefixes (e.g. ["body"] = linear probe), train the rest.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Collection

import torch
import torch.nn as nn

from pipeline.data.datasets import Source
from pipeline.evaluate import accuracy, predict_logits
from pipeline.models.checkpoint import load_model, save_checkpoint
from pipeline.models.freezing import freeze_by_prefix
from pipeline.models.registry import ModelSpec, build_model, complete_spec, param_counts
from pipeline.training.config import TrainConfig, resume_key
from pipeline.training.loop import train
from pipeline.views.rng import GLOBAL_RNG_LOCK


def data_info(ds: Source) -> dict:
    """What a checkpoint records about the data it was trained on (and how its rows became
    inputs: image size, tokenizer fingerprint...)."""
    return {
        "name": ds.name,
        "split": ds.split_spec,
        "fingerprint": ds.fingerprint(),
        "num_samples": len(ds),
        "inputs": ds.describe(),
    }


def training_lineage(
    train_data: Source,
    val_data: Source | None,
    transform,
    cfg: TrainConfig,
    *,
    model: dict | None = None,
    parent: str | None = None,
    freeze: list[str] | None = None,
) -> dict:
    """What a teacher's weights are a function of: the data (fingerprints hash inputs,
    labels and the split definition), the views, the model (or the fine-tuned parent's
    fingerprint and the frozen prefixes) and the training config. Recorded in the
    checkpoint as metadata["lineage"]; a resume file with another lineage is not continued."""
    lin = {
        "data": {"fingerprint": train_data.fingerprint(), "split": train_data.split_spec},
        "val_data": None if val_data is None else {"fingerprint": val_data.fingerprint(), "split": val_data.split_spec},
        "views": transform.to_dict() if transform is not None else None,
        "train": resume_key(cfg),
    }
    if parent is not None:
        lin.update(parent=parent, freeze=list(freeze or []))
    else:
        lin["model"] = model
    return json.loads(json.dumps(lin))  # tuples -> lists: compares equal to what a checkpoint gives back


def _train_ckpt(cfg: TrainConfig, out_path: str) -> TrainConfig:
    # the mid-run training checkpoint sits next to the final model unless given
    return cfg if cfg.ckpt_path else dataclasses.replace(cfg, ckpt_path=f"{out_path}.train.pt")


def _metrics(model: nn.Module, result: dict, val_data: Source | None) -> dict:
    m = {k: result[k] for k in ("metric", "best_val", "best_epoch", "epochs_run", "steps", "stopped_early", "seconds")}
    if val_data is not None:  # of the weights actually saved (the best epoch's)
        device = next(model.parameters()).device
        m["val"] = accuracy(predict_logits(model, val_data, device=device), val_data.y)
    return m


def train_teacher(
    arch: dict | ModelSpec,
    train_data: Source,
    val_data: Source | None = None,
    *,
    cfg: TrainConfig,
    out_path: str,
    transform=None,
    resume: bool = False,
    metadata: dict | None = None,
    on_batch=None,
) -> tuple[nn.Module, dict]:
    """Train a teacher from scratch (hard labels, augmented with transform) and save it to
    out_path. resume=True continues an interrupted run from its training checkpoint
    (cfg.ckpt_path, default out_path + ".train.pt"). Returns (model, checkpoint metadata)."""
    # data args the factory takes (a tokenizer's vocab_size / pad_id) go into the saved spec;
    # the lineage keeps the spec as given (the data's fingerprint already covers the rest)
    given = arch if isinstance(arch, ModelSpec) else ModelSpec.from_dict(arch)
    spec = complete_spec(given, train_data.model_args())
    if train_data.num_classes is None or train_data.y is None:
        raise ValueError(f"teacher training needs labeled data; {train_data.name!r} is unlabeled")
    cfg = _train_ckpt(cfg, out_path)
    with GLOBAL_RNG_LOCK:
        torch.manual_seed(cfg.seed)  # same seed -> same initial weights
        model = build_model(spec, in_shape=train_data.in_shape, num_classes=train_data.num_classes)
    lineage = training_lineage(train_data, val_data, transform, cfg, model=given.to_dict())
    result = train(
        model,
        cfg,
        train_data=train_data,
        val_data=val_data,
        transform=transform,
        resume=resume,
        lineage=lineage,
        on_batch=on_batch,
    )
    meta = {
        "role": "teacher",
        "lineage": lineage,
        "data": data_info(train_data),
        "val_data": data_info(val_data) if val_data is not None else None,
        "view_spec": transform.to_dict() if transform is not None else None,
        "train_config": cfg.to_dict(),
        "metrics": _metrics(model, result, val_data),
        "param_counts": param_counts(model),
        **(metadata or {}),
    }
    meta = save_checkpoint(
        out_path, model, arch=spec, in_shape=train_data.in_shape, num_classes=train_data.num_classes, metadata=meta
    )
    return model, meta


def finetune(
    checkpoint: str,
    data: Source,
    val_data: Source | None = None,
    *,
    cfg: TrainConfig,
    out_path: str,
    freeze: list[str] | None = None,
    transform=None,
    resume: bool = False,
    metadata: dict | None = None,
    on_batch=None,
    trusted_factories: Collection[str] = (),
) -> tuple[nn.Module, dict]:
    """Transfer learning from `checkpoint` onto `data` (hard labels). If data has a
    different number of classes the head is replaced by a fresh nn.Linear. Parameters
    under `freeze` prefixes keep requires_grad=False and are unchanged (frozen BatchNorm
    layers also keep their running statistics). Returns (model, checkpoint metadata)."""
    model, src = load_model(checkpoint, trusted_factories=trusted_factories)
    if data.num_classes is None or data.y is None:
        raise ValueError(f"fine-tuning needs labeled data; {data.name!r} is unlabeled")
    if tuple(src["in_shape"]) != tuple(data.in_shape):
        raise ValueError(
            f"{checkpoint} expects inputs {tuple(src['in_shape'])}, data {data.name!r} has {data.in_shape}"
        )
    cfg = _train_ckpt(cfg, out_path)
    with GLOBAL_RNG_LOCK:  # a new head's init must not interleave with other threads' seeding
        torch.manual_seed(cfg.seed)
        if data.num_classes != src["num_classes"]:
            if not isinstance(getattr(model, "head", None), nn.Linear):
                raise ValueError(f"cannot replace the head for {data.num_classes} classes: model has no Linear .head")
            model.head = nn.Linear(model.head.in_features, data.num_classes)
    frozen = sorted(freeze_by_prefix(model, list(freeze or []), what=f"teacher {checkpoint}"))
    lineage = training_lineage(data, val_data, transform, cfg, parent=src.get("fingerprint"), freeze=freeze)
    result = train(
        model,
        cfg,
        train_data=data,
        val_data=val_data,
        transform=transform,
        resume=resume,
        lineage=lineage,
        on_batch=on_batch,
    )
    meta = {
        "role": "finetuned",
        "lineage": lineage,
        "parent": {"path": str(checkpoint), "fingerprint": src.get("fingerprint")},
        "frozen": list(freeze or []),
        "num_frozen_params": len(frozen),
        "data": data_info(data),
        "val_data": data_info(val_data) if val_data is not None else None,
        "view_spec": transform.to_dict() if transform is not None else None,
        "train_config": cfg.to_dict(),
        "metrics": _metrics(model, result, val_data),
        "param_counts": param_counts(model),
        **(metadata or {}),
    }
    meta = save_checkpoint(
        out_path, model, arch=src["arch"], in_shape=data.in_shape, num_classes=data.num_classes, metadata=meta
    )
    return model, meta
