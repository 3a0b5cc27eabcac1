"""The pipeline graph: compiled IR, and whole runs on KFP's embedded local runner."""

import json
import re
import shutil

import pytest
import yaml

import pipeline
from components import images


@pytest.fixture(scope="module")
def ir(compiled_ir):
    return next(yaml.safe_load_all(compiled_ir.read_text()))  # 1st document: the pipeline spec


def _executor_images(ir) -> dict[str, str]:
    return {name.removeprefix("exec-"): spec["container"]["image"]
            for name, spec in ir["deploymentSpec"]["executors"].items()}


def test_ir_has_every_step_in_its_own_image_of_the_same_name(ir):
    found = _executor_images(ir)
    assert set(found) == {"ingest", "preprocess", "train", "evaluate", "select", "serve", "deploy"}
    for step, image in found.items():
        assert image == images.image(step), "task, image and @step share one name"
    assert len(set(found.values())) == len(found), "each step runs in its own image"


def test_ir_fans_evaluate_out_over_the_backend_parameter(ir):
    root = ir["root"]["dag"]["tasks"]
    assert {"ingest", "preprocess", "train", "select"} <= set(root)
    loop = next(t for t in root.values() if "parameterIterator" in t)
    assert loop["parameterIterator"]["items"]["inputParameter"].endswith("pipelinechannel--backends")
    loop_dag = ir["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert list(loop_dag) == ["evaluate"]
    defaults = ir["root"]["inputDefinitions"]["parameters"]["backends"]["defaultValue"]
    assert defaults == pipeline.DEFAULT_BACKENDS and {"eager", "onednn"} <= set(defaults)


def test_ir_installs_nothing_at_task_start(ir):
    for name, spec in ir["deploymentSpec"]["executors"].items():
        script = " ".join(spec["container"]["command"] + spec["container"].get("args", []))
        assert "pip install" not in script, name


def test_image_names_follow_the_env_file(monkeypatch):
    monkeypatch.setenv("IMAGE_REGISTRY", "ghcr.io/acme")
    monkeypatch.setenv("IMAGE_TAG", "abc123")
    assert images.image("train") == "ghcr.io/acme/gtsrb-train:abc123"
    with pytest.raises(KeyError, match="no image for step 'nope'"):
        images.image("nope")


@pytest.mark.slow
def test_run_local_end_to_end_on_synthetic_data(synthetic_root, tmp_path):
    summary = pipeline.run_local(str(synthetic_root), epochs=2, backends=["eager", "onednn"],
                                 output_dir=str(tmp_path), arch="lp", allow_download=False)
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["winner"] == summary["winner"] and written["winner"] in ("eager", "onednn")
    assert set(written["backends"]) == {"eager", "onednn"}
    for name, result in written["backends"].items():
        assert result["status"] == "ok" and result["test_images"] == 86
        assert result["agreement"] == 100.0 if name == "eager" else result["agreement"] >= 99.0
        assert 2.3 < result["accuracy"] <= 100
        for batch in ("batch1", "batch64"):
            lat = result["latency"][batch]
            assert 0 < lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["runs"] >= 50
    model_dir = tmp_path / "artifacts" / written["model"]["path"].split("/artifacts/")[1]
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["architecture"] == "lp" and card["weights_sha256"] == written["model"]["weights_sha256"]
    assert card["training"]["epochs_run"] == 2 and len(card["class_names"]) == 43
    report = next(tmp_path.glob("artifacts/*/select/report")).read_text()
    assert f"**Winner: `{written['winner']}`**" in report and "| eager |" in report.replace("**", "")


@pytest.mark.slow
def test_run_local_stops_at_a_corrupt_image_and_leaves_no_model(synthetic_root, tmp_path, capfd):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    bad = root / "gtsrb/GTSRB/Training/00003/00000_00001.ppm"
    bad.write_bytes(bad.read_bytes()[:40])
    code = pipeline.main(["run-local", "--data-dir", str(root), "--epochs", "1", "--backends", "eager",
                          "--output-dir", str(tmp_path / "out"), "--no-download"])
    out, err = capfd.readouterr()
    assert code == 1
    assert "run-local: " in err and "ingest" in err                       # the CLI's one-line verdict
    assert re.search(r"IngestError: .*Training/00003/00000_00001\.ppm", out + err)   # the task's error names the file
    assert not list((tmp_path / "out").glob("artifacts/*/train/model"))
    assert not list((tmp_path / "out").glob("artifacts/*/ingest/raw"))
    assert not (tmp_path / "out" / "summary.json").exists()


def test_run_local_rejects_unknown_backends(tmp_path):
    with pytest.raises(SystemExit, match="unknown backend"):
        pipeline.run_local(str(tmp_path), epochs=1, backends=["eager", "tpu"], output_dir=str(tmp_path))
