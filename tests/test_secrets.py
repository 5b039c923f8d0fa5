"""Storage credentials never become Prefect parameters, logs or artifacts (issue #12):
a literal secret (YAML or override) is replaced by an env: reference before any flow or
task parameter is recorded, and references are resolved only inside tasks."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY, api

from flows import secrets

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_references_resolve_and_literals_are_moved_out(monkeypatch):
    monkeypatch.setenv("MY_S3_SECRET", "s3cr3t")
    opts = {
        "endpoint_url": "http://x",
        "key": "AKIA-7f3",
        "secret": "env:MY_S3_SECRET",
        "client_kwargs": {"aws_session_token": "tok-9q2"},
    }
    refs = secrets.to_references(opts)
    assert refs["endpoint_url"] == "http://x" and refs["secret"] == "env:MY_S3_SECRET"
    assert refs["key"].startswith("env:DISTILL_SECRET_") and refs["client_kwargs"]["aws_session_token"].startswith(
        "env:"
    )
    assert "AKIA-7f3" not in json.dumps(refs) and "tok-9q2" not in json.dumps(refs)
    assert secrets.resolve(refs) == dict(opts, secret="s3cr3t")
    over = secrets.scrub_overrides(["label.storage_options.secret=abc", "label.temperature=2"])
    assert over[1] == "label.temperature=2" and "abc" not in over[0]
    assert secrets.resolve({"secret": over[0].split("=", 1)[1]})["secret"] == "abc"
    with pytest.raises(ValueError, match="NOT_SET_ANYWHERE"):
        secrets.resolve({"secret": "env:NOT_SET_ANYWHERE"})
    assert secrets.redact({"a": 1, "secret": "x", "nested": {"token": "y"}}) == {
        "a": 1,
        "secret": "***",
        "nested": {"token": "***"},
    }


@pytest.mark.s3
def test_a_literal_secret_never_reaches_the_prefect_api(prefect_server, s3_server, tmp_path):
    secret = "SUPERSECRET-4b1d"
    env = dict(prefect_server["env"])
    uri = f"s3://{s3_server['bucket']}/secret-{os.getpid()}"
    args = [
        f"runs_dir={tmp_path}",
        "name=sec",
        "teacher.train.epochs=1",
        "students.train.epochs=1",
        "students.models=[{name: m, arch: mlp, kwargs: {width: 8}}]",
        f"label.uri={uri}",
        f"label.storage_options.endpoint_url={s3_server['endpoint']}",
        "label.storage_options.key=testing",
        f"label.storage_options.secret={secret}",
    ]
    r = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", TINY, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert secret not in r.stdout + r.stderr
    flow_runs = api(prefect_server, "POST", "/flow_runs/filter", {"limit": 200})
    mine = [f for f in flow_runs if "sec" in json.dumps(f["parameters"])]
    assert len(mine) >= 3  # distill, label, students (+ their subflows)
    assert secret not in json.dumps(flow_runs)
    assert secret not in json.dumps(api(prefect_server, "POST", "/task_runs/filter", {"limit": 200}))
    assert secret not in json.dumps(api(prefect_server, "POST", "/logs/filter", {"limit": 200}))
    assert secret not in json.dumps(api(prefect_server, "POST", "/artifacts/filter", {"limit": 200}))
    for root, _, files in os.walk(tmp_path):
        for f in files:
            if f.endswith((".json", ".jsonl", ".md")):
                assert secret not in open(os.path.join(root, f), errors="replace").read(), f
