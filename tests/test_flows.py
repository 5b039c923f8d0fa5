"""Flows under one session-scoped Prefect test server; task bodies via .fn()."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY

import storage
from flows.config import load_config

pytestmark = pytest.mark.usefixtures("prefect_harness")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Run the whole `distill` flow once on the tiny config; later tests inspect it."""
    from flows.flows import distill_flow

    runs = tmp_path_factory.mktemp("runs")
    overrides = [f"runs_dir={runs}"]
    t0 = time.perf_counter()
    report = distill_flow(TINY, overrides)
    return {
        "report": report,
        "overrides": overrides,
        "runs": runs,
        "seconds": time.perf_counter() - t0,
        "cfg": load_config(TINY, overrides),
    }


def test_distill_flow_end_to_end(tiny_run):
    report, cfg = tiny_run["report"], tiny_run["cfg"]
    path = cfg.run_dir() / "report.json"
    on_disk = json.loads(path.read_text())
    assert on_disk["soft_labels"] == cfg.soft_label_uri()
    t = on_disk["teacher"]
    assert set(t) >= {"name", "accuracy", "params", "size_bytes", "latency_ms", "checkpoint"}
    assert t["accuracy"] > 0.5 and os.path.exists(t["checkpoint"])
    names = [s["name"] for s in on_disk["students"]]
    assert names == ["mlp-16-baseline", "mlp-16-T3-a0.5-kd", "mlp-32-baseline", "mlp-32-T3-a0.5-kd"]
    for s in on_disk["students"]:
        assert set(s) >= {"name", "accuracy", "params", "size_bytes", "latency_ms", "agreement", "baseline", "gain"}
        assert s["accuracy"] > 0.3 and 0 <= s["agreement"] <= 1 and os.path.exists(s["checkpoint"])
        assert os.path.exists(s["safetensors"]) and os.path.exists(s["torchscript"])
        assert s["int8"]["size_bytes"] < s["size_bytes"] and abs(s["int8"]["accuracy"] - s["accuracy"]) < 0.1
        base = next(
            b
            for b in on_disk["students"]
            if b["name"] == s["name"].split("-T")[0].replace("-baseline", "") + "-baseline"
        )
        assert s["baseline"] == base["accuracy"]
    # the teacher ran once on the evaluation split for all four students' agreement
    cached = list((cfg.run_dir() / "students").glob("teacher-eval-logits-*.npy"))
    assert len(cached) == 1 and np.load(cached[0]).shape == (300, 10)
    # the soft labels are complete, verified, and say exactly what produced them
    ds = storage.open_soft_labels(cfg.soft_label_uri(), verify=True)
    m = ds.manifest
    assert m["num_samples"] == 600 and m["num_views"] == 2 and m["temperature"] == 3.0
    assert m["teacher"]["fingerprint"] == t["fingerprint"]
    assert m["data"]["transform"]["shift"] == 1 and m["num_shards"] == 3
    assert report["label"]["labelled_shards"] == 3


def test_flow_runs_and_keyed_artifacts_are_recorded(tiny_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs()
        names = {client.read_flow(r.flow_id).name for r in runs}
        assert {"distill", "label", "label-shards", "students", "student-sweep"} <= names
        tasks = {t.name for t in client.read_task_runs()}
        assert {"train-teacher", "plan-labels", "label-shard-0", "finalize-labels", "report"} <= {
            n.rsplit("-", 1)[0] if n.startswith(("plan", "finalize", "report", "train-teacher-")) else n for n in tasks
        }
        for key, kind in (
            ("tiny-label-progress", "progress"),
            ("tiny-label-shards", "table"),
            ("tiny-students", "table"),
            ("tiny-students-chart", "image"),
        ):
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
            assert arts, key
            assert arts[0].type == kind
    with get_client(sync_client=True) as client:
        prog = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-label-progress"]))
        )
        assert float(prog[0].data) == 100.0
        table = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["tiny-label-shards"])))
        rows = json.loads(table[0].data) if isinstance(table[0].data, str) else table[0].data
        assert [r["shard"] for r in rows[:-1]] == [0, 1, 2] and all(r["rows_per_s"] > 0 for r in rows[:-1])


def test_label_rerun_skips_every_shard_quickly(tiny_run):
    from flows.flows import label_flow

    cfg = tiny_run["cfg"]
    before = storage.open_soft_labels(cfg.soft_label_uri()).shards
    t0 = time.perf_counter()
    out = label_flow(TINY, tiny_run["overrides"])
    rerun = time.perf_counter() - t0
    assert out["labelled_shards"] == 0 and out["skipped_shards"] == 3
    assert storage.open_soft_labels(cfg.soft_label_uri()).shards == before
    first = tiny_run["report"]["label"]["seconds"]
    print(f"label first run {first:.2f}s, re-run {rerun:.2f}s")
    assert out["seconds"] < 0.5 * first + 1.0


