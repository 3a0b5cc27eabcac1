"""Step 6 — gate: serve this run's winner (the challenger) only if it is not worse than the model
served now (the champion).

- The champion's identity record (:data:`IDENTITY`): weights sha256, served artifact URI, test
  accuracy, test-split fingerprint (components.preprocess.split_fingerprint), run id, time. On a
  cluster it is the annotations the deploy step writes on the live InferenceService (read with a
  single ``get``); with run-local it is ``<champion dir>/champion.json`` beside a copy of the
  champion's served artifact, which run-local replaces only on promote (:func:`install_local_champion`).
- Both models predict the challenger's test split as they are served (:func:`served_predictions`:
  a served ONNX artifact through ONNX Runtime, the file its evaluation measured; torch weights on the
  fp32 reference backend), so accuracies are measured on the same images even when the champion was
  recorded on another split (its fingerprint then differs from the challenger's).
- Rule: promote when there is no champion, or challenger accuracy ≥ champion accuracy −
  ``max_regression`` points. The paired predictions give the images only one model gets right and
  the exact McNemar p-value (two-sided binomial test on those discordant images).
- A champion record that cannot be used (unreadable annotations, an artifact that is gone, weights
  whose sha256 is not the recorded one) is reported and blocks promotion unless ``force_deploy``.
"""

import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Markdown, Model, Output

from components import rollout
from components.artifact import ModelArtifactError
from components.kfp_step import step
from components.local_run import CHAMPION_RECORD, PROMOTE

KEEP = "keep"                           # and PROMOTE (components/local_run.py: the predictor reads it)
# Record field -> InferenceService annotation (deploy writes them, the gate reads them).
IDENTITY = {
    "weights_sha256": "gtsrb/weights-sha256",
    "model_uri": "gtsrb/model-uri",
    "test_accuracy": "gtsrb/test-accuracy",
    "test_fingerprint": "gtsrb/test-fingerprint",
    "run_id": "gtsrb/run-id",
    "deployed_at": "gtsrb/deployed-at",
}
RECORD_FILE = CHAMPION_RECORD           # run-local: <champion dir>/champion.json names its model directory
SHA256 = re.compile(r"[0-9a-f]{64}")


class ChampionRecordError(RuntimeError):
    """The champion exists but its record cannot be trusted: the gate will not promote over it."""


# --------------------------------------------------------------------------- the identity record
def identity(weights_sha256: str, model_uri: str, test_accuracy: float, test_fingerprint: str, run_id: str,
             deployed_at: str | None = None) -> dict:
    return {"weights_sha256": weights_sha256, "model_uri": model_uri, "test_accuracy": float(test_accuracy),
            "test_fingerprint": test_fingerprint, "run_id": run_id,
            "deployed_at": deployed_at or datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")}


def to_annotations(record: dict) -> dict[str, str]:
    return {IDENTITY[k]: (repr(record[k]) if k == "test_accuracy" else str(record[k])) for k in IDENTITY}


def parse_record(fields: dict, where: str) -> dict:
    """A validated identity record from ``fields`` (record keys, string or typed values);
    ChampionRecordError naming every problem."""
    problems = [f"{k} missing" for k in IDENTITY if fields.get(k) in (None, "")]
    record = {k: fields.get(k) for k in IDENTITY}
    for key in ("weights_sha256", "test_fingerprint"):
        if record[key] and not SHA256.fullmatch(str(record[key])):
            problems.append(f"{key} {record[key]!r} is not a sha256")
    if record["test_accuracy"] not in (None, ""):
        try:
            record["test_accuracy"] = float(record["test_accuracy"])
            if not 0.0 <= record["test_accuracy"] <= 100.0:
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"test_accuracy {fields['test_accuracy']!r} is not a percentage")
    if problems:
        raise ChampionRecordError(f"{where}: unreadable champion record: {'; '.join(problems)}")
    return record


def record_from_inference_service(isvc: dict, where: str) -> dict:
    """The identity record in an InferenceService's annotations, cross-checked with the weights its
    predictor container is told to serve."""
    annotations = isvc.get("metadata", {}).get("annotations") or {}
    if not any(a in annotations for a in IDENTITY.values() if a != IDENTITY["weights_sha256"]):
        raise ChampionRecordError(f"{where} carries no champion record (annotations {sorted(IDENTITY.values())}); "
                                  "was it deployed before the gate existed?")
    record = parse_record({k: annotations.get(a) for k, a in IDENTITY.items()}, where)
    containers = isvc.get("spec", {}).get("predictor", {}).get("containers") or []
    served = {e.get("name"): e.get("value") for c in containers for e in c.get("env") or []}.get(rollout.WEIGHTS_ENV)
    if served is not None and served != record["weights_sha256"]:
        raise ChampionRecordError(f"{where}: sha256 mismatch: the annotation says weights {record['weights_sha256']} "
                                  f"but the predictor serves {served}")
    return record


