"""`pipeline.py submit` against a stand-in KFP API client answering with a recorded KFP 2.17 run, a gRPC
MLMD stand-in serving that run's recorded metadata (tests/fixtures/kfp-2.17-second-run.json: a second
run whose tasks came from KFP's cache) and a real S3 server on 127.0.0.1, and the pull-request report
(.github/scripts/pr_report.py) the pipeline workflow renders from its summary."""

from __future__ import annotations

import importlib.util
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace as NS

import pytest

import pipeline
from components import cluster
from components.selection import select_winner
from tests.mlmdserver import mlmd_server, recorded
from tests.s3server import s3_store
from tests.test_selection import RESULTS

ROOT = Path(__file__).resolve().parent.parent
RECORDED = recorded()
RUN_ID = RECORDED["run"]["run_id"]
# Where the cached select's summary really is: under the first run's id (see the fixture).
SUMMARY_KEY = f"v2/artifacts/gtsrb-backends/{RECORDED['first_run_id']}/select/7d21c4e9/summary"


def summary(winner_b1: float | None = None) -> dict:
    results = [dict(r) for r in RESULTS]
    if winner_b1 is not None:
        results[2] = {**results[2], "latency": {**results[2]["latency"],
                                                "batch1": {**results[2]["latency"]["batch1"], "median_ms": winner_b1}}}
    return {**select_winner(results), "model": {"path": "/minio/mlpipeline/model", "architecture": "signnet",
                                                "weights_sha256": "ab" * 32, "flops_per_image": 2e6}}


class FakeClient:
    """The kfp.Client calls `submit` makes, recorded; `fail_connects` first constructions raise."""
    calls: list = []
    fail_connects = 0
    final_state = "SUCCEEDED"
    existing_pipeline = None
    run_id = RUN_ID

    def __init__(self, host, ui_host):
        if FakeClient.fail_connects:
            FakeClient.fail_connects -= 1
            raise ConnectionRefusedError("port-forward not up yet")
        self.calls.append(("connect", host, ui_host))

    def get_pipeline_id(self, name):
        return self.existing_pipeline

    def upload_pipeline(self, package, pipeline_name):
        self.calls.append(("upload_pipeline", pipeline_name))
        return NS(pipeline_id="p1")

    def list_pipeline_versions(self, pipeline_id):
        return NS(pipeline_versions=[NS(pipeline_version_id="v1")])

    def upload_pipeline_version(self, package, name, pipeline_id):
        self.calls.append(("upload_pipeline_version", pipeline_id))
        return NS(pipeline_version_id="v2")

    def create_experiment(self, name):
        return NS(experiment_id="e1")

    def run_pipeline(self, experiment_id, job_name, params, pipeline_id, version_id):
        self.calls.append(("run_pipeline", experiment_id, params, pipeline_id, version_id))
        return NS(run_id=self.run_id)

    def wait_for_run_completion(self, run_id, timeout, sleep_duration):
        if self.final_state == "SUCCEEDED":       # the recorded GetRun answer, typed as kfp's client returns it
            from kfp_server_api import ApiClient

            return ApiClient().deserialize(NS(data=json.dumps(RECORDED["run"])), "V2beta1Run")
        failed = NS(display_name="train", state="FAILED", error=NS(message="OOMKilled"), pod_name="train-pod")
        return NS(state=self.final_state, run_details=NS(task_details=[failed]))


@pytest.fixture
def kfp_client(monkeypatch):
    import kfp

    monkeypatch.setattr(kfp, "Client", FakeClient)
    monkeypatch.setattr(pipeline.time, "sleep", lambda seconds: None)
    FakeClient.calls, FakeClient.fail_connects, FakeClient.final_state = [], 0, "SUCCEEDED"
    FakeClient.existing_pipeline, FakeClient.run_id = None, RUN_ID
    return FakeClient


@pytest.fixture
def object_store():
    with s3_store(cluster.MINIO_BUCKET) as client:
        yield os.environ["S3_ENDPOINT"], client      # s3_store points the environment at its server


@pytest.fixture
def metadata():
    with mlmd_server(RECORDED["mlmd"]) as (endpoint, store):
        yield endpoint, store


def submit(tmp_path, *extra) -> int:
    return pipeline.main(["submit", "--package", str(tmp_path / "pipeline.yaml"), "--host", "http://api:8888",
                          "--ui-host", "http://ui:8080", *extra])


