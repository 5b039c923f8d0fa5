"""Prefect flows: thin wiring of flows.recipes. Tasks take the config as a JSON dict plus
URIs and small metadata; every tensor stays inside a task.

    train-teacher  -> runs/<name>/teacher.pt
    label          -> soft-label dataset (one task per shard, mapped; resumable)
    students       -> N students from ONE soft-label dataset + baselines; report.json
    distill        -> all of the above, end to end
"""
from __future__ import annotations

import time

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (create_image_artifact, create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.device import available_cores, torch_threads

from . import progress, recipes, secrets
from .config import Config, load_config, parse_config
from .runtime import retry_on_io
from .report import chart_data_url, chart_markdown, report_rows


def _io_retries(cfg: Config) -> dict:
    """label.retries with backoff (1, 5, 15, 30, 30, ... seconds) for the I/O tasks."""
    n = cfg.label.retries
    if n == 0:
        return {"retries": 0}
    return {"retries": n, "retry_delay_seconds": [min(30, d) for d in (1, 5, 15, 30)][:n] + [30] * max(0, n - 4)}


def _key(cfg: Config, what: str) -> str:
    # artifact keys: lowercase letters, digits and dashes only
    return f"{cfg.name.replace('_', '-')}-{what}"


def make_task_runner(cfg: Config, dask_address: str | None = None):
    r = cfg.label.runner
    address = dask_address or (r.dask_address if r.kind == "dask" else None)
    if address or r.kind == "dask":
        from prefect_dask import DaskTaskRunner
        return DaskTaskRunner(address=address) if address else \
            DaskTaskRunner(cluster_kwargs={"n_workers": r.max_workers, "threads_per_worker": 1})
    return ThreadPoolTaskRunner(max_workers=r.max_workers)


def _load(config: dict | str, overrides: list[str] | None) -> Config:
    return load_config(config, overrides) if isinstance(config, str) else parse_config(config, overrides)


# ------------------------------------------------------------------ tasks

@task(name="train-teacher", retries=1, retry_condition_fn=retry_on_io)
def train_teacher_task(config: dict, retrain: bool = False) -> dict:
    return recipes.ensure_teacher(recipes.as_config(config), retrain=retrain)


@task(name="plan-labels", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io)
def plan_labels_task(config: dict, teacher: dict) -> dict:
    return recipes.plan_labels(recipes.as_config(config), teacher)


@task(name="label-shard", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io,
      task_run_name="label-shard-{shard}")
def label_shard_task(config: dict, teacher: dict, shard: int, start: int, stop: int) -> dict:
    return recipes.label_one_shard(recipes.as_config(config), teacher, shard, start, stop)


@task(name="finalize-labels", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io)
def finalize_labels_task(config: dict, teacher: dict) -> dict:
    return recipes.finalize_labels(recipes.as_config(config), teacher)


@task(name="train-student", retries=1, retry_condition_fn=retry_on_io, task_run_name="student-{run[name]}")
def train_student_task(config: dict, teacher: dict, soft_label_uri: str, run: dict) -> dict:
    return recipes.train_student(recipes.as_config(config), teacher, soft_label_uri, run)


@task(name="report")
def report_task(config: dict, teacher: dict, soft_label_uri: str, results: list[dict]) -> dict:
    return recipes.build_report(recipes.as_config(config), teacher, soft_label_uri, results)


# ------------------------------------------------------------------ flows

@flow(name="train-teacher", log_prints=True)
def train_teacher_flow(config: dict | str, overrides: list[str] | None = None, retrain: bool = False) -> dict:
    cfg = _load(config, overrides)
    t = train_teacher_task(secrets.for_parameters(cfg.model_dump(mode="json")), retrain)
    get_run_logger().info("teacher %s at %s", t["fingerprint"][:19], t["checkpoint"])
    return t


def _resolve_teacher(cfg: Config) -> dict:
    # refuses a run directory's teacher trained with another lineage (data, views, model)
    return recipes.existing_teacher(cfg)


@flow(name="label", log_prints=True)
def label_flow(config: dict | str, overrides: list[str] | None = None, dask_address: str | None = None) -> dict:
    """Teacher inference into a soft-label dataset; one task per pending shard."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    teacher = _resolve_teacher(cfg)
    runner = make_task_runner(cfg, dask_address)
    return _label_shards.with_options(task_runner=runner)(raw, teacher)


@flow(name="label-shards")
def _label_shards(config: dict, teacher: dict) -> dict:
    log = get_run_logger()
    cfg = recipes.as_config(config)
    t0 = time.perf_counter()
    plan = plan_labels_task.with_options(**_io_retries(cfg))(config, teacher)
    pending = plan["pending"]
    log.info("%s: %d shard(s), %d committed, %d to label", plan["uri"], plan["num_shards"],
             len(plan["committed"]), len(pending))
    progress_id = create_progress_artifact(progress=100.0 * len(plan["committed"]) / plan["num_shards"],
                                           key=_key(cfg, "label-progress"),
                                           description=f"Labelling {plan['uri']}")
    rows = []
    if pending:
        futures = label_shard_task.with_options(**_io_retries(cfg)).map(
                                       unmapped(config), unmapped(teacher), [p["shard"] for p in pending],
                                       [p["start"] for p in pending], [p["stop"] for p in pending])
        done = len(plan["committed"])
        pbar = progress.bar(total=plan["num_shards"], initial=done, desc="label shards", unit="shard")
        for fut in as_completed(futures):
            s = fut.result()
            done += 1
            rows.append(s)
            pbar.update(1)
            update_progress_artifact(progress_id, progress=100.0 * done / plan["num_shards"])
            log.info("shard %d: %d rows, %.0f samples/s", s["shard"], s["rows"], s["samples_per_s"])
        pbar.close()
    summary = finalize_labels_task.with_options(**_io_retries(cfg))(config, teacher)
    dt = time.perf_counter() - t0
    labelled = sum(r["samples"] for r in rows)
    table = [{"shard": r["shard"], "rows": r["rows"], "samples": r["samples"], "seconds": round(r["seconds"], 3),
              "samples_per_s": round(r["samples_per_s"], 1), "sha256": r.get("sha256", "")[:16]}
             for r in sorted(rows, key=lambda r: r["shard"])]
    table.append({"shard": "total", "rows": sum(r["rows"] for r in rows), "samples": labelled,
                  "seconds": round(dt, 3), "samples_per_s": round(labelled / dt, 1) if dt else 0.0,
                  "sha256": f"skipped {len(plan['committed'])}"})
    create_table_artifact(table=table, key=_key(cfg, "label-shards"),
                          description=f"Per-shard labelling of {summary['uri']}")
    return summary | {"labelled_shards": len(rows), "skipped_shards": len(plan["committed"]),
                      "worker_pids": sorted({r["pid"] for r in rows if r.get("pid") is not None}),
                      "seconds": dt, "samples_per_s": labelled / dt if dt else 0.0}


@flow(name="students", log_prints=True)
def students_flow(config: dict | str, overrides: list[str] | None = None) -> dict:
    """Train the student sweep from ONE soft-label dataset, plus baselines; write the report."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    teacher = _resolve_teacher(cfg)
    uri = cfg.soft_label_uri()
    runs = recipes.student_runs(cfg)
    if any(r["mode"] == "stored" for r in runs):  # refuse foreign labels before any student (baseline) trains
        recipes.check_label_lineage(cfg, uri)
    runner = ThreadPoolTaskRunner(max_workers=cfg.students.max_parallel)
    # the runner's threads start inside this block, so they take its thread count
    with torch_threads(cfg.students.torch_threads(available_cores())):
        return _student_sweep.with_options(task_runner=runner)(raw, teacher, uri, runs)


@flow(name="student-sweep")
def _student_sweep(config: dict, teacher: dict, uri: str, runs: list[dict]) -> dict:
    cfg = recipes.as_config(config)
    futures = train_student_task.map(unmapped(config), unmapped(teacher), unmapped(uri), runs)
    pbar = progress.bar(total=len(runs), desc="students", unit="student")
    results_by_name = {}
    for fut in as_completed(futures):
        r = fut.result()
        results_by_name[r["name"]] = r
        pbar.update(1)
    pbar.close()
    results = [results_by_name[r["name"]] for r in runs]  # sweep order, not completion order
    report = report_task(config, teacher, uri, results)
    create_table_artifact(table=report_rows(report), key=_key(cfg, "students"),
                          description=f"Students of {cfg.name} distilled from {uri}")
    chart = chart_data_url(report)
    description = "Accuracy vs parameters: each hard-label baseline and its distilled student"
    if chart is not None:   # an image artifact: the UI shows the picture itself
        create_image_artifact(image_url=chart, key=_key(cfg, "students-chart"), description=description)
    else:
        create_markdown_artifact(markdown=chart_markdown(report), key=_key(cfg, "students-chart"),
                                 description=description)
    return report


@flow(name="distill", log_prints=True)
def distill_flow(config: dict | str, overrides: list[str] | None = None, dask_address: str | None = None) -> dict:
    """End to end: teacher (unless a checkpoint is given), labels, students, report."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    train_teacher_task(raw)            # no-op when the checkpoint exists
    labels = label_flow(raw, dask_address=dask_address)
    report = students_flow(raw)
    report["label"] = labels
    return report
