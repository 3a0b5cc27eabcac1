"""The deploy step: the rendered InferenceService (pure; validated against KServe's typed models and
the CRD's openAPIV3Schema), apply/wait against a fake Kubernetes API server on 127.0.0.1 driven
through the real `kubernetes` client, the compiled pipeline IR, and deploy_model end to end with
a real S3 server and a real predictor behind the "Ready" InferenceService."""

import copy
import json
import re
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import jsonschema
import pytest
import yaml
from kubernetes import client as k8s

from components import cluster, deploy, gate, storage
from components.images import image
from components.measure import SHORT_SPIN
from components.model import WEIGHTS_FILE, sha256_file
from tests.s3server import s3_store

SCHEMA = Path(__file__).parent / "schemas" / "inferenceservice-v1beta1.schema.json"
SHA = "ab" * 32
URI = "s3://mlpipeline/v2/artifacts/gtsrb-backends/run-1/train/123/model/"
SERVING = deploy.Serving(image="registry.example/gtsrb-serve:test", onnx_image="registry.example/gtsrb-serve-onnx:test")


# --------------------------------------------------------------------------- rendering
def render(backend="eager", serving=SERVING, fmt="torch"):
    return deploy.render_inference_service(URI, backend, SHA, serving, fmt=fmt)


def strict(schema):
    """Reject unknown fields (the API server's fieldValidation=Strict) wherever the CRD lists properties."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def validator():
    schema = strict(json.loads(SCHEMA.read_text()))
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_render_is_a_pure_function_of_its_inputs():
    assert render() == render()
    assert render("onednn") != render()
    json.dumps(render())                                         # plain JSON types only


def test_rendered_inference_service():
    body = render()
    assert body["apiVersion"] == "serving.kserve.io/v1beta1" and body["kind"] == "InferenceService"
    assert body["metadata"]["name"] == cluster.INFERENCE_SERVICE
    assert body["metadata"]["namespace"] == cluster.NAMESPACE
    assert body["metadata"]["annotations"]["gtsrb/weights-sha256"] == SHA
    predictor = body["spec"]["predictor"]
    assert predictor["serviceAccountName"] == cluster.SERVICE_ACCOUNT   # carries the S3 secret
    assert predictor["deploymentStrategy"] == {"type": "Recreate"}      # no old pod answers after a redeploy
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"                      # where KServe looks for STORAGE_URI
    assert container["image"] == SERVING.image
    assert container["command"] == ["python", "-m", "components.serving"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"STORAGE_URI": URI, "GTSRB_BACKEND": "eager", "GTSRB_WEIGHTS_SHA256": SHA,
                   "GTSRB_MAX_BATCH": "64"}
    assert "--model_dir=/mnt/models" in container["args"] and "--workers=2" in container["args"]
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "2Gi"},
                                      "limits": {"cpu": "2", "memory": "3Gi"}}
    assert container["ports"] == [{"name": "http1", "containerPort": 8080, "protocol": "TCP"},
                                  {"name": "grpc", "containerPort": 8081, "protocol": "TCP"}]
    assert "--enable_grpc=true" in container["args"] and "--grpc_port=8081" in container["args"]
    probe = container["readinessProbe"]["httpGet"]
    assert probe == {"path": f"/v2/models/{cluster.INFERENCE_SERVICE}/ready", "port": 8080}


def test_render_rejects_what_kserve_cannot_download():
    with pytest.raises(ValueError, match="s3://"):
        deploy.render_inference_service("minio://mlpipeline/x/model", "eager", SHA, SERVING)
    with pytest.raises(ValueError, match="cpu_limit"):
        render(serving=deploy.Serving(image="x", cpu_limit=0))


def test_rendered_object_validates_against_the_crd_schema(validator):
    errors = sorted(validator.iter_errors(render()), key=str)
    assert not errors, "\n".join(e.message for e in errors)


def test_rendered_container_round_trips_through_the_kubernetes_typed_model():
    """KServe's own deserializer does not know Kubernetes types, so the predictor container is
    checked with the Kubernetes client's: every rendered field survives typing."""
    (container,) = render()["spec"]["predictor"]["containers"]

    class Response:
        data = json.dumps(container)

    typed = k8s.ApiClient().deserialize(Response(), "V1Container")
    assert typed.readiness_probe.http_get.port == 8080 and typed.env[0].name == "STORAGE_URI"
    assert k8s.ApiClient().sanitize_for_serialization(typed) == container


