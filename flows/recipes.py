"""Recipes: config -> pipeline/storage calls. Plain functions (no Prefect), so each task
body is one call here and can be tested on its own. Everything passed in or out is a
config dict, a path/URI or small JSON metadata, never a tensor.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

import storage
from storage import Location
from pipeline.models.checkpoint import checkpoint_info, load_model
from pipeline.evaluate import evaluate
from pipeline.labelling.classify import label_shard, open_label_writer
from pipeline.training.teacher import finetune, train_teacher, training_lineage
from pipeline.training import student
from pipeline.training.loop import TrainConfig, lineage_diff
from pipeline.views.images import ViewSpec

from . import secrets
from .config import Config, TrainSection, parse_config
from .inputs import eval_split, splits, unit, view_spec



def as_config(cfg: Config | dict) -> Config:
    return cfg if isinstance(cfg, Config) else parse_config(cfg)


def train_config(section: TrainSection, **extra) -> TrainConfig:
    """A training section plus what the recipe fills in (paths; a student's loss,
    temperature and alpha from the sweep grid)."""
    return TrainConfig(**section.model_dump(), **extra)


# ------------------------------------------------------------------ teacher

def teacher_info(path: str) -> dict:
    """The manifest's `teacher` entry for a checkpoint: name, fingerprint, arch, path."""
    meta = checkpoint_info(path)   # metadata only: builds (and imports) nothing
    return {"name": meta.get("name") or Path(path).stem, "fingerprint": meta["fingerprint"],
            "checkpoint": str(path)}


class TeacherLineageError(ValueError):
    """The teacher checkpoint in the run directory was trained with other data, split,
    views, model or training config than this config says."""


def teacher_lineage(cfg: Config) -> dict:
    """The lineage train_teacher / finetune record for this config's teacher."""
    s = splits(cfg)
    tcfg = train_config(cfg.teacher.train)
    if cfg.teacher.finetune_from:
        parent = checkpoint_info(cfg.teacher.finetune_from)["fingerprint"]
        return training_lineage(s["train"], s.get("val"), view_spec(cfg), tcfg, parent=parent,
                                freeze=cfg.teacher.freeze)
    return training_lineage(s["train"], s.get("val"), view_spec(cfg), tcfg,
                            model=cfg.teacher.model.model_dump(include={"arch", "kwargs"}))


_TEACHER_KEYS = {"train": "teacher.train", "model": "teacher.model", "freeze": "teacher.freeze",
                 "parent": "teacher.finetune_from (its fingerprint)"}


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
                out.append(f"{which} split: the checkpoint was trained on {_split_desc(was)}, this config "
                           f"cuts {_split_desc(now)}")
            elif f"{top}.split" not in keys:  # same split definition, other inputs or labels
                out.append(f"{which} split: same split, other images or labels (data.fingerprint "
                           f"{str(was)[:16]}... recorded, {str(now)[:16]}... now): data.dataset changed")
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
    problems = (_teacher_diff(recorded, want) if isinstance(recorded, dict) else
                ["it records no training lineage (written before distillery recorded one), so nothing says "
                 "it was trained on this config's data"])
    raise TeacherLineageError(
        f"refusing to reuse the teacher at {path}: it was trained with another lineage than this config's:\n"
        + "".join(f"  - {p}\n" for p in problems)
        + "  Delete the file or pass `distill teacher train --retrain` to train it again (or set "
          "teacher.checkpoint to use it as it is)")


def existing_teacher(cfg: Config) -> dict:
    """teacher_info of the config's teacher checkpoint, which must exist (and, in the run
    directory, have this config's lineage): for labelling and students."""
    path = cfg.teacher_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"no teacher checkpoint at {path}: run `distill teacher train` first "
                                f"or set teacher.checkpoint")
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
            raise ValueError(f"--retrain: teacher.checkpoint={path} is a given checkpoint, not one trained "
                             f"here; unset teacher.checkpoint to train a teacher")
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
            finetune(cfg.teacher.finetune_from, train_set, s.get("val"), cfg=tcfg, out_path=path,
                     freeze=cfg.teacher.freeze, view_spec=view_spec(cfg), resume=not retrain, metadata=meta,
                     on_batch=on_batch, trusted_factories=cfg.model_factories())
        else:
            # retrain: a new run, not the continuation of the last one's resume file
            train_teacher(cfg.teacher.model.model_dump(include={"arch", "kwargs"}), train_set, s.get("val"),
                          cfg=tcfg, out_path=path, view_spec=view_spec(cfg), resume=not retrain, metadata=meta,
                          on_batch=on_batch)
    finally:
        close()
    return teacher_info(path)


# ------------------------------------------------------------------ labelling

