"""An object store that stops answering during `distill label` (issue #12): transient
errors are retried as configured, a lasting outage ends with one clear line naming the
endpoint (no traceback), and the partial dataset resumes once the store is back.

The outage is real: the CLI talks to the moto S3 server through a TCP proxy on
127.0.0.1 that the test stops and restarts on the same port."""

import os
import socket
import subprocess
import sys
import threading
import time

import boto3
import pytest
from conftest import TINY

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.s3


class Proxy:
    """127.0.0.1:port -> target, one thread per direction; stop() closes everything."""

    def __init__(self, target: tuple[str, int], port: int = 0):
        self.target = target
        self.srv = socket.socket()
        self.srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.srv.bind(("127.0.0.1", port))
        self.srv.listen(64)
        self.port = self.srv.getsockname()[1]
        self.conns: list[socket.socket] = []
        self.alive = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while self.alive:
            try:
                c, _ = self.srv.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(self.target, timeout=10)
            except OSError:
                c.close()
                continue
            self.conns += [c, u]
            for a, b in ((c, u), (u, c)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stop(self):
        self.alive = False
        self.srv.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass


def _distill(args, env, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_outage_is_retried_reported_in_one_line_and_resumes(prefect_server, s3_server, tmp_path):
    host, port = s3_server["endpoint"].split("//")[1].split(":")
    proxy = Proxy((host, int(port)))
    endpoint = f"http://127.0.0.1:{proxy.port}"
    prefix = f"outage-{os.getpid()}"
    env = dict(
        prefect_server["env"],
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    base = [
        f"runs_dir={tmp_path}",
        "name=outage",
        "teacher.train.epochs=1",
        f"label.uri=s3://{s3_server['bucket']}/{prefix}",
        f"label.storage_options.endpoint_url={endpoint}",
        "label.retries=1",
        "label.runner.max_workers=1",
        "label.shard_size=60",
        # botocore's own connection retries (up to 5 attempts with exponential backoff,
        # ~15 s per try) are not what is tested here; distillery's task retries are
        "label.storage_options.config_kwargs={retries: {max_attempts: 1}}",
    ]
    r = _distill(["teacher", "train", TINY, *base], env)
    assert r.returncode == 0, r.stderr[-2000:]

    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"], region_name="us-east-1")

    def commits():
        got = s3.list_objects_v2(Bucket=s3_server["bucket"], Prefix=f"{prefix}/_commits/")
        return got.get("KeyCount", 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "label", TINY, *base],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    t0 = time.time()
    while commits() < 2 and proc.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    proxy.stop()  # the store goes away mid-run
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, (out[-2000:], err[-3000:])
    assert "Traceback" not in out + err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("distill:")]
    assert len(lines) == 1 and f"127.0.0.1:{proxy.port}" in lines[0] and "re-run" in lines[0], err[-2000:]
    done = commits()
    assert 2 <= done < 10  # 600 samples / 60 per shard = 10 shards
    from conftest import api

    runs = api(
        prefect_server, "POST", "/task_runs/filter", {"task_runs": {"name": {"like_": "label-shard-"}}, "limit": 200}
    )
    assert max(t["run_count"] for t in runs) == 2, "label.retries=1: the failing shard ran twice"

    proxy2 = Proxy((host, int(port)), port=proxy.port)  # the store is back, same endpoint
    try:
        r = _distill(["label", TINY, *base], env)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"{done} skipped" in r.stdout, r.stdout
        import storage

        so = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
        assert storage.verify(f"s3://{s3_server['bucket']}/{prefix}", storage_options=so).ok
    finally:
        proxy2.stop()
