"""Shared fixtures. Environment that libraries read at import time is set here, first."""
import os

# botocore >= 1.36 sends checksum headers some S3 servers reject.
os.environ.setdefault("AWS_REQUEST_CHECKSUM_CALCULATION", "when_required")
os.environ.setdefault("AWS_RESPONSE_CHECKSUM_VALIDATION", "when_required")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")

import uuid  # noqa: E402

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


def write_toy(uri, *, backend="parquet", n=200, c=10, shards=4, views=1, temperature=4.0,
              representation="dense", k=None, dtype="float16", seed=0, storage_options=None, **kw):
    """Write a complete toy dataset; returns the raw logits, rows ordered (sample_id, view)."""
    from storage import SoftLabelWriter
    z = toy_logits(n * views, c, seed)
    sids = np.repeat(np.arange(n), views)
    vw = np.tile(np.arange(views), n)
    bounds = np.linspace(0, n * views, shards + 1).astype(int)
    with SoftLabelWriter(uri, backend=backend, num_classes=c, temperature=temperature, representation=representation,
                         k=k, dtype=dtype, num_views=views, teacher=TEACHER, data=DATA,
                         storage_options=storage_options, **kw) as w:
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
    yield {"bucket": bucket, "endpoint": endpoint,
           "storage_options": {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}}
    server.stop()


@pytest.fixture
def s3_uri(s3_server):
    return f"s3://{s3_server['bucket']}/{uuid.uuid4().hex[:10]}"
