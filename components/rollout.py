"""Is the InferenceService serving *this* model yet? The checks a redeploy needs beyond Ready.

KServe 0.21 in Standard mode sets PredictorReady from the predictor Deployment's conditions
(pkg/apis/serving/v1beta1/inference_service_status.go, ``PropagateRawStatus``): during a
RollingUpdate the old pod keeps the Deployment Available, so the InferenceService reads Ready
while the new pod may still be Pending (25 % surge needs one more pod's CPU, which a 4-CPU kind
node may not have), and a smoke test would talk to the old model. Hence:

- the deploy step renders ``deploymentStrategy: Recreate`` (components/deploy.py): the old pod is
  gone before the new one starts, so nothing old can answer;
- :func:`rollout_status` (pure, over the Deployment as the API returns it): the Deployment's pod
  template carries this model's weights (env ``GTSRB_WEIGHTS_SHA256``), its controller observed
  that generation, and desired == updated == available replicas with no old replica left (the
  rules of ``kubectl rollout status``); a Deployment past its progress deadline fails at once;
- :func:`check_served` (pure): the running predictor says which weights it serves.

The predictor's side of the contract: ``GET /v2/models/<name>`` (V2 model metadata) answers
``"versions": ["sha256:<the weights' sha256>"]`` (:data:`VERSION_PREFIX`, :func:`weights_version`).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

WEIGHTS_ENV = "GTSRB_WEIGHTS_SHA256"     # the env var deploy.py gives the predictor container
CONTAINER_NAME = "kserve-container"
VERSION_PREFIX = "sha256:"
POLL_SECONDS = 5
REQUEST_SECONDS = 10


class RolloutError(RuntimeError):
    pass


def predictor_deployment(name: str) -> str:
    """The Deployment KServe's raw reconciler creates for an InferenceService's predictor."""
    return f"{name}-predictor"


def weights_version(weights_sha256: str) -> str:
    """What the predictor lists in its V2 model metadata ``versions``."""
    return f"{VERSION_PREFIX}{weights_sha256}"


# --------------------------------------------------------------------------- pure
def template_weights(deployment: dict) -> str | None:
    """The weights sha256 the Deployment's pod template gives the predictor container."""
    containers = deployment.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    env = next((c.get("env") or [] for c in containers if c.get("name") == CONTAINER_NAME), [])
    return next((e.get("value") for e in env if e.get("name") == WEIGHTS_ENV), None)


def rollout_status(deployment: dict | None, weights_sha256: str) -> tuple[bool, str]:
    """(done, what it is waiting for) for the predictor Deployment (None: not created yet).
    Raises RolloutError when the Deployment gave up (ProgressDeadlineExceeded)."""
    if deployment is None:
        return False, "the predictor Deployment does not exist yet"
    name = deployment.get("metadata", {}).get("name", "?")
    template = template_weights(deployment)
    if template != weights_sha256:
        return False, f"Deployment {name} still runs weights {template} (KServe has not rolled this model out yet)"
    status = deployment.get("status", {})
    if status.get("observedGeneration", 0) < deployment["metadata"].get("generation", 1):
        return False, f"Deployment {name}: its controller has not observed the new spec yet"
    for condition in status.get("conditions", []):
        if condition.get("type") == "Progressing" and condition.get("reason") == "ProgressDeadlineExceeded":
            raise RolloutError(f"Deployment {name} exceeded its progress deadline: {condition.get('message')}")
    desired = deployment.get("spec", {}).get("replicas", 1)
    updated, total = status.get("updatedReplicas", 0), status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    if updated < desired:
        return False, f"Deployment {name}: {updated} of {desired} replicas run the new model"
    if total > updated:
        return False, f"Deployment {name}: {total - updated} old replica(s) still running"
    if available < updated:
        return False, f"Deployment {name}: {available} of {updated} new replicas available"
    return True, f"Deployment {name}: {available} of {desired} replicas serve the new model"


def served_weights(metadata: dict) -> str | None:
    """The weights sha256 a predictor's V2 model metadata names, if any."""
    versions = [v for v in metadata.get("versions") or [] if isinstance(v, str) and v.startswith(VERSION_PREFIX)]
    return versions[0].removeprefix(VERSION_PREFIX) if len(versions) == 1 else None


def check_served(metadata: dict, weights_sha256: str, url: str) -> None:
    served = served_weights(metadata)
    if served != weights_sha256:
        what = f"weights {served}" if served else f"no weights sha256 (model metadata: {json.dumps(metadata)[:300]})"
        raise RolloutError(f"{url} serves {what}, not the deployed artifact's {weights_sha256}")


# --------------------------------------------------------------------------- I/O
def model_metadata(base_url: str, name: str, timeout: float = REQUEST_SECONDS) -> dict:
    url = f"{base_url}/v2/models/{name}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as e:
        raise RolloutError(f"reading the served model's metadata at {url}: {e}") from e


def read_deployment(apps_api, namespace: str, name: str) -> dict | None:
    from kubernetes.client import ApiClient
    from kubernetes.client.exceptions import ApiException

    try:
        return ApiClient().sanitize_for_serialization(apps_api.read_namespaced_deployment(name, namespace))
    except ApiException as e:
        if e.status == 404:
            return None
        raise RolloutError(f"reading Deployment {namespace}/{name}: HTTP {e.status} {e.reason}") from e


def wait_for_rollout(apps_api, namespace: str, name: str, weights_sha256: str, timeout: float,
                     poll: float = POLL_SECONDS, clock=time.monotonic, sleep=time.sleep) -> dict:
    """Poll the predictor Deployment of InferenceService ``name`` until :func:`rollout_status` is done."""
    deadline = clock() + timeout
    deployment_name = predictor_deployment(name)
    while True:
        deployment = read_deployment(apps_api, namespace, deployment_name)
        done, why = rollout_status(deployment, weights_sha256)
        if done:
            return deployment
        if clock() >= deadline:
            raise RolloutError(f"the new model is not rolled out after {timeout:.0f}s: {why}")
        sleep(poll)
