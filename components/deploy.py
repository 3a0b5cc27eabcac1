"""Step 7 (deploy_target="kserve") — deploy: serve the winner as a KServe InferenceService.

- :func:`render_inference_service` (pure): a ``serving.kserve.io/v1beta1`` InferenceService whose
  predictor is the serving image as a custom container (``kserve-container``), with STORAGE_URI =
  the served artifact in KFP's object store (SeaweedFS's S3 API in KFP 2.17; KServe's
  storage-initializer copies it to /mnt/models using the S3 secret of the predictor's service
  account), the winning backend and the expected weights sha256 as env, resource requests/limits
  (one server worker per CPU of the limit), a readiness probe on the model's V2 ready endpoint and
  the Recreate deployment strategy (no old pod answers once the new one runs: components/rollout.py).
  The served artifact's format picks the image and the memory: an ONNX winner runs in the slim
  ``serve-onnx`` image (no torch), torch backends in the full ``serve`` image (:data:`RUNTIMES`).
- :func:`deploy_model`: checks that the storageUri (the select step's served artifact: what was
  measured is what is served) holds the artifact being deployed, creates or replaces the
  InferenceService (applying twice leaves one), waits for a Ready status that describes the
  predictor Deployment running these weights (:func:`stale_status`) with a timeout (failing with
  the conditions and the predictor's last events), then for that Deployment to run this model on
  every replica, checks that the served model names these weights, then smoke-tests the predict
  URL against the same artifact in-process.

KFP hands artifacts over as ``minio://mlpipeline/v2/artifacts/...`` (a historical scheme name: the
store is SeaweedFS's S3 API); KServe reads ``s3://`` (components.storage maps one to the other).
"""


import copy
import time
from dataclasses import dataclass, field

from kfp.dsl import Artifact, Input, Model, Output
from kserve import ApiClient, V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
from kserve.constants.constants import (
    KSERVE_GROUP,
    KSERVE_KIND_INFERENCESERVICE,
    KSERVE_PLURAL_INFERENCESERVICE,
    KSERVE_V1BETA1_VERSION,
)
from kubernetes.client import (
    V1Container,
    V1ContainerPort,
    V1DeploymentStrategy,
    V1EnvVar,
    V1HTTPGetAction,
    V1ObjectMeta,
    V1Probe,
    V1ResourceRequirements,
)
from kubernetes.client.exceptions import ApiException

from components import cluster, gate, rollout
from components.artifact import SERVING, serving_format
from components.kfp_step import step
from components.serving.model import DEFAULT_MAX_BATCH, DEFAULT_MODEL_DIR

GROUP, VERSION, PLURAL, KIND = (KSERVE_GROUP, KSERVE_V1BETA1_VERSION, KSERVE_PLURAL_INFERENCESERVICE,
                               KSERVE_KIND_INFERENCESERVICE)
CONTAINER_NAME = rollout.CONTAINER_NAME  # KServe reads STORAGE_URI from the container of this name
MODEL_MOUNT = DEFAULT_MODEL_DIR         # where the storage-initializer puts the storageUri
HTTP_PORT = 8080
# KServe (Standard mode) puts the first container port on the Service's port 80 and every further
# port on its own number; a port named *grpc* or *h2c* gets appProtocol kubernetes.io/h2c.
GRPC_PORT = 8081
EVENTS_SHOWN = 10
POLL_SECONDS = 5
# The predictor's readiness probe: first after PROBE_DELAY_SECONDS, then every PROBE_PERIOD_SECONDS;
# not ready after PROBE_FAILURES answers slower than PROBE_TIMEOUT_SECONDS (or not 200).
PROBE_DELAY_SECONDS, PROBE_PERIOD_SECONDS, PROBE_TIMEOUT_SECONDS, PROBE_FAILURES = 5, 5, 3, 3
# KServe gives up on the model (no point waiting for Ready) in these transition states.
FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")


class DeployError(RuntimeError):
    pass


def _image(step: str):
    def default() -> str:
        from components.images import image

        return image(step)
    return default


@dataclass(frozen=True)
class Runtime:
    """The serving image and memory for one served-artifact format."""
    image_step: str
    memory_request: str
    memory_limit: str