@pytest.mark.parametrize("mutate, message", [
    (lambda b: b["spec"]["predictor"].update(storageURI=URI), "Additional properties"),
    (lambda b: b["spec"]["predictor"].update(minReplicas="1"), "is not of type 'integer'"),
    (lambda b: b["spec"]["predictor"]["containers"][0].pop("name"), "'name' is a required property"),
    (lambda b: b["spec"]["predictor"]["containers"][0]["env"].append({"name": "X", "value": 1}), "not of type"),
    (lambda b: b["spec"]["predictor"]["containers"][0]["resources"]["limits"].update(cpu=[2]),
     "is not valid under any of the given schemas"),
])
def test_the_schema_check_catches_mistakes(validator, mutate, message):
    body = render()
    mutate(body)
    assert any(message in e.message for e in validator.iter_errors(body))


# --------------------------------------------------------------------------- the compiled pipeline
@pytest.fixture(scope="module")
def ir(compiled_ir):
    docs = list(yaml.safe_load_all(compiled_ir.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _task(ir, name):
    spec, _ = ir
    for component in spec["components"].values():
        tasks = component.get("dag", {}).get("tasks", {})
        if name in tasks:
            return tasks[name], component
    raise KeyError(name)


def test_ir_smoke_tests_locally_and_deploys_otherwise(ir):
    spec, _ = ir
    assert spec["root"]["inputDefinitions"]["parameters"]["deploy_target"]["defaultValue"] == "local"
    branches = spec["components"]["comp-condition-branches-3"]["dag"]["tasks"]     # inside the gate's "promote"
    conditions = {t["componentRef"]["name"]: t["triggerPolicy"]["condition"] for t in branches.values()}
    by_task = {next(iter(spec["components"][c]["dag"]["tasks"])): cond for c, cond in conditions.items()}
    assert by_task == {"serve": "inputs.parameter_values['pipelinechannel--deploy_target'] == 'local'",
                       "deploy": "!(inputs.parameter_values['pipelinechannel--deploy_target'] == 'local')"}
    task, _ = _task(ir, "deploy")
    assert task["inputs"]["parameters"]["deploy_target"]["componentInputParameter"].endswith("deploy_target")


def test_ir_deploy_task_gets_winner_image_secret_resources_and_timeout(ir):
    spec, executors = ir
    task, _ = _task(ir, "deploy")
    params = task["inputs"]["parameters"]
    assert params["serving_image"]["runtimeValue"]["constant"] == image("serve")
    assert params["onnx_serving_image"]["runtimeValue"]["constant"] == image("serve-onnx")
    assert params["backend"]["componentInputParameter"].endswith("select-Output")   # select's return value
    assert task["cachingOptions"] == {}                                             # caching off
    container = spec["deploymentSpec"]["executors"]["exec-deploy"]["container"]
    assert container["image"] == image("deploy")
    resources = container["resources"]
    assert resources["resourceCpuLimit"] == "2" and resources["resourceMemoryLimit"] == "2Gi"
    platform = executors["exec-deploy"]
    (secret,) = platform["secretAsEnv"]
    assert secret["secretName"] == cluster.S3_SECRET and secret["optional"] is False
    assert secret["keyToEnv"] == [{"secretKey": "AWS_ACCESS_KEY_ID", "envVar": "AWS_ACCESS_KEY_ID"},
                                  {"secretKey": "AWS_SECRET_ACCESS_KEY", "envVar": "AWS_SECRET_ACCESS_KEY"}]
    assert int(platform["activeDeadlineSeconds"]) > deploy_ready_seconds()
    serve_task, _ = _task(ir, "serve")
    assert spec["deploymentSpec"]["executors"]["exec-serve"]["container"]["image"] == image("serve")
    assert serve_task["inputs"]["parameters"]["backend"]["componentInputParameter"].endswith("select-Output")


def test_ir_serve_and_deploy_take_the_served_artifact_and_no_data(ir):
    """What is served is what was measured: select's ``served`` artifact, the copy of what the
    winner's evaluate task wrote (for ONNX Runtime, the file it measured); every evaluate task
    writes one and select collects them; the preprocessed data set never travels to serving."""
    spec, _ = ir
    for name, inputs in (("serve", {"model"}), ("deploy", {"model", "verdict"})):   # verdict: the gate's summary
        task, _ = _task(ir, name)
        artifacts = task["inputs"]["artifacts"]
        assert set(artifacts) == inputs, name
        assert artifacts["model"] == {"componentInputArtifact": "pipelinechannel--select-served"}, name
        definition = spec["components"][task["componentRef"]["name"]]["inputDefinitions"]
        assert set(definition["artifacts"]) == inputs, name
    select = spec["root"]["dag"]["tasks"]["select"]
    assert "evaluate-served" in json.dumps(select["inputs"]["artifacts"]["candidates"])
    outputs = spec["components"]["comp-select"]["outputDefinitions"]["artifacts"]
    assert outputs["served"]["artifactType"]["schemaTitle"] == "system.Model"
    assert spec["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]["served"]["artifactType"][
        "schemaTitle"] == "system.Model"


def test_the_served_format_picks_the_image_and_the_memory():
    """An ONNX winner runs in the slim image with the memory measured for it; torch in the full one."""
    torch_container = render()["spec"]["predictor"]["containers"][0]
    onnx_container = render("onnxruntime-int8", fmt="onnx")["spec"]["predictor"]["containers"][0]
    assert torch_container["image"] == SERVING.image and onnx_container["image"] == SERVING.onnx_image
    assert onnx_container["resources"] == {"requests": {"cpu": "1", "memory": deploy.RUNTIMES["onnx"].memory_request},
                                           "limits": {"cpu": "2", "memory": deploy.RUNTIMES["onnx"].memory_limit}}
    assert deploy.Serving().onnx_image == image("serve-onnx") and deploy.Serving().image == image("serve")
    with pytest.raises(ValueError, match="no serving runtime for format 'tflite'"):
        render(fmt="tflite")


def deploy_ready_seconds():
    import pipeline

    return pipeline.DEPLOY_READY_SECONDS


# --------------------------------------------------------------------------- a fake Kubernetes API
ISVC_PATH = re.compile(r"^/apis/serving\.kserve\.io/v1beta1/namespaces/([^/]+)/inferenceservices(?:/([^/?]+))?")
DEPLOYMENT_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/?]+)")
EVENTS_PATH = re.compile(r"^/api/v1/namespaces/([^/]+)/events")