def test_label_resumes_after_losing_a_shard(tiny_run, tmp_path):
    """Delete one shard's commit record: a re-run labels exactly that shard again."""
    from flows.flows import label_flow

    overrides = tiny_run["overrides"] + [f"label.uri={tmp_path / 'labels'}"]
    label_flow(TINY, overrides)
    uri = str(tmp_path / "labels")
    before = storage.open_soft_labels(uri).shards
    os.remove(os.path.join(uri, "_commits", "shard-00001.json"))
    out = label_flow(TINY, overrides)
    assert out["labelled_shards"] == 1 and out["skipped_shards"] == 2
    assert storage.open_soft_labels(uri, verify=True).shards == before


def test_task_bodies_directly(tiny_run, tmp_path):
    """Task bodies via .fn(): plan and label one shard without a flow run."""
    from prefect.logging import disable_run_logger

    from flows.classify import teacher_info
    from flows.flows import label_shard_task, plan_labels_task

    cfg = tiny_run["cfg"]
    raw = cfg.model_dump(mode="json")
    raw["label"]["uri"] = str(tmp_path / "fn")
    teacher = teacher_info(cfg.teacher_path())
    with disable_run_logger():
        plan = plan_labels_task.fn(raw, teacher)
        assert plan["num_shards"] == 3 and [p["shard"] for p in plan["pending"]] == [0, 1, 2]
        s = label_shard_task.fn(raw, teacher, plan["pending"][1]["shard"])
        assert s["shard"] == 1 and s["rows"] == 400 and not s["skipped"]
        again = label_shard_task.fn(raw, teacher, plan["pending"][1]["shard"])
        assert again["skipped"]
        assert plan_labels_task.fn(raw, teacher)["committed"] == [1]


def test_students_refuse_labels_from_another_teacher(tiny_run, tmp_path):
    """A student sweep checks the stored teacher fingerprint against the teacher it reports on."""
    from flows.recipes import student_runs, train_student

    cfg = tiny_run["cfg"]
    teacher = {"name": "other", "fingerprint": "sha256:not-this-one", "checkpoint": cfg.teacher_path()}
    run = [r for r in student_runs(cfg) if r["loss"] != "ce"][0]
    with pytest.raises(storage.MismatchError, match="teacher.fingerprint"):
        train_student(cfg, teacher, run)


def test_student_with_dataloader_workers_inside_prefect(tiny_run):
    """Workers streaming stored labels from a process that runs Prefect (forkserver start)."""
    from prefect import flow

    from flows.classify import teacher_info
    from flows.flows import train_student_task
    from flows.recipes import student_runs

    cfg = load_config(
        TINY, tiny_run["overrides"] + ["students.train.num_workers=2", "students.train.epochs=1", "name=workers"]
    )
    raw = cfg.model_dump(mode="json")
    raw["label"]["uri"] = load_config(TINY, tiny_run["overrides"]).soft_label_uri()
    teacher = teacher_info(load_config(TINY, tiny_run["overrides"]).teacher_path())
    run = [r for r in student_runs(cfg) if r["loss"] != "ce"][0]

    @flow
    def one_student():
        return train_student_task(raw, teacher, run)

    out = one_student()
    assert out["epochs_run"] == 1 and out["accuracy"] > 0.2


def test_label_on_a_dask_cluster(tiny_run, tmp_path):
    """The scale-out path: shard tasks on a Dask cluster through prefect-dask."""
    from distributed import LocalCluster

    from flows.flows import label_flow

    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster:
        out = label_flow(
            TINY, tiny_run["overrides"] + [f"label.uri={tmp_path / 'dask'}"], dask_address=cluster.scheduler_address
        )
        assert out["labelled_shards"] == 3
        # the shards really ran in the cluster's worker processes, not in this one
        assert os.getpid() not in out["worker_pids"]
    ds = storage.open_soft_labels(str(tmp_path / "dask"), verify=True)
    ref = storage.open_soft_labels(load_config(TINY, tiny_run["overrides"]).soft_label_uri())
    assert [s["sha256"] for s in ds.shards] == [s["sha256"] for s in ref.shards]


