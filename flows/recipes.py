"""Recipes: a config -> pipeline and storage calls, the same for every task. Plain functions
(no Prefect), so each Prefect task body is one call here and can be tested on its own, and
the torchrun entry (flows/ddp.py) trains a student through the very same function.
Everything passed in or out is a config, a path/URI or small JSON metadata, never a tensor.

What differs between tasks is the task's half (flows/classify.py, flows/lm.py, picked by
the config's `task`): its teacher, its data, its labeller, its students' inputs and what
the report says about them. Everything else is here once:

    teacher = ensure_teacher(cfg)                  trained (classify) or resolved (lm)
    plan    = plan_labels(cfg, teacher)            open or resume the label datasets
    label_one_shard(cfg, teacher, i)               one per pending shard (a Prefect task each)
    labels  = finalize_labels(cfg, teacher)
    runs    = student_runs(cfg)                    the sweep
    result  = train_student(cfg, teacher, run)     one student (a Prefect task each)
    report  = build_report(cfg, teacher, results)  report.json, report.md, students.png
"""

from __future__ import annotations

import json
import os

import storage
from pipeline.labelling.loop import LabelRun
from pipeline.objectives.losses import LOSSES
from pipeline.tasks import TASKS
from pipeline.training.config import TrainConfig
from pipeline.training.stream import verifier
from pipeline.training.student import run_student, same_steps_config
from storage import Location

from . import classify, lm, secrets
from .config import StudentModelConfig, parse_config
from .inspection import summarize

TASK_RECIPES = {"classify": classify, "lm": lm}


def as_config(cfg):
    return parse_config(cfg) if isinstance(cfg, dict) else cfg


def task_recipes(cfg):
    """The task's half of the recipes (flows/classify.py or flows/lm.py)."""
    return TASK_RECIPES[cfg.task]


def storage_options(cfg) -> dict | None:
    return secrets.resolve(cfg.label.storage_options) or None


# ------------------------------------------------------------------ teacher


def ensure_teacher(cfg, *, retrain: bool = False) -> dict:
    """The teacher: trained (or fine-tuned) unless a checkpoint of this config's lineage
    exists (a classifier), or resolved (a language model: a GGUF file converted once)."""
    return task_recipes(cfg).ensure_teacher(cfg, retrain=retrain)


def existing_teacher(cfg) -> dict:
    """The teacher labelling and students need; never trains (refuses a missing one)."""
    return task_recipes(cfg).existing_teacher(cfg)


# ------------------------------------------------------------------ labelling


def label_run(
    cfg, teacher: dict, *, overwrite: bool = False, shards: list[int] | None = None, job: str = "windows"
) -> LabelRun:
    """Open (or resume) the label datasets of one of the config's teacher passes (`job`:
    "windows", the inputs; "generate", the answers the teacher writes): one LabelRun over
    the task's labeller (over `shards` only when given: a per-shard task reads only their records)."""
    t = task_recipes(cfg)
    return LabelRun(
        t.labeller(cfg, teacher, job=job),
        shard_size=cfg.label.generate.shard_size if job == "generate" else cfg.label.shard_size,
        teacher=t.manifest_teacher(teacher),
        storage_options=storage_options(cfg),
        overwrite=overwrite,
        shards=shards,
        signing_key=cfg.label.signing_key,
    )


def plan_labels(cfg, teacher: dict, job: str = "windows") -> dict:
    """Open the datasets (resume, or overwrite when configured) and list the shards still to label."""
    try:
        run = label_run(cfg, teacher, overwrite=cfg.label.overwrite, job=job)
    except storage.MismatchError as e:  # name the config's knob beside the API's
        raise storage.MismatchError(f"{e}\nIn a config: label.overwrite=true, or another name or runs_dir.") from None
    pending = run.pending()
    return {
        "uris": [w.uri for w in run.writers],
        "num_shards": len(run.plan),
        "pending": [{"shard": i, "start": run.plan[i][0], "stop": run.plan[i][1]} for i in pending],
        "committed": sorted(set(range(len(run.plan))) - set(pending)),
    }


def label_one_shard(cfg, teacher: dict, shard: int, job: str = "windows") -> dict:
    """Label one shard into every dataset lacking it (a retry or a concurrent run may have
    done it already: then nothing)."""
    s = label_run(cfg, teacher, shards=[shard], job=job).label_shard(shard)
    return {k: v for k, v in s.items() if k != "records"} | {
        "sha256": s["records"][0]["sha256"] if s["records"] else "",
        "skipped": not s["records"],
        "pid": os.getpid(),
    }


def finalize_labels(cfg, teacher: dict, job: str = "windows") -> dict:
    """Every dataset's complete manifest; {layout: summary} (a concurrent run may have
    finalized already: a manifest naming exactly the committed shards is kept)."""
    run = label_run(cfg, teacher, shards=[], job=job)  # finalize lists the commit records itself
    # The labellers open their outputs in label_uris() order; the writers hold the resolved
    # uri (a relative local path made absolute), so pair by position, not by string.
    layouts = list(cfg.label_uris(job))
    assert len(layouts) == len(run.writers), (layouts, [w.uri for w in run.writers])
    return {
        layout: summarize(m, w.uri, storage_options(cfg))
        for layout, w, m in zip(layouts, run.writers, run.finalize(), strict=True)
    }


