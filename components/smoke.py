"""Smoke test of a served model: a running predictor must answer exactly like the same artifact
run in-process. Used by the pipeline's last step (local: start the predictor on 127.0.0.1, check,
stop) and by the deploy step (check the InferenceService's URL), and by `make predict`.

    python -m components.smoke predict IMAGE [--url http://127.0.0.1:8080] [--top-k 3]
    python -m components.smoke check [--summary runs/latest/summary.json]

The check sends V1 (three encoded images of different formats and sizes, plus one already
normalized array), V2 (BYTES and FP32) and one bad request; every top-5 class and probability
must match the in-process model within PROBABILITY_TOLERANCE, and the bad request must be a 400.
"""


import argparse
import base64
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Input, Model, Output

from components import cluster
from components.kfp_step import step

MODEL_NAME = cluster.INFERENCE_SERVICE
TOP_K = 5
PROBABILITY_TOLERANCE = 1e-4
STARTUP_SECONDS = 180
REQUEST_SECONDS = 30


class SmokeTestFailed(RuntimeError):
    pass


# --------------------------------------------------------------------------- HTTP
def post_json(url: str, body: dict, timeout: float = REQUEST_SECONDS) -> tuple[int, dict]:
    """POST a JSON body; (status, decoded JSON answer), for 4xx/5xx answers too."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def is_ready(base_url: str, model_name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v2/models/{model_name}/ready", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def image_instances(images: list[bytes]) -> list[dict]:
    return [{"image": {"b64": base64.b64encode(data).decode()}} for data in images]


# --------------------------------------------------------------------------- the check
def sample_images() -> list[bytes]:
    """Three deterministic images: PPM 40x44, PNG 64x48, JPEG 96x96 (sizes and formats clients send)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for fmt, (w, h) in (("PPM", (40, 44)), ("PNG", (64, 48)), ("JPEG", (96, 96))):
        pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        pixels[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 256, size=3, dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        out.append(buffer.getvalue())
    return out


def _compare(where: str, served: list[tuple[int, float]], expected: list[tuple[int, float]]) -> float:
    """Served vs in-process top-k as (class id, probability); returns the largest probability gap."""
    served_p, expected_p = dict(served), dict(expected)
    if served[0][0] != expected[0][0] or set(served_p) != set(expected_p):
        raise SmokeTestFailed(f"{where}: served top-{len(served)} {served} but the artifact in-process "
                              f"gives {expected}")
    gap = max(abs(served_p[c] - expected_p[c]) for c in expected_p)
    if gap > PROBABILITY_TOLERANCE:
        raise SmokeTestFailed(f"{where}: probabilities differ by {gap:.2e} (> {PROBABILITY_TOLERANCE}): "
                              f"served {served}, in-process {expected}")
    return gap


def _v1_top(prediction: dict) -> list[tuple[int, float]]:
    return [(t["class_id"], t["probability"]) for t in prediction["top_k"]]


def _v2_top(answer: dict, k: int) -> list[list[tuple[int, float]]]:
    outputs = {o["name"]: o["data"] for o in answer["outputs"]}
    ids, probs = outputs["top_k_class_id"], outputs["top_k_probability"]
    return [list(zip(ids[i:i + k], probs[i:i + k], strict=True)) for i in range(0, len(ids), k)]


def check_endpoint(base_url: str, model_dir: str, backend: str, model_name: str = MODEL_NAME) -> dict:
    """Compare a running predictor at ``base_url`` with the artifact in-process; raises SmokeTestFailed."""
    from components.predictor import GTSRBModel

    reference = GTSRBModel(model_name, model_dir, backend)
    images = sample_images()
    v1_body = {"instances": image_instances(images), "parameters": {"top_k": TOP_K}}
    batch = reference.preprocess(v1_body)
    normalized = batch.x[0].tolist()
    expected = [_v1_top(p) for p in reference.predict(batch)["predictions"]]
    v1_url = f"{base_url}/v1/models/{model_name}:predict"
    v2_url = f"{base_url}/v2/models/{model_name}/infer"
    top = {"top_k": TOP_K}
    calls = {
        "v1 images": (v1_url, v1_body, lambda a: [_v1_top(p) for p in a["predictions"]], expected),
        "v1 array": (v1_url, {"instances": [normalized], "parameters": top},
                     lambda a: [_v1_top(p) for p in a["predictions"]], expected[:1]),
        "v2 BYTES": (v2_url, {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                                          "data": [base64.b64encode(d).decode() for d in images]}],
                              "parameters": top}, lambda a: _v2_top(a, TOP_K), expected),
        "v2 FP32": (v2_url, {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                         "data": normalized}], "parameters": top},
                    lambda a: _v2_top(a, TOP_K), expected[:1]),
    }
    gaps = {}
    for name, (url, body, extract, want) in calls.items():
        status, answer = post_json(url, body)
        if status != 200:
            raise SmokeTestFailed(f"{name}: HTTP {status} from {url}: {answer}")
        served = extract(answer)
        if len(served) != len(want):
            raise SmokeTestFailed(f"{name}: {len(served)} answers for {len(want)} instances")
        gaps[name] = max(_compare(f"{name} [{i}]", s, w) for i, (s, w) in enumerate(zip(served, want, strict=True)))
    status, answer = post_json(v1_url, {"instances": []})
    if status != 400 or "error" not in answer:
        raise SmokeTestFailed(f"an empty 'instances' list got HTTP {status} {answer}, expected 400 with an error")
    return {"url": base_url, "model_name": model_name, "backend": backend,
            "weights_sha256": reference.weights_sha256, "checks": sorted(gaps) + ["v1 bad request -> 400"],
            "max_probability_gap": max(gaps.values()),
            "first_image": {"class_id": expected[0][0][0], "probability": expected[0][0][1]}}


