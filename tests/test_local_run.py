"""What `make serve` serves for a run-local summary.json: what the run's gate decided (the run's
winner on promote, the champion it kept on keep), said in one line at startup; anything else is a
one-line refusal."""

import json
import shutil

import pytest

from components import gate
from components.artifact import ONNX_FILE, sha256_file
from components.local_run import NotServable, serving_choice, serving_target
from components.served import export_served
from components.serving import server
from components.serving.__main__ import main as serving_main

RUN = "gtsrb-backends-20261207-101010-000000"


@pytest.fixture(scope="module")
def served_eager(trained_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("served-eager") / "served"
    export_served(trained_model, "eager", out)
    return out


def write_summary(tmp_path, served_dir, decision, kept=None, problem=None):
    """A run-local summary.json whose winner is eager (``served_dir``) and whose gate decided ``decision``."""
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({
        "winner": "eager", "served": {"path": str(served_dir), "backend": "eager"},
        "gate": {"decision": decision, "reason": f"because {decision}", "champion": kept, "problem": problem},
        "run": {"artifacts": str(tmp_path / "artifacts" / RUN), "champion_dir": str(tmp_path / "champion")}}))
    return path


def install_onnx_champion(tmp_path, served_onnx):
    """An ONNX Runtime champion from an earlier run in ``tmp_path/champion``; its gate record."""
    served = served_onnx["onnxruntime"]
    record = gate.identity(json.loads((served / "model_card.json").read_text())["weights_sha256"], "s3://x", 90.0,
                           "0" * 64, "gtsrb-backends-older")
    gate.install_local_champion(tmp_path / "champion", served, record)
    return {"weights_sha256": record["weights_sha256"]}


def test_promote_serves_the_runs_winner(served_eager, tmp_path):
    choice = serving_choice(write_summary(tmp_path, served_eager, "promote"))
    card = json.loads((served_eager / "model_card.json").read_text())
    assert (choice.model_dir, choice.backend, choice.run) == (str(served_eager), "eager", RUN)
    assert choice.sha256 == card["serving"]["sha256"] == sha256_file(served_eager / choice.file)
    assert choice.why == "the gate promoted this run's winner: because promote"
    assert serving_target(tmp_path / "summary.json") == (str(served_eager), "eager")


def test_keep_serves_the_champion_it_kept_with_its_backend(served_eager, served_onnx, tmp_path):
    kept = install_onnx_champion(tmp_path, served_onnx)
    choice = serving_choice(write_summary(tmp_path, served_eager, "keep", kept=kept))
    champion = tmp_path / "champion" / f"model-{kept['weights_sha256'][:16]}"
    assert (choice.model_dir, choice.backend, choice.run) == (str(champion), "onnxruntime", "gtsrb-backends-older")
    assert (choice.file, choice.sha256) == (ONNX_FILE, sha256_file(served_onnx["onnxruntime"] / ONNX_FILE))
    assert choice.why == "the gate kept the champion: because keep"


def test_keep_refuses_what_it_cannot_serve_as_kept(served_eager, served_onnx, trained_model, tmp_path):
    with pytest.raises(NotServable, match=r"without being able to read it \(record unusable\).*FORCE_DEPLOY=1"):
        serving_choice(write_summary(tmp_path, served_eager, "keep", problem="record unusable"))
    install_onnx_champion(tmp_path, served_onnx)
    with pytest.raises(NotServable, match="another run changed the champion since"):
        serving_choice(write_summary(tmp_path, served_eager, "keep", kept={"weights_sha256": "f" * 64}))
    old = tmp_path / "old"                          # a champion installed before champions kept the served artifact
    record = gate.identity(json.loads((trained_model / "model_card.json").read_text())["weights_sha256"], "s3://x",
                           90.0, "0" * 64, "gtsrb-backends-oldest")
    gate.install_local_champion(old, trained_model, record)
    shutil.rmtree(tmp_path / "champion")
    (old).rename(tmp_path / "champion")
    with pytest.raises(NotServable, match="its backend is not on record"):
        serving_choice(write_summary(tmp_path, served_eager, "keep", kept={"weights_sha256": record["weights_sha256"]}))
    older = tmp_path / "older.json"
    older.write_text(json.dumps({"winner": "eager", "served": {"path": str(served_eager)}}))
    with pytest.raises(NotServable, match="no gate decision"):
        serving_choice(older)


def test_a_missing_summary_or_a_tampered_artifact_is_not_servable(served_eager, tmp_path):
    with pytest.raises(NotServable, match=r"summary.json not found: run `make local` first"):
        serving_choice(tmp_path / "summary.json")
    tampered = tmp_path / "served"
    shutil.copytree(served_eager, tampered)
    card = json.loads((tampered / "model_card.json").read_text())
    (tampered / card["serving"]["file"]).write_bytes(b"not the measured file")
    with pytest.raises(NotServable, match="sha256"):
        serving_choice(write_summary(tmp_path, tampered, "promote"))


def test_make_serve_says_what_it_serves_and_why(served_eager, served_onnx, tmp_path, monkeypatch, capsys):
    started = {}
    monkeypatch.setattr(server, "start", lambda model, *args: started.update(model=model, args=args))
    kept = install_onnx_champion(tmp_path, served_onnx)
    summary = write_summary(tmp_path, served_eager, "keep", kept=kept)
    assert serving_main(["--summary", str(summary), "--workers", "1", "--host", "127.0.0.1"]) == 0
    err = capsys.readouterr().err
    sha = sha256_file(served_onnx["onnxruntime"] / ONNX_FILE)
    assert (f"predictor: serving run gtsrb-backends-older: backend onnxruntime, model.onnx sha256 {sha} "
            f"({tmp_path / 'champion' / ('model-' + kept['weights_sha256'][:16])}); the gate kept the champion: "
            "because keep") in err
    assert started["model"].backend == "onnxruntime" and started["args"][-1] == "127.0.0.1"


def test_make_serve_without_a_run_is_one_line(tmp_path, capsys):
    assert serving_main(["--summary", str(tmp_path / "summary.json")]) == 1
    err = capsys.readouterr().err
    assert err == f"predictor: {tmp_path / 'summary.json'} not found: run `make local` first\n"