def test_submit_uploads_runs_waits_and_downloads_the_summary(kfp_client, object_store, metadata, tmp_path, capsys):
    """A second run: select came from the cache, so its summary is under the first run's id, and
    nothing at all is under this run's id but deploy's record."""
    endpoint, store = object_store
    body = json.dumps(summary()).encode()
    store.put_object("mlpipeline", SUMMARY_KEY, io.BytesIO(body), len(body))
    kfp_client.fail_connects = 2
    out = tmp_path / "out" / "summary.json"
    assert submit(tmp_path, "--arg", "epochs=2", "--arg", "deploy_target=kserve", "--arg", 'backends=["eager"]',
                  "--s3-endpoint", endpoint, "--mlmd-endpoint", metadata[0], "--summary-out", str(out)) == 0
    assert kfp_client.calls[0] == ("connect", "http://api:8888", "http://ui:8080"), "retried until reachable"
    assert ("upload_pipeline", "gtsrb-backends") in kfp_client.calls
    assert ("run_pipeline", "e1", {"epochs": 2, "deploy_target": "kserve", "backends": ["eager"]}, "p1", "v1") \
        in kfp_client.calls
    printed = capsys.readouterr().out
    assert f"run: http://ui:8080/#/runs/details/{RUN_ID}" in printed and "final state: SUCCEEDED" in printed
    assert "winner: onnxruntime" in printed
    written = json.loads(out.read_text())
    assert written["winner"] == "onnxruntime" and written["run"]["id"] == RUN_ID
    assert written["run"]["summary_uri"] == f"minio://mlpipeline/{SUMMARY_KEY}"
    assert (tmp_path / "pipeline.yaml").is_file(), "compiled first"


def test_submit_adds_a_version_to_an_existing_pipeline(kfp_client, tmp_path):
    kfp_client.existing_pipeline = "p0"
    assert submit(tmp_path) == 0
    assert ("upload_pipeline_version", "p0") in kfp_client.calls
    assert kfp_client.calls[-1] == ("run_pipeline", "e1", {}, "p0", "v2")


def test_a_failed_run_exits_non_zero_and_names_the_failed_task(kfp_client, tmp_path, capsys):
    kfp_client.final_state = "FAILED"
    assert submit(tmp_path) == 1
    captured = capsys.readouterr()
    assert "final state: FAILED" in captured.out
    assert "task train failed: OOMKilled (pod train-pod)" in captured.err


def test_a_run_without_a_summary_artifact_fails(kfp_client, object_store, tmp_path, capsys):
    endpoint, _ = object_store
    objects = {**RECORDED["mlmd"], "executions": [e for e in RECORDED["mlmd"]["executions"]
                                                  if e["customProperties"]["task_name"]["stringValue"] != "select"]}
    with mlmd_server(objects) as (mlmd_endpoint, _):
        assert submit(tmp_path, "--s3-endpoint", endpoint, "--mlmd-endpoint", mlmd_endpoint,
                      "--summary-out", str(tmp_path / "s.json")) == 1
    assert "cannot find the run's summary: no finished execution of task 'select'" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_an_argument_without_a_value_is_refused(kfp_client, tmp_path):
    with pytest.raises(SystemExit):
        submit(tmp_path, "--arg", "epochs")


# --------------------------------------------------------------------------- the PR report
@pytest.fixture(scope="module")
def pr_report():
    spec = importlib.util.spec_from_file_location("pr_report", ROOT / ".github/scripts/pr_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pr_report_has_the_table_the_winner_and_the_comparison_with_main(pr_report):
    text = pr_report.report(summary(winner_b1=0.4), summary(), run_url="https://run", commit="f" * 40)
    assert text.startswith(pr_report.MARKER + "\n")
    assert "**Winner: `onnxruntime`**" in text and "| **onnxruntime** |" in text
    assert "commit `ffffffffffff` · [run](https://run)" in text
    assert "## vs main" in text and "Winner: `onnxruntime` (same as main)" in text
    assert "| onnxruntime | 95.00 (+0.00) | 0.400 (-0.100) | 20.000 (+0.000) |" in text
    assert "| onednn-bf16 | not run here | – | – |" in text


def test_pr_report_without_main_or_without_a_summary(pr_report, tmp_path):
    assert "_No summary from main to compare with yet._" in pr_report.report(summary(), None)
    assert "did not finish" in pr_report.report(None, None)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(summary()))
    assert pr_report._load(str(path))["winner"] == "onnxruntime" and pr_report._load(str(tmp_path / "no")) is None