def _writer(cfg: Config, teacher: dict, *, overwrite: bool = False):
    model, _ = load_model(teacher["checkpoint"], trusted_factories=cfg.model_factories())
    inputs = splits(cfg)[cfg.data.label_split]
    lc = cfg.label
    vs = view_spec(cfg)
    # what the labels are a function of, plus the config's data section: `distill inspect
    # --replay` rebuilds the very inputs from it and recomputes stored rows with the teacher
    data = {"name": inputs.name, "split": inputs.split_spec, "fingerprint": inputs.fingerprint(),
            "transform": vs.to_dict() if vs is not None else None, "inputs": inputs.describe(),
            "recipe": {"data": json.loads(cfg.data.model_dump_json()), "label_split": cfg.data.label_split}}
    writer, plan, dev, amp = open_label_writer(
        model, inputs, cfg.soft_label_uri(), backend=lc.backend, temperature=lc.temperature, teacher=teacher,
        data=data,
        num_views=cfg.views.num_views, view_spec=view_spec(cfg), shard_size=lc.shard_size,
        representation=lc.representation, k=lc.k, dtype=lc.dtype, device=lc.device, amp=lc.amp,
        feature_layer=lc.feature_layer, storage_options=secrets.resolve(lc.storage_options) or None, overwrite=overwrite,
        compression=lc.compression)
    return model, inputs, writer, plan, dev, amp


def plan_labels(cfg: Config, teacher: dict) -> dict:
    """Open the dataset (resume or create) and list the shards still to label."""
    _, _, writer, plan, _, _ = _writer(cfg, teacher, overwrite=cfg.label.overwrite)
    done = set(writer.committed_shards())
    return {"uri": writer.uri, "num_shards": len(plan), "status": writer.manifest["status"],
            "pending": [{"shard": i, "start": a, "stop": b} for i, (a, b) in enumerate(plan) if i not in done],
            "committed": sorted(done)}


def label_one_shard(cfg: Config, teacher: dict, shard: int, start: int, stop: int) -> dict:
    model, inputs, writer, plan, dev, amp = _writer(cfg, teacher)
    if shard in set(writer.committed_shards()):  # a retry or a concurrent run got there first
        return {"shard": shard, "rows": 0, "samples": 0, "seconds": 0.0, "samples_per_s": 0.0, "skipped": True}
    s = label_shard(model, inputs, writer, shard, start=start, stop=stop, view_spec=view_spec(cfg),
                    num_views=cfg.views.num_views, batch_size=cfg.label.batch_size, device=str(dev), amp=amp,
                    feature_layer=cfg.label.feature_layer)
    return {k: v for k, v in s.items() if k != "record"} | {"sha256": s["record"]["sha256"], "skipped": False,
                                                          "pid": os.getpid()}


def finalize_labels(cfg: Config, teacher: dict) -> dict:
    _, _, writer, _, _, _ = _writer(cfg, teacher)
    # a concurrent run may have finalized already; finalize again only if the manifest
    # does not name exactly the committed shards
    m = writer.manifest if writer.is_finalized_as_committed() else writer.finalize()
    return summarize(m, writer.uri)


def summarize(m: dict, uri: str) -> dict:
    return {"uri": uri, "status": m["status"], "backend": m["backend"], "num_samples": m["num_samples"],
            "num_rows": m["num_rows"], "num_views": m["num_views"], "num_classes": m["num_classes"],
            "temperature": m["temperature"], "representation": m["representation"],
            "num_shards": m.get("num_shards"), "bytes": sum(s.get("bytes", 0) for s in m.get("shards", [])),
            "teacher": m["teacher"], "data": {k: m["data"].get(k) for k in ("name", "split", "fingerprint", "transform", "inputs")}}


# ------------------------------------------------------------------ students

def student_runs(cfg: Config) -> list[dict]:
    """The sweep: models x temperatures x alphas x losses, plus one hard-label baseline per model."""
    runs = []
    sc = cfg.students
    for m in sc.models:
        base = m.display_name()
        if sc.baseline:
            runs.append({"name": f"{base}-baseline", "model": m.model_dump(), "mode": "hard", "arch_name": base})
        for T in sc.temperatures:
            for a in sc.alphas:
                for loss in sc.losses:
                    runs.append({"name": f"{base}-T{T:g}-a{a:g}-{loss}", "model": m.model_dump(), "mode": "stored",
                                 "temperature": T, "alpha": a, "loss": loss, "arch_name": base})
    names = [r["name"] for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"students: duplicate run names {sorted(dup)}; give the models distinct `name`s")
    return runs


