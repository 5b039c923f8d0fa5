"""Shared fixtures. Environment that libraries read at import time is set here, first."""

import os

# botocore >= 1.36 sends checksum headers some S3 servers reject.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

# Prefect reads its settings at import: give the test session its own home (database,
# profiles) and time for the temporary server to start on a loaded 2-core machine.
import tempfile  # noqa: E402

os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix="distillery-prefect-")
os.environ.pop("PREFECT_API_URL", None)
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import threading  # noqa: E402
import uuid  # noqa: E402

# This pytest process hosts Prefect's test server, which registers threading atexit hooks
# for its service threads. A forked child (a DataLoader worker in the stream tests) would
# run them at exit against threads it does not have and exit with code 1. Children own
# none of the parent's services, so they drop the inherited hooks.
os.register_at_fork(after_in_child=lambda: threading._threading_atexits.clear())

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TEACHER = {"name": "toy-teacher", "fingerprint": "sha256:teacher-a"}
DATA = {"name": "toy", "split": "train", "fingerprint": "sha256:data-a", "transform": {"shift": 2}}


def toy_logits(n: int, c: int, seed: int = 0) -> np.ndarray:
    """Raw logits with a realistic spread (a few confident classes per row)."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, c)).astype(np.float32) * 3.0
    z[np.arange(n), rng.integers(0, c, n)] += 8.0
    return z


def write_toy(
    uri,
    *,
    backend="parquet",
    n=200,
    c=10,
    shards=4,
    views=1,
    temperature=4.0,
    representation="dense",
    k=None,
    dtype="float16",
    seed=0,
    storage_options=None,
    **kw,
):
    """Write a complete toy dataset; returns the raw logits, rows ordered (sample_id, view)."""
    from storage import SoftLabelWriter

    z = toy_logits(n * views, c, seed)
    sids = np.repeat(np.arange(n), views)
    vw = np.tile(np.arange(views), n)
    bounds = np.linspace(0, n * views, shards + 1).astype(int)
    with SoftLabelWriter(
        uri,
        backend=backend,
        num_classes=c,
        temperature=temperature,
        representation=representation,
        k=k,
        dtype=dtype,
        num_views=views,
        teacher=TEACHER,
        data=DATA,
        storage_options=storage_options,
        **kw,
    ) as w:
        for i in range(shards):
            a, b = bounds[i], bounds[i + 1]
            w.write_shard(i, sids[a:b], z[a:b], vw[a:b] if views > 1 else None)
    return z


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto) on 127.0.0.1 with one bucket; yields storage_options."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    bucket = "distillery-test"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield {
        "bucket": bucket,
        "endpoint": endpoint,
        "storage_options": {"endpoint_url": endpoint, "key": "testing", "secret": "testing"},
    }
    server.stop()


@pytest.fixture(scope="session")
def prefect_harness():
    """One Prefect test server for the whole session (starting one takes 15-30 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture
def one_thread():
    """torch intra-op threads = 1 for the test (2 shared cores; small models run faster)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """sklearn digits split 300 train / 100 val."""
    from pipeline.data.datasets import load_digits8, split_dataset

    return split_dataset(load_digits8(), seed=0, sizes={"train": 300, "val": 100})


TINY = os.path.join(os.path.dirname(__file__), "configs", "tiny.yaml")


def cli_in_process(*args: str):
    """`distill ARGS` through the CLI's own main() in this process, captured like
    subprocess.run(..., capture_output=True, text=True). For commands that end before
    Prefect starts (config and preflight refusals, convert): the same code path as the
    console script without paying a new interpreter's torch + Prefect imports (~3 s a
    call). Each test file that uses it keeps at least one real subprocess case."""
    import contextlib
    import io
    import subprocess

    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return subprocess.CompletedProcess(["distill", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def s3_uri(s3_server):
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 180.0, proc=None) -> None:
    import time
    import urllib.request

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


def stop_process(proc, timeout: float = 20.0) -> None:
    """Stop a process we started (its whole process group), by PID."""
    import signal
    import subprocess

    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=timeout)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on 127.0.0.1 with its own PREFECT_HOME.

    Yields {"url": http://127.0.0.1:N, "api": .../api, "env": env for clients/workers}."""
    import subprocess
    import sys

    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = dict(
        os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_LOGGING_LEVEL="WARNING"
    )
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [
            os.path.join(os.path.dirname(sys.executable), "prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/api/health", proc=proc)
        client_home = tmp_path_factory.mktemp("prefect-client-home")
        client_env = dict(
            os.environ,
            PREFECT_API_URL=f"{url}/api",
            PREFECT_HOME=str(client_home),
            PREFECT_WORKER_QUERY_SECONDS="2",
            PREFECT_WORKER_PREFETCH_SECONDS="2",
        )
        yield {"url": url, "api": f"{url}/api", "env": client_env, "log": str(home / "server.log")}
    finally:
        stop_process(proc)
        log.close()


def api(server: dict, method: str, path: str, body=None):
    """JSON call to the Prefect REST API. A 503 is retried with backoff, as Prefect's own
    client does: the server answers 503 when its SQLite database is briefly locked by a
    busy moment (seen once in a full run, on create_flow_run; its transaction is rolled back)."""
    import json
    import time
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    for attempt in range(6):
        req = urllib.request.Request(
            f"{server['api']}{path}", data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            if e.code != 503 or attempt == 5:
                raise
            time.sleep(0.5 * 2**attempt)