# --------------------------------------------------------------------------- local serving
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predictor_command(model_dir: str, backend: str, port: int, workers: int = 0) -> list[str]:
    return [sys.executable, "-m", "components.predictor", f"--model_dir={model_dir}", f"--backend={backend}",
            f"--model_name={MODEL_NAME}", f"--http_port={port}", f"--workers={workers}"]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@dataclass
class LocalPredictor:
    url: str
    process: subprocess.Popen
    log: Path
    startup_seconds: float


@contextmanager
def local_predictor(model_dir: str, backend: str, workers: int = 0, extra_args: tuple = (),
                    startup_seconds: float = STARTUP_SECONDS):
    """Run the predictor (KServe ModelServer) on a free port, wait until the model is ready, yield,
    and always stop it. Its log goes to a temporary file (quoted when it fails to start)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="predictor-") as tmp:
        log_path = Path(tmp) / "predictor.log"
        start = time.monotonic()
        with open(log_path, "wb") as log:
            process = subprocess.Popen([*predictor_command(model_dir, backend, port, workers), *extra_args],
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            while not is_ready(url, MODEL_NAME):
                if process.poll() is not None or time.monotonic() - start > startup_seconds:
                    state = f"exited with {process.returncode}" if process.returncode is not None else "is not ready"
                    raise SmokeTestFailed(f"predictor {state} after {time.monotonic() - start:.0f}s; log tail:\n"
                                          f"{log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.5)
            yield LocalPredictor(url, process, log_path, time.monotonic() - start)
        finally:
            stop(process)


def serve_and_check(model_dir: str, backend: str, workers: int = 0) -> dict:
    """Serve this artifact locally with the predictor and check it against the artifact in-process."""
    with local_predictor(model_dir, backend, workers) as served:
        result = check_endpoint(served.url, model_dir, backend)
    return {**result, "startup_seconds": round(served.startup_seconds, 1), "workers": workers or "one per CPU"}


@step("serve")
def smoke(model: Input[Model], data: Input[Dataset], backend: str, result: Output[Artifact]) -> str:
    """Serve the winner with the KServe predictor on 127.0.0.1 and check its answers (``data``
    supplies the calibration images when the winner needs them)."""
    import json
    import tempfile

    from components.predictor import serving_bundle
    from components.smoke import serve_and_check

    with tempfile.TemporaryDirectory() as tmp:
        outcome = serve_and_check(serving_bundle(model.path, data.path, backend, f"{tmp}/model"), backend)
    with open(result.path, "w") as f:
        json.dump(outcome, f, indent=2)
    print(f"smoke: {backend} served at {outcome['url']} answers like the artifact "
          f"(max probability gap {outcome['max_probability_gap']:.1e}; {', '.join(outcome['checks'])})")
    return outcome["url"]


# --------------------------------------------------------------------------- CLI
def print_answer(image: Path, status: int, answer: dict) -> None:
    if status != 200:
        print(f"{image.name}: HTTP {status}: {answer.get('error', answer)}")
        return
    prediction = answer["predictions"][0]
    print(f"{image.name}: class {prediction['class_id']} \"{prediction['class_name']}\" "
          f"probability {prediction['probability']:.4f}")
    for t in prediction.get("top_k", [])[1:]:
        print(f"  then class {t['class_id']} \"{t['class_name']}\" probability {t['probability']:.4f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="send one image to a running predictor and print the answer")
    p.add_argument("image", type=Path)
    p.add_argument("--url", default=os.environ.get("PREDICTOR_URL", "http://127.0.0.1:8080"))
    p.add_argument("--model-name", default=MODEL_NAME)
    p.add_argument("--top-k", type=int, default=3)
    c = sub.add_parser("check", help="serve the latest run-local model locally and smoke-test it")
    c.add_argument("--summary", default="runs/latest/summary.json")
    args = parser.parse_args(argv)
    if args.command == "predict":
        body = {"instances": image_instances([args.image.read_bytes()]), "parameters": {"top_k": args.top_k}}
        status, answer = post_json(f"{args.url}/v1/models/{args.model_name}:predict", body)
        print_answer(args.image, status, answer)
        return 0 if status == 200 else 1
    from components.predictor import serving_target

    print(json.dumps(serve_and_check(*serving_target(args.summary)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