# --------------------------------------------------------------------------- the champion
@dataclass
class Champion:
    record: dict
    model_dir: Path
    source: str                          # where the record came from, for messages


def _verified_model(model_dir: Path, record: dict, where: str) -> Path:
    from components.model import ModelArtifactError, verified_card

    try:
        card = verified_card(model_dir)
    except ModelArtifactError as e:
        raise ChampionRecordError(f"{where}: the champion's model artifact is unusable: {e}") from None
    if card["weights_sha256"] != record["weights_sha256"]:
        raise ChampionRecordError(f"{where}: sha256 mismatch: the record names weights {record['weights_sha256']} "
                                  f"but the artifact at {record['model_uri']} holds {card['weights_sha256']}")
    return model_dir


def local_champion(champion_dir: str | Path) -> Champion | None:
    """run-local's champion: None when ``champion_dir`` holds no record yet."""
    directory = Path(champion_dir)
    path = directory / RECORD_FILE
    if not path.exists():
        return None
    try:
        fields = json.loads(path.read_text())
        model_dir = directory / fields["model_dir"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ChampionRecordError(f"{path}: unreadable champion record ({type(e).__name__}: {e})") from None
    record = parse_record(fields, str(path))
    return Champion(record, _verified_model(model_dir, record, str(path)), str(directory))


def cluster_champion(custom_api, storage_client, namespace: str, name: str,
                     download_dir: str | Path) -> Champion | None:
    """The live InferenceService's champion, its model downloaded into ``download_dir``; None when
    there is no InferenceService. Needs only ``get`` on inferenceservices."""
    from kubernetes.client.exceptions import ApiException

    from components import storage
    from components.deploy import GROUP, PLURAL, VERSION

    where = f"InferenceService {namespace}/{name}"
    try:
        isvc = custom_api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except ApiException as e:
        if e.status == 404:
            return None
        raise ChampionRecordError(f"{where}: cannot read the champion: HTTP {e.status} {e.reason}") from None
    record = record_from_inference_service(isvc, where)
    try:
        storage.download_artifact(storage_client, record["model_uri"], download_dir)
    except (storage.StorageError, ValueError) as e:
        raise ChampionRecordError(f"{where}: the champion's model artifact {record['model_uri']} cannot be "
                                  f"downloaded (gone from the artifact store?): {e}") from None
    return Champion(record, _verified_model(Path(download_dir), record, where), where)


def install_local_champion(champion_dir: str | Path, model_dir: str | Path, record: dict) -> Path:
    """Make the model artifact at ``model_dir`` run-local's champion, atomically: the artifact is
    copied and verified under a new directory, then ``champion.json`` is replaced in one rename; a
    failure at any point leaves the previous champion as it was. Returns the record's path."""
    from components.model import verified_card

    directory = Path(champion_dir)
    directory.mkdir(parents=True, exist_ok=True)
    record = parse_record(record, "new champion record")
    target = f"model-{record['weights_sha256'][:16]}"
    staging = Path(tempfile.mkdtemp(prefix=".model-", dir=directory))
    try:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        _verified_model(staging, record, f"new champion {model_dir}")
        if (directory / target).exists():            # the same weights again (a forced re-promote)
            verified_card(directory / target)
            shutil.rmtree(staging)
        else:
            os.replace(staging, directory / target)
        pending = directory / f".{RECORD_FILE}.partial"
        pending.write_text(json.dumps({**record, "model_dir": target}, indent=2) + "\n")
        os.replace(pending, directory / RECORD_FILE)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for old in directory.glob("model-*"):                 # earlier champions, now unreferenced
        if old.name != target:
            shutil.rmtree(old, ignore_errors=True)
    return directory / RECORD_FILE


# --------------------------------------------------------------------------- comparison
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs: under "both models are
    equally accurate" each discordant image is a fair coin, so p = P(a Binomial(b + c, 1/2) count
    at least as far from the middle) = min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))."""
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b}, {c}")
    n = b + c
    tail = Fraction(sum(math.comb(n, i) for i in range(min(b, c) + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def paired_counts(challenger, champion, labels) -> dict:
    """Images both / only one / neither of the models classify right (tensors of top-1 classes)."""
    a, b = challenger == labels, champion == labels
    return {"test_images": len(labels), "both_right": int((a & b).sum()), "challenger_only": int((a & ~b).sum()),
            "champion_only": int((~a & b).sum()), "both_wrong": int((~a & ~b).sum())}


def rule_text(max_regression: float) -> str:
    return f"promote when there is no champion, or challenger accuracy ≥ champion accuracy − {max_regression:g} points"


def decide(challenger_accuracy: float, champion_accuracy: float | None, max_regression: float,
           problem: str | None, no_champion: str, p_value: float | None, force_deploy: bool) -> tuple[str, str]:
    """(decision, one-line reason). ``problem``: why the champion record is unusable, if it is;
    ``no_champion``: where no champion was found (when there is none)."""
    if problem:
        decision, reason = KEEP, f"the champion's record is unusable ({problem}); not promoting without force_deploy"
    elif champion_accuracy is None:
        decision, reason = PROMOTE, f"no champion: {no_champion}"
    else:
        gap = challenger_accuracy - champion_accuracy
        ok = gap >= -max_regression - 1e-9
        decision = PROMOTE if ok else KEEP
        p = "" if p_value is None else f", exact McNemar p = {p_value:.3g}"
        reason = (f"challenger {challenger_accuracy:.2f} % {'≥' if ok else '<'} champion {champion_accuracy:.2f} % "
                  f"− {max_regression:g} points ({gap:+.2f} points{p})")
    if force_deploy:
        return PROMOTE, (f"force_deploy: promoted although the gate says keep: {reason}" if decision == KEEP
                         else f"{reason} (force_deploy set, not needed)")
    return decision, reason


# --------------------------------------------------------------------------- the gate
def served_predictions(model_dir: str | Path, test: dict):
    """Top-1 classes on ``test`` of the artifact at ``model_dir`` as it is served: a served ONNX
    artifact through ONNX Runtime (the file the winner's evaluation measured), otherwise the weights
    on the fp32 reference backend."""
    import torch

    from components.artifact import SERVING, serving_format
    from components.evaluate import EvalData, predict_all, reference_predictions
    from components.model import load_model_artifact, normalize, verified_card

    card = verified_card(model_dir)
    norm = card["normalization"]
    x = normalize(test["images"], norm["mean"], norm["std"])
    if serving_format(card) == "onnx":
        from components import ort
        from components.runtime import cpu_count

        run = ort.session(Path(model_dir) / card[SERVING]["file"], cpu_count())
        return predict_all(lambda batch: torch.from_numpy(run(batch.numpy())), x)
    model, card = load_model_artifact(model_dir)
    return reference_predictions(EvalData(model, card, x, test["labels"], Path(model_dir)))


def _accuracy(correct: int, n: int) -> float:
    return 100.0 * correct / n


def run_gate(model_dir: str, model_uri: str, data_dir: str, find_champion, max_regression: float = 0.0,
             force_deploy: bool = False, run_id: str = "") -> dict:
    """The gate's core. ``find_champion()`` returns a Champion, None (no champion) or raises
    ChampionRecordError. Returns the summary's ``gate`` section."""
    from components.model import verified_card
    from components.preprocess import load_split, split_fingerprint
    from components.runtime import set_threads

    if not (math.isfinite(max_regression) and max_regression >= 0):
        raise ValueError(f"max_regression must be a finite number of points >= 0, got {max_regression}")
    set_threads()
    test = load_split(data_dir, "test")
    labels, n = test["labels"], len(test["labels"])
    fingerprint = split_fingerprint(test)
    mine = served_predictions(model_dir, test)
    correct = int((mine == labels).sum())
    challenger = {"weights_sha256": verified_card(model_dir)["weights_sha256"], "model_uri": model_uri,
                  "accuracy": _accuracy(correct, n), "correct": correct, "test_fingerprint": fingerprint,
                  "run_id": run_id}
    champion, problem, no_champion, paired, p_value = None, None, "", None, None
    try:
        found = find_champion()
        if found is None:
            no_champion = "nothing is served yet"
        else:
            try:
                theirs = served_predictions(found.model_dir, test)
            except ModelArtifactError as e:   # verified, but this code cannot run it (an older network)
                raise ChampionRecordError(f"{found.source}: the champion's model cannot be run: {e}") from None
            paired = paired_counts(mine, theirs, labels)
            p_value = mcnemar_exact(paired["challenger_only"], paired["champion_only"])
            record = found.record
            champion_correct = paired["both_right"] + paired["champion_only"]
            champion = {"weights_sha256": record["weights_sha256"], "model_uri": record["model_uri"],
                        "accuracy": _accuracy(champion_correct, n), "correct": champion_correct,
                        "recorded_accuracy": record["test_accuracy"], "test_fingerprint": record["test_fingerprint"],
                        "same_test_split": record["test_fingerprint"] == fingerprint, "run_id": record["run_id"],
                        "deployed_at": record["deployed_at"], "source": found.source}
    except ChampionRecordError as e:
        problem = str(e)
    decision, reason = decide(challenger["accuracy"], champion and champion["accuracy"], max_regression, problem,
                              no_champion, p_value, force_deploy)
    return {"decision": decision, "reason": reason, "rule": rule_text(max_regression),
            "max_regression": max_regression, "force_deploy": force_deploy, "problem": problem,
            "challenger": challenger, "champion": champion, "paired": paired, "mcnemar_p": p_value}


def markdown_report(gate: dict) -> str:
    """The gate's Markdown report (KFP UI; the pull-request comment)."""
    lines = [f"# Gate: **{gate['decision']}**\n", f"{gate['reason']}.\n", f"Rule: {gate['rule']}.\n",
             "| model | weights sha256 | test accuracy % | correct | test split |", "|---|---|---|---|---|"]
    ch = gate["challenger"]
    lines.append(f"| challenger (this run) | `{ch['weights_sha256'][:12]}…` | {ch['accuracy']:.2f} | {ch['correct']} "
                 f"| `{ch['test_fingerprint'][:12]}…` |")
    cp = gate["champion"]
    if cp:
        recorded = "same split" if cp["same_test_split"] else \
            f"recorded {cp['recorded_accuracy']:.2f} % on split `{cp['test_fingerprint'][:12]}…`"
        lines.append(f"| champion (served, run {cp['run_id'] or '?'}) | `{cp['weights_sha256'][:12]}…` | "
                     f"{cp['accuracy']:.2f} | {cp['correct']} | this run's ({recorded}) |")
    lines.append("")
    p = gate["paired"]
    if p:
        lines.append(f"Paired on the {p['test_images']} test images: both right {p['both_right']}, only the "
                     f"challenger {p['challenger_only']}, only the champion {p['champion_only']}, both wrong "
                     f"{p['both_wrong']}. Exact McNemar p = {gate['mcnemar_p']:.3g} (the chance of a split at least "
                     "this uneven of the images only one model gets right if both were equally accurate).\n")
    return "\n".join(lines)


def summary_line(gate: dict) -> str:
    """One line for a terminal: decision, reason, the model served after this run."""
    served = gate["challenger"] if gate["decision"] == PROMOTE else gate["champion"]
    return (f"gate: {gate['decision']} — {gate['reason']}"
            + (f"\nserved model: weights sha256 {served['weights_sha256']}" if served else ""))


def write_gate(selection_path: str, model_dir: str, model_uri: str, data_dir: str, find_champion,
               max_regression: float, force_deploy: bool, run_id: str, summary_path: str, report_path: str) -> dict:
    """The gate step's core: decide, then write select's summary with a ``gate`` section, and the report."""
    summary = json.loads(Path(selection_path).read_text())
    gate = run_gate(model_dir, model_uri, data_dir, find_champion, max_regression, force_deploy, run_id)
    summary["gate"] = gate
    Path(summary_path).write_text(json.dumps(summary, indent=2) + "\n")
    Path(report_path).write_text(markdown_report(gate))
    print(summary_line(gate), flush=True)
    return gate


def champion_finder(deploy_target: str, champion_dir: str, namespace: str, name: str, download_dir: str):
    """Where the champion is: ``champion_dir`` for "local", the live InferenceService for "kserve"
    (in-cluster Kubernetes config; object-store credentials from the environment)."""
    if deploy_target == "local":
        return lambda: local_champion(champion_dir)
    if deploy_target != "kserve":
        raise ValueError(f"deploy_target must be 'local' or 'kserve', got {deploy_target!r}")

    def find():
        from kubernetes import client, config

        from components import cluster
        from components.storage import client_from_env

        config.load_incluster_config()
        return cluster_champion(client.CustomObjectsApi(), client_from_env(cluster.MINIO_ENDPOINT), namespace,
                                name, download_dir)
    return find


def measured(summary_path: str, run_id: str) -> dict:
    """What deploy annotates besides the weights and storageUri, from the gate's summary."""
    challenger = json.loads(Path(summary_path).read_text())["gate"]["challenger"]
    return {"test_accuracy": challenger["accuracy"], "test_fingerprint": challenger["test_fingerprint"],
            "run_id": run_id}


@step("gate")
def gate(selection: Input[Artifact], model: Input[Model], data: Input[Dataset], deploy_target: str,
         champion_dir: str, namespace: str, name: str, max_regression: float, force_deploy: bool, run_id: str,
         summary: Output[Artifact], report: Output[Markdown]) -> str:
    """Promote the winner only if it is not worse than the served champion: returns "promote" or
    "keep"; ``summary`` is select's summary with a ``gate`` section."""
    import tempfile

    from components.gate import champion_finder, write_gate

    with tempfile.TemporaryDirectory() as download:
        find = champion_finder(deploy_target, champion_dir, namespace, name, download)
        result = write_gate(selection.path, model.path, model.uri, data.path, find, max_regression, force_deploy,
                            run_id, summary.path, report.path)
    summary.metadata.update(decision=result["decision"])
    return result["decision"]
