"""The served artifact (components/served.py, components/artifact.py) and the torch-free ONNX predictor:
the file an evaluation measured is what the server loads, byte for byte; numpy preprocessing
equals the torch training transform; an ONNX server process imports no torch."""

import base64
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as tv

from components import backends
from components.artifact import CARD_FILE, ONNX_FILE, SERVING, ModelArtifactError, sha256_file, verified_card
from components.model import load_model_artifact
from components.served import export_served, write_served
from components.serving.model import GTSRBModel, prepare_served, top_classes

ONNX_BACKENDS = [n for n, b in backends.BACKENDS.items() if b.exports == "onnx"]


def v1_images(*files) -> dict:
    return {"instances": [{"image": {"b64": base64.b64encode(f.read_bytes()).decode()}} for f in files]}


# --------------------------------------------------------------------------- the served artifact
def test_an_onnx_backend_serves_the_very_file_its_preparation_ran(trained_model, tmp_path):
    """The served artifact holds the file the measured session was created from (sha256 equal),
    with no weights and no calibration sample: nothing to export or quantize at start."""
    net, card = load_model_artifact(trained_model)
    spec = backends.get("onnxruntime")
    predict = spec.prepare(net, torch.zeros(4, 3, 32, 32))
    served = write_served(tmp_path / "served", trained_model, "onnxruntime", predict)
    assert sorted(p.name for p in (tmp_path / "served").iterdir()) == [ONNX_FILE, CARD_FILE]
    assert served[SERVING]["sha256"] == sha256_file(predict.exported) == sha256_file(tmp_path / "served" / ONNX_FILE)
    assert served[SERVING]["backend"] == "onnxruntime" and served[SERVING]["format"] == "onnx"
    assert served["weights_sha256"] == card["weights_sha256"], "the weights it was made from"
    assert "weights_file" not in served and "calibration" not in served
    assert verified_card(tmp_path / "served") == served


def test_a_torch_backend_serves_the_model_artifact_files(trained_model, tmp_path):
    net, card = load_model_artifact(trained_model)
    predict = backends.get("eager").prepare(net, torch.zeros(1, 3, 32, 32))
    served = write_served(tmp_path / "served", trained_model, "eager", predict)
    assert served[SERVING] == {"backend": "eager", "format": "torch", "file": card["weights_file"],
                               "sha256": card["weights_sha256"]}
    for name in ("model.pt", "calibration.pt"):
        assert sha256_file(tmp_path / "served" / name) == sha256_file(trained_model / name)


