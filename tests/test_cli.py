"""The `distill` CLI through a subprocess, against a real Prefect server. Cases that end
before Prefect starts (config errors, usage errors, convert) run most of their calls
through the CLI's main() in-process (conftest.cli_in_process)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY, api, cli_in_process

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def distill(*args, env=None, timeout=600, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=env or dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def cli_run(prefect_server, tmp_path_factory):
    # runs_dir relative to the working directory, as in configs/quickstart.yaml: the stored
    # uris resolve to absolute paths and everything downstream must still find its dataset.
    cwd = tmp_path_factory.mktemp("cli-cwd")
    r = distill("run", TINY, "runs_dir=runs", "name=cli", env=prefect_server["env"], cwd=cwd)
    runs = cwd / "runs"
    return {"result": r, "runs": runs, "uri": str(runs / "cli" / "soft_labels")}


def _shards(uri):
    """The dataset's shard files, in shard order, as its manifest's shard index lists them."""
    from pathlib import Path

    import forge

    return [Path(uri) / s["path"] for s in forge.load(str(uri))[1]]


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
    # tests/configs/tiny.yaml names its splits train, val, test (not alphabetical, as
    # data.sizes orders are): the replay rebuilds the same splits and recomputes the rows
    replay = distill("inspect", cli_run["uri"], "--replay", "12")
    assert replay.returncode == 0, replay.stderr
    assert "12 rows recomputed" in replay.stdout and ": match" in replay.stdout
    copy = tmp_path / "copy"
    shutil.copytree(cli_run["uri"], copy)
    shard = _shards(copy)[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    bad = distill("inspect", str(copy), "--verify")
    assert bad.returncode == 1
    assert shard.name in bad.stdout and "sha256 mismatch" in bad.stdout
    # without --verify a damaged shard is not noticed, but a missing dataset is
    missing = distill("inspect", str(tmp_path / "nothing"))
    assert missing.returncode == 1 and "manifest.json not found" in missing.stderr


def test_config_errors_name_the_key(tmp_path):
    r = distill("run", TINY, "students.trian.epochs=1")  # the console command itself
    assert r.returncode == 2 and "students.trian: unknown key" in r.stderr
    # the rest: main() in-process
    r = cli_in_process("label", TINY, "label.temperature=-1")
    assert r.returncode == 2 and "label.temperature" in r.stderr and "greater than 0" in r.stderr
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(open(TINY).read().replace("backend: parquet", "backend: csv"))
    r = cli_in_process("students", str(cfg))
    assert r.returncode == 2 and "label.backend" in r.stderr and "'csv'" in r.stderr
    cfg.write_text(open(TINY).read() + "\nextra_section: {a: 1}\n")
    r = cli_in_process("run", str(cfg))
    assert r.returncode == 2 and "extra_section: unknown key" in r.stderr
    r = cli_in_process("run", str(tmp_path / "none.yaml"))
    assert r.returncode == 2 and "config file not found" in r.stderr


def test_label_without_teacher_says_what_to_do(tmp_path, prefect_server):
    r = distill("label", TINY, f"runs_dir={tmp_path}", env=prefect_server["env"])
    assert r.returncode != 0
    assert "distill teacher train" in (r.stdout + r.stderr)


# ------------------------------------------------------------------ overrides everywhere

# Every subcommand that takes a config, with its own options placed before the override
# (argparse stops filling `overrides` at the first option: `teacher train CONFIG --retrain
# key=value` was rejected with "unrecognized arguments").
CONFIG_COMMANDS = [
    ["run", TINY],
    ["teacher", "train", TINY, "--retrain"],
    ["label", TINY, "--dask", "tcp://127.0.0.1:1"],
    ["students", TINY],
    ["serve", TINY],
    ["deploy", TINY, "--pool", "nowhere"],
]


@pytest.mark.parametrize("cmd", CONFIG_COMMANDS, ids=lambda c: " ".join(c[:2]).replace(TINY, "CONFIG"))
def test_every_config_command_takes_overrides(cmd):
    # a misspelt key proves the override reached the config: validation names it and
    # exits 2 before anything runs (no Prefect, no server needed)
    r = cli_in_process(*cmd, "name=overridden", "students.trian.epochs=1", "--debug")
    assert "unrecognized arguments" not in r.stderr, r.stderr
    assert r.returncode == 2 and "students.trian: unknown key" in r.stderr, r.stderr


def test_unknown_words_are_still_rejected():
    r = distill("teacher", "train", TINY, "--retrian")
    assert r.returncode == 2 and "unrecognized arguments: --retrian" in r.stderr
    r = cli_in_process("inspect", "some/uri", "label.temperature=2")  # inspect takes no config
    assert r.returncode == 2 and "unrecognized arguments: label.temperature=2" in r.stderr


def test_teacher_train_applies_overrides_after_its_option(tmp_path, prefect_server):
    r = distill(
        "teacher",
        "train",
        TINY,
        "--retrain",
        f"runs_dir={tmp_path}",
        "name=ovr",
        "teacher.train.epochs=1",
        env=prefect_server["env"],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ovr" / "teacher.pt").exists()
    assert json.loads(r.stdout[r.stdout.index("{") : r.stdout.rindex("}") + 1])["name"] == "tiny-cnn"


# ------------------------------------------------------------------ errors without tracebacks


@pytest.fixture
def damaged_runs(cli_run, tmp_path):
    """A copy of the CLI run's directory whose students must be trained again (so they
    read the soft labels) and whose dataset the test damages."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(cli_run["runs"] / "cli", runs / "cli", ignore=shutil.ignore_patterns("students", "report.json"))
    return runs


