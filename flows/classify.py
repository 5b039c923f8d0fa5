"""The classifier task's half of the recipes (`task: classify`): its teacher (trained, or
fine-tuned, from the config, and refused when a checkpoint of another lineage is in the
way), its labeller, the checks that stored labels belong to this config's data, and the
inputs of each student. flows/recipes.py calls these through `TASK_RECIPES`; everything
passed in or out is a config, a path/URI or small JSON metadata, never a tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import storage
from pipeline.labelling.classify import ClassifyLabeller
from pipeline.models.checkpoint import checkpoint_info, load_model
from pipeline.paths import absolute_if_exists
from pipeline.training import student
from pipeline.training.config import TrainConfig
from pipeline.training.loop import lineage_diff
from pipeline.training.stream import verifier
from pipeline.training.teacher import finetune, train_teacher, training_lineage
from pipeline.views.images import ViewSpec

from . import secrets
from .config import ClassifyConfig as Config
from .config import TrainSection
from .inputs import eval_split, splits, unit, view_spec


def train_config(section: TrainSection, **extra) -> TrainConfig:
    """A training section plus what the recipe fills in (paths; a student's loss,
    temperature and alpha from the sweep grid)."""
    return TrainConfig(**section.model_dump(), **extra)


# ------------------------------------------------------------------ teacher


def teacher_info(path: str) -> dict:
    """The manifest's `teacher` entry for a checkpoint: name, fingerprint, arch, path."""
    meta = checkpoint_info(path)  # metadata only: builds (and imports) nothing
    return {"name": meta.get("name") or Path(path).stem, "fingerprint": meta["fingerprint"], "checkpoint": str(path)}


class TeacherLineageError(ValueError):
    """The teacher checkpoint in the run directory was trained with other data, split,
    views, model or training config than this config says."""


def teacher_lineage(cfg: Config) -> dict:
    """The lineage train_teacher / finetune record for this config's teacher."""
    s = splits(cfg)
    tcfg = train_config(cfg.teacher.train)
    if cfg.teacher.finetune_from:
        parent = checkpoint_info(cfg.teacher.finetune_from)["fingerprint"]
        return training_lineage(
            s["train"], s.get("val"), view_spec(cfg), tcfg, parent=parent, freeze=cfg.teacher.freeze
        )
    return training_lineage(
        s["train"], s.get("val"), view_spec(cfg), tcfg, model=cfg.teacher.model.model_dump(include={"arch", "kwargs"})
    )


_TEACHER_KEYS = {
    "train": "teacher.train",
    "model": "teacher.model",
    "freeze": "teacher.freeze",
    "parent": "teacher.finetune_from (its fingerprint)",
}


def _at(d, dotted: str):
    for k in dotted.split("."):
        d = d.get(k, "<missing>") if isinstance(d, dict) else "<missing>"
    return d


def _teacher_diff(old: dict, new: dict) -> list[str]:
    """Each differing lineage item, in config terms: checkpoint value vs config value."""
    out = []
    keys = lineage_diff(old, new)
    for key in keys:
        was, now = _at(old, key), _at(new, key)
        top, _, rest = key.partition(".")
        if top in ("data", "val_data"):
            which = "train" if top == "data" else "val"
            if rest == "split":
                out.append(
                    f"{which} split: the checkpoint was trained on {_split_desc(was)}, this config "
                    f"cuts {_split_desc(now)}"
                )
            elif f"{top}.split" not in keys:  # same split definition, other inputs or labels
                out.append(
                    f"{which} split: same split, other images or labels (data.fingerprint "
                    f"{str(was)[:16]}... recorded, {str(now)[:16]}... now): data.dataset changed"
                )
            continue
        name = f"{_TEACHER_KEYS.get(top, top)}{'.' + rest if rest else ''}"
        out.append(f"{name}: checkpoint {was!r}, config {now!r}")
    return out


def check_teacher_lineage(cfg: Config, path: str) -> None:
    """Refuse to reuse a teacher checkpoint of the run directory that was trained with
    another lineage than this config's. A given teacher.checkpoint is the user's choice:
    not checked."""
    if cfg.teacher.checkpoint:
        return
    recorded = checkpoint_info(path).get("lineage")
    want = teacher_lineage(cfg)
    if recorded == want:
        return
    problems = (
        _teacher_diff(recorded, want)
        if isinstance(recorded, dict)
        else [
            "it records no training lineage (written before distillery recorded one), so nothing says "
            "it was trained on this config's data"
        ]
    )
    raise TeacherLineageError(
        f"refusing to reuse the teacher at {path}: it was trained with another lineage than this config's:\n"
        + "".join(f"  - {p}\n" for p in problems)
        + "  Delete the file or pass `distill teacher train --retrain` to train it again (or set "
        "teacher.checkpoint to use it as it is)"
    )


