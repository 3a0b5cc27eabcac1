"""The pipeline graph: compiled IR, and whole runs on KFP's embedded local runner."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml

import pipeline
from components import images
from components.measure import SHORT_SPIN


@pytest.fixture(scope="module")
def ir(compiled_ir):
    return next(yaml.safe_load_all(compiled_ir.read_text()))  # 1st document: the pipeline spec


def _executor_images(ir) -> dict[str, str]:
    return {name.removeprefix("exec-"): spec["container"]["image"]
            for name, spec in ir["deploymentSpec"]["executors"].items()}


def test_ir_has_every_step_in_its_own_image_of_the_same_name(ir):
    found = _executor_images(ir)
    assert set(found) == {"ingest", "preprocess", "train", "evaluate", "select", "gate", "serve", "deploy"}
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
def test_run_local_on_the_sample_prints_one_line_per_task_then_the_table(sample_dir, tmp_path, capfd):
    """A newcomer's `make local`, small: under 40 lines (one per task with its duration and key
    figure, the table, the winner); kfp's executor output goes to OUTPUT_DIR/pipeline.log."""
    code = pipeline.main(["run-local", "--data-dir", str(sample_dir), "--epochs", "1", "--arch", "lp",
                          "--backends", "eager,onednn,onnxruntime", "--output-dir", str(tmp_path), "--no-download",
                          "--champion-dir", str(tmp_path / "champion")])
    out, err = capfd.readouterr()
    assert code == 0, out + err
    lines = (out + err).splitlines()
    assert len(lines) <= 40, out + err
    tasks = [re.match(r"\[ ?(\d)/9\] (.+?)\s+(\d+\.\d) s  (.+)$", line) for line in lines if line.startswith("[")]
    assert [m.group(2) for m in tasks] == ["ingest", "preprocess", "train", "evaluate eager", "evaluate onednn",
                                           "evaluate onnxruntime", "select", "gate", "serve"], out
    figures = {m.group(2): m.group(4) for m in tasks}
    assert re.fullmatch(r"1,\d{3} train \+ \d+ test images verified", figures["ingest"])
    assert re.fullmatch(r"1 epoch, best val accuracy \d+\.\d\d %", figures["train"])
    assert re.fullmatch(r"b1 median \d+\.\d{3} ms, accuracy \d+\.\d\d %", figures["evaluate onednn"])
    written = json.loads((tmp_path / "summary.json").read_text())
    assert figures["select"] == f"winner {written['winner']}" and f"winner: {written['winner']}" in out
    assert "answers like the artifact" in figures["serve"] and "| " not in out
    log = (tmp_path / "pipeline.log").read_text()
    assert "Executing task 'train'" in log and "train: epoch 1/1" in log and "\x1b[" not in log
    assert written["run"]["log"] == str(tmp_path / "pipeline.log")
    assert written["run"]["epochs"] == written["run"]["epochs_requested"] == 1

    assert set(written["backends"]) == {"eager", "onednn", "onnxruntime"}
    for name, result in written["backends"].items():
        assert result["status"] == "ok" and result["test_images"] == written["backends"]["eager"]["test_images"]
        assert result["agreement"] == 100.0 if name == "eager" else result["agreement"] >= 99.0
        assert result["openmp_env"] == SHORT_SPIN, "evaluate's OpenMP workers spin as briefly as bench's"
        for batch in ("batch1", "batch64"):
            lat = result["latency"][batch]
            assert 0 < lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"] and lat["runs"] >= 50
    model_dir = tmp_path / "artifacts" / written["model"]["path"].split("/artifacts/")[1]
    card = json.loads((model_dir / "model_card.json").read_text())
    assert card["architecture"] == "lp" and card["weights_sha256"] == written["model"]["weights_sha256"]
    assert card["training"]["epochs_run"] == 1 and card["calibration"]["images"] == 512
    assert written["serving"]["weights_sha256"] == card["weights_sha256"]
    # every evaluate task wrote what serving its backend loads; select handed the winner's on, byte for byte
    from components.artifact import ONNX_FILE, sha256_file, verified_card

    measured = written["backends"]["onnxruntime"]["served"]
    assert measured["format"] == "onnx" and measured["backend"] == "onnxruntime"
    evaluated = [verified_card(p) for p in tmp_path.glob("artifacts/*/**/evaluate/served")]
    assert sorted(c["serving"]["backend"] for c in evaluated) == ["eager", "onednn", "onnxruntime"]
    served = written["served"]
    assert served["backend"] == written["winner"] and served["path"].endswith("/select/served")
    assert served["sha256"] == written["backends"][written["winner"]]["served"]["sha256"]
    assert verified_card(served["path"])["serving"] == {k: served[k] for k in served if k not in ("uri", "path")}
    if written["winner"] == "onnxruntime":
        assert sha256_file(Path(served["path"]) / ONNX_FILE) == measured["sha256"]
    assert written["serving"]["backend"] == written["winner"]
    report = next(tmp_path.glob("artifacts/*/select/report")).read_text()
    assert f"**Winner: `{written['winner']}`**" in report and "| eager |" in report.replace("**", "")
    assert written["gate"]["decision"] == "promote" and written["gate"]["champion"] is None   # a fresh champion dir
    assert json.loads((tmp_path / "champion" / "champion.json").read_text())["weights_sha256"] == card["weights_sha256"]