def _log_messages(server) -> list[str]:
    return [log["message"] for log in api(server, "POST", "/logs/filter", {"limit": 200, "sort": "TIMESTAMP_DESC"})]


def test_missing_shard_prints_one_line_and_the_ui_keeps_the_traceback(damaged_runs, prefect_server):
    shard = _shards(damaged_runs / "cli" / "soft_labels")[1]
    shard.unlink()
    r = distill("students", TINY, f"runs_dir={damaged_runs}", "name=cli", env=prefect_server["env"])
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    said = [line for line in r.stderr.splitlines() if line.startswith("distill:")]
    assert len(said) == 1 and "CorruptShardError" in said[0] and shard.name in said[0] and "is missing" in said[0], (
        r.stderr[-2000:]
    )
    # the console dropped the traceback; the run's logs on the server (the UI) have it
    assert any(
        "Traceback (most recent call last)" in m and f"{shard.name} is missing" in m
        for m in _log_messages(prefect_server)
    )


def test_unreadable_manifest_prints_one_line(damaged_runs, prefect_server):
    manifest = damaged_runs / "cli" / "soft_labels" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])  # cut off mid-write
    r = distill("students", TINY, f"runs_dir={damaged_runs}", "name=cli", env=prefect_server["env"])
    out = r.stdout + r.stderr
    assert r.returncode == 1, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    said = [line for line in r.stderr.splitlines() if line.startswith("distill:")]
    assert len(said) == 1 and "manifest.json" in said[0], r.stderr[-2000:]


def test_debug_shows_the_tracebacks(damaged_runs, prefect_server):
    _shards(damaged_runs / "cli" / "soft_labels")[0].unlink()
    r = distill("--debug", "students", TINY, f"runs_dir={damaged_runs}", "name=cli", env=prefect_server["env"])
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert r.stderr.count("storage.errors.CorruptShardError") >= 2  # Prefect's and the CLI's own
    assert [line for line in r.stderr.splitlines() if line.startswith("distill: CorruptShardError")]


# ------------------------------------------------------------------ convert


def test_convert_copies_a_dataset_to_the_other_backend(tmp_path):
    import numpy as np
    from conftest import write_toy

    from storage import open_soft_labels

    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    write_toy(src, backend="parquet", n=120, shards=3, views=2)
    r = distill("convert", src, dst, "--backend", "zarr")  # the console command; the rest in-process
    assert r.returncode == 0, r.stderr
    assert f"{src} -> {dst}: zarr format 3, 240 rows in 3 shards" in r.stdout
    a, b = open_soft_labels(src), open_soft_labels(dst)
    assert b.manifest["backend"] == "zarr" and b.manifest["status"] == "complete"
    assert b.manifest["format_version"] == 3 and len(b.shards) == 3
    ids = np.arange(120)
    ra, rb = a.take(ids), b.take(ids)
    assert ra.keys() == rb.keys() and all(np.array_equal(ra[k], rb[k]) for k in ra)
    # DST now holds a zarr dataset: converting parquet there again needs --overwrite
    again = cli_in_process("convert", src, dst, "--backend", "parquet")
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert again.stderr.startswith("distill: MismatchError") and "overwrite" in again.stderr
    forced = cli_in_process("convert", src, dst, "--backend", "parquet", "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert open_soft_labels(dst).manifest["backend"] == "parquet"


def test_convert_of_a_missing_dataset_says_so(tmp_path):
    r = cli_in_process("convert", str(tmp_path / "nothing"), str(tmp_path / "dst"), "--backend", "zarr")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.startswith("distill: ") and "manifest.json not found" in r.stderr
