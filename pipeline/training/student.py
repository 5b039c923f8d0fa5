"""The student recipe, one for every task and every caller (the Prefect flows and the
torchrun entry, both through flows/recipes.py):

    build -> train (stored labels, or the hard-label baseline) -> checkpoint
          -> evaluate (the task's: accuracy and agreement, or perplexity) -> export

Plain functions and dataclasses: no Prefect, no config objects. The inputs are the
datasets, the model spec, a TrainConfig, the label URIs, paths and flags.

Rules that live here and nowhere else:
  * the checkpoint metadata of a student (`student_metadata`, keys STUDENT_METADATA_KEYS);
  * the fairness rule of a hard-label baseline (`baseline_epochs`, `baseline_config`):
    as many optimizer steps as a stored-label student, validated as often;
  * the student lineage a resume file must match (`student_lineage`);
  * the teacher's evaluation-logit cache (`teacher_eval_logits`): a sweep runs a large
    teacher on the evaluation split once, not once per student.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline.data.datasets import Source
from pipeline.evaluate import predict_logits
from pipeline.models.checkpoint import load_model, save_checkpoint
from pipeline.models.registry import FROM_WEIGHTS, complete_spec, model_adapter
from pipeline.tasks import task_of
from pipeline.training.config import TrainConfig, resume_key
from pipeline.training.loop import train
from pipeline.training.teacher import data_info
from pipeline.views.rng import GLOBAL_RNG_LOCK
from storage import Location, lineage_digest

if TYPE_CHECKING:
    from pipeline.views.base import Transform

# one shape for every student checkpoint, whoever trained it (flows, torchrun)
STUDENT_METADATA_KEYS = (
    "role",
    "name",
    "run",
    "teacher",
    "soft_labels",
    "data",
    "train_config",
    "lineage",
    "world_size",
    "metrics",
)
METRIC_KEYS = ("metric", "best_val", "best_epoch", "epochs_run", "epochs_trained", "steps", "stopped_early")


# ------------------------------------------------------------------ the pieces of metadata


def soft_label_info(uri: str, manifest: dict) -> dict:
    """What a student records about one soft-label dataset it learned from."""
    return {
        "uri": str(uri),
        "digest": manifest.get("digest") or lineage_digest(manifest),
        "temperature": manifest.get("temperature"),
        "representation": manifest.get("representation"),
    }


def student_metadata(
    *,
    run: dict,
    teacher: dict | None,
    soft_labels: Sequence[dict],
    data: Source,
    train_config: TrainConfig,
    result: dict,
    lineage: dict | None,
    world_size: int = 1,
) -> dict:
    """The metadata of a student checkpoint (keys STUDENT_METADATA_KEYS), the one shape
    written by every caller of the recipe. soft_labels: soft_label_info of each dataset
    learned from ([] for a hard-label baseline)."""
    meta = {
        "role": "student",
        "name": run["name"],
        "run": run,
        "teacher": teacher,
        "soft_labels": list(soft_labels),
        "data": data_info(data),
        "train_config": train_config.to_dict(),
        "lineage": lineage,
        "world_size": int(world_size),
        "metrics": {k: result.get(k) for k in METRIC_KEYS},
    }
    assert tuple(meta) == STUDENT_METADATA_KEYS
    return meta


def student_lineage(
    *,
    data: dict[str, str],
    split: dict,
    views: dict | None,
    model: dict,
    train_config: TrainConfig,
    teacher_fingerprint: str | None = None,
    label_manifests: Sequence[dict] = (),
) -> dict:
    """What a student's resume file must match to be continued (or reused when complete):
    the data of every split (name -> fingerprint), the split definition, the views, the
    model, the training config and, for a distilled student, the teacher and the
    soft-label datasets' identity (manifest digest). A baseline never reads labels: a
    relabel keeps it."""
    import json

    lin = {
        "data": dict(data),
        "split": split,
        "views": views,
        "model": {k: model[k] for k in ("arch", "kwargs")}
        | ({"trainer": "hf"} if model.get("trainer") == "hf" else {}),
        "train": resume_key(train_config),
    }
    if train_config.loss != "ce":
        lin["teacher"] = teacher_fingerprint
        lin["soft_labels"] = [m.get("digest") or lineage_digest(m) for m in label_manifests]
    return json.loads(json.dumps(lin))


# ------------------------------------------------------------------ the baseline fairness rule


def baseline_epochs(
    stored_epochs: int, *, label_samples: int, num_views: int, labelled_samples: int, batch_size: int
) -> int:
    """Epochs that give a hard-label baseline as many optimizer steps as a stored-label student.

    A stored epoch covers every view of every label-split sample (N_label x V rows); a hard
    epoch covers the labelled split once, one random view id in [0, V) per sample. With
    the label split = the labelled split that is V x the epochs; with scarce labels and a
    large transfer set, many more epochs of the small labelled subset."""
    stored_steps = stored_epochs * math.ceil(label_samples * num_views / batch_size)
    return max(1, round(stored_steps / math.ceil(labelled_samples / batch_size)))


def baseline_config(cfg: TrainConfig, *, label_samples: int, num_views: int, labelled_samples: int) -> TrainConfig:
    """cfg for the hard-label baseline of a stored-label student trained with cfg: its
    epochs (baseline_epochs) and validation as often, every stored-epoch's worth of steps."""
    epochs = baseline_epochs(
        cfg.epochs,
        label_samples=label_samples,
        num_views=num_views,
        labelled_samples=labelled_samples,
        batch_size=cfg.batch_size,
    )
    return dataclasses.replace(cfg, epochs=epochs, eval_every=cfg.eval_every * max(1, epochs // cfg.epochs))


def same_steps_config(cfg: TrainConfig, *, reference_samples: int, samples: int) -> TrainConfig:
    """cfg for a student reading `samples` rows per epoch (other data: the teacher's written
    answers) that takes exactly the optimizer steps of one reading `reference_samples` with
    cfg: max_steps = epochs x ceil(reference / batch), over as many epochs as that needs
    (the last one cut short)."""
    steps = cfg.epochs * math.ceil(reference_samples / cfg.batch_size)
    if cfg.max_steps is not None:
        steps = min(steps, cfg.max_steps)
    per_epoch = math.ceil(samples / cfg.batch_size)
    return dataclasses.replace(cfg, epochs=math.ceil(steps / per_epoch), max_steps=steps)


# ------------------------------------------------------------------ the teacher's eval-logit cache


def teacher_eval_logits(
    teacher: dict, eval_data: Source, cache_dir: str | os.PathLike, *, trusted_factories: Collection[str] = ()
) -> np.ndarray:
    """The teacher's logits on eval_data (N, C), rows in eval_data order.

    teacher: {"checkpoint", "fingerprint", ...} (the manifest's teacher entry). Computed once
    per teacher and evaluation split and kept in cache_dir."""
    key = f"{teacher['fingerprint'].split(':')[-1][:16]}-{eval_data.fingerprint().split(':')[-1][:16]}"
    path = os.path.join(os.fspath(cache_dir), f"teacher-eval-logits-{key}.npy")
    if os.path.exists(path):
        return np.load(path)
    model, _ = load_model(teacher["checkpoint"], trusted_factories=trusted_factories)
    z = np.asarray(predict_logits(model, eval_data))
    buf = io.BytesIO()
    np.save(buf, z)
    # parallel students may race here: same bytes, unique temp names, last rename wins
    Location(os.path.dirname(path)).write_bytes_atomic(os.path.basename(path), buf.getvalue())
    return z


# ------------------------------------------------------------------ the recipe


@dataclass
class StudentResult:
    model: nn.Module
    checkpoint: str
    metadata: dict | None  # None on ranks other than 0 (they write no checkpoint)
    train: dict  # train()'s result
    train_seconds: float
    evaluation: dict | None  # evaluate() on the eval split, None without one
    exports: dict  # the task's exports: {"safetensors", "torchscript", "int8"} or {"hf_dir"}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _trainer(run: dict) -> Callable[..., dict]:
    """loop.train, or Hugging Face Trainer behind the same contract (`trainer: hf`)."""
    if run["model"].get("trainer", "builtin") != "hf":
        return train
    from pipeline.training.hf import train_with_trainer  # transformers: only when asked for

    return train_with_trainer


def run_student(
    *,
    run: dict,
    train_config: TrainConfig,
    transfer: Any,
    labelled: Any,
    val: Any,
    checkpoint_path: str,
    soft_labels: Sequence[str] = (),
    label_manifests: Sequence[dict] = (),
    teacher: dict | None = None,
    transform: Transform | None = None,
    num_views: int = 1,
    num_classes: int | None = None,
    storage_options: dict | None = None,
    expect: dict | None = None,
    public_key: str | bytes | None = None,
    lineage: dict | Callable[[TrainConfig], dict] | None = None,
    resume: bool = True,
    baseline_fair: bool = True,
    on_batch: Callable[[int, dict], None] | None = None,
    eval_data: Any = None,
    teacher_logits: np.ndarray | Callable[[], np.ndarray] | None = None,
    export_dir: str | None = None,
    quantize: bool = False,
    tokenizer_dir: str | None = None,
    model_args: dict | None = None,
) -> StudentResult:
    """Train one student and write its checkpoint; then, given eval_data, evaluate it (the
    task's evaluation: accuracy with agreement against teacher_logits, an array or a
    function giving it; or perplexity) and export it into export_dir (the task's export:
    safetensors + TorchScript [+ int8 numbers with quantize], or a Hugging Face directory
    with the tokenizer of tokenizer_dir).

    run: {"name", "model": {"arch", "kwargs"}, "loss", ...} (JSON). loss "ce" is the
    hard-label baseline on `labelled`, with baseline_config applied when baseline_fair;
    any other loss learns from soft_labels (URIs of the labels of `transfer`'s rows,
    label_manifests their manifests). num_classes: the label width (a language model's
    vocabulary), else labelled's or transfer's. lineage: the resume key
    (student_lineage), or a function of the final TrainConfig (a baseline's differs from
    train_config). model_args: more data arguments for the model factory (a pruned
    student's teacher directory). run["model"]["trainer"] "hf": Hugging Face Trainer does
    the steps (training/hf.py), else the built-in loop. A model that starts from weights
    (registry.FROM_WEIGHTS) is also evaluated before training (evaluation["initial"]).
    Under DDP every rank calls this; rank 0 writes the checkpoint and does the evaluation
    and export."""
    hard = run["loss"] == "ce"
    if not hard and not soft_labels:
        raise ValueError(f"student {run['name']!r}: loss {run['loss']!r} needs soft_labels")
    tcfg = train_config
    if hard and baseline_fair:
        tcfg = baseline_config(tcfg, label_samples=len(transfer), num_views=num_views, labelled_samples=len(labelled))
    num_classes = num_classes or labelled.num_classes or transfer.num_classes
    # data args the factory takes (a tokenizer's vocab_size / pad_id) go into the saved spec
    arch = complete_spec(
        {"arch": run["model"]["arch"], "kwargs": run["model"]["kwargs"]}, transfer.model_args() | (model_args or {})
    ).to_dict()
    with GLOBAL_RNG_LOCK:  # students train in parallel threads; seeding and init must not interleave
        torch.manual_seed(tcfg.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
        model = model_adapter(arch).build(transfer.in_shape, num_classes)
    initial = None
    if eval_data is not None and arch["arch"] in FROM_WEIGHTS and _rank() == 0:
        initial = task_of(eval_data).evaluate(model, eval_data)  # what pruning kept, before any step
    if callable(lineage):
        lineage = lineage(tcfg)
    train_data = labelled if hard else transfer
    labels = None if hard else list(soft_labels) if len(soft_labels) > 1 else soft_labels[0]
    t0 = time.perf_counter()
    result = _trainer(run)(
        model,
        tcfg,
        train_data=train_data,
        val_data=val,
        labels=labels,
        transform=transform,
        num_views=num_views if hard else None,
        storage_options=storage_options,
        expect=None if hard else expect,
        public_key=None if hard else public_key,
        resume=resume,
        lineage=lineage,
        on_batch=on_batch,
    )
    seconds = time.perf_counter() - t0
    out = StudentResult(
        model=model,
        checkpoint=str(checkpoint_path),
        metadata=None,
        train=result,
        train_seconds=seconds,
        evaluation=None,
        exports={},
    )
    if _rank() != 0:
        return out
    infos = [] if hard else [soft_label_info(u, m) for u, m in zip(soft_labels, label_manifests)]
    meta = student_metadata(
        run=run,
        teacher=teacher,
        soft_labels=infos,
        data=train_data,
        train_config=tcfg,
        result=result,
        lineage=lineage,
        world_size=_world(),
    )
    out.metadata = save_checkpoint(
        checkpoint_path, model, arch=arch, in_shape=transfer.in_shape, num_classes=num_classes, metadata=meta
    )
    if eval_data is None:
        return out
    task = task_of(eval_data)
    z = teacher_logits() if callable(teacher_logits) else teacher_logits
    out.evaluation = task.evaluate(model, eval_data, teacher_logits=z)
    if initial is not None:
        out.evaluation["initial"] = initial
    if export_dir is not None:
        out.exports = task.export(
            model, export_dir, run["name"], eval_data, quantize=quantize, tokenizer_dir=tokenizer_dir
        )
    return out
