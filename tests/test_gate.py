"""The champion/challenger gate (components/gate.py): the exact McNemar test against known values,
the identity record as InferenceService annotations, the gate's core driven by recorded
InferenceService objects (a stand-in for the one `get` it makes) and a real S3 server holding the
champion's artifact, run-local's champion directory, and the compiled graph."""

import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from components import cluster, deploy, gate, rollout, storage
from components.preprocess import load_split, split_fingerprint
from tests.s3server import s3_store

FIXTURES = Path(__file__).parent / "fixtures"


# --------------------------------------------------------------------------- McNemar
@pytest.mark.parametrize("b, c, p", [
    (0, 0, 1.0),              # no discordant image: no evidence either way
    (1, 0, 1.0),
    (3, 3, 1.0),
    (0, 5, 0.0625),           # 2 * (1/2)^5
    (2, 8, 0.109375),         # 2 * (1 + 10 + 45) / 1024
    (0, 10, 0.001953125),     # 2 / 1024
    (1, 9, 0.021484375),      # 2 * (1 + 10) / 1024
])
def test_mcnemar_exact_known_values(b, c, p):
    assert gate.mcnemar_exact(b, c) == p
    assert gate.mcnemar_exact(c, b) == p


def _float_binomial_p(b, c):
    """The same test computed another way: float pmf terms from log-gamma, summed over both tails."""
    n, k = b + c, min(b, c)
    pmf = [math.exp(math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2))
           for i in range(n + 1)]
    return min(1.0, sum(pmf[:k + 1]) + sum(pmf[n - k:]))


def test_mcnemar_exact_matches_r_binom_test_and_a_float_computation():
    # R: binom.test(40, 100)$p.value = 0.05688793 (the exact McNemar test is this binomial test)
    assert gate.mcnemar_exact(40, 60) == pytest.approx(0.05688793, abs=5e-9)
    for b, c in [(25, 10), (7, 19), (130, 170), (1, 40)]:
        assert gate.mcnemar_exact(b, c) == pytest.approx(_float_binomial_p(b, c), rel=1e-9)
    assert 0.0 < gate.mcnemar_exact(3000, 3300) < 1e-3         # large counts stay exact (integers)
    with pytest.raises(ValueError):
        gate.mcnemar_exact(-1, 2)


# --------------------------------------------------------------------------- the record
SHA_A, SHA_B, FP = "a" * 64, "b" * 64, "f" * 64


def record(**changes):
    return {**gate.identity(SHA_A, "s3://mlpipeline/v2/artifacts/run-1/train/1/model/", 41.25, FP, "run-1",
                            "2026-01-02T03:04:05Z"), **changes}


def test_annotations_round_trip_through_a_rendered_inference_service():
    body = deploy.render_inference_service(record()["model_uri"], "onnxruntime", SHA_A,
                                           deploy.Serving(image="x"), record())
    assert body["metadata"]["annotations"] == {
        "gtsrb/weights-sha256": SHA_A, "gtsrb/model-uri": record()["model_uri"], "gtsrb/test-accuracy": "41.25",
        "gtsrb/test-fingerprint": FP, "gtsrb/run-id": "run-1", "gtsrb/deployed-at": "2026-01-02T03:04:05Z"}
    assert gate.record_from_inference_service(body, "isvc") == record()
    with pytest.raises(ValueError, match="identity record names"):
        deploy.render_inference_service(record()["model_uri"], "onnxruntime", SHA_B, deploy.Serving(image="x"),
                                        record())


def test_unreadable_records_name_every_problem():
    with pytest.raises(gate.ChampionRecordError) as error:
        gate.parse_record(record(test_accuracy="n/a", weights_sha256="123", run_id=""), "isvc")
    message = str(error.value)
    assert "run_id missing" in message and "'123' is not a sha256" in message and "'n/a' is not a percentage" in message
    with pytest.raises(gate.ChampionRecordError, match="is not a percentage"):
        gate.parse_record(record(test_accuracy="101"), "isvc")


