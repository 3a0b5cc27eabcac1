"""A real S3-protocol server on 127.0.0.1 for tests: moto's standalone server, always stopped."""

import logging
from contextlib import contextmanager

import pytest

ACCESS_KEY, SECRET_KEY, REGION = "testing-key", "testing-secret", "us-east-1"


@contextmanager
def s3_server():
    """Yields ``host:port`` of a fresh in-memory S3 server bound to 127.0.0.1 on a free port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)   # no line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"{host}:{port}"
    finally:
        server.stop()


def s3_env(endpoint: str) -> dict[str, str]:
    """The variables KServe's controller gives the storage-initializer for an S3 secret whose
    annotations name this endpoint with s3-usehttps "0" (pkg/credentials/s3: BuildS3EnvVars)."""
    return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "S3_ENDPOINT": endpoint,
            "AWS_ENDPOINT_URL": f"http://{endpoint}", "S3_USE_HTTPS": "0", "AWS_DEFAULT_REGION": REGION}


@contextmanager
def s3_store(bucket: str):
    """A fresh S3 server, the environment pointing at it (as KServe's secret does on a cluster), and
    components.storage's client for it, with ``bucket`` created."""
    from components import storage

    with s3_server() as endpoint, pytest.MonkeyPatch.context() as env:
        for key, value in s3_env(endpoint).items():
            env.setenv(key, value)
        client = storage.client_from_env()
        client.make_bucket(bucket)
        yield client