def existing_teacher(cfg: Config) -> dict:
    """teacher_info of the config's teacher checkpoint, which must exist (and, in the run
    directory, have this config's lineage): for labelling and students."""
    path = cfg.teacher_path()
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no teacher checkpoint at {path}: run `distill teacher train` first or set teacher.checkpoint"
        )
    check_teacher_lineage(cfg, path)
    return teacher_info(path)


def ensure_teacher(cfg: Config, *, retrain: bool = False) -> dict:
    """Train (or fine-tune) the teacher unless a checkpoint of this config's lineage
    already exists (one of another lineage is refused). Returns teacher_info."""
    path = cfg.teacher_path()
    if os.path.exists(path) and not retrain:
        return existing_teacher(cfg)
    if cfg.teacher.checkpoint:
        if os.path.exists(path):  # --retrain must not overwrite the user's own file
            raise ValueError(
                f"--retrain: teacher.checkpoint={path} is a given checkpoint, not one trained "
                f"here; unset teacher.checkpoint to train a teacher"
            )
        raise FileNotFoundError(f"teacher.checkpoint {cfg.teacher.checkpoint!r} does not exist")
    s = splits(cfg)
    train_set = s["train"] if s["train"].y is not None else None
    if train_set is None:
        raise ValueError("teacher training needs a labeled 'train' split")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tcfg = train_config(cfg.teacher.train, log_path=str(Path(path).with_suffix(".jsonl")))
    meta = {"name": cfg.teacher.model.display_name()}
    from .progress import batch_callback

    on_batch, close = batch_callback("teacher")
    try:
        if cfg.teacher.finetune_from:
            finetune(
                cfg.teacher.finetune_from,
                train_set,
                s.get("val"),
                cfg=tcfg,
                out_path=path,
                freeze=cfg.teacher.freeze,
                transform=view_spec(cfg),
                resume=not retrain,
                metadata=meta,
                on_batch=on_batch,
                trusted_factories=cfg.model_factories(),
            )
        else:
            # retrain: a new run, not the continuation of the last one's resume file
            train_teacher(
                cfg.teacher.model.model_dump(include={"arch", "kwargs"}),
                train_set,
                s.get("val"),
                cfg=tcfg,
                out_path=path,
                transform=view_spec(cfg),
                resume=not retrain,
                metadata=meta,
                on_batch=on_batch,
            )
    finally:
        close()
    return teacher_info(path)


# ------------------------------------------------------------------ labelling


# ------------------------------------------------------------------ the stored labels' lineage


class LabelLineageError(storage.MismatchError):
    """Stored labels were made from other inputs than this config's label split, or they
    cover images this config evaluates on (the student would be tested on training rows)."""


def _split_desc(spec: str | None) -> str:
    try:
        d = json.loads(spec)
        return f"split {d['split']!r} cut with data.seed={d['seed']} (sizes {d['sizes']})"
    except (TypeError, ValueError, KeyError):
        return f"split {spec!r}"


def _views_problems(cfg: Config, m: dict) -> list[str]:
    """views.* keys whose config value differs from what the labels were made with (the
    manifest's num_views and data.transform): the student would regenerate other pixels
    than the teacher labelled."""
    out = []
    if m["num_views"] != cfg.views.num_views:
        out.append(f"views.num_views: stored {m['num_views']}, config {cfg.views.num_views}")
    stored = (m.get("data") or {}).get("transform")
    spec = view_spec(cfg)
    want = spec.to_dict() if spec is not None else None
    if stored != want:
        # no transform is the identity: compare field by field against the other side's seed
        st = stored if isinstance(stored, dict) else ViewSpec(seed=(want or {}).get("seed", 0)).to_dict()
        cf = want if want is not None else ViewSpec(seed=st.get("seed", 0)).to_dict()
        key = "views.transform." if "kind" in st or "kind" in cf else "views."  # where the config sets it
        out += [
            f"{key}{k}: stored {st.get(k)!r}, config {cf.get(k)!r}"
            for k in sorted(set(st) | set(cf))
            if st.get(k) != cf.get(k)
        ]
    return out