@pytest.mark.slow
def test_run_local_stops_at_a_corrupt_image_and_leaves_no_model(synthetic_root, tmp_path, capfd):
    root = tmp_path / "root"
    shutil.copytree(synthetic_root, root)
    bad = root / "gtsrb/GTSRB/Training/00003/00000_00001.ppm"
    bad.write_bytes(bad.read_bytes()[:40])
    code = pipeline.main(["run-local", "--data-dir", str(root), "--epochs", "1", "--backends", "eager",
                          "--output-dir", str(tmp_path / "out"), "--no-download",
                          "--champion-dir", str(tmp_path / "champion")])
    out, err = capfd.readouterr()
    assert code == 1
    assert "run-local: " in err and "task ingest failed after" in err      # the CLI's verdict
    assert re.search(r"IngestError: .*Training/00003/00000_00001\.ppm", err)   # the task's last lines name the file
    assert f"full log (with the traceback): {tmp_path / 'out' / 'pipeline.log'}" in err
    assert len((out + err).splitlines()) <= 12                          # the error, not the traceback's frames
    assert "IngestError" in (tmp_path / "out" / "pipeline.log").read_text()
    assert not list((tmp_path / "out").glob("artifacts/*/train/model"))
    assert not list((tmp_path / "out").glob("artifacts/*/ingest/raw"))
    assert not (tmp_path / "out" / "summary.json").exists()
    assert not (tmp_path / "champion").exists()