class FakeCluster:
    """InferenceServices, their predictor Deployments and events in memory, with just enough
    API-server semantics: 404/409, resourceVersion checks on replace, generation bumps on spec
    changes. Its "KServe" reconciles on every read of an InferenceService but the first
    ``unreconciled`` after a write (those see the previous status) the way KServe 0.21 does in
    Standard mode: it writes the predictor Deployment with the InferenceService's labels and
    annotations in the pod template (``buildObjectMeta``), so an annotation-only apply bumps the
    Deployment's generation and not the InferenceService's, and copies the Deployment's
    status.observedGeneration into the InferenceService's (``PropagateRawStatus``); its Deployment
    controller observes every generation at once. Ready after ``ready_after`` reads when
    ``ready_url`` is set, with the Deployment rolled out."""

    def __init__(self):
        self.objects, self.deployments, self.events, self.writes = {}, {}, [], []
        self.version, self.reads = 0, 0
        self.ready_url, self.ready_after, self.transition, self.unreconciled = None, 2, None, 0
        self.lock = threading.Lock()

    def _bump(self, obj):
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)
        self.reads = 0

    def handle(self, method, path, body):
        with self.lock:
            events = EVENTS_PATH.match(path)
            if events and method == "GET":
                return 200, {"kind": "EventList", "apiVersion": "v1", "metadata": {}, "items": self.events}
            deployment = DEPLOYMENT_PATH.match(path)
            if deployment and method == "GET":
                return self._deployment(*deployment.groups())
            match = ISVC_PATH.match(path)
            if not match:
                return 404, status(404, f"no route {method} {path}")
            namespace, name = match.groups()
            key = (namespace, name or (body or {}).get("metadata", {}).get("name"))
            current = self.objects.get(key)
            if method == "GET" and name:
                if current is None:
                    return 404, status(404, f"inferenceservices {name} not found")
                self.reads += 1
                self._control(current)
                return 200, current
            if method == "POST":
                if current is not None:
                    return 409, status(409, "already exists")
                obj = copy.deepcopy(body)
                obj["metadata"].update(generation=1, uid=str(uuid.uuid4()))
                obj["status"] = {}
                self._bump(obj)
                self.objects[key] = obj
                self.writes.append(("create", key))
                return 201, obj
            if method == "PUT":
                if current is None:
                    return 404, status(404, "not found")
                if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                    return 409, status(409, "the object has been modified")
                obj = copy.deepcopy(body)
                changed = obj["spec"] != current["spec"]
                obj["metadata"].update(generation=current["metadata"]["generation"] + changed,
                                       uid=current["metadata"]["uid"])
                obj["status"] = current["status"]
                self._bump(obj)
                self.objects[key] = obj
                self.writes.append(("replace", key))
                return 200, obj
            return 405, status(405, "method not allowed")

    def _deployment(self, namespace, name):
        deployment = self.deployments.get((namespace, name))
        if deployment is None:
            return 404, status(404, f"deployments.apps {name} not found")
        return 200, deployment

    def _reconcile_deployment(self, isvc, ready):
        key = (isvc["metadata"]["namespace"], f"{isvc['metadata']['name']}-predictor")
        predictor = isvc["spec"]["predictor"]
        spec = {"replicas": 1, "selector": {}, "strategy": predictor["deploymentStrategy"],
                "template": {"metadata": {"labels": isvc["metadata"].get("labels", {}),
                                          "annotations": isvc["metadata"].get("annotations", {})},
                             "spec": {"containers": predictor["containers"]}}}
        current = self.deployments.get(key)
        generation = 1 if current is None else current["metadata"]["generation"] + (current["spec"] != spec)
        available = int(bool(ready))
        self.deployments[key] = {
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": key[1], "namespace": key[0], "generation": generation},
            "spec": copy.deepcopy(spec),
            "status": {"observedGeneration": generation, "replicas": 1, "updatedReplicas": 1,
                       "readyReplicas": available, "availableReplicas": available}}
        return generation

    def _control(self, obj):
        if self.reads <= self.unreconciled:
            return                                      # KServe has not reconciled the last write yet
        ready = not self.transition and self.ready_url and self.reads >= self.ready_after
        observed = self._reconcile_deployment(obj, ready)
        if self.transition:
            obj["status"] = {"observedGeneration": observed, "modelStatus": {
                "transitionStatus": self.transition, "lastFailureInfo": {"reason": "ModelLoadFailed",
                                                                        "message": "sha256 mismatch"}},
                "conditions": [{"type": "Ready", "status": "False", "reason": "PredictorNotReady"}]}
        elif ready:
            obj["status"] = {"observedGeneration": observed, "url": "http://gtsrb.example",
                             "address": {"url": self.ready_url},
                             "conditions": [{"type": "PredictorReady", "status": "True"},
                                            {"type": "Ready", "status": "True"}]}
        else:
            obj["status"] = {"observedGeneration": observed, "conditions": [
                {"type": "Ready", "status": "False", "reason": "PredictorNotReady",
                 "message": "Revision \"gtsrb-predictor-00001\" failed with message: back-off"}]}