# ------------------------------------------------------------------ students


def student_runs(cfg) -> list[dict]:
    """The sweep: models x seeds x (the hard-label baseline, loss "ce", once; and every KD
    loss x temperature x alpha). Small JSON dicts: Prefect task parameters."""
    sc = cfg.students
    seeds, runs = sc.seed_list(), []
    for m in cfg.student_models():
        losses = list(m.losses) if m.losses is not None else cfg.student_losses()
        if sc.baseline and "ce" not in losses:
            losses = ["ce", *losses]
        base = m.display_name()
        for data in m.data if m.data is not None else sc.data:
            # the teacher's written answers: CE on them is sequence-level KD (a student, not the
            # baseline); a KD loss there comes with that CE (students.generated_alphas)
            gen = data == "generated"
            mine = m.alphas if m.alphas is not None else sc.alphas
            pre, alphas = (f"{base}-seqkd", sc.generated_alphas) if gen else (base, mine)
            for seed in seeds:
                tail = "" if len(seeds) == 1 else f"-s{seed}"
                common = {"model": m.model_dump(), "seed": seed, "arch_name": base, "data": data}
                for loss in losses:
                    if loss == "ce":
                        name = f"{pre}{tail}" if gen else f"{base}-baseline{tail}"
                        runs.append({"name": name, "loss": "ce", "temperature": None, "alpha": None} | common)
                        continue
                    for T in cfg.student_temperatures():
                        for a in alphas:
                            name = f"{pre}-T{T:g}-a{a:g}-{loss}{tail}"
                            runs.append({"name": name, "loss": loss, "temperature": T, "alpha": a} | common)
    names = [r["name"] for r in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"students: duplicate run names {dup}; give the models distinct `name`s")
    return runs


def label_uri_for(cfg, loss: str, data: str = "human") -> str:
    """The label dataset a KD loss learns from: the config's layout of the loss's family (of
    the teacher's written answers for data "generated")."""
    uris = cfg.label_uris("generate" if data == "generated" else "windows")
    for family in LOSSES[loss].labels:
        if family in uris:
            return uris[family]
    raise ValueError(f"loss {loss!r} learns from {LOSSES[loss].labels} labels; the config stores {sorted(uris)}")


def check_labels(cfg) -> None:
    """Refuse foreign labels before any student (or baseline) trains."""
    for uri in {label_uri_for(cfg, r["loss"], r["data"]) for r in student_runs(cfg) if r["loss"] != "ce"}:
        task_recipes(cfg).check_label_lineage(cfg, uri)


def train_student(cfg, teacher: dict, run: dict, on_batch=None) -> dict:
    """One student of the sweep (pipeline.training.student.run_student with the task's
    inputs); the numbers the report needs."""
    import torch

    t = task_recipes(cfg)
    so = storage_options(cfg)
    uris, manifests = [], []
    if run["loss"] != "ce":
        uris = [label_uri_for(cfg, run["loss"], run.get("data", "human")), *cfg.students.extra_soft_labels]
        manifests = [t.check_label_lineage(cfg, uris[0])] + [
            storage.open_soft_labels(u, storage_options=so, verifier=verifier(cfg.label.public_key)).manifest
            for u in uris[1:]
        ]
    out = cfg.run_dir() / "students"
    out.mkdir(parents=True, exist_ok=True)
    tcfg = TrainConfig(
        **(cfg.students.train_for(StudentModelConfig(**run["model"])).model_dump() | {"seed": run["seed"]}),
        loss=run["loss"],
        temperature=run["temperature"],
        alpha=run["alpha"] or 0.0,
        log_path=str(out / f"{run['name']}.jsonl"),
        ckpt_path=str(out / f"{run['name']}.train.pt"),
    )
    ckpt = str(out / f"{run['name']}.pt")
    inputs = t.student_inputs(cfg, teacher, run, manifests)
    ref = inputs.pop("equal_steps_to", None)
    if ref is not None:  # other windows (the teacher's answers): exactly the sweep's steps
        tcfg = same_steps_config(tcfg, reference_samples=ref, samples=len(inputs["transfer"]))
    r = run_student(
        run=run,
        train_config=tcfg,
        checkpoint_path=ckpt,
        soft_labels=uris,
        label_manifests=manifests,
        teacher=t.manifest_teacher(teacher),
        storage_options=so,
        expect={"teacher.fingerprint": teacher["fingerprint"]} if uris else None,
        public_key=cfg.label.public_key,
        resume=True,
        on_batch=on_batch,
        export_dir=str(out) if cfg.students.export else None,
        quantize=cfg.students.quantize,
        baseline_fair=ref is None,
        **inputs,
    )
    res = r.train
    return {
        **{k: run[k] for k in ("name", "arch_name", "loss", "temperature", "alpha", "seed")},
        "data": run.get("data", "human"),
        "mode": "hard" if run["loss"] == "ce" and run.get("data", "human") == "human" else "stored",
        "labels": uris[0] if uris else None,
        **{k: v for k, v in (r.evaluation or {}).items() if k != "initial"},
        # a student from weights (pruned, pretrained): its metric before any step
        **({"initial": r.evaluation["initial"][r.train["metric"]]} if (r.evaluation or {}).get("initial") else {}),
        "trainer": run["model"].get("trainer", "builtin"),
        "tokenizer": run["model"].get("tokenizer"),  # its own (cross-tokenizer KD), or None: the teacher's
        **r.exports,
        "checkpoint": ckpt,  # evaluation: rank 0 only under DDP
        **{
            k: res.get(k)
            for k in ("best_val", "best_epoch", "epochs_run", "epochs_trained", "steps", "units", "unit", "throughput")
        },
        "train_seconds": r.train_seconds,
        "torch_threads": torch.get_num_threads(),
    }