# The parent verifies and loads the model too, then each worker (cpu_limit of them).
# torch: 3 processes of torch + KServe, roughly 0.5-1 GiB each.
# onnx: the PSS measured for every process of a 2-worker server (docs/serving-footprint.md) plus
# headroom in the request, and room in the limit for batch-64 traffic and a worker being replaced.
RUNTIMES = {"torch": Runtime("serve", "2Gi", "3Gi"),
            "onnx": Runtime("serve-onnx", "512Mi", "1Gi")}


@dataclass(frozen=True)
class Serving:
    """How the winner is served; defaults are components/cluster.py's names and images/images.env's
    images."""
    name: str = cluster.INFERENCE_SERVICE
    namespace: str = cluster.NAMESPACE
    service_account: str = cluster.SERVICE_ACCOUNT
    image: str = field(default_factory=_image(RUNTIMES["torch"].image_step))
    onnx_image: str = field(default_factory=_image(RUNTIMES["onnx"].image_step))
    cpu_request: str = "1"
    cpu_limit: int = 2                  # whole CPUs: the server runs one worker process per CPU
    max_batch: int = DEFAULT_MAX_BATCH
    min_replicas: int = 1
    max_replicas: int = 1

    def runtime(self, fmt: str) -> tuple[str, Runtime]:
        """(image, memory) of the served artifact format ``fmt``."""
        if fmt not in RUNTIMES:
            raise ValueError(f"no serving runtime for format {fmt!r}; known: {', '.join(RUNTIMES)}")
        return (self.onnx_image if fmt == "onnx" else self.image), RUNTIMES[fmt]


# --------------------------------------------------------------------------- render (pure)
def render_inference_service(storage_uri: str, backend: str, weights_sha256: str, serving: Serving,
                             record: dict | None = None, fmt: str = "torch") -> dict:
    """The InferenceService as the dict the Kubernetes API takes, built from KServe's typed models.
    ``record``: the model's identity (components.gate.identity), written as annotations that the
    next run's gate reads; ``fmt``: the served artifact's format (components/artifact.py), which
    picks image and memory."""
    if not storage_uri.startswith("s3://"):
        raise ValueError(f"storageUri must be s3://..., got {storage_uri!r}")
    if serving.cpu_limit < 1:
        raise ValueError(f"cpu_limit must be a whole number of CPUs >= 1, got {serving.cpu_limit}")
    if record and (record["weights_sha256"], record["model_uri"]) != (weights_sha256, storage_uri):
        raise ValueError(f"the identity record names {record['weights_sha256']} at {record['model_uri']}, "
                         f"not the served {weights_sha256} at {storage_uri}")
    image, runtime = serving.runtime(fmt)
    container = V1Container(
        name=CONTAINER_NAME,
        image=image,
        command=["python", "-m", "components.serving"],
        args=[f"--model_name={serving.name}", f"--model_dir={MODEL_MOUNT}", f"--http_port={HTTP_PORT}",
              f"--workers={serving.cpu_limit}", "--enable_grpc=true", f"--grpc_port={GRPC_PORT}"],
        env=[V1EnvVar(name="STORAGE_URI", value=storage_uri),
             V1EnvVar(name="GTSRB_BACKEND", value=backend),
             V1EnvVar(name=rollout.WEIGHTS_ENV, value=weights_sha256),
             V1EnvVar(name="GTSRB_MAX_BATCH", value=str(serving.max_batch))],
        ports=[V1ContainerPort(name="http1", container_port=HTTP_PORT, protocol="TCP"),
               V1ContainerPort(name="grpc", container_port=GRPC_PORT, protocol="TCP")],
        resources=V1ResourceRequirements(
            requests={"cpu": serving.cpu_request, "memory": runtime.memory_request},
            limits={"cpu": str(serving.cpu_limit), "memory": runtime.memory_limit}),
        readiness_probe=V1Probe(
            http_get=V1HTTPGetAction(path=f"/v2/models/{serving.name}/ready", port=HTTP_PORT),
            initial_delay_seconds=PROBE_DELAY_SECONDS, period_seconds=PROBE_PERIOD_SECONDS,
            timeout_seconds=PROBE_TIMEOUT_SECONDS, failure_threshold=PROBE_FAILURES),
    )
    isvc = V1beta1InferenceService(
        api_version=f"{GROUP}/{VERSION}", kind=KIND,
        metadata=V1ObjectMeta(
            name=serving.name, namespace=serving.namespace,
            labels={"app.kubernetes.io/name": serving.name, "app.kubernetes.io/part-of": "gtsrb",
                    "gtsrb/backend": backend},
            annotations={**(gate.to_annotations(record) if record else {}),
                         gate.IDENTITY["weights_sha256"]: weights_sha256}),
        spec=V1beta1InferenceServiceSpec(predictor=V1beta1PredictorSpec(
            service_account_name=serving.service_account, min_replicas=serving.min_replicas,
            max_replicas=serving.max_replicas, containers=[container],
            deployment_strategy=V1DeploymentStrategy(type="Recreate"))),
    )
    return ApiClient().sanitize_for_serialization(isvc)