def check_label_lineage(cfg: Config, uri: str) -> dict:
    """Refuse stored labels that do not belong to this config's splits and views; returns
    their manifest.

    The checks: the manifest's data fingerprint is that of this config's label split (the
    same inputs, data.seed and sizes: the fingerprint hashes the images, labels and split
    definition), the stored ids are exactly the split's, the config's views are the stored
    ones, and, as proof that evaluation cannot leak, none of the stored sample ids is an
    id of this config's evaluation or validation split."""
    s = splits(cfg)
    inputs = s[cfg.data.label_split]
    ds = storage.open_soft_labels(
        uri, storage_options=secrets.resolve(cfg.label.storage_options) or None, verifier=verifier(cfg.label.public_key)
    )
    stored = ds.manifest.get("data") or {}
    problems = []
    if stored.get("fingerprint") != inputs.fingerprint():
        if stored.get("split") == inputs.split_spec:
            problems.append(
                f"they label the same split of {stored.get('name')!r} ({_split_desc(inputs.split_spec)}) "
                f"but other images or labels: data.fingerprint differs ({str(stored.get('fingerprint'))[:16]}"
                f"... stored, {inputs.fingerprint()[:16]}... now), data.dataset changed since labelling"
            )
        else:
            problems.append(
                f"they label {stored.get('name')!r} {_split_desc(stored.get('split'))}, but this config's "
                f"label split is {inputs.name!r} {_split_desc(inputs.split_spec)}: other images "
                f"(data.fingerprint differs)"
            )
    ids = np.unique(
        np.concatenate([b["sample_id"] for b in ds.iter_batches(1 << 16, shuffle=False, columns=["sample_id"])])
    )
    unlabelled = np.setdiff1d(inputs.sample_ids, ids)
    if len(unlabelled):
        problems.append(
            f"{len(unlabelled)} of the {len(inputs)} samples of this config's label split "
            f"{cfg.data.label_split!r} have no stored label (sample ids e.g. {unlabelled[:5].tolist()}): "
            f"the split is larger than what was labelled"
        )
    foreign = np.setdiff1d(ids, inputs.sample_ids)
    if len(foreign):
        problems.append(
            f"{len(foreign)} stored samples are not in this config's label split "
            f"{cfg.data.label_split!r} (sample ids e.g. {foreign[:5].tolist()})"
        )
    views = _views_problems(cfg, ds.manifest)
    if views:
        problems.append(
            "the config's views differ from those the labels were made with (the student would "
            "see other pixels than the teacher labelled): " + "; ".join(views)
        )
    for name in ("test", "val"):
        if name not in s:
            continue
        leaked = np.intersect1d(ids, s[name].sample_ids)
        if len(leaked):
            problems.append(
                f"{len(leaked)} of the {len(s[name])} images of this config's {name!r} split are "
                f"stored labels' samples (sample ids e.g. {leaked[:5].tolist()}): students would "
                f"train on them, so evaluating on them would leak"
            )
    if problems:
        raise LabelLineageError(
            f"refusing the soft labels at {uri}:\n"
            + "".join(f"  - {p}\n" for p in problems)
            + "  Use the data and views sections (data.seed, data.sizes, data.label_split, "
            "views.*) the labels were made with, or label again with this config "
            "(`distill label`, another label.uri)"
        )
    return ds.manifest


# ------------------------------------------------------------------ labelling


def manifest_teacher(teacher: dict) -> dict:
    """The manifest's teacher entry: name, fingerprint, checkpoint (an absolute path, so a
    replay from another working directory finds it)."""
    return teacher | {"checkpoint": os.path.abspath(teacher["checkpoint"])}


def recipe_data(cfg: Config) -> dict:
    """The config's data section as the manifest records it for `--replay`: its file paths
    made absolute (a relative path means the labelling run's working directory)."""
    d = json.loads(cfg.data.model_dump_json())
    d["dataset"] = absolute_if_exists(d.get("dataset"))
    for key in ("source", "transfer", "tokenizer"):
        if d.get(key):
            d[key]["path"] = absolute_if_exists(d[key]["path"])
    if d.get("split_files"):
        d["split_files"] = {k: absolute_if_exists(v) for k, v in d["split_files"].items()}
    return d