def test_student_sweep_is_reproducible(tiny_run, tmp_path):
    """Same config, same stored labels: the same students, although they train in parallel threads."""
    from flows.flows import students_flow

    cfg = tiny_run["cfg"]
    threads_before = torch.get_num_threads()
    again = students_flow(
        TINY,
        tiny_run["overrides"]
        + [f"runs_dir={tmp_path}", f"label.uri={cfg.soft_label_uri()}", f"teacher.checkpoint={cfg.teacher_path()}"],
    )
    first = {s["name"]: s["accuracy"] for s in tiny_run["report"]["students"]}
    assert {s["name"]: s["accuracy"] for s in again["students"]} == first
    # each student ran with cores // max_parallel torch threads, and the process got its count back
    from pipeline.device import available_cores

    assert {s["torch_threads"] for s in again["students"]} == {max(1, available_cores() // 2)}
    assert torch.get_num_threads() == threads_before


def test_students_refuse_labels_of_another_data_split(tiny_run, tmp_path, capsys):
    """Labels made with data.seed=0; a student config with data.seed=1 cuts other splits, whose test
    and val images the teacher labelled for training: refused, by the recipe and by the CLI."""
    from flows.classify import LabelLineageError, check_label_lineage, teacher_info
    from flows.cli import main
    from flows.recipes import student_runs, train_student

    cfg = tiny_run["cfg"]
    uri = cfg.soft_label_uri()
    keep = [f"label.uri={uri}", f"teacher.checkpoint={cfg.teacher_path()}"]
    other = load_config(TINY, [f"runs_dir={tmp_path}", "data.seed=1", *keep])
    teacher = teacher_info(cfg.teacher_path())
    run = [r for r in student_runs(other) if r["loss"] != "ce"][0]
    with pytest.raises(LabelLineageError) as e:
        train_student(other, teacher, run)
    msg = str(e.value)
    assert isinstance(e.value, storage.MismatchError) and uri in msg
    assert "data.seed=0" in msg and "data.seed=1" in msg and "data.fingerprint differs" in msg
    # the id check: it names how many evaluation and validation images are stored labels' samples
    ids = np.concatenate([b["sample_id"] for b in storage.open_soft_labels(uri).iter_batches(4096, shuffle=False)])
    from flows.inputs import splits

    n_test = len(np.intersect1d(ids, splits(other)["test"].sample_ids))
    assert n_test > 0 and f"{n_test} of the 300 images of this config's 'test' split" in msg
    assert "'val' split" in msg
    assert not (tmp_path / "tiny" / "students").exists()  # nothing trained
    # the same data section: the labels' ids and this config's test/val ids are disjoint
    check_label_lineage(load_config(TINY, [f"runs_dir={tmp_path}", *keep]), uri)
    # the CLI refuses before any student (baselines included) trains, one clear line, exit 1
    capsys.readouterr()
    assert main(["students", TINY, f"runs_dir={tmp_path}", "data.seed=1", *keep]) == 1
    err = capsys.readouterr().err
    assert "distill: LabelLineageError: refusing the soft labels at " + uri in err and "data.seed=1" in err
    assert not (tmp_path / "tiny" / "students").exists()


def test_relabelling_a_run_with_another_recipe_is_refused_naming_the_config_knob(tiny_run):
    """Labels made at T = 3 are not silently mixed with (or replaced by) labels at T = 2: the
    refusal names the differing field and the config's way out, and the dataset is untouched."""
    from flows.recipes import existing_teacher, plan_labels

    cfg = tiny_run["cfg"]
    manifest = Path(cfg.soft_label_uri()) / "manifest.json"
    before = manifest.read_bytes()
    other = load_config(TINY, tiny_run["overrides"] + ["label.temperature=2.0"])
    with pytest.raises(storage.MismatchError, match="(?s)temperature.*label.overwrite=true"):
        plan_labels(other, existing_teacher(cfg))
    assert manifest.read_bytes() == before


def test_students_again_with_another_grid_adds_to_the_report(tiny_run, tmp_path):
    """A second sweep (another grid) adds its students to report.json instead of replacing
    the first sweep's; a student retrained under the same name replaces its earlier entry."""
    import shutil

    from flows import recipes
    from flows.classify import teacher_info

    shutil.copytree(tiny_run["runs"], tmp_path / "runs")
    cfg = load_config(TINY, [f"runs_dir={tmp_path / 'runs'}", f"label.uri={tiny_run['cfg'].soft_label_uri()}"])
    teacher = teacher_info(cfg.teacher_path())
    first = json.loads((cfg.run_dir() / "report.json").read_text())["students"]
    assert len(first) == 4
    raw = [{k: v for k, v in s.items() if k not in ("baseline", "gain")} for s in first]
    new = dict(raw[1], name=raw[1]["name"].replace("T3", "T5"), temperature=5.0, accuracy=0.5)
    # the same student retrained, under its name in a run of several seeds
    redo = dict(raw[0], accuracy=0.25, name=f"{raw[0]['name']}-s{raw[0]['seed']}")
    report = recipes.build_report(cfg, teacher, [new, redo])
    names = [s["name"] for s in report["students"]]
    assert sorted(names) == sorted([s["name"] for s in first[1:]] + [new["name"], redo["name"]])
    by = {s["name"]: s for s in report["students"]}
    assert by[redo["name"]]["accuracy"] == 0.25 and by[new["name"]]["accuracy"] == 0.5
    assert json.loads((cfg.run_dir() / "report.json").read_text())["students"] == report["students"]
    # an earlier student whose checkpoint is gone, or whose model and seed were retrained for
    # other steps (no longer equal steps with its baseline), leaves the report
    path = cfg.run_dir() / "report.json"
    old = json.loads(path.read_text())
    old["students"][2]["checkpoint"] = str(tmp_path / "gone.pt")
    path.write_text(json.dumps(old))
    kd = [s for s in raw if s["loss"] != "ce"]
    longer = dict(kd[0], name=kd[0]["name"] + "-again", steps=kd[0]["steps"] + 1)
    report = recipes.build_report(cfg, teacher, [longer])
    stale = {s["name"] for s in old["students"] if s["loss"] != "ce" and s["arch_name"] == kd[0]["arch_name"]}
    want = {s["name"] for i, s in enumerate(old["students"]) if i != 2} - stale
    assert {s["name"] for s in report["students"]} == want | {longer["name"]} and kd[0]["name"] in stale
