"""components/rollout.py over recorded redeploys (tests/fixtures/kserve-0.21-redeploy.json): with KServe's
default RollingUpdate the InferenceService reads Ready while the old pod serves and the new one is
Pending; the rollout check is not fooled. With Recreate it completes once the new pod is Ready."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from components import rollout

RECORDED = json.loads((Path(__file__).parent / "fixtures" / "kserve-0.21-redeploy.json").read_text())
NEW, OLD = RECORDED["new_weights"], RECORDED["old_weights"]


def isvc_ready(step: dict) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in step["isvc"]["status"]["conditions"])


def test_a_rolling_update_reads_ready_while_the_old_pod_serves_and_the_rollout_check_waits():
    unobserved, pending, _ = RECORDED["rolling_update"]
    for step, waiting_for in ((unobserved, "has not observed the new spec"),
                              (pending, "1 old replica(s) still running")):
        assert isvc_ready(step), f"{step['when']}: KServe says Ready"
        done, why = rollout.rollout_status(step["deployment"], NEW)
        assert not done and waiting_for in why, (step["when"], why)


def test_a_rollout_past_its_progress_deadline_fails_at_once():
    *_, stuck = RECORDED["rolling_update"]
    assert not isvc_ready(stuck), "PropagateRawStatus: Progressing=False with a message makes PredictorReady False"
    with pytest.raises(rollout.RolloutError, match="gtsrb-predictor exceeded its progress deadline: .*timed out"):
        rollout.rollout_status(stuck["deployment"], NEW)


def test_recreate_completes_only_when_the_new_pod_is_available():
    states = [rollout.rollout_status(step["deployment"], NEW) for step in RECORDED["recreate"]]
    assert [done for done, _ in states] == [False, False, True]
    assert "0 of 1 replicas run the new model" in states[0][1]
    assert "0 of 1 new replicas available" in states[1][1]
    assert [isvc_ready(s) for s in RECORDED["recreate"]] == [False, False, True]


def test_a_deployment_still_carrying_the_old_model_or_none_is_not_done():
    ready = RECORDED["recreate"][-1]["deployment"]
    done, why = rollout.rollout_status(ready, OLD)
    assert not done and f"still runs weights {NEW}" in why
    assert rollout.rollout_status(None, NEW) == (False, "the predictor Deployment does not exist yet")


def test_wait_for_rollout_polls_until_done_or_times_out():
    class Apps:
        def __init__(self, steps):
            self.steps, self.reads = [s["deployment"] for s in steps], []

        def read_namespaced_deployment(self, name, namespace):
            self.reads.append((namespace, name))
            return self.steps[min(len(self.reads) - 1, len(self.steps) - 1)]

    ticks = iter(range(1000))
    apps = Apps(RECORDED["recreate"])
    got = rollout.wait_for_rollout(apps, "kubeflow", "gtsrb", NEW, timeout=60, poll=0, clock=lambda: next(ticks),
                                   sleep=lambda s: None)
    assert got["status"]["availableReplicas"] == 1 and apps.reads == [("kubeflow", "gtsrb-predictor")] * 3
    pending = [RECORDED["rolling_update"][1]]
    with pytest.raises(rollout.RolloutError, match="not rolled out after 5s: .*1 old replica"):
        rollout.wait_for_rollout(Apps(pending), "kubeflow", "gtsrb", NEW, timeout=5, poll=0,
                                 clock=lambda: next(ticks), sleep=lambda s: None)


def test_the_served_model_must_name_the_deployed_weights():
    url = "http://gtsrb-predictor.kubeflow.svc.cluster.local"
    metadata = {"name": "gtsrb", "platform": "", "versions": [rollout.weights_version(NEW)], "inputs": [],
                "outputs": []}
    rollout.check_served(metadata, NEW, url)
    with pytest.raises(rollout.RolloutError, match=f"{url} serves weights {NEW}, not the deployed artifact's {OLD}"):
        rollout.check_served(metadata, OLD, url)
    bare = {**metadata, "versions": None}
    with pytest.raises(rollout.RolloutError, match="serves no weights sha256 .model metadata:"):
        rollout.check_served(bare, NEW, url)
    two = copy.deepcopy(metadata)
    two["versions"].append(rollout.weights_version(OLD))
    assert rollout.served_weights(two) is None, "ambiguous"
