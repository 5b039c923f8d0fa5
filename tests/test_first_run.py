"""The CLI's first run the way it failed (issue #8): a brand-new PREFECT_HOME, Prefect's
embedded temporary server (no PREFECT_API_URL) and a CPU kept busy by other processes.

The subprocesses get none of the Prefect settings this test session sets for itself
(conftest raises the startup timeout, lowers the log level): what is tested is the CLI's
own defaults."""

import os
import subprocess
import sys
import time

import pytest
from conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# What users read as failures: telemetry errors offline and service tracebacks.
NOISE = ("Traceback", "telemetry", "database is locked", "| ERROR")


def fresh_env(home, **settings) -> dict:
    """The caller's environment without any PREFECT_* setting (or DO_NOT_TRACK), plus a
    new PREFECT_HOME: what a user who just cloned the repository has."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "DO_NOT_TRACK"}
    env.update(PREFECT_HOME=str(home), **settings)
    return env


def distill(*args, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def busy_cpu():
    """Four spinning processes per core for as long as the test runs (each also stops by
    itself after 5 minutes should the teardown never run). Measured on 2 cores with
    Prefect's 20 s default: one per core, the first start fit (13 s); three per core it
    timed out 1 in 2, four per core 2 in 2, like the 3 in 5 seen in the field."""
    spin = "import time\nend = time.time() + 300\nwhile time.time() < end: pass\n"
    cores = len(os.sched_getaffinity(0))
    procs = [subprocess.Popen([sys.executable, "-c", spin], start_new_session=True) for _ in range(min(4 * cores, 32))]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)


@pytest.mark.slow
def test_first_run_on_a_busy_machine_succeeds_quietly(tmp_path, busy_cpu):
    home = tmp_path / "prefect-home"  # does not exist yet: Prefect creates it
    t0 = time.perf_counter()
    # the point is a slow first start, not speed: generous, so a machine busy with more
    # than the burners (another job) still finishes (measured 205 s of flow under such load)
    # one flow (`teacher train`): what failed was the temporary server's first start, and
    # every command starts it the same way (the whole `distill run` took 127 s under this load)
    r = distill(
        "teacher",
        "train",
        TINY,
        f"runs_dir={tmp_path / 'runs'}",
        "name=first",
        "teacher.train.epochs=1",
        env=fresh_env(home),
        timeout=600,
    )
    seconds = time.perf_counter() - t0
    out = r.stdout + r.stderr
    print(f"first run on a busy CPU: {seconds:.1f}s")
    assert all(p.poll() is None for p in busy_cpu), "the CPU burners stopped before the run ended"
    assert r.returncode == 0, out[-4000:]
    assert "Starting temporary server" in out  # really the embedded server
    assert (home / "prefect.db").exists()  # ... on the fresh home
    assert '"name": "tiny-cnn"' in r.stdout and "[first] teacher finished" in r.stdout
    assert (tmp_path / "runs" / "first" / "teacher.pt").exists()
    noisy = [line for line in out.splitlines() if any(n in line for n in NOISE)]
    assert not noisy, "\n".join(noisy[:20])


def test_a_server_that_never_comes_up_ends_with_one_line(tmp_path):
    # Prefect's own setting, set by the user, is respected: 1 s is too short for the
    # temporary server's start on any machine (its imports alone take longer)
    env = fresh_env(tmp_path / "prefect-home", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    r = distill("teacher", "train", TINY, f"runs_dir={tmp_path / 'runs'}", env=env, timeout=120)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    said = [line for line in r.stderr.splitlines() if line.startswith("distill:")]
    assert len(said) == 1 and said[0].startswith("distill: Prefect's temporary API server did not start within 1 s"), (
        r.stderr
    )
    assert "PREFECT_API_URL" in said[0]  # ... and what to do about it
    assert not (tmp_path / "runs" / "tiny" / "teacher.pt").exists()


def test_env_defaults_leave_what_the_user_set(tmp_path):
    from flows.runtime import EMBEDDED_DEFAULTS, prefect_env_defaults

    home = tmp_path / "home"
    home.mkdir()
    # nothing set: embedded, every default applied, analytics off on both sides
    env = {"PREFECT_HOME": str(home)}
    assert prefect_env_defaults(env) is True
    assert env == {"PREFECT_HOME": str(home), **EMBEDDED_DEFAULTS, "DO_NOT_TRACK": "1"}
    # set in the environment: kept; opting in to analytics also leaves the client's alone
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "true",
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "7",
    }
    prefect_env_defaults(env)
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "true" and "DO_NOT_TRACK" not in env
    assert env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] == "7"
    # set in the active profile (`prefect config set`): the API URL there means a real
    # server, so the temporary server's settings are not touched
    (home / "profiles.toml").write_text(
        'active = "mine"\n[profiles.mine]\n'
        'PREFECT_API_URL = "http://127.0.0.1:4200/api"\n'
        'PREFECT_SERVER_ANALYTICS_ENABLED = "true"\n'
    )
    env = {"PREFECT_HOME": str(home)}
    assert prefect_env_defaults(env) is False
    assert env == {"PREFECT_HOME": str(home)}
