"""components/mlmd.py: a run's task outputs from its MLMD records (recorded second run, where every
task but deploy came from KFP's cache), through the pure function and through gRPC."""

from __future__ import annotations

import copy

import pytest

from components import mlmd
from tests.mlmdserver import mlmd_server, recorded

SELECT = "select"


@pytest.fixture
def run() -> dict:
    return recorded()


def first_run_uri(run: dict, task: str, output: str) -> str:
    return f"minio://mlpipeline/v2/artifacts/gtsrb-backends/{run['first_run_id']}/{task}/7d21c4e9/{output}"


def uri(objects: dict, task=SELECT, output="summary") -> str:
    return mlmd.output_uri(objects["executions"], objects["events"], objects["artifacts"], task, output)


def test_a_cached_task_gives_the_uri_of_the_run_that_computed_it(run):
    assert run["run"]["run_id"] not in first_run_uri(run, SELECT, "summary")
    assert uri(run["mlmd"]) == first_run_uri(run, SELECT, "summary")
    assert run["run"]["run_id"] in uri(run["mlmd"], "deploy", "record"), "deploy is never cached"


def test_the_run_api_of_kfp_2_17_gives_no_artifacts(run):
    """Why MLMD: the recorded GetRun answer's task details carry no outputs and no execution ids."""
    tasks = run["run"]["run_details"]["task_details"]
    assert tasks and not any("outputs" in t or "execution_id" in t for t in tasks)
    assert {t["state"] for t in tasks if t["display_name"] == SELECT} == {"SKIPPED"}, "cached executor"


def test_a_retried_task_counts_its_last_finished_execution(run):
    objects = copy.deepcopy(run["mlmd"])
    retry = copy.deepcopy(next(e for e in objects["executions"] if e["id"] == "38"))
    failed = dict(copy.deepcopy(retry), id="42", lastKnownState="FAILED")
    retry.update(id="43", lastKnownState="COMPLETE")
    objects["executions"] += [failed, retry]
    objects["events"].append({"artifactId": "44", "executionId": "43", "type": "OUTPUT",
                              "path": {"steps": [{"key": "summary"}]}})
    objects["artifacts"].append({"id": "44", "uri": "minio://mlpipeline/v2/artifacts/x/retry/summary"})
    assert uri(objects) == "minio://mlpipeline/v2/artifacts/x/retry/summary"


def test_no_finished_execution_names_what_the_run_recorded(run):
    objects = copy.deepcopy(run["mlmd"])
    next(e for e in objects["executions"] if e["id"] == "38")["lastKnownState"] = "FAILED"
    with pytest.raises(mlmd.OutputNotFound, match=r"no finished execution of task 'select' in this run "
                                                  r"\(its executions: 38=FAILED; tasks recorded: .*deploy.*train"):
        uri(objects)
    with pytest.raises(mlmd.OutputNotFound, match="executions: none"):
        uri(run["mlmd"], task="smoke")


def test_an_output_without_its_event_or_uri_fails(run):
    with pytest.raises(mlmd.OutputNotFound, match="0 OUTPUT events for 'summaries'"):
        uri(run["mlmd"], output="summaries")
    objects = copy.deepcopy(run["mlmd"])
    next(a for a in objects["artifacts"] if a["id"] == "7").pop("uri")
    with pytest.raises(mlmd.OutputNotFound, match="artifact 7 .select.summary. has no URI"):
        uri(objects)


def test_the_grpc_client_reads_every_page_of_the_run(run):
    with mlmd_server(run["mlmd"]) as (endpoint, store):
        executions, events, artifacts = mlmd.MetadataStore(endpoint).run_objects(run["run"]["run_id"])
        assert mlmd.run_output_uri(endpoint, run["run"]["run_id"], SELECT, "summary") == first_run_uri(
            run, SELECT, "summary")
    assert executions == run["mlmd"]["executions"], "every field read survives the wire"
    assert store.calls.count("GetExecutionsByContext") >= 2 * 3, "11 executions in pages of 4, twice"
    assert len(events) == len(run["mlmd"]["events"]) and len(artifacts) == len(run["mlmd"]["artifacts"])


def test_an_unknown_run_or_an_unreachable_server_fails_clearly(run, monkeypatch):
    with mlmd_server(run["mlmd"]) as (endpoint, _):
        with pytest.raises(mlmd.OutputNotFound, match="no system.PipelineRun context for run other-run"):
            mlmd.run_output_uri(endpoint, "other-run", SELECT, "summary")
    monkeypatch.setattr(mlmd, "DEADLINE_SECONDS", 0.5)
    with pytest.raises(mlmd.OutputNotFound, match=f"MLMD at {endpoint}: GetContextByTypeAndName failed: "
                                                  "DEADLINE_EXCEEDED"):
        mlmd.run_output_uri(endpoint, "any", SELECT, "summary")