def status(code, message):
    return {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "message": message}


def event(name, kind, reason, message, second, type_="Warning"):
    return {"metadata": {"name": f"{name}.{second}", "namespace": cluster.NAMESPACE},
            "involvedObject": {"kind": kind, "name": name, "namespace": cluster.NAMESPACE},
            "reason": reason, "message": message, "type": type_,
            "lastTimestamp": f"2026-01-01T00:00:{second:02d}Z"}


@pytest.fixture
def fake():
    state = FakeCluster()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            code, answer = state.handle(self.command, self.path, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        configuration = k8s.Configuration()
        configuration.host = f"http://127.0.0.1:{server.server_address[1]}"
        api = k8s.ApiClient(configuration)
        yield state, k8s.CustomObjectsApi(api), k8s.CoreV1Api(api), k8s.AppsV1Api(api)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class FakeClock:
    """Deterministic time for wait_until_ready: every read advances one second."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1
        return self.now


def wait(custom, core, apps, timeout=30, weights=SHA):
    return deploy.wait_until_ready(custom, core, apps, cluster.NAMESPACE, cluster.INFERENCE_SERVICE, weights,
                                   timeout, poll=0, clock=FakeClock(), sleep=lambda s: None)


def test_applying_twice_leaves_one_inference_service(fake):
    state, custom, _, *_ = fake
    first = deploy.apply_inference_service(custom, render())
    second = deploy.apply_inference_service(custom, render())
    assert list(state.objects) == [(cluster.NAMESPACE, cluster.INFERENCE_SERVICE)]
    assert [w[0] for w in state.writes] == ["create", "replace"]
    assert second["metadata"]["generation"] == first["metadata"]["generation"] == 1     # same spec
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    third = deploy.apply_inference_service(custom, render("onednn"))
    assert third["metadata"]["generation"] == 2 and len(state.objects) == 1
    env = {e["name"]: e["value"] for e in third["spec"]["predictor"]["containers"][0]["env"]}
    assert env["GTSRB_BACKEND"] == "onednn"


def test_wait_returns_the_ready_inference_service(fake):
    state, custom, core, apps = fake
    state.ready_url, state.ready_after = "http://gtsrb-predictor.kubeflow.svc.cluster.local", 3
    deploy.apply_inference_service(custom, render())
    isvc = wait(custom, core, apps)
    assert state.reads == 3
    assert deploy.service_url(isvc) == "http://gtsrb-predictor.kubeflow.svc.cluster.local"


def test_wait_times_out_with_conditions_and_the_predictors_last_events(fake):
    state, custom, core, apps = fake
    state.events = [event("gtsrb-predictor-5d9c-x2", "Pod", "BackOff", "Back-off restarting failed container", 9),
                    event("other-app-7f", "Pod", "Failed", "not ours", 10),
                    event(cluster.INFERENCE_SERVICE, "InferenceService", "InternalError", "fails to reconcile", 3),
                    event("gtsrb-predictor-5d9c-x2", "Pod", "Pulled", "image pulled", 1, "Normal")]
    deploy.apply_inference_service(custom, render())
    with pytest.raises(deploy.DeployError) as error:
        wait(custom, core, apps, timeout=5)
    message = str(error.value)
    assert "not Ready after 5s" in message and "Ready=False (PredictorNotReady" in message
    lines = message.splitlines()
    assert lines[-3:] == ["  Normal Pulled pod/gtsrb-predictor-5d9c-x2: image pulled",
                          "  Warning InternalError inferenceservice/gtsrb: fails to reconcile",
                          "  Warning BackOff pod/gtsrb-predictor-5d9c-x2: Back-off restarting failed container"]
    assert "not ours" not in message
    assert "status not current" not in message, "KServe reconciled: the status is about these weights"


def test_wait_fails_at_once_when_kserve_cannot_load_the_model(fake):
    state, custom, core, apps = fake
    state.transition = "BlockedByFailedLoad"
    deploy.apply_inference_service(custom, render())
    with pytest.raises(deploy.DeployError, match="failed \\(BlockedByFailedLoad\\).*sha256 mismatch"):
        wait(custom, core, apps, timeout=1000)
    assert state.reads == 1


def test_api_errors_name_the_operation(fake):
    _, custom, core, apps = fake
    with pytest.raises(deploy.DeployError, match="reading InferenceService kubeflow/gtsrb: HTTP 404"):
        wait(custom, core, apps)


def test_wait_does_not_take_a_stale_ready_for_this_model(fake):
    """After an annotation-only apply the Deployment is a generation ahead of the InferenceService;
    right after the next apply the old Ready status reports observedGeneration 2 == the new
    InferenceService generation 2, yet it is about the old Deployment."""
    state, custom, core, apps = fake
    state.ready_url, state.ready_after = "http://gtsrb-predictor.kubeflow.svc.cluster.local", 1
    deploy.apply_inference_service(custom, render())
    wait(custom, core, apps)
    again = render()
    again["metadata"]["annotations"][gate.IDENTITY["run_id"]] = "run-2"      # same spec, new annotations
    assert deploy.apply_inference_service(custom, again)["metadata"]["generation"] == 1
    wait(custom, core, apps)
    predictor = state.deployments[(cluster.NAMESPACE, "gtsrb-predictor")]
    assert predictor["metadata"]["generation"] == 2, "the template carries the annotations"
    other = "cd" * 32
    state.unreconciled = 2                                  # the next two reads see the previous status
    applied = deploy.apply_inference_service(custom, deploy.render_inference_service(URI, "eager", other, SERVING))
    assert applied["metadata"]["generation"] == 2 == applied["status"]["observedGeneration"]
    isvc = wait(custom, core, apps, weights=other)
    assert state.reads == 3, "returned only once KServe had reconciled the new spec"
    assert isvc["status"]["observedGeneration"] == 3 != isvc["metadata"]["generation"]


def test_wait_accepts_a_ready_status_from_a_recreated_deployment(fake):
    """KServe re-creates a deleted predictor Deployment at generation 1: observedGeneration stays
    below the InferenceService's generation for good, and the status is current all the same."""
    state, custom, core, apps = fake
    state.ready_url, state.ready_after = "http://gtsrb-predictor.kubeflow.svc.cluster.local", 1
    deploy.apply_inference_service(custom, render())
    wait(custom, core, apps)
    deploy.apply_inference_service(custom, render("onednn"))
    state.deployments.clear()                               # kubectl delete deployment gtsrb-predictor
    isvc = wait(custom, core, apps)
    assert isvc["metadata"]["generation"] == 2 and isvc["status"]["observedGeneration"] == 1
    assert state.reads == 1


# --------------------------------------------------------------------------- status currency over the recording
RECORDED = json.loads((Path(__file__).parent / "fixtures" / "kserve-0.21-redeploy.json").read_text())
NEW = RECORDED["new_weights"]


def ready(step):
    return any(c["type"] == "Ready" and c["status"] == "True" for c in step["isvc"]["status"]["conditions"])


def counts_as_current_by_the_isvc_generation(step):
    """The comparison deploy.py made before: status.observedGeneration against the InferenceService's own."""
    return step["isvc"]["status"]["observedGeneration"] >= step["isvc"]["metadata"]["generation"]


def test_a_stale_ready_status_is_recognised_in_the_recorded_redeploy():
    applied, (unobserved, pending, stuck) = RECORDED["applied"], RECORDED["rolling_update"]
    for step, why in ((applied, "KServe has not put these weights in Deployment gtsrb-predictor yet"),
                      (unobserved, "its status is from Deployment gtsrb-predictor generation 2, not the current 3")):
        assert ready(step) and counts_as_current_by_the_isvc_generation(step), step["when"]
        assert deploy.stale_status(step["isvc"], step["deployment"], NEW) == why, step["when"]
    for step in (pending, stuck, *RECORDED["recreate"]):
        assert deploy.stale_status(step["isvc"], step["deployment"], NEW) is None, step["when"]
    assert deploy.stale_status(applied["isvc"], None, NEW) == "its predictor Deployment does not exist yet"


def test_the_isvc_generation_does_not_decide_currency():
    """The same recorded status is current or not by the Deployment's counters alone."""
    done = copy.deepcopy(RECORDED["recreate"][-1])
    for generation in (1, 2, 7):
        done["isvc"]["metadata"]["generation"] = generation
        assert deploy.stale_status(done["isvc"], done["deployment"], NEW) is None
    recreated = copy.deepcopy(done)                          # KServe re-created the Deployment
    recreated["deployment"]["metadata"]["generation"] = recreated["deployment"]["status"]["observedGeneration"] = 1
    recreated["isvc"]["status"]["observedGeneration"] = 0    # propagated from the object it created: no status
    assert "generation 0, not the current 1" in deploy.stale_status(recreated["isvc"], recreated["deployment"], NEW)
    recreated["isvc"]["status"]["observedGeneration"] = 1
    assert not counts_as_current_by_the_isvc_generation(recreated)
    assert deploy.stale_status(recreated["isvc"], recreated["deployment"], NEW) is None


@pytest.mark.parametrize("sequence, reads", [("rolling_update", 3), ("recreate", 4)])
def test_wait_until_ready_over_the_recorded_redeploy(sequence, reads):
    """The recorded objects, read in order: the first Ready status about the new weights' Deployment
    ends the wait (under RollingUpdate the old pod still serves then: components/rollout.py waits on)."""
    steps = [RECORDED["applied"], *RECORDED[sequence]]

    class Api:
        def __init__(self):
            self.reads = 0

        def get_namespaced_custom_object(self, *args):
            self.reads += 1
            return copy.deepcopy(steps[self.reads - 1]["isvc"])

        def read_namespaced_deployment(self, name, namespace):
            assert (namespace, name) == ("kubeflow", "gtsrb-predictor")
            return copy.deepcopy(steps[self.reads - 1]["deployment"])

    api = Api()
    isvc = deploy.wait_until_ready(api, None, api, "kubeflow", "gtsrb", NEW, timeout=60, poll=0, clock=FakeClock(),
                                   sleep=lambda s: None)
    assert api.reads == reads and isvc["status"]["observedGeneration"] == 3


# --------------------------------------------------------------------------- deploy_model end to end
@pytest.fixture(scope="module")
def store():
    with s3_store(cluster.MINIO_BUCKET) as client:
        yield client


@pytest.fixture(scope="module")
def predictor_url(trained_model):
    """What the Ready InferenceService's address points at: the predictor serving the artifact."""
    from components.serving.client import local_predictor

    with local_predictor(str(trained_model), "eager", workers=1) as served:
        yield served.url


def served_as_artifact(model_dir):
    """The served model's V2 metadata as the predictor will report it once it implements rollout's
    contract (test_the_predictor_reports_its_weights_in_its_model_metadata)."""
    from components.rollout import weights_version

    return lambda url, name: {"name": name, "versions": [weights_version(sha256_file(model_dir / WEIGHTS_FILE))]}


def test_the_predictor_reports_its_weights_in_its_model_metadata(trained_model, predictor_url):
    from components import rollout

    metadata = rollout.model_metadata(predictor_url, cluster.INFERENCE_SERVICE)
    rollout.check_served(metadata, sha256_file(trained_model / WEIGHTS_FILE), predictor_url)


def test_deploy_fails_clearly_when_the_old_model_still_answers(fake, store, trained_model):
    state, custom, core, apps = fake
    state.ready_url = "http://gtsrb-predictor.kubeflow.svc.cluster.local"
    old = {"name": cluster.INFERENCE_SERVICE, "versions": ["sha256:" + "0" * 64]}
    smoked = []
    kfp_uri = f"minio://{cluster.MINIO_BUCKET}/v2/artifacts/gtsrb-backends/{uuid.uuid4().hex}/train/7/model"
    storage.upload_artifact(store, trained_model, kfp_uri)
    with pytest.raises(deploy.DeployError, match=r"kubeflow/gtsrb: http://gtsrb-predictor.kubeflow.svc.cluster.local "
                                                 r"serves weights 0{64}, not the deployed artifact's [0-9a-f]{64}"):
        deploy.deploy_model(kfp_uri, str(trained_model), "eager", custom, core, apps, store, SERVING,
                            timeout=60, poll=0, sleep=lambda s: None, served_metadata=lambda url, name: old,
                            smoke=lambda *a: smoked.append(a))
    assert not smoked, "no smoke test against the wrong model"


@pytest.mark.slow
def test_deploy_model_from_a_kfp_artifact_uri(fake, store, trained_model, predictor_url, tmp_path):
    state, custom, core, apps = fake
    state.ready_url = predictor_url
    kfp_uri = f"minio://{cluster.MINIO_BUCKET}/v2/artifacts/gtsrb-backends/{uuid.uuid4().hex}/train/7/model"
    storage.upload_artifact(store, trained_model, kfp_uri)                # what KFP's launcher stored
    record = None
    measured = {"test_accuracy": 41.25, "test_fingerprint": "f" * 64, "run_id": "run-7"}
    for _ in range(2):                                                     # deploying twice leaves one
        record = deploy.deploy_model(kfp_uri, str(trained_model), "eager", custom, core, apps, store, SERVING,
                                     timeout=60, poll=0, sleep=lambda s: None, served_metadata=served_as_artifact(
                                         trained_model), measured=measured)
    assert len(state.objects) == 1
    assert record["storage_uri"] == storage.s3_prefix_uri(kfp_uri) and record["storage_uri"].startswith("s3://")
    assert record["url"] == predictor_url
    assert record["predict_url"] == f"{predictor_url}/v1/models/{cluster.INFERENCE_SERVICE}:predict"
    assert record["smoke"]["max_probability_gap"] <= 1e-4 and "v2 BYTES" in record["smoke"]["checks"]
    (isvc,) = state.objects.values()
    env = {e["name"]: e["value"] for e in isvc["spec"]["predictor"]["containers"][0]["env"]}
    assert env["STORAGE_URI"] == record["storage_uri"]
    assert env["GTSRB_WEIGHTS_SHA256"] == sha256_file(trained_model / WEIGHTS_FILE) == record["weights_sha256"]
    # The next run's gate reads this deployment back as its champion, through the same API (get only).
    champion = gate.cluster_champion(custom, store, cluster.NAMESPACE, cluster.INFERENCE_SERVICE,
                                     tmp_path / "champion")
    assert champion.record == record["identity"] == {
        "weights_sha256": record["weights_sha256"], "model_uri": record["storage_uri"], **measured,
        "deployed_at": record["identity"]["deployed_at"]}
    assert sha256_file(champion.model_dir / WEIGHTS_FILE) == record["weights_sha256"]


def test_deploy_serves_only_an_artifact_in_the_object_store(fake, store, trained_model):
    state, custom, core, apps = fake
    with pytest.raises(deploy.DeployError, match="is not in the object store"):
        deploy.deploy_model(str(trained_model), str(trained_model), "eager", custom, core, apps, store, SERVING,
                            timeout=60, poll=0, sleep=lambda s: None)
    assert not state.objects, "nothing applied"


def test_deploy_refuses_a_storage_uri_holding_other_weights(fake, store, trained_model):
    _, custom, core, *_ = fake
    kfp_uri = f"minio://{cluster.MINIO_BUCKET}/v2/artifacts/gtsrb-backends/{uuid.uuid4().hex}/train/7/model"
    storage.upload_artifact(store, trained_model, kfp_uri)
    with pytest.raises(deploy.DeployError, match="holds weights"):
        deploy.resolve_storage_uri(kfp_uri, "0" * 64, store)


def test_ir_heavy_tasks_request_cpu_and_memory_without_a_cpu_limit(ir):
    spec, _ = ir
    for step in ("train", "evaluate"):
        resources = spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]["resources"]
        assert resources["resourceCpuRequest"] == "1" and "resourceCpuLimit" not in resources, step
        assert resources["resourceMemoryRequest"] == "2Gi" and resources["resourceMemoryLimit"] == "6Gi", step


def test_ir_evaluate_sets_the_short_openmp_spin_in_its_environment(ir):
    spec, _ = ir
    env = spec["deploymentSpec"]["executors"]["exec-evaluate"]["container"]["env"]
    assert {e["name"]: e["value"] for e in env} == SHORT_SPIN
