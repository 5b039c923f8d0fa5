"""Prefect flows: thin wiring of flows.recipes, the same flows for every task (the recipes
dispatch on the config's task). Tasks take the config as a JSON dict plus URIs and small
metadata; every tensor stays inside a task.

    train-teacher  -> the teacher (a classifier trained once; a language model resolved)
    label          -> the label datasets (one task per shard, mapped; resumable; threads or Dask)
    students       -> the student sweep from the stored labels + baselines; report.json
    distill        -> all of the above, end to end
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (
    create_image_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.device import available_cores, torch_threads

from . import progress, recipes, secrets
from .config import load_config, parse_config
from .report import chart_data_url, chart_markdown, report_rows
from .runtime import retry_on_io


def _io_retries(cfg) -> dict:
    """label.retries with backoff (1, 5, 15, 30, 30, ... seconds) for the I/O tasks."""
    n = cfg.label.retries
    if n == 0:
        return {"retries": 0}
    return {"retries": n, "retry_delay_seconds": [min(30, d) for d in (1, 5, 15, 30)][:n] + [30] * max(0, n - 4)}


def _key(cfg, what: str) -> str:
    # artifact keys: lowercase letters, digits and dashes only
    return f"{cfg.name.replace('_', '-')}-{what}"


def make_task_runner(cfg, dask_address: str | None = None):
    r = cfg.label.runner
    address = dask_address or (r.dask_address if r.kind == "dask" else None)
    if address or r.kind == "dask":
        from prefect_dask import DaskTaskRunner

        return (
            DaskTaskRunner(address=address)
            if address
            else DaskTaskRunner(cluster_kwargs={"n_workers": r.max_workers, "threads_per_worker": 1})
        )
    return ThreadPoolTaskRunner(max_workers=r.max_workers)


def _load(config: dict | str, overrides: list[str] | None):
    return load_config(config, overrides) if isinstance(config, str) else parse_config(config, overrides)


# ------------------------------------------------------------------ tasks


def _shard_run_name() -> str:
    """label-shard-<i> (the inputs' pass), answers-shard-<i> (the teacher writing answers)."""
    from prefect.runtime import task_run

    p = task_run.parameters
    return f"{'label' if p.get('job', 'windows') == 'windows' else 'answers'}-shard-{p['shard']}"


@task(name="train-teacher", retries=1, retry_condition_fn=retry_on_io)
def train_teacher_task(config: dict, retrain: bool = False) -> dict:
    return recipes.ensure_teacher(recipes.as_config(config), retrain=retrain)


@task(name="plan-labels", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io)
def plan_labels_task(config: dict, teacher: dict, job: str = "windows") -> dict:
    return recipes.plan_labels(recipes.as_config(config), teacher, job)


@task(
    name="label-shard",
    retries=2,
    retry_delay_seconds=[1, 5],
    retry_condition_fn=retry_on_io,
    task_run_name=_shard_run_name,
)
def label_shard_task(config: dict, teacher: dict, shard: int, job: str = "windows") -> dict:
    return recipes.label_one_shard(recipes.as_config(config), teacher, shard, job)


@task(name="finalize-labels", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io)
def finalize_labels_task(config: dict, teacher: dict, job: str = "windows") -> dict:
    return recipes.finalize_labels(recipes.as_config(config), teacher, job)


@task(name="train-student", retries=1, retry_condition_fn=retry_on_io, task_run_name="student-{run[name]}")
def train_student_task(config: dict, teacher: dict, run: dict) -> dict:
    on_batch, close = progress.batch_callback(run["name"])
    try:
        return recipes.train_student(recipes.as_config(config), teacher, run, on_batch=on_batch)
    finally:
        close()


@task(name="report")
def report_task(config: dict, teacher: dict, results: list[dict]) -> dict:
    return recipes.build_report(recipes.as_config(config), teacher, results)


# ------------------------------------------------------------------ flows


@flow(name="train-teacher", log_prints=True)
def train_teacher_flow(config: dict | str, overrides: list[str] | None = None, retrain: bool = False) -> dict:
    cfg = _load(config, overrides)
    t = train_teacher_task(secrets.for_parameters(cfg.model_dump(mode="json")), retrain)
    get_run_logger().info("teacher %s: %s", t["name"], t["fingerprint"][:19])
    return t


@flow(name="label", log_prints=True)
def label_flow(config: dict | str, overrides: list[str] | None = None, dask_address: str | None = None) -> dict:
    """Teacher inference into the label datasets; one task per pending shard. With
    label.generate a second pass follows: the teacher writing answers (its own shards)."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    # refuses a run directory's teacher trained with another lineage (data, views, model)
    teacher = recipes.existing_teacher(cfg)
    runner = make_task_runner(cfg, dask_address)
    out = None
    for job in cfg.label_jobs():
        name = "label-shards" if job == "windows" else "label-answers"
        r = _label_shards.with_options(task_runner=runner, name=name)(raw, teacher, job)
        out = r if out is None else out | {job: r}
    return out


@flow(name="label-shards")
def _label_shards(config: dict, teacher: dict, job: str = "windows") -> dict:
    log = get_run_logger()
    cfg = recipes.as_config(config)
    t0 = time.perf_counter()
    plan = plan_labels_task.with_options(**_io_retries(cfg))(config, teacher, job)
    pending = plan["pending"]
    log.info(
        "%s: %d shard(s), %d committed, %d to label",
        ", ".join(plan["uris"]),
        plan["num_shards"],
        len(plan["committed"]),
        len(pending),
    )
    progress_id = create_progress_artifact(
        progress=100.0 * len(plan["committed"]) / plan["num_shards"],
        key=_key(cfg, "label-progress" if job == "windows" else f"label-{job}-progress"),
        description=f"Labelling {', '.join(plan['uris'])}",
    )
    rows = []
    if pending:
        futures = label_shard_task.with_options(**_io_retries(cfg)).map(
            unmapped(config), unmapped(teacher), [p["shard"] for p in pending], unmapped(job)
        )
        done = len(plan["committed"])
        desc = "label shards" if job == "windows" else "write answers"
        pbar = progress.bar(total=plan["num_shards"], initial=done, desc=desc, unit="shard")
        for fut in as_completed(futures):
            s = fut.result()
            done += 1
            rows.append(s)
            pbar.update(1)
            update_progress_artifact(progress_id, progress=100.0 * done / plan["num_shards"])
            log.info("shard %d: %d samples, %d rows, %.0f rows/s", s["shard"], s["samples"], s["rows"], s["rows_per_s"])
        pbar.close()
    summary = finalize_labels_task.with_options(**_io_retries(cfg))(config, teacher, job)
    dt = time.perf_counter() - t0
    labelled, stored = sum(r["samples"] for r in rows), sum(r["rows"] for r in rows)
    table = [
        {
            "shard": r["shard"],
            "samples": r["samples"],
            "rows": r["rows"],
            "seconds": round(r["seconds"], 3),
            "rows_per_s": round(r["rows_per_s"], 1),
            "sha256": r.get("sha256", "")[:16],
        }
        for r in sorted(rows, key=lambda r: r["shard"])
    ]
    table.append(
        {
            "shard": "total",
            "samples": labelled,
            "rows": stored,
            "seconds": round(dt, 3),
            "rows_per_s": round(stored / dt, 1) if dt else 0.0,
            "sha256": f"skipped {len(plan['committed'])}",
        }
    )
    create_table_artifact(
        table=table,
        key=_key(cfg, "label-shards" if job == "windows" else f"label-{job}-shards"),
        description=f"Per-shard labelling of {', '.join(plan['uris'])}",
    )
    return {
        "datasets": summary,
        "num_shards": plan["num_shards"],
        "labelled_shards": len(rows),
        "skipped_shards": len(plan["committed"]),
        "worker_pids": sorted({r["pid"] for r in rows if r.get("pid") is not None}),
        "seconds": dt,
        "samples_per_s": labelled / dt if dt else 0.0,
        "rows_per_s": stored / dt if dt else 0.0,
    }


@flow(name="students", log_prints=True)
def students_flow(config: dict | str, overrides: list[str] | None = None) -> dict:
    """Train the student sweep from the stored labels, plus baselines; write the report."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    teacher = recipes.existing_teacher(cfg)
    runs = recipes.student_runs(cfg)
    recipes.check_labels(cfg)  # refuse foreign labels before any student (baseline) trains
    runner = ThreadPoolTaskRunner(max_workers=cfg.students.max_parallel)
    # the runner's threads start inside this block, so they take its thread count
    with torch_threads(cfg.students.torch_threads(available_cores())):
        return _student_sweep.with_options(task_runner=runner)(raw, teacher, runs)


@flow(name="student-sweep")
def _student_sweep(config: dict, teacher: dict, runs: list[dict]) -> dict:
    cfg = recipes.as_config(config)
    log = get_run_logger()
    futures = train_student_task.map(unmapped(config), unmapped(teacher), runs)
    pbar = progress.bar(total=len(runs), desc="students", unit="student")
    by_name = {}
    for fut in as_completed(futures):
        r = fut.result()
        by_name[r["name"]] = r
        pbar.update(1)
        metric = "accuracy" if "accuracy" in r else "perplexity"
        log.info("%s: %s %.4g (%s steps)", r["name"], metric, r[metric], r["steps"])
    pbar.close()
    results = [by_name[r["name"]] for r in runs]  # sweep order, not completion order
    report = report_task(config, teacher, results)
    create_table_artifact(
        table=report_rows(report),
        key=_key(cfg, "students"),
        description=f"Students of {cfg.name}: {report['metric']} next to their baselines",
    )
    chart = chart_data_url(report)
    description = f"{report['metric'].capitalize()} vs parameters: each hard-label baseline and its distilled students"
    if chart is not None:  # an image artifact: the UI shows the picture itself
        create_image_artifact(image_url=chart, key=_key(cfg, "students-chart"), description=description)
    else:
        create_markdown_artifact(
            markdown=chart_markdown(report), key=_key(cfg, "students-chart"), description=description
        )
    return report


@flow(name="distill", log_prints=True)
def distill_flow(config: dict | str, overrides: list[str] | None = None, dask_address: str | None = None) -> dict:
    """End to end: teacher (unless a checkpoint is given), labels, students, report."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    train_teacher_task(raw)  # no-op when the checkpoint exists (or the teacher is pretrained)
    labels = label_flow(raw, dask_address=dask_address)
    report = students_flow(raw)
    report["label"] = labels
    return report