# ------------------------------------------------------------------ report


def _with_earlier(cfg, teacher: dict, results: list[dict]) -> list[dict]:
    """This sweep's results plus the students of an earlier report.json of the same run
    (same teacher, same labels) that this sweep did not retrain: `distill students` with
    another grid adds to the report instead of replacing it. An earlier student is left
    out when its checkpoint is gone, or when this sweep's students of its model, seed and
    kind took other steps (the model was retrained for other epochs: no equal steps)."""
    path = cfg.run_dir() / "report.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return results
    same = (old.get("teacher") or {}).get("fingerprint") == teacher["fingerprint"] and old.get("soft_labels") == next(
        iter(cfg.label_uris().values())
    )
    if not same:
        return results
    now = {_student_key(r) for r in results}
    steps = {_steps_key(r): r.get("steps") for r in results}
    return [
        s
        for s in old.get("students", [])
        if _student_key(s) not in now
        and (s.get("checkpoint") is None or os.path.exists(s["checkpoint"]))
        and steps.get(_steps_key(s), s.get("steps")) == s.get("steps")
    ] + results


def _student_key(s: dict) -> tuple:
    """One student under either of its names: "<name>", or "<name>-s<seed>" in a run of several seeds."""
    return s.get("name", "").removesuffix(f"-s{s.get('seed')}"), s.get("seed")


def _steps_key(s: dict) -> tuple:
    """Students of one model, seed and kind (the CE baseline or KD) train equal steps."""
    return s.get("arch_name"), s.get("seed"), s.get("loss") == "ce"


def _alphas(cfg) -> list[float]:
    """Every alpha of the sweep's KD students of the data's own text (a model's own first)."""
    per_model = [a for m in cfg.student_models() for a in (m.alphas if m.alphas is not None else cfg.students.alphas)]
    return sorted(set(per_model))


def build_report(cfg, teacher: dict, results: list[dict]) -> dict:
    """report.json (with report.md and students.png beside it): the teacher, every student
    next to its architecture's baseline of the same seed, and the rows over seeds."""
    from .report import aggregate, gap_closed, report_markdown, students_png, with_baselines

    t = task_recipes(cfg)
    task = TASKS[cfg.task]
    labels = {}
    for layout, uri in cfg.label_uris().items():
        try:
            labels[layout] = summarize(
                storage.read_manifest(Location(uri, storage_options(cfg))), uri, storage_options(cfg)
            )
        except (storage.SoftLabelError, OSError):
            continue  # only the baseline trained: no labels needed
    students = with_baselines(_with_earlier(cfg, teacher, results), task.metric, task.higher_is_better)
    teacher_eval = t.teacher_evaluation(cfg, teacher)
    report = {
        "name": cfg.name,
        "task": cfg.task,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "teacher": teacher_eval,
        "labels": labels,
        "soft_labels": next(iter(cfg.label_uris().values())),
        "students": students,
        "rows": gap_closed(
            aggregate(students, task.metric),
            task.metric,
            teacher_eval.get(task.metric),
            teacher_bpb=teacher_eval.get("bits_per_byte"),
        ),
        "data": t.data_description(cfg) | {"seeds": len(cfg.students.seed_list()), "alphas": _alphas(cfg)},
    }
    report["eval_split"] = report["data"]["eval_split"]
    run_dir = Location(str(cfg.run_dir()))
    run_dir.write_bytes_atomic("students.png", students_png(report))
    report["chart"] = str(cfg.run_dir() / "students.png")
    report["path"] = str(cfg.run_dir() / "report.json")
    run_dir.write_bytes_atomic("report.md", report_markdown(report).encode())
    run_dir.write_bytes_atomic("report.json", json.dumps(report, indent=2, default=str).encode())
    return report