def test_decide_rule_and_force():
    promote = gate.decide(40.0, 40.2, 0.5, None, "", 0.5, False)
    assert promote[0] == "promote" and "≥ champion 40.20 % − 0.5 points (-0.20 points" in promote[1]
    keep = gate.decide(40.0, 40.2, 0.0, None, "", 0.5, False)
    assert keep[0] == "keep" and "challenger 40.00 % < champion 40.20 %" in keep[1]
    forced = gate.decide(40.0, 40.2, 0.0, None, "", 0.5, True)
    assert forced == ("promote", f"force_deploy: promoted although the gate says keep: {keep[1]}")
    assert gate.decide(40.0, None, 0.0, None, "nothing is served yet", None, False) == \
        ("promote", "no champion: nothing is served yet")
    bad = gate.decide(40.0, None, 0.0, "sha256 mismatch", "", None, False)
    assert bad[0] == "keep" and "unusable (sha256 mismatch); not promoting without force_deploy" in bad[1]
    assert gate.decide(40.0, None, 0.0, "sha256 mismatch", "", None, True)[0] == "promote"


# --------------------------------------------------------------------------- recorded InferenceServices
@pytest.fixture(scope="module")
def recorded():
    """InferenceService objects as `kubectl get -o json` shows them: deployed with a champion record,
    deployed before the gate (weights annotation only)."""
    return json.loads((FIXTURES / "gate-inferenceservices.json").read_text())


class RecordedAPI:
    """The one call the gate makes (RBAC: get), answered from a recorded object or an HTTP status."""

    def __init__(self, isvc=None, status=404):
        self.isvc, self.status, self.calls = isvc, status, []

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append((group, version, namespace, plural, name))
        if self.isvc is None:
            raise ApiException(status=self.status, reason="Not Found" if self.status == 404 else "Forbidden")
        return copy.deepcopy(self.isvc)


@pytest.fixture(scope="module")
def store():
    with s3_store(cluster.MINIO_BUCKET) as client:
        yield client


@pytest.fixture(scope="module")
def weak_model(prepared, tmp_path_factory):
    """A model much worse than ``trained_model`` on the same synthetic test split (1 epoch)."""
    from components.train import TrainConfig, train_model

    out = tmp_path_factory.mktemp("weak") / "model"
    train_model(str(prepared), str(out), TrainConfig(arch="lp", epochs=1, val_fraction=0.0, seed=1))
    return out


def served(recorded_isvc: dict, model_dir: Path, uri: str, fingerprint: str, accuracy: float = 50.0) -> dict:
    """``recorded_isvc`` re-pointed at the artifact at ``uri`` (the weights annotation and env too)."""
    from components.model import read_card

    isvc = copy.deepcopy(recorded_isvc)
    sha = read_card(model_dir)["weights_sha256"]
    annotations = isvc["metadata"]["annotations"]
    for key, value in {"weights_sha256": sha, "model_uri": uri, "test_fingerprint": fingerprint,
                       "test_accuracy": repr(accuracy)}.items():
        if gate.IDENTITY[key] in annotations or key == "weights_sha256":
            annotations[gate.IDENTITY[key]] = value
    for env in isvc["spec"]["predictor"]["containers"][0]["env"]:
        if env["name"] == rollout.WEIGHTS_ENV:
            env["value"] = sha
        if env["name"] == "STORAGE_URI":
            env["value"] = uri
    return isvc


def cluster_gate(api, store, model_dir, prepared, tmp_path, **options):
    def find():
        return gate.cluster_champion(api, store, cluster.NAMESPACE, cluster.INFERENCE_SERVICE, tmp_path / "champion")

    return gate.run_gate(str(model_dir), "minio://mlpipeline/challenger", str(prepared), find, **options)


def upload(store, model_dir, name) -> str:
    return storage.upload_artifact(store, model_dir, f"s3://{cluster.MINIO_BUCKET}/v2/artifacts/{name}/model")["uri"]


def test_no_inference_service_means_promote(store, trained_model, prepared, tmp_path):
    api = RecordedAPI()
    result = cluster_gate(api, store, trained_model, prepared, tmp_path)
    assert api.calls == [("serving.kserve.io", "v1beta1", cluster.NAMESPACE, "inferenceservices",
                          cluster.INFERENCE_SERVICE)]
    assert result["decision"] == "promote" and result["reason"] == "no champion: nothing is served yet"
    assert result["champion"] is None and result["paired"] is None
    challenger = result["challenger"]
    assert challenger["test_fingerprint"] == split_fingerprint(load_split(prepared, "test"))
    assert challenger["correct"] == round(challenger["accuracy"] * 86 / 100)


