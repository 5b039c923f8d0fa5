"""Prefect flows of the language-model recipe (`task: lm`): thin wiring of flows.lm_recipes.
Tasks take the config as a JSON dict plus small dicts (URIs, fingerprints, numbers).

    lm-label     -> the teacher scores the train windows once: token_topk and/or token_sampled datasets
    lm-students  -> the student sweep (architecture x loss x seed) streaming those labels; report.json
    lm-distill   -> both, end to end
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task, unmapped
from prefect.artifacts import (create_image_artifact, create_markdown_artifact, create_progress_artifact,
                               create_table_artifact, update_progress_artifact)
from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.device import available_cores, torch_threads

from . import lm_recipes, progress, secrets
from .lm_config import LMConfig, load_lm_config, parse_lm_config
from .report import millions, chart_data_url
from .runtime import retry_on_io




def _load(config: dict | str, overrides: list[str] | None) -> LMConfig:
    return load_lm_config(config, overrides) if isinstance(config, str) else parse_lm_config(config, overrides)


def _key(cfg: LMConfig, what: str) -> str:
    return f"{cfg.name.replace('_', '-')}-{what}"


# ------------------------------------------------------------------ tasks

@task(name="lm-teacher", retries=1, retry_condition_fn=retry_on_io)
def teacher_task(config: dict) -> dict:
    return lm_recipes.resolve_teacher(lm_recipes.as_lm_config(config))


@task(name="lm-label-corpus", retries=2, retry_delay_seconds=[1, 5], retry_condition_fn=retry_on_io)
def label_task(config: dict, teacher: dict) -> dict:
    cfg = lm_recipes.as_lm_config(config)
    log = get_run_logger()
    n = -(-cfg.corpus.sizes["train"] // cfg.label.shard_size)
    pid = create_progress_artifact(progress=0.0, key=_key(cfg, "lm-label-progress"),
                                   description=f"Labelling {cfg.label_root()}")
    bar = progress.bar(total=n, desc="label shards", unit="shard")

    def on_shard(s: dict) -> None:
        bar.update(1)
        update_progress_artifact(pid, progress=100.0 * (s["shard"] + 1) / n)
        log.info("shard %d: %d tokens, %.0f tokens/s", s["shard"], s["tokens"], s["tokens_per_s"])
    try:
        return lm_recipes.label(cfg, teacher, progress=on_shard)
    finally:
        bar.close()


@task(name="lm-teacher-eval", retries=1, retry_condition_fn=retry_on_io)
def teacher_eval_task(config: dict, teacher: dict) -> dict:
    return lm_recipes.teacher_eval(lm_recipes.as_lm_config(config), teacher)


@task(name="lm-student", retries=1, retry_condition_fn=retry_on_io, task_run_name="student-{run[name]}")
def student_task(config: dict, teacher: dict, run: dict) -> dict:
    cfg = lm_recipes.as_lm_config(config)
    bar = progress.bar(total=None, desc=run["name"], unit="step")

    def on_step(rec: dict) -> None:
        bar.update(1)
    try:
        return lm_recipes.train_student(cfg, teacher, run, progress=on_step)
    finally:
        bar.close()


@task(name="lm-report")
def report_task(config: dict, teacher: dict, labels: dict, t_eval: dict, results: list[dict]) -> dict:
    return lm_recipes.build_report(lm_recipes.as_lm_config(config), teacher, labels, t_eval, results)


# ------------------------------------------------------------------ flows

@flow(name="lm-label", log_prints=True)
def lm_label_flow(config: dict | str, overrides: list[str] | None = None) -> dict:
    """The teacher labels the corpus' train windows once, into every configured layout."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    teacher = teacher_task(raw)
    labels = label_task(raw, teacher)
    table = [{"layout": layout, "uri": s["uri"], "tokens": s["num_tokens"], "bytes_per_token": round(s["bytes_per_token"], 1),
              "labelled_shards": s["labelled_shards"], "skipped_shards": s["skipped_shards"],
              "tokens_per_s": round(s["tokens_per_s"], 1)} for layout, s in labels.items()]
    create_table_artifact(table=table, key=_key(cfg, "lm-labels"), description=f"Token labels of {cfg.name}")
    return {"teacher": teacher, "labels": labels}


@flow(name="lm-students", log_prints=True)
def lm_students_flow(config: dict | str, overrides: list[str] | None = None, labels: dict | None = None) -> dict:
    """Train the student sweep from the stored token labels; write the report."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    teacher = teacher_task(raw)
    t_eval = teacher_eval_task(raw, teacher)
    runs = lm_recipes.student_runs(cfg)
    runner = ThreadPoolTaskRunner(max_workers=cfg.students.max_parallel)
    with torch_threads(cfg.students.torch_threads(available_cores())):
        report = _sweep.with_options(task_runner=runner)(raw, teacher, runs, labels or {}, t_eval)
    return report


@flow(name="lm-student-sweep")
def _sweep(config: dict, teacher: dict, runs: list[dict], labels: dict, t_eval: dict) -> dict:
    cfg = lm_recipes.as_lm_config(config)
    futures = student_task.map(unmapped(config), unmapped(teacher), runs)
    by_name = {}
    for fut in as_completed(futures):
        r = fut.result()
        by_name[r["name"]] = r
        get_run_logger().info("%s: val perplexity %.2f (%d steps, %.0f tokens/s)", r["name"], r["val_perplexity"],
                              r["steps"], r["train_tokens_per_s"])
    results = [by_name[r["name"]] for r in runs]          # sweep order, not completion order
    report = report_task(config, teacher, labels, t_eval, results)
    create_table_artifact(table=[{"student": r["student"], "loss": r["loss"], "params": millions(r["params"]),
                                  "val_perplexity": round(r["val_perplexity"], 2), "steps": r["steps"],
                                  "vs_ce": None if r["vs_ce"] is None else f"{100 * r['vs_ce']:+.1f}%"}
                                 for r in report["rows"]],
                          key=_key(cfg, "lm-students"), description=f"Students of {cfg.name}: validation perplexity")
    chart = chart_data_url(report)
    if chart:
        create_image_artifact(image_url=chart, key=_key(cfg, "lm-students-chart"),
                              description="Validation perplexity per student; the teacher dashed")
    else:
        create_markdown_artifact(markdown=f"```\n{lm_recipes.report_table(report)}\n```",
                                 key=_key(cfg, "lm-students-chart"))
    return report


@flow(name="lm-distill", log_prints=True)
def lm_distill_flow(config: dict | str, overrides: list[str] | None = None) -> dict:
    """End to end: teacher labels (once; resumed), the student sweep, the report."""
    cfg = _load(config, overrides)
    raw = secrets.for_parameters(cfg.model_dump(mode="json"))  # no literal secret becomes a parameter
    labelled = lm_label_flow(raw)
    return lm_students_flow(raw, labels=labelled["labels"])
