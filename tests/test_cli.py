"""The `distill` CLI through a subprocess, against a real Prefect server."""
import json
import os
import subprocess
import sys

import pytest

from conftest import TINY, api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def distill(*args, env=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cli_run(prefect_server, tmp_path_factory):
    runs = tmp_path_factory.mktemp("cli-runs")
    r = distill("run", TINY, f"runs_dir={runs}", "name=cli", env=prefect_server["env"])
    return {"result": r, "runs": runs, "uri": str(runs / "cli" / "soft_labels")}


def test_run_prints_report_and_appears_on_the_server(cli_run, prefect_server):
    r = cli_run["result"]
    assert r.returncode == 0, r.stderr[-3000:]
    assert "teacher: tiny-cnn" in r.stdout and "mlp-32-T3-a0.5-kd" in r.stdout and "baseline" in r.stdout
    report = json.loads((cli_run["runs"] / "cli" / "report.json").read_text())
    assert len(report["students"]) == 4
    runs = api(prefect_server, "POST", "/flow_runs/filter", {"limit": 200})
    by_name = {(r["name"], r["state_type"]) for r in runs}
    flows = {f["id"]: f["name"] for f in api(prefect_server, "POST", "/flows/filter", {"limit": 200})}
    completed = {flows[r["flow_id"]] for r in runs if r["state_type"] == "COMPLETED"}
    assert {"distill", "label", "students"} <= completed, by_name


def test_inspect_good_and_corrupted(cli_run, tmp_path):
    import shutil
    ok = distill("inspect", cli_run["uri"], "--verify")
    assert ok.returncode == 0, ok.stderr
    assert "status complete" in ok.stdout and "OK" in ok.stdout
    copy = tmp_path / "copy"
    shutil.copytree(cli_run["uri"], copy)
    shard = sorted(p for p in os.listdir(copy) if p.startswith("shard-"))[1]
    data = bytearray((copy / shard).read_bytes())
    data[len(data) // 2] ^= 0x10
    (copy / shard).write_bytes(bytes(data))
    bad = distill("inspect", str(copy), "--verify")
    assert bad.returncode == 1
    assert shard in bad.stdout and "sha256 mismatch" in bad.stdout
    # without --verify a damaged shard is not noticed, but a missing dataset is
    missing = distill("inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "manifest.json not found" in missing.stderr


def test_config_errors_name_the_key(tmp_path):
    r = distill("run", TINY, "students.trian.epochs=1")
    assert r.returncode == 2 and "students.trian: unknown key" in r.stderr
    r = distill("label", TINY, "label.temperature=-1")
    assert r.returncode == 2 and "label.temperature" in r.stderr and "greater than 0" in r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(open(TINY).read().replace("backend: parquet", "backend: csv"))
    r = distill("students", str(cfg))
    assert r.returncode == 2 and "label.backend" in r.stderr and "'csv'" in r.stderr
    cfg.write_text(open(TINY).read() + "\nextra_section: {a: 1}\n")
    r = distill("run", str(cfg))
    assert r.returncode == 2 and "extra_section: unknown key" in r.stderr
    r = distill("run", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_label_without_teacher_says_what_to_do(tmp_path, prefect_server):
    r = distill("label", TINY, f"runs_dir={tmp_path}", env=prefect_server["env"])
    assert r.returncode != 0
    assert "distill teacher train" in (r.stdout + r.stderr)