def test_a_worse_challenger_is_kept_with_paired_counts(recorded, store, trained_model, weak_model, prepared,
                                                       tmp_path):
    fingerprint = split_fingerprint(load_split(prepared, "test"))
    uri = upload(store, trained_model, "strong")
    api = RecordedAPI(served(recorded["annotated"], trained_model, uri, fingerprint))
    result = cluster_gate(api, store, weak_model, prepared, tmp_path)
    champion, challenger, paired = result["champion"], result["challenger"], result["paired"]
    assert champion["same_test_split"] and champion["model_uri"] == uri
    assert challenger["accuracy"] < champion["accuracy"], "1 epoch vs 8 epochs"
    assert result["decision"] == "keep"
    assert paired["both_right"] + paired["challenger_only"] == challenger["correct"]
    assert paired["both_right"] + paired["champion_only"] == champion["correct"]
    assert sum(paired[k] for k in ("both_right", "challenger_only", "champion_only", "both_wrong")) == 86
    assert result["mcnemar_p"] == gate.mcnemar_exact(paired["challenger_only"], paired["champion_only"])
    assert f"exact McNemar p = {result['mcnemar_p']:.3g}" in result["reason"]
    lenient = cluster_gate(api, store, weak_model, prepared, tmp_path / "2", max_regression=100.0)
    assert lenient["decision"] == "promote" and lenient["paired"] == paired
    report = gate.markdown_report(result)
    assert "# Gate: **keep**" in report and f"only the champion {paired['champion_only']}" in report


def test_a_served_onnx_champion_is_measured_as_it_is_served(recorded, store, trained_model, served_onnx, weak_model,
                                                           prepared, tmp_path):
    """The deployed artifact is select's served one: for an ONNX Runtime winner the ONNX file and a
    card without weights. The gate downloads it and predicts with that file through ONNX Runtime."""
    import onnxruntime  # noqa: F401  (the served_onnx fixture needs it too)

    from components.artifact import verified_card

    int8 = served_onnx["onnxruntime-int8"]
    assert "weights_file" not in verified_card(int8)
    fingerprint = split_fingerprint(load_split(prepared, "test"))
    uri = upload(store, int8, "served-int8")
    api = RecordedAPI(served(recorded["annotated"], int8, uri, fingerprint))
    result = cluster_gate(api, store, weak_model, prepared, tmp_path)
    champion, test = result["champion"], load_split(prepared, "test")
    int8_predictions = gate.served_predictions(int8, test)
    fp32_predictions = gate.served_predictions(trained_model, test)
    assert champion["correct"] == int((int8_predictions == test["labels"]).sum())
    assert (int8_predictions == fp32_predictions).float().mean() >= 0.9      # int8, not the fp32 weights
    assert result["decision"] == "keep" and champion["model_uri"] == uri


def test_a_champion_recorded_on_another_test_split_is_measured_on_the_challengers(
        recorded, store, trained_model, prepared, tmp_path):
    uri = upload(store, trained_model, "other-split")
    api = RecordedAPI(served(recorded["annotated"], trained_model, uri, "c" * 64, accuracy=99.5))
    result = cluster_gate(api, store, trained_model, prepared, tmp_path)
    champion = result["champion"]
    assert not champion["same_test_split"] and champion["recorded_accuracy"] == 99.5
    assert champion["accuracy"] == result["challenger"]["accuracy"], "the same weights, measured on this split"
    assert result["paired"]["challenger_only"] == result["paired"]["champion_only"] == 0
    assert result["decision"] == "promote" and result["mcnemar_p"] == 1.0
    assert "recorded 99.50 % on split `cccccccccccc…`" in gate.markdown_report(result)


def _problem(result):
    assert result["decision"] == "keep" and result["champion"] is None
    assert "not promoting without force_deploy" in result["reason"]
    return result["problem"]


def test_a_champion_deployed_before_the_gate_blocks_promotion_unless_forced(recorded, store, trained_model,
                                                                           prepared, tmp_path):
    api = RecordedAPI(recorded["legacy"])
    assert "carries no champion record" in _problem(cluster_gate(api, store, trained_model, prepared, tmp_path))
    forced = cluster_gate(api, store, trained_model, prepared, tmp_path, force_deploy=True)
    assert forced["decision"] == "promote" and forced["reason"].startswith("force_deploy: promoted although")