def teacher_eval_logits(cfg: Config, teacher: dict):
    """The teacher's logits on the evaluation split (for students' agreement), (N, C),
    cached next to the run's students (pipeline.training.student.teacher_eval_logits)."""
    return student.teacher_eval_logits(teacher, eval_split(cfg), cfg.run_dir() / "students",
                                       trusted_factories=cfg.model_factories())


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
        key = "views.transform." if "kind" in st or "kind" in cf else "views."   # where the config sets it
        out += [f"{key}{k}: stored {st.get(k)!r}, config {cf.get(k)!r}"
                for k in sorted(set(st) | set(cf)) if st.get(k) != cf.get(k)]
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
    ds = storage.open_soft_labels(uri, storage_options=secrets.resolve(cfg.label.storage_options) or None)
    stored = ds.manifest.get("data") or {}
    problems = []
    if stored.get("fingerprint") != inputs.fingerprint():
        if stored.get("split") == inputs.split_spec:
            problems.append(f"they label the same split of {stored.get('name')!r} ({_split_desc(inputs.split_spec)}) "
                            f"but other images or labels: data.fingerprint differs ({str(stored.get('fingerprint'))[:16]}"
                            f"... stored, {inputs.fingerprint()[:16]}... now), data.dataset changed since labelling")
        else:
            problems.append(f"they label {stored.get('name')!r} {_split_desc(stored.get('split'))}, but this config's "
                            f"label split is {inputs.name!r} {_split_desc(inputs.split_spec)}: other images "
                            f"(data.fingerprint differs)")
    ids = np.unique(np.concatenate([b["sample_id"] for b in ds.iter_batches(1 << 16, shuffle=False,
                                                                            columns=["sample_id"])]))
    unlabelled = np.setdiff1d(inputs.sample_ids, ids)
    if len(unlabelled):
        problems.append(f"{len(unlabelled)} of the {len(inputs)} samples of this config's label split "
                        f"{cfg.data.label_split!r} have no stored label (sample ids e.g. {unlabelled[:5].tolist()}): "
                        f"the split is larger than what was labelled")
    foreign = np.setdiff1d(ids, inputs.sample_ids)
    if len(foreign):
        problems.append(f"{len(foreign)} stored samples are not in this config's label split "
                        f"{cfg.data.label_split!r} (sample ids e.g. {foreign[:5].tolist()})")
    views = _views_problems(cfg, ds.manifest)
    if views:
        problems.append("the config's views differ from those the labels were made with (the student would "
                        "see other pixels than the teacher labelled): " + "; ".join(views))
    for name in ("test", "val"):
        if name not in s:
            continue
        leaked = np.intersect1d(ids, s[name].sample_ids)
        if len(leaked):
            problems.append(f"{len(leaked)} of the {len(s[name])} images of this config's {name!r} split are "
                            f"stored labels' samples (sample ids e.g. {leaked[:5].tolist()}): students would "
                            f"train on them, so evaluating on them would leak")
    if problems:
        raise LabelLineageError(f"refusing the soft labels at {uri}:\n" + "".join(f"  - {p}\n" for p in problems)
                                + "  Use the data and views sections (data.seed, data.sizes, data.label_split, "
                                  "views.*) the labels were made with, or label again with this config "
                                  "(`distill label`, another label.uri)")
    return ds.manifest


def baseline_epochs(cfg: Config) -> int:
    """Epochs that give a hard-label baseline as many optimizer steps as a stored-label
    student (the rule: pipeline.training.student.baseline_epochs)."""
    s, t = splits(cfg), cfg.students.train
    return student.baseline_epochs(t.epochs, label_samples=len(s[cfg.data.label_split]),
                                   num_views=cfg.views.num_views, labelled_samples=len(s["train"]),
                                   batch_size=t.batch_size)


def student_lineage(cfg: Config, teacher: dict, run: dict, tcfg: TrainConfig, label_manifests: list[dict]) -> dict:
    """What a student's resume file must match (pipeline.training.student.student_lineage), in this
    config's terms: every split's fingerprint, the data section's split definition, the views."""
    return student.student_lineage(
        data={name: d.fingerprint() for name, d in splits(cfg).items()},
        split=cfg.data.model_dump(include={"dataset", "seed", "sizes", "fractions", "label_split", "loader"}),
        views=cfg.views.model_dump(), model=run["model"], train_config=tcfg, mode=run["mode"],
        teacher_fingerprint=teacher["fingerprint"], label_manifests=label_manifests)


