"""/metrics sums every worker's metrics (prometheus_client multiprocess mode)."""

import os
import subprocess
import sys

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from components.serving import worker_metrics

COUNT = """
from prometheus_client import Counter
Counter("answers", "answers given", ["model_name"]).labels("gtsrb").inc({n})
"""


def test_one_worker_needs_no_directory(monkeypatch):
    monkeypatch.delenv(worker_metrics.ENV, raising=False)
    assert worker_metrics.prepare(1) is None
    assert worker_metrics.ENV not in os.environ


def test_workers_get_a_fresh_directory_unless_one_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv(worker_metrics.ENV, "")   # unset for prepare(), and restored afterwards
    directory = worker_metrics.prepare(2)
    assert os.environ[worker_metrics.ENV] == directory and os.listdir(directory) == []
    monkeypatch.setenv(worker_metrics.ENV, str(tmp_path))
    assert worker_metrics.prepare(2) == str(tmp_path)
    (tmp_path / "counter_12345.db").write_bytes(b"")           # left by an earlier server
    with pytest.raises(ValueError, match="earlier run"):
        worker_metrics.prepare(2)
    monkeypatch.setenv(worker_metrics.ENV, str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="not a directory"):
        worker_metrics.prepare(2)


def test_metrics_route_answers_the_sum_over_processes_before_a_later_metrics_route(monkeypatch, tmp_path):
    monkeypatch.setenv(worker_metrics.ENV, str(tmp_path))
    for n in (3, 4):                              # two "workers", each with its own process and file
        subprocess.run([sys.executable, "-c", COUNT.format(n=n)], check=True, env=os.environ.copy())
    assert len(list(tmp_path.glob("counter_*.db"))) == 2
    app = FastAPI()
    worker_metrics.serve_all_workers(app)
    app.add_api_route("/metrics", lambda: "KServe's per-process metrics")   # registered later, as KServe does
    text = TestClient(app).get("/metrics").text
    assert "KServe's" not in text
    assert 'answers_total{model_name="gtsrb"} 7.0' in text.splitlines()


def test_without_the_directory_kserves_route_stays(monkeypatch):
    monkeypatch.delenv(worker_metrics.ENV, raising=False)
    app = FastAPI()
    worker_metrics.serve_all_workers(app)
    app.add_api_route("/metrics", lambda: "per-process")
    assert TestClient(app).get("/metrics").json() == "per-process"