# --------------------------------------------------------------------------- apply / wait
def _api_call(what: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except ApiException as e:
        raise DeployError(f"{what}: HTTP {e.status} {e.reason}: {e.body}") from e


def apply_inference_service(api, body: dict, attempts: int = 3) -> dict:
    """Create ``body``, or replace the existing InferenceService of that name (idempotent)."""
    namespace, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for _ in range(attempts):
        try:
            current = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except ApiException as e:
            if e.status != 404:
                raise DeployError(f"reading InferenceService {namespace}/{name}: HTTP {e.status} {e.reason}") from e
            try:
                return api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            except ApiException as e:
                if e.status == 409:           # created meanwhile: replace it on the next attempt
                    continue
                raise DeployError(f"creating InferenceService {namespace}/{name}: HTTP {e.status} {e.reason}: "
                                  f"{e.body}") from e
        desired = copy.deepcopy(body)
        desired["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
        try:
            return api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, desired)
        except ApiException as e:
            if e.status == 409:               # changed meanwhile: read it again
                continue
            raise DeployError(f"replacing InferenceService {namespace}/{name}: HTTP {e.status} {e.reason}: "
                              f"{e.body}") from e
    raise DeployError(f"InferenceService {namespace}/{name} kept changing; gave up after {attempts} attempts")


def _condition(status: dict, kind: str) -> dict | None:
    return next((c for c in status.get("conditions", []) if c.get("type") == kind), None)


def recent_events(core, namespace: str, name: str, limit: int = EVENTS_SHOWN) -> list[str]:
    """The last events of the InferenceService and its predictor's objects (pods, deployments, ...)."""
    events = _api_call("listing events", core.list_namespaced_event, namespace).items
    ours = [e for e in events if e.involved_object.name == name
            or e.involved_object.name.startswith(f"{name}-predictor")]

    def when(event):
        stamp = event.last_timestamp or event.event_time or event.first_timestamp
        return stamp.timestamp() if stamp else 0.0

    return [f"{e.type} {e.reason} {e.involved_object.kind.lower()}/{e.involved_object.name}: {e.message}"
            for e in sorted(ours, key=when)[-limit:]]


def _not_ready_report(isvc: dict, core, namespace: str, name: str) -> str:
    status = isvc.get("status", {})
    conditions = "; ".join(f"{c.get('type')}={c.get('status')}"
                           + (f" ({c.get('reason')}: {c.get('message')})" if c.get("message") else "")
                           for c in status.get("conditions", [])) or "none reported yet"
    failure = status.get("modelStatus", {}).get("lastFailureInfo")
    events = recent_events(core, namespace, name)
    return (f"conditions: {conditions}" + (f"; model failure: {failure}" if failure else "")
            + "\nlast events of the predictor:\n" + ("\n".join(f"  {e}" for e in events) or "  (none)"))


def stale_status(isvc: dict, deployment: dict | None, weights_sha256: str) -> str | None:
    """Why the InferenceService's status does not yet describe the predictor Deployment that runs
    ``weights_sha256`` (None: it does). ``deployment``: the predictor Deployment as the API returns
    it (None: not created yet).

    In Standard mode KServe's ``status.observedGeneration`` is not the InferenceService's:
    ``PropagateRawStatus`` sets it to the predictor Deployment's ``status.observedGeneration``
    (kserve/kserve pkg/apis/serving/v1beta1/inference_service_status.go, ``ss.ObservedGeneration =
    deploymentList[0].Status.ObservedGeneration``; read at v0.20.0 and master aaac4e29, the mirror
    has no 0.21 tag). The two counters drift apart: the InferenceService's annotations and labels,
    which KServe copies into the pod template (pkg/controller/v1beta1/inferenceservice/components/
    predictor.go, ``buildObjectMeta``), bump the Deployment's generation and not the
    InferenceService's (metadata is not spec), and a Deployment KServe re-creates starts again at 1.
    Comparing either way with the InferenceService's generation can take a stale Ready for current
    or wait for ever on a current one; so the status is compared with the Deployment's own
    ``metadata.generation``, once that Deployment's template carries these weights."""
    if deployment is None:
        return "its predictor Deployment does not exist yet"
    name = deployment.get("metadata", {}).get("name", "?")
    if rollout.template_weights(deployment) != weights_sha256:
        return f"KServe has not put these weights in Deployment {name} yet"
    observed = isvc.get("status", {}).get("observedGeneration", 0)
    generation = deployment["metadata"].get("generation", 1)
    if observed < generation:
        return f"its status is from Deployment {name} generation {observed}, not the current {generation}"
    return None


def wait_until_ready(api, core, apps, namespace: str, name: str, weights_sha256: str, timeout: float,
                     poll: float = POLL_SECONDS, clock=time.monotonic, sleep=time.sleep) -> dict:
    """Poll until the InferenceService reports Ready for the predictor Deployment that runs
    ``weights_sha256`` (:func:`stale_status`); DeployError with the conditions and recent events on
    timeout or when KServe reports the model cannot load."""
    deadline = clock() + timeout
    while True:
        isvc = _api_call(f"reading InferenceService {namespace}/{name}", api.get_namespaced_custom_object,
                         GROUP, VERSION, namespace, PLURAL, name)
        stale = stale_status(isvc, rollout.read_deployment(apps, namespace, rollout.predictor_deployment(name)),
                             weights_sha256)
        status = isvc.get("status", {})
        ready = _condition(status, "Ready")
        if not stale and ready and ready.get("status") == "True":
            return isvc
        transition = status.get("modelStatus", {}).get("transitionStatus")
        if not stale and transition in FAILED_TRANSITIONS:
            raise DeployError(f"InferenceService {namespace}/{name} failed ({transition}); "
                              + _not_ready_report(isvc, core, namespace, name))
        if clock() >= deadline:
            raise DeployError(f"InferenceService {namespace}/{name} not Ready after {timeout:.0f}s; "
                              + (f"status not current: {stale}; " if stale else "")
                              + _not_ready_report(isvc, core, namespace, name))
        sleep(poll)


def service_url(isvc: dict) -> str:
    """The predictor's in-cluster address (what a pipeline pod can reach), else its external URL."""
    status = isvc.get("status", {})
    url = status.get("address", {}).get("url") or status.get("url")
    if not url:
        raise DeployError(f"InferenceService {isvc['metadata']['name']} is Ready but reports no URL")
    return url.rstrip("/")


# --------------------------------------------------------------------------- storage
def resolve_storage_uri(model_uri: str, weights_sha256: str, client, serving: dict | None = None) -> str:
    """The s3:// storageUri to serve: the artifact's own URI (KFP's minio://, or s3://), after
    checking that its model card names the same weights (and the same served file)."""
    from components import storage

    if not model_uri.startswith(storage.SCHEMES):
        raise DeployError(f"the model artifact {model_uri!r} is not in the object store "
                          f"({' or '.join(storage.SCHEMES)}); KServe can only serve what it can download")
    uri = storage.s3_prefix_uri(model_uri)
    card = storage.read_card(client, uri)
    stored = card.get("weights_sha256")
    if stored != weights_sha256:
        raise DeployError(f"{uri} holds weights {stored}, not the deployed artifact's {weights_sha256}")
    if card.get(SERVING) != serving:
        raise DeployError(f"{uri} serves {card.get(SERVING)}, not the deployed artifact's {serving}")
    return uri


# --------------------------------------------------------------------------- deploy
def deploy_model(model_uri: str, model_dir: str, backend: str, custom_api, core_api, apps_api, storage_client,
                 serving: Serving, timeout: float = 600, smoke=None, served_metadata=rollout.model_metadata,
                 clock=time.monotonic, measured: dict | None = None, **wait_options) -> dict:
    """Deploy the served artifact at ``model_uri`` (``model_dir``: KFP's local copy of it) and
    check it; returns the deployment record. ``smoke(url, model_dir, backend, name)`` defaults to
    components.serving.check.check_endpoint; ``served_metadata(url, name)`` reads the served
    model's V2 metadata. ``timeout`` covers Ready and the rollout together. ``measured``:
    {test_accuracy, test_fingerprint, run_id} from the gate, annotated on the InferenceService
    with the weights and storageUri."""
    from components.artifact import verified_card
    from components.serving.check import check_endpoint

    card = verified_card(model_dir)                    # verifies the local copy's files
    sha, fmt = card["weights_sha256"], serving_format(card)
    storage_uri = resolve_storage_uri(model_uri, sha, storage_client, card.get(SERVING))
    record = gate.identity(sha, storage_uri, **measured) if measured else None
    body = render_inference_service(storage_uri, backend, sha, serving, record, fmt)
    applied = apply_inference_service(custom_api, body)
    print(f"deploy: applied InferenceService {serving.namespace}/{serving.name} (generation "
          f"{applied['metadata'].get('generation')}), storageUri {storage_uri}, backend {backend}", flush=True)
    deadline = clock() + timeout
    try:
        isvc = wait_until_ready(custom_api, core_api, apps_api, serving.namespace, serving.name, sha, timeout,
                                clock=clock, **wait_options)
        rollout.wait_for_rollout(apps_api, serving.namespace, serving.name, sha, max(0.0, deadline - clock()),
                                 clock=clock, **wait_options)
        url = service_url(isvc)
        rollout.check_served(served_metadata(url, serving.name), sha, url)
    except rollout.RolloutError as e:
        raise DeployError(f"InferenceService {serving.namespace}/{serving.name}: {e}") from e
    print(f"deploy: Ready at {url}, serving weights {sha[:12]} on every replica; smoke-testing it", flush=True)
    checked = (smoke or check_endpoint)(url, model_dir, backend, serving.name)
    return {"name": serving.name, "namespace": serving.namespace, "url": url, "storage_uri": storage_uri,
            "backend": backend, "weights_sha256": sha, "format": fmt, "image": serving.runtime(fmt)[0],
            "smoke": checked, "predict_url": f"{url}/v1/models/{serving.name}:predict", "identity": record}


def deploy_and_record(model_uri: str, model_dir: str, backend: str, serving: Serving, timeout: float,
                      record_path: str, measured: dict | None = None) -> dict:
    """The deploy step in the cluster: Kubernetes and object-store clients from the pod's service
    account and environment, :func:`deploy_model`, the record written to ``record_path``."""
    import json

    from kubernetes import client, config

    from components.storage import client_from_env

    config.load_incluster_config()
    outcome = deploy_model(model_uri, model_dir, backend, client.CustomObjectsApi(), client.CoreV1Api(),
                           client.AppsV1Api(), client_from_env(cluster.MINIO_ENDPOINT), serving, timeout=timeout,
                           measured=measured)
    with open(record_path, "w") as f:
        json.dump(outcome, f, indent=2)
    return outcome


@step("deploy")
def deploy(model: Input[Model], verdict: Input[Artifact], backend: str, deploy_target: str, serving_image: str,
           onnx_serving_image: str, namespace: str, name: str, timeout_seconds: int, run_id: str,
           record: Output[Artifact]) -> str:
    """Serve the winner (select's served artifact) as a KServe InferenceService, wait for Ready,
    smoke-test it. The serving images (torch, and the slim one for ONNX winners) are fixed when the
    pipeline is compiled (components.images), like every step's image. The
    pipeline runs this step for every deploy_target but "local", so a misspelt target fails here
    instead of serving nothing. The gate's ``verdict`` (its summary: the challenger's test accuracy
    and test-split fingerprint) and ``run_id`` are annotated on the InferenceService: the next
    run's champion record."""
    if deploy_target != "kserve":
        raise ValueError(f"deploy_target must be 'local' or 'kserve', got {deploy_target!r}")

    from components.deploy import Serving, deploy_and_record
    from components.gate import measured

    outcome = deploy_and_record(model.uri, model.path, backend, Serving(name=name, namespace=namespace,
                                image=serving_image, onnx_image=onnx_serving_image), timeout_seconds,
                                record.path, measured=measured(verdict.path, run_id))
    record.metadata.update(url=outcome["url"], storage_uri=outcome["storage_uri"], backend=backend)
    return outcome["predict_url"]