def train_student(cfg: Config, teacher: dict, soft_label_uri: str, run: dict) -> dict:
    """One student of the sweep: the config's inputs to pipeline.training.student.run_student."""
    import torch
    so = secrets.resolve(cfg.label.storage_options) or None
    uris, manifests = [], []
    if run["mode"] != "hard":
        uris = [soft_label_uri, *cfg.students.extra_soft_labels]
        manifests = [check_label_lineage(cfg, soft_label_uri)] + [
            storage.open_soft_labels(u, storage_options=so).manifest for u in cfg.students.extra_soft_labels]
    s = splits(cfg)
    out = cfg.run_dir() / "students"
    out.mkdir(parents=True, exist_ok=True)
    grid = {k: run[k] for k in ("temperature", "alpha", "loss") if k in run}  # the sweep owns these
    tcfg = train_config(cfg.students.train, **grid,
                        log_path=str(out / f"{run['name']}.jsonl"), ckpt_path=str(out / f"{run['name']}.train.pt"))
    ckpt = str(out / f"{run['name']}.pt")
    # the config's views (checked equal to the stored transform), not the stored ones silently
    r = student.run_student(
        run=run, train_config=tcfg, transfer=s[cfg.data.label_split], labelled=s["train"], val=s.get("val"),
        checkpoint_path=ckpt, soft_labels=uris, label_manifests=manifests, teacher=teacher,
        view_spec=view_spec(cfg), num_views=cfg.views.num_views, storage_options=so,
        expect={"teacher.fingerprint": teacher["fingerprint"]} if uris else None,
        lineage=lambda t: student_lineage(cfg, teacher, run, t, manifests), resume=True,
        eval_data=eval_split(cfg), teacher_logits=lambda: teacher_eval_logits(cfg, teacher),
        export_dir=str(out) if cfg.students.export else None, quantize=cfg.students.quantize)
    ev, result = r.evaluation, r.train
    return r.exports | {"name": run["name"], "arch_name": run["arch_name"], "mode": run["mode"],
            "temperature": run.get("temperature"), "alpha": run.get("alpha"), "loss": run.get("loss"),
            "accuracy": ev["accuracy"], "agreement": ev["agreement"], "ece": ev["ece"], "params": ev["params"],
            "size_bytes": ev["size_bytes"], "latency_ms": ev["latency_ms"], "checkpoint": ckpt,
            "best_val_acc": result.get("best_val_acc"), "epochs_run": result.get("epochs_run"),
            "epochs_trained": result.get("epochs_trained"), "steps": result.get("steps"),
            "train_seconds": r.train_seconds, "torch_threads": torch.get_num_threads()}


def build_report(cfg: Config, teacher: dict, soft_label_uri: str, results: list[dict]) -> dict:
    """report.json: teacher and each student (with its architecture's baseline accuracy)."""
    s = splits(cfg)
    model, tmeta = load_model(teacher["checkpoint"], trusted_factories=cfg.model_factories())
    ev = evaluate(model, eval_split(cfg))
    counts = tmeta.get("param_counts") or {}
    baselines = {r["arch_name"]: r["accuracy"] for r in results if r["mode"] == "hard"}
    students = []
    for r in results:
        entry = {k: r[k] for k in ("name", "arch_name", "accuracy", "agreement", "params", "size_bytes",
                                   "latency_ms", "checkpoint", "mode", "temperature", "alpha", "loss", "ece",
                                   "torch_threads")}
        entry["baseline_accuracy"] = baselines.get(r["arch_name"])
        entry["steps"] = r.get("steps")
        entry.update({k: r[k] for k in ("int8", "safetensors", "torchscript") if k in r})
        students.append(entry)
    report = {"name": cfg.name, "eval_split": "test" if "test" in s else "val",
              "teacher": {"name": teacher["name"], "accuracy": ev["accuracy"], "params": ev["params"],
                          "size_bytes": ev["size_bytes"], "latency_ms": ev["latency_ms"], "ece": ev["ece"],
                          "fingerprint": teacher["fingerprint"], "checkpoint": teacher["checkpoint"],
                          # the architecture (a pretrained model's `path`), and what fine-tuning trained
                          "arch": tmeta.get("arch"), "trained_params": counts.get("trainable"),
                          "pretrained": (tmeta.get("arch") or {}).get("kwargs", {}).get("path")},
              "students": students, "soft_labels": soft_label_uri,
              # what the students learned from: for the table's footnote and the chart
              "data": {"labelled_split": "train", "labelled": len(s["train"]), "label_split": cfg.data.label_split,
                       "label_samples": len(s[cfg.data.label_split]), "views": cfg.views.num_views,
                       "unit": unit(s["train"])}}
    from .report import students_png
    run_dir = Location(str(cfg.run_dir()))
    run_dir.write_bytes_atomic("students.png", students_png(report))
    report["chart"] = str(cfg.run_dir() / "students.png")
    path = cfg.run_dir() / "report.json"
    run_dir.write_bytes_atomic(path.name, json.dumps(report, indent=2).encode())
    report["path"] = str(path)
    return report