def labeller(cfg: Config, teacher: dict, job: str = "windows") -> ClassifyLabeller:
    """The teacher over every (sample, view) of the label split. The manifest records,
    besides what the labels are a function of, the config's data section: `distill inspect
    --replay` rebuilds the very inputs from it and recomputes stored rows with the teacher."""
    model, _ = load_model(teacher["checkpoint"], trusted_factories=cfg.model_factories())
    inputs = splits(cfg)[cfg.data.label_split]
    lc = cfg.label
    recipe = {"data": recipe_data(cfg), "label_split": cfg.data.label_split}
    return ClassifyLabeller(
        model,
        inputs,
        transform=view_spec(cfg),
        num_views=cfg.views.num_views,
        batch_size=lc.batch_size,
        device=lc.device,
        amp=lc.amp,
        feature_layer=lc.feature_layer,
        workers=lc.workers,
        data={"recipe": recipe},
        output={
            "uri": cfg.soft_label_uri(),
            "backend": lc.backend,
            "temperature": lc.temperature,
            "representation": lc.representation,
            "k": lc.k,
            "dtype": lc.dtype,
            "compression": lc.compression,
        },
    )


# ------------------------------------------------------------------ students


def student_inputs(cfg: Config, teacher: dict, run: dict, manifests: list[dict]) -> dict:
    """run_student's task-specific arguments for one student of the sweep."""
    s = splits(cfg)
    return {
        "transfer": s[cfg.data.label_split],
        "labelled": s["train"],
        "val": s.get("val"),
        "eval_data": eval_split(cfg),
        "transform": view_spec(cfg),
        "num_views": cfg.views.num_views,
        "teacher_logits": lambda: teacher_eval_logits(cfg, teacher),
        "lineage": lambda t: student_lineage(cfg, teacher, run, t, manifests),
    }


def teacher_eval_logits(cfg: Config, teacher: dict):
    """The teacher's logits on the evaluation split (for students' agreement), (N, C),
    cached next to the run's students (pipeline.training.student.teacher_eval_logits)."""
    return student.teacher_eval_logits(
        teacher, eval_split(cfg), cfg.run_dir() / "students", trusted_factories=cfg.model_factories()
    )


def student_lineage(cfg: Config, teacher: dict, run: dict, tcfg: TrainConfig, label_manifests: list[dict]) -> dict:
    """What a student's resume file must match (pipeline.training.student.student_lineage),
    in this config's terms: every split's fingerprint, the data section's split definition,
    the views."""
    return student.student_lineage(
        data={name: d.fingerprint() for name, d in splits(cfg).items()},
        split=cfg.data.model_dump(
            include={"dataset", "seed", "sizes", "fractions", "ranges", "split_files", "label_split", "loader"}
        ),
        views=cfg.views.model_dump(),
        model=run["model"],
        train_config=tcfg,
        teacher_fingerprint=teacher["fingerprint"],
        label_manifests=label_manifests,
    )


def teacher_evaluation(cfg: Config, teacher: dict) -> dict:
    """The report's teacher entry: its accuracy (and size, latency) on the evaluation split."""
    from pipeline.tasks import task_of

    model, tmeta = load_model(teacher["checkpoint"], trusted_factories=cfg.model_factories())
    data = eval_split(cfg)
    ev = task_of(data).evaluate(model, data)
    counts = tmeta.get("param_counts") or {}
    return {
        "name": teacher["name"],
        "accuracy": ev["accuracy"],
        "params": ev["params"],
        "size_bytes": ev["size_bytes"],
        "latency_ms": ev["latency_ms"],
        "ece": ev["ece"],
        "fingerprint": teacher["fingerprint"],
        "checkpoint": teacher["checkpoint"],
        # the architecture (a pretrained model's `path`), and what fine-tuning trained
        "arch": tmeta.get("arch"),
        "trained_params": counts.get("trainable"),
        "pretrained": (tmeta.get("arch") or {}).get("kwargs", {}).get("path"),
    }


def data_description(cfg: Config) -> dict:
    """What the students learned from, for the report's footnote and chart."""
    s = splits(cfg)
    return {
        "labelled_split": "train",
        "labelled": len(s["train"]),
        "label_split": cfg.data.label_split,
        "label_samples": len(s[cfg.data.label_split]),
        "views": cfg.views.num_views,
        "unit": unit(s["train"]),
        "eval_split": "test" if "test" in s else "val",
    }