def test_unreadable_annotations_block_promotion(recorded, store, trained_model, prepared, tmp_path):
    isvc = copy.deepcopy(recorded["annotated"])
    isvc["metadata"]["annotations"]["gtsrb/test-accuracy"] = "NaN%"
    problem = _problem(cluster_gate(RecordedAPI(isvc), store, trained_model, prepared, tmp_path))
    assert "unreadable champion record: test_accuracy 'NaN%' is not a percentage" in problem


def test_a_champion_artifact_that_is_gone_blocks_promotion(recorded, store, trained_model, prepared, tmp_path):
    isvc = served(recorded["annotated"], trained_model, "s3://mlpipeline/v2/artifacts/deleted/model/", FP)
    problem = _problem(cluster_gate(RecordedAPI(isvc), store, trained_model, prepared, tmp_path))
    assert "model artifact s3://mlpipeline/v2/artifacts/deleted/model/ cannot be downloaded" in problem


def test_a_sha256_mismatch_blocks_promotion(recorded, store, trained_model, weak_model, prepared, tmp_path):
    uri = upload(store, weak_model, "mismatch")
    isvc = served(recorded["annotated"], trained_model, uri, FP)     # annotations name trained_model's weights
    problem = _problem(cluster_gate(RecordedAPI(isvc), store, trained_model, prepared, tmp_path))
    assert "sha256 mismatch: the record names weights" in problem
    isvc = served(recorded["annotated"], trained_model, uri, FP)
    isvc["spec"]["predictor"]["containers"][0]["env"][2]["value"] = SHA_B
    problem = _problem(cluster_gate(RecordedAPI(isvc), store, trained_model, prepared, tmp_path))
    assert f"but the predictor serves {SHA_B}" in problem


def test_an_inference_service_the_gate_may_not_read_blocks_promotion(store, trained_model, prepared, tmp_path):
    problem = _problem(cluster_gate(RecordedAPI(status=403), store, trained_model, prepared, tmp_path))
    assert problem == "InferenceService kubeflow/gtsrb: cannot read the champion: HTTP 403 Forbidden"


# --------------------------------------------------------------------------- run-local's champion dir
def local_record(model_dir, fingerprint=FP):
    from components.model import read_card

    return gate.identity(read_card(model_dir)["weights_sha256"], str(model_dir), 40.0, fingerprint, "run-x")


def test_local_champion_install_read_and_replace(trained_model, weak_model, tmp_path):
    directory = tmp_path / "champion"
    assert gate.local_champion(directory) is None
    gate.install_local_champion(directory, trained_model, local_record(trained_model))
    first = gate.local_champion(directory)
    assert first.record == local_record(trained_model) | {"deployed_at": first.record["deployed_at"]}
    assert (first.model_dir / "model.pt").is_file()
    gate.install_local_champion(directory, weak_model, local_record(weak_model))
    second = gate.local_champion(directory)
    assert second.record["weights_sha256"] == local_record(weak_model)["weights_sha256"]
    assert sorted(p.name for p in directory.iterdir()) == [gate.RECORD_FILE, second.model_dir.name], \
        "the replaced champion's files are gone, nothing partial is left"


def test_a_local_champion_is_a_served_artifact_measured_as_served(served_onnx, trained_model, weak_model,
                                                                   prepared, tmp_path):
    """run-local installs select's served artifact (an int8 winner: its .onnx file, no weights): the
    next gate measures the champion through that file, as `make serve` would serve it."""
    int8 = served_onnx["onnxruntime-int8"]
    gate.install_local_champion(tmp_path / "champion", int8, local_record(int8))
    champion = gate.local_champion(tmp_path / "champion")
    assert sorted(p.name for p in champion.model_dir.iterdir()) == ["model.onnx", "model_card.json"]
    test = load_split(prepared, "test")
    result = gate.run_gate(str(weak_model), "s3://w", str(prepared), lambda: champion)
    assert result["champion"]["correct"] == int((gate.served_predictions(int8, test) == test["labels"]).sum())