def test_a_served_onnx_file_that_changed_refuses_to_start(served_onnx, tmp_path):
    changed = tmp_path / "changed"
    shutil.copytree(served_onnx["onnxruntime"], changed)
    with open(changed / ONNX_FILE, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\0" * 8)
    with pytest.raises(ModelArtifactError, match="model.onnx: sha256 .* does not match the model card"):
        GTSRBModel("gtsrb", str(changed), "onnxruntime")


def test_an_artifact_is_served_only_with_the_backend_it_was_exported_for(served_onnx, trained_model):
    with pytest.raises(ModelArtifactError, match="exported for backend 'onnxruntime-int8', not 'onnxruntime'"):
        GTSRBModel("gtsrb", str(served_onnx["onnxruntime-int8"]), "onnxruntime")
    with pytest.raises(ModelArtifactError, match="not the expected"):
        GTSRBModel("gtsrb", str(served_onnx["onnxruntime"]), "onnxruntime", expected_sha256="0" * 64)
    with pytest.raises(ModelArtifactError, match="serves the onnx file its evaluation measured"):
        GTSRBModel("gtsrb", str(trained_model), "onnxruntime")      # no export at start-up


def test_an_int8_export_needs_the_calibration_sample(uncalibrated_model, tmp_path):
    with pytest.raises(ModelArtifactError, match="names no calibration sample"):
        export_served(uncalibrated_model, "onnxruntime-int8", tmp_path / "served")
    assert not (tmp_path / "served").exists() and not (tmp_path / "served.partial").exists()


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_the_served_file_answers_like_the_backend_in_process(served_onnx, trained_model, sample_dir, backend):
    """The ONNX server's logits are the registry backend's own on the same images (the evaluated
    predictions), and its answers are their softmax."""
    files = sorted((sample_dir / "gtsrb" / "GTSRB" / "Final_Test" / "Images").glob("*.ppm"))[:16]
    served = GTSRBModel("gtsrb", str(served_onnx[backend]), backend, max_batch=16)
    batch = served.preprocess(v1_images(*files))
    run, _ = prepare_served(served_onnx[backend], backend)
    net, card = load_model_artifact(trained_model)
    spec = backends.get(backend)
    calibration = None
    if spec.needs_calibration:
        from components.model import calibration_images
        calibration = calibration_images(trained_model, card)
    in_process = spec.prepare(net, torch.zeros(1, 3, 32, 32), calibration=calibration)
    expected = in_process(torch.from_numpy(batch.x)).numpy()
    np.testing.assert_allclose(run(batch.x), expected, atol=1e-5)
    answers = served.predict(batch)["predictions"]
    probabilities = torch.softmax(torch.from_numpy(expected), dim=1)
    assert [a["class_id"] for a in answers] == probabilities.argmax(1).tolist()
    assert [a["probability"] for a in answers] == pytest.approx(probabilities.max(1).values.tolist(), abs=1e-5)


def test_top_classes_is_torchs_softmax_and_topk():
    logits = np.random.default_rng(0).normal(size=(5, 43)).astype(np.float32) * 8
    ids, probabilities = top_classes(logits, 3)
    expected = torch.softmax(torch.from_numpy(logits), dim=1).topk(3, dim=1)
    assert ids.tolist() == expected.indices.tolist()
    np.testing.assert_allclose(probabilities, expected.values.numpy(), atol=1e-7)
    assert np.isfinite(top_classes(np.full((1, 43), 1e30, dtype=np.float32), 43)[1]).all()


# --------------------------------------------------------------------------- numpy = torch preprocessing
def test_numpy_preprocessing_equals_the_torch_transform_on_every_sample_test_image(served_onnx, trained_model,
                                                                                   sample_dir):
    """Decode, RGB, bilinear 32x32, normalize in numpy/PIL (the predictor's ONNX path) vs
    torchvision's Resize + ToTensor + Normalize: at most 1e-5 apart per value, and the network's
    top-1 is the same on both."""
    files = sorted((sample_dir / "gtsrb" / "GTSRB" / "Final_Test" / "Images").glob("*.ppm"))
    assert len(files) > 800
    served = GTSRBModel("gtsrb", str(served_onnx["onnxruntime"]), "onnxruntime", max_batch=64)
    net, card = load_model_artifact(trained_model)
    torch_transform = tv.Compose([tv.Resize((32, 32)), tv.ToTensor(),
                                  tv.Normalize(card["normalization"]["mean"], card["normalization"]["std"])])
    worst, top1_numpy, top1_torch = 0.0, [], []
    for i in range(0, len(files), 64):
        chunk = files[i:i + 64]
        x = served.preprocess(v1_images(*chunk)).x
        reference = torch.stack([torch_transform(Image.open(f).convert("RGB")) for f in chunk])
        worst = max(worst, float(np.abs(x - reference.numpy()).max()))
        with torch.no_grad():
            top1_numpy += net(torch.from_numpy(x)).argmax(1).tolist()
            top1_torch += net(reference).argmax(1).tolist()
    assert worst <= 1e-5, worst
    assert top1_numpy == top1_torch


# --------------------------------------------------------------------------- no torch in an ONNX server
NO_TORCH = """
import base64, pickle, sys
from components.serving.check import sample_images
from components.serving.model import GTSRBModel
from components.serving.server import ServerSettings

parent = GTSRBModel("gtsrb", sys.argv[1], sys.argv[2], max_batch=4, server=ServerSettings())
worker = pickle.loads(pickle.dumps(parent))          # what a spawned server worker receives
worker.load()
body = {"instances": [{"image": {"b64": base64.b64encode(i).decode()}} for i in sample_images()]}
assert worker.predict(worker.preprocess(body)) == parent.predict(parent.preprocess(body))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "onnx", "onnxscript"))
maps = [line for line in open("/proc/self/maps") if "libtorch" in line or "libc10" in line]
print(len(heavy), len(maps), heavy[:5])
"""


@pytest.mark.parametrize("backend", ONNX_BACKENDS)
def test_an_onnx_server_process_imports_no_torch(served_onnx, backend):
    result = subprocess.run([sys.executable, "-c", NO_TORCH, str(served_onnx[backend]), backend],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[:2] == ["0", "0"], result.stdout
