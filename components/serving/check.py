"""The smoke check: a running predictor must answer exactly like the same artifact run in-process.

It sends V1 (three encoded images of different formats and sizes, plus one already normalized
array), V2 (BYTES and FP32) and one bad request; every top-5 class and probability must match
the in-process model within PROBABILITY_TOLERANCE, and the bad request must be a 400. Used by
the serve step (a local predictor), the deploy step (the InferenceService's URL) and the tests.
"""

from __future__ import annotations

import base64
import io

from components.serving.client import MODEL_NAME, SmokeTestFailed, image_instances, local_predictor, post_json

TOP_K = 5
PROBABILITY_TOLERANCE = 1e-4


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
    from components.serving.model import GTSRBModel

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


def serve_and_check(model_dir: str, backend: str, workers: int = 0) -> dict:
    """Serve this artifact locally with the predictor and check it against the artifact in-process."""
    with local_predictor(model_dir, backend, workers) as served:
        result = check_endpoint(served.url, model_dir, backend)
    return {**result, "startup_seconds": round(served.startup_seconds, 1), "workers": workers or "one per CPU"}