def test_a_failed_install_leaves_the_previous_champion(trained_model, tampered_model, tmp_path):
    directory = tmp_path / "champion"
    gate.install_local_champion(directory, trained_model, local_record(trained_model))
    before = {p.name: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    with pytest.raises(gate.ChampionRecordError, match="unusable"):
        gate.install_local_champion(directory, tampered_model, local_record(trained_model))
    assert {p.name: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == before
    assert len(list(directory.iterdir())) == 2


def test_bad_local_champion_records(trained_model, tmp_path):
    directory = tmp_path / "champion"
    gate.install_local_champion(directory, trained_model, local_record(trained_model))
    champion = gate.local_champion(directory)
    (directory / gate.RECORD_FILE).write_text("{not json")
    with pytest.raises(gate.ChampionRecordError, match="unreadable champion record"):
        gate.local_champion(directory)
    (directory / gate.RECORD_FILE).write_text(json.dumps({**champion.record, "model_dir": champion.model_dir.name}))
    shutil.rmtree(champion.model_dir)
    with pytest.raises(gate.ChampionRecordError, match="model artifact is unusable: .*model card missing"):
        gate.local_champion(directory)


def older_signnet(model_dir: Path, out: Path) -> Path:
    """``model_dir`` rewritten as a signnet artifact from before ImageStandardize had its window
    buffer: verified (sha256s match), but its weights do not fit today's network."""
    import torch

    from components.artifact import sha256_file
    from components.model import build_model

    shutil.copytree(model_dir, out)
    state = {k: v for k, v in build_model("signnet").state_dict().items() if k != "features.0.window"}
    torch.save(state, out / "model.pt")
    card = json.loads((out / "model_card.json").read_text())
    card.update(architecture="signnet", weights_sha256=sha256_file(out / "model.pt"))
    (out / "model_card.json").write_text(json.dumps(card))
    return out


def test_a_champion_this_code_cannot_run_blocks_promotion(trained_model, prepared, tmp_path):
    from components.model import ModelArtifactError, load_model_artifact

    old = older_signnet(trained_model, tmp_path / "old")
    with pytest.raises(ModelArtifactError, match=r"features\.0\.window.*older version of the network; train it again"):
        load_model_artifact(old)
    directory = tmp_path / "champion"
    gate.install_local_champion(directory, old, local_record(old))
    result = gate.run_gate(str(trained_model), str(trained_model), str(prepared),
                           lambda: gate.local_champion(directory))
    assert "the champion's model cannot be run" in _problem(result) and "train it again" in result["problem"]
    assert result["challenger"]["accuracy"] > 0


# --------------------------------------------------------------------------- the graph
@pytest.fixture(scope="module")
def ir(compiled_ir):
    docs = list(yaml.safe_load_all(compiled_ir.read_text()))
    return docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_ir_serves_and_deploys_only_when_the_gate_promotes(ir):
    spec, executors = ir
    root = spec["root"]["dag"]["tasks"]
    gate_task = root["gate"]
    assert gate_task["cachingOptions"] == {}, "the champion it reads changes between runs"
    assert gate_task["inputs"]["artifacts"]["selection"]["taskOutputArtifact"]["producerTask"] == "select"
    assert gate_task["inputs"]["parameters"]["run_id"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    (promote,) = [t for t in root.values() if "gate-Output" in t.get("triggerPolicy", {}).get("condition", "")]
    assert promote["triggerPolicy"]["condition"] == \
        "inputs.parameter_values['pipelinechannel--gate-Output'] == 'promote'"

    def below(component):                     # every task name under a component, at any depth
        for name, task in spec["components"][component].get("dag", {}).get("tasks", {}).items():
            yield name
            yield from below(task["componentRef"]["name"])

    inside = set(below(promote["componentRef"]["name"]))
    assert {"serve", "deploy"} <= inside
    assert not {"serve", "deploy"} & set(root), "nothing is served outside the promote branch"
    deploy_task = spec["components"]["comp-condition-5"]["dag"]["tasks"]["deploy"]
    assert deploy_task["inputs"]["artifacts"]["verdict"] == {"componentInputArtifact": "pipelinechannel--gate-summary"}
    (secret,) = executors["exec-gate"]["secretAsEnv"]
    assert secret["secretName"] == cluster.S3_SECRET
    assert spec["root"]["dag"]["outputs"]["artifacts"]["Output"]["artifactSelectors"][0]["producerSubtask"] == "gate"
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["max_regression"]["defaultValue"] == 0.0 and defaults["force_deploy"]["defaultValue"] is False
    assert defaults["champion_dir"]["defaultValue"] == "runs/champion"


def test_deploy_annotates_what_the_gate_measured(tmp_path):
    path = tmp_path / "summary"
    path.write_text(json.dumps({"gate": {"challenger": {"accuracy": 41.25, "test_fingerprint": FP}}}))
    assert gate.measured(str(path), "run-9") == {"test_accuracy": 41.25, "test_fingerprint": FP, "run_id": "run-9"}