def test_run_local_downloads_only_into_the_default_data_folder(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(pipeline, "run_local", lambda *args, **kw: calls.append(kw["allow_download"]))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DATA_DIR", raising=False)
    for argv in ([], ["--data-dir", "data"], ["--data-dir", str(tmp_path / "data")], ["--data-dir", "elsewhere"],
                 ["--no-download"]):
        assert pipeline.main(["run-local", *argv]) == 0
    assert calls == [True, True, True, False, False]


def test_run_local_with_a_wrong_data_dir_stops_before_anything_starts(synthetic_root, tmp_path):
    deep = synthetic_root / "gtsrb"
    before = sorted(deep.rglob("*"))
    with pytest.raises(SystemExit, match=f"^run-local: data folder {deep} does not hold GTSRB: .*; found "
                                         f"GT-final_test.csv, GTSRB/; that is 1 level too deep: use {synthetic_root}$"):
        pipeline.main(["run-local", "--data-dir", str(deep), "--output-dir", str(tmp_path / "out")])
    assert sorted(deep.rglob("*")) == before and not (tmp_path / "out").exists()


def test_the_train_line_says_how_many_epochs_ran_and_why():
    history = [{"train_accuracy": 61.234}]
    card = {"epochs_run": 30, "stopped_by_time_budget": False, "val_accuracy": None, "history": history}
    assert pipeline.training_figure(card) == "30 epochs, no validation split, final train accuracy 61.23 % (augmented)"
    card.update(epochs_run=1, stopped_by_time_budget=True, val_accuracy=97.5)
    assert pipeline.training_figure(card) == "1 epoch, stopped by the time budget, best val accuracy 97.50 %"


def test_a_progress_line_and_the_results_table_show_the_same_accuracy():
    from components.selection import results_table

    accuracy = 100 * 619 / 817                  # 75.76499...: rounded to 4 decimals first, it showed 75.77
    result = {"backend": "eager", "status": "ok", "accuracy": accuracy, "agreement": 100.0,
              "latency": {"batch1": {"median_ms": 0.1234}, "batch64": {"median_ms": 2.5}}, "verdict": "winner"}
    assert pipeline.evaluation_figure(result) == "b1 median 0.123 ms, accuracy 75.76 %"
    row = results_table({"backends": {"eager": result}}).splitlines()[1].split()
    assert row[:3] == ["eager", "75.76", "100.00"]
    assert pipeline.evaluation_figure({"status": "skipped", "reason": "needs AVX512-BF16"}) == \
        "skipped (the table below says why)"


def submitted_parameters(monkeypatch, *make_args) -> dict:
    """The parameters `make pipeline ...` hands to pipeline.py submit, through make and bash as run."""
    import shlex
    import subprocess

    out = subprocess.run(["make", "--no-print-directory", "-n", "pipeline", *make_args], cwd=pipeline.ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    joined = out.replace("\\\n", " ")                             # the recipe's continued lines as one
    command = joined[joined.index("pipeline.py submit"):].split("\n", 1)[0]
    called = {}
    monkeypatch.setattr(pipeline, "submit", lambda args, params: called.update(params) or 0)
    assert pipeline.main(shlex.split(command)[1:]) == 0
    return called


def test_make_pipeline_passes_backends_and_quoted_json_to_submit(monkeypatch):
    both = ["eager", "onnxruntime"]
    assert submitted_parameters(monkeypatch, "BACKENDS=eager,onnxruntime")["backends"] == both
    quoted = submitted_parameters(monkeypatch, "PIPELINE_ARGS=--arg max_regression=0.5 "
                                               "--arg 'backends=[\"eager\",\"onnxruntime\"]'")
    assert quoted == {"backends": both, "max_regression": 0.5, "deploy_target": "kserve"}
    with pytest.raises(SystemExit, match=r'^submit: backends="\[eager,onnxruntime\]": expected a JSON list'):
        submitted_parameters(monkeypatch, 'PIPELINE_ARGS=--arg backends=["eager","onnxruntime"]')   # quotes lost


@pytest.mark.parametrize("arguments, message", [
    (["--arg", "backends=[\"eager\",\"onnx\"]"], r"unknown backend\(s\) \['onnx'\]; known: eager, "),
    (["--backends", "eager,tpu"], r"unknown backend\(s\) \['tpu'\]"),
    (["--backends", "eager", "--arg", "backends=[\"eager\"]"], "give the backends once"),
    (["--arg", "epoch=3"], "unknown pipeline parameter 'epoch'; known: data_dir, "),
    (["--arg", "epochs=3x"], 'epochs="3x": expected a JSON integer$'),
    (["--arg", "force_deploy=1"], "force_deploy=1: expected a JSON boolean"),
    (["--arg", "max_regression=true"], "max_regression=true: expected a JSON float"),
    (["--arg", "deploy_target=kserv"], "deploy_target='kserv': expected one of local, kserve"),
    (["--arg", "backends=[]"], "backends is empty"),
])
def test_submit_checks_its_parameters_before_anything_else(arguments, message, monkeypatch):
    monkeypatch.setattr(pipeline, "submit", lambda args, params: pytest.fail("submitted"))
    with pytest.raises(SystemExit, match=f"^submit: {message}"):
        pipeline.main(["submit", *arguments])


@pytest.mark.parametrize("value, forced", [("1", True), ("true", True), ("yes", True), ("0", False),
                                           ("false", False), ("no", False), ("", False)])
def test_make_local_forces_deploy_only_when_told_yes(value, forced):
    import subprocess

    out = subprocess.run(["make", "--no-print-directory", "-n", "local", f"FORCE_DEPLOY={value}"], cwd=pipeline.ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert ("--force-deploy" in out) is forced and "pipeline.py run-local" in out
    assert len(out.splitlines()) == 1 and "  " not in out, "make echoes one command line, no blank continuations"


def test_make_local_refuses_a_force_deploy_value_it_does_not_know():
    import subprocess

    done = subprocess.run(["make", "-n", "local", "FORCE_DEPLOY=ture"], cwd=pipeline.ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "FORCE_DEPLOY=ture: use 1, true or yes for --force-deploy" in done.stderr


@pytest.mark.parametrize("value, verbose", [("1", True), ("yes", True), ("0", False), ("", False)])
def test_make_local_streams_the_log_when_told_verbose(value, verbose):
    import subprocess

    out = subprocess.run(["make", "--no-print-directory", "-n", "local", f"VERBOSE={value}"], cwd=pipeline.ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    assert ("--verbose" in out) is verbose and len(out.splitlines()) == 1


def test_run_local_rejects_unknown_backends(tmp_path):
    with pytest.raises(SystemExit, match="unknown backend"):
        pipeline.run_local(str(tmp_path), epochs=1, backends=["eager", "tpu"], output_dir=str(tmp_path))


@pytest.mark.slow
def test_run_local_gate_promotes_keeps_and_forces_on_the_sample(sample_dir, tmp_path, capfd):
    """Issue 15's check: a fresh champion dir -> 3 epochs promote; 1 epoch keep (exit 0, the champion
    unchanged, nothing served); 1 epoch --force-deploy promote."""
    champion = tmp_path / "champion"

    def run(epochs, *extra):
        out = tmp_path / f"out-{epochs}{'-'.join(extra)}"
        code = pipeline.main(["run-local", "--data-dir", str(sample_dir), "--epochs", str(epochs), "--backends",
                              "eager", "--output-dir", str(out), "--champion-dir", str(champion), "--no-download",
                              *extra])
        printed = capfd.readouterr().out
        return code, json.loads((out / "summary.json").read_text()), printed

    def champion_sha():
        return json.loads((champion / "champion.json").read_text())["weights_sha256"]

    code, first, printed = run(3)
    assert code == 0 and first["gate"]["decision"] == "promote" and first["gate"]["champion"] is None
    assert champion_sha() == first["model"]["weights_sha256"] and "serving" in first
    assert "gate: promote — no champion" in printed

    code, second, printed = run(1)
    gate = second["gate"]
    assert code == 0 and gate["decision"] == "keep", gate["reason"]
    assert champion_sha() == first["model"]["weights_sha256"], "the champion is unchanged"
    assert "serving" not in second and not list((tmp_path / "out-1").glob("artifacts/*/serve"))
    assert gate["champion"]["weights_sha256"] == first["model"]["weights_sha256"]
    assert gate["champion"]["same_test_split"] and gate["champion"]["accuracy"] == pytest.approx(
        first["gate"]["challenger"]["accuracy"])
    assert gate["challenger"]["accuracy"] < gate["champion"]["accuracy"]
    assert f"gate: keep — {gate['reason']}" in printed and "(unchanged)" in printed
    assert re.search(r"^\[7/7\] serve +skipped  the gate kept the champion", printed, re.MULTILINE)

    code, third, printed = run(1, "--force-deploy")
    assert code == 0 and third["gate"]["decision"] == "promote"
    assert third["gate"]["reason"].startswith("force_deploy: promoted although the gate says keep")
    assert champion_sha() == third["model"]["weights_sha256"] != first["model"]["weights_sha256"]
