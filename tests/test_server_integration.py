"""The docker-compose topology, natively: a real Prefect server, a process work pool,
`distill deploy`, a `distill worker`, soft labels on an S3 API server (moto); and
`distill serve` registering scheduled deployments."""

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import TINY, api, stop_process

import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow


def _distill_cmd(*args):
    return [sys.executable, "-m", "flows.cli", *args]


def _run_deployment(server, name: str, timeout: float = 400) -> dict:
    dep = api(server, "GET", f"/deployments/name/{name}")
    run = api(server, "POST", f"/deployments/{dep['id']}/create_flow_run", {})
    t0 = time.time()
    while time.time() - t0 < timeout:
        fr = api(server, "GET", f"/flow_runs/{run['id']}")
        if fr["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return fr
        time.sleep(2)
    raise TimeoutError(f"flow run of {name} not finished after {timeout}s (state {fr['state_type']})")


def test_deploy_worker_s3_topology(prefect_server, s3_server, tmp_path):
    env = dict(prefect_server["env"])
    so = s3_server["storage_options"]
    uri = f"s3://{s3_server['bucket']}/integration/soft_labels"
    overrides = [
        f"runs_dir={tmp_path / 'runs'}",
        "name=integ",
        f"label.uri={uri}",
        f"label.storage_options={{endpoint_url: '{so['endpoint_url']}', key: testing, secret: testing}}",
    ]
    dep = subprocess.run(
        _distill_cmd("deploy", os.path.relpath(TINY, REPO), *overrides, "--pool", "integ-pool"),
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert dep.returncode == 0, dep.stderr[-3000:]
    assert "integ-label" in dep.stdout and "integ-students" in dep.stdout
    pools = api(prefect_server, "POST", "/work_pools/filter", {})
    assert any(p["name"] == "integ-pool" and p["type"] == "process" for p in pools)

    log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        _distill_cmd("worker", "--pool", "integ-pool"),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        for name in ("train-teacher/integ-train-teacher", "label/integ-label", "students/integ-students"):
            fr = _run_deployment(prefect_server, name)
            assert fr["state_type"] == "COMPLETED", (name, fr["state"], open(tmp_path / "worker.log").read()[-4000:])
    finally:
        stop_process(worker)
        log.close()

    report = storage.verify(uri, storage_options=so)
    assert report.ok, report.problems
    m = storage.open_soft_labels(uri, storage_options=so).manifest
    assert m["num_samples"] == 600 and m["backend"] == "parquet"
    rep = json.loads((tmp_path / "runs" / "integ" / "report.json").read_text())
    assert rep["soft_labels"] == uri and len(rep["students"]) == 4

    flows = {f["id"]: f["name"] for f in api(prefect_server, "POST", "/flows/filter", {"limit": 200})}
    runs = api(prefect_server, "POST", "/flow_runs/filter", {"limit": 200})
    completed = {flows[r["flow_id"]] for r in runs if r["state_type"] == "COMPLETED"}
    assert {"train-teacher", "label", "label-shards", "students", "student-sweep"} <= completed
    for key in ("integ-label-progress", "integ-label-shards", "integ-students", "integ-students-chart"):
        arts = api(prefect_server, "POST", "/artifacts/filter", {"artifacts": {"key": {"any_": [key]}}})
        assert arts, f"artifact {key} missing"
    with urllib.request.urlopen(prefect_server["url"] + "/", timeout=30) as r:
        html = r.read().decode()
    assert r.status == 200 and "<html" in html.lower()


def test_serve_registers_scheduled_deployments(prefect_server, tmp_path):
    env = dict(prefect_server["env"])
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        _distill_cmd("serve", TINY, "name=served", "schedules.label=0 3 * * *", "schedules.students=30 4 * * 1"),
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        t0, found = time.time(), {}
        while time.time() - t0 < 180 and len(found) < 2:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()[-3000:]
            deps = api(prefect_server, "POST", "/deployments/filter", {"limit": 200})
            found = {
                d["name"]: [s["schedule"].get("cron") for s in d.get("schedules", [])]
                for d in deps
                if d["name"] in ("served-label", "served-students")
            }
            found = {k: v for k, v in found.items() if v}
            time.sleep(2)
        assert found.get("served-label") == ["0 3 * * *"]
        assert found.get("served-students") == ["30 4 * * 1"]
    finally:
        stop_process(proc)
        log.close()
