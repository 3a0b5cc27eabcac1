"""Step 4 — evaluate: one backend, measured on the test split.

Per backend: test accuracy; top-1 agreement with the fp32 ``eager`` reference (computed in the
same process); a confusion matrix; the preparation cost (export / quantization / compilation);
latency at batch 1 and batch 64 — ``runs`` (≥ 50) timed runs of the same batch in ``ROUNDS``
rounds (``components.measure``): median of the round medians, p90, p99 and throughput — with a
fixed, recorded thread count. A backend that is unavailable here, or that does not compute in the
precision it names (checked when it is prepared), is reported as skipped with its reason.

Accuracy passes run in batches of ``EVAL_BATCH`` (the last one padded), so a shape-specialising
backend (``compile``) only ever sees the two latency batch sizes.
"""


import json
import os
import platform
import time
from dataclasses import dataclass
from functools import cached_property
from importlib import metadata
from pathlib import Path

import torch
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import backends
from components.kfp_step import step
from components.measure import PINNED_THREADS, batch_of, interleaved, latency_stats
from components.model import NUM_CLASSES, calibration_images, load_model_artifact, normalize
from components.preprocess import load_split
from components.runtime import set_threads

LATENCY_BATCHES = (1, 64)
EVAL_BATCH = 64
MIN_RUNS = 50
ROUNDS = 10          # timed runs come in this many rounds; the latency is the median of the round medians
WARMUP = 3           # untimed runs before each round's timed runs


@dataclass
class EvalData:
    model: torch.nn.Module
    card: dict
    x: torch.Tensor                  # normalized test images
    y: torch.Tensor                  # test labels
    model_dir: Path

    @cached_property
    def calibration(self) -> torch.Tensor:
        """The artifact's calibration sample (normalized), read on first use: the images every
        evaluation and the server calibrate int8 backends with."""
        return calibration_images(self.model_dir, self.card)


def load_eval_data(model_dir: str | Path, data_dir: str | Path) -> EvalData:
    model, card = load_model_artifact(model_dir)
    test = load_split(data_dir, "test")
    norm = card["normalization"]
    return EvalData(model, card, normalize(test["images"], norm["mean"], norm["std"]), test["labels"], Path(model_dir))


def predict_all(predict, x: torch.Tensor, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Top-1 class of every image, in chunks of exactly ``batch`` (the last chunk padded)."""
    out = []
    for i in range(0, len(x), batch):
        chunk = x[i:i + batch]
        n = len(chunk)
        if n < batch:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
        out.append(predict(chunk.contiguous()).argmax(1)[:n])
    return torch.cat(out)


def time_latency(predict, x: torch.Tensor, flops_per_image: int | None, runs: int = MIN_RUNS,
                 warmup: int = WARMUP) -> dict:
    """Latency at each of LATENCY_BATCHES: ``runs`` timed runs per batch size in ROUNDS rounds,
    the batch sizes alternating round by round (``warmup`` untimed runs before each)."""
    samples = {b: batch_of(x, b) for b in LATENCY_BATCHES}
    times = interleaved({"": predict}, samples, ROUNDS, -(-runs // ROUNDS), warmup)
    return {f"batch{b}": latency_stats(times["", b], b, flops_per_image) for b in LATENCY_BATCHES}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> list[list[int]]:
    flat = labels * NUM_CLASSES + predictions
    return torch.bincount(flat, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES).tolist()


def quality(predictions: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy and agreement with the reference, in percent."""
    return {"accuracy": 100.0 * (predictions == labels).float().mean().item(),
            "agreement": 100.0 * (predictions == reference).float().mean().item(),
            "reference_accuracy": 100.0 * (reference == labels).float().mean().item(),
            "test_images": len(labels)}


def describe(name: str) -> dict:
    """The registry's facts about a backend, as they go into every result."""
    spec = backends.get(name)
    return {"backend": name, "description": spec.description, "enabled_by": spec.enabled_by,
            "precision": spec.precision, "needs_calibration": spec.needs_calibration}


def skipped(name: str, reason: str | None = None) -> dict | None:
    """A skipped result if ``name`` cannot run here (or ``reason`` says why it did not), else None."""
    reason = reason or backends.get(name).unavailable()
    if reason is None:
        return None
    print(f"evaluate: {name}: skipped ({reason})", flush=True)
    return {**describe(name), "status": "skipped", "reason": reason}


def prepare_timed(name: str, data: EvalData) -> tuple[object, float]:
    spec = backends.get(name)
    start = time.perf_counter()
    predict = spec.prepare(data.model, batch_of(data.x, EVAL_BATCH),
                           data.calibration if spec.needs_calibration else None)
    return predict, time.perf_counter() - start


def reference_predictions(data: EvalData) -> torch.Tensor:
    """Top-1 classes of the fp32 reference backend on the test split."""
    reference = backends.get(backends.REFERENCE).prepare(data.model, batch_of(data.x, EVAL_BATCH))
    return predict_all(reference, data.x)


def prepare_and_score(name: str, data: EvalData, reference: torch.Tensor,
                      threads: int) -> tuple[object, torch.Tensor, dict]:
    """Prepare backend ``name`` and score it on the test split: (predict, predictions, result
    without latency); (None, None, skipped result) if preparing showed it cannot run as described
    (e.g. it does not compute in its precision)."""
    try:
        predict, seconds = prepare_timed(name, data)
    except backends.BackendUnavailable as e:
        return None, None, skipped(name, str(e))
    predictions = predict_all(predict, data.x)
    needs_calibration = backends.get(name).needs_calibration
    result = {**describe(name), "status": "ok", **quality(predictions, reference, data.y), **environment(threads),
              "prepare_seconds": seconds, "flops_per_image": data.card.get("flops_per_image"),
              "calibration_images": len(data.calibration) if needs_calibration else 0}
    return predict, predictions, result


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def environment(threads: int) -> dict:
    """What the latency figures depend on beyond the code: threads, machine, versions, and the
    OpenMP settings of this process (components/measure.py; absent = the runtime's defaults)."""
    return {"threads": threads, "machine": platform.machine(), "torch_version": torch.__version__,
            "onnxruntime_version": _version("onnxruntime"),
            "openmp_env": {k: os.environ[k] for k in PINNED_THREADS if k in os.environ}}


def evaluate_backend(model_dir: str, data_dir: str, backend: str, threads: int = 0, runs: int = MIN_RUNS,
                     warmup: int = WARMUP, served_dir: str | None = None) -> dict:
    """Measure ``backend``; returns a JSON-serialisable result (status ok or skipped). With
    ``served_dir``, a backend that ran also writes its served artifact there (components/served.py:
    for ONNX Runtime, the very file measured)."""
    if runs < MIN_RUNS:
        raise ValueError(f"runs={runs}: latency needs at least {MIN_RUNS} timed runs")
    result = skipped(backend)
    if result:
        return result
    threads = set_threads(threads or None)
    data = load_eval_data(model_dir, data_dir)
    predict, predictions, result = prepare_and_score(backend, data, reference_predictions(data), threads)
    if predict is None:
        return result
    latency = time_latency(predict, data.x, result["flops_per_image"], runs, warmup)
    result.update(latency=latency, confusion_matrix=confusion_matrix(data.y, predictions))
    if served_dir:
        from components.served import write_served

        result["served"] = write_served(served_dir, model_dir, backend, predict)["serving"]
    print(f"evaluate: {backend}: accuracy {result['accuracy']:.2f}% agreement {result['agreement']:.2f}% "
          f"prepare {result['prepare_seconds']:.1f}s "
          + " ".join(f"b{v['batch']} median {v['median_ms']:.3f} ms p99 {v['p99_ms']:.3f} ms"
                     for v in latency.values()), flush=True)
    return result


def write_result(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


@step("evaluate")
def evaluate(model: Input[Model], data: Input[Dataset], backend: str, result: Output[Artifact],
             metrics: Output[Metrics], confusion: Output[ClassificationMetrics], served: Output[Model]):
    """Accuracy, agreement with fp32 eager, confusion matrix and latency for one backend, and
    what serving it loads (``served``: for ONNX Runtime, the file measured)."""
    import os

    from components.evaluate import evaluate_backend, write_result
    from components.model import CLASS_NAMES

    outcome = evaluate_backend(model.path, data.path, backend, served_dir=served.path)
    write_result(outcome, result.path)
    result.metadata.update(backend=backend, status=outcome["status"])
    if outcome["status"] != "ok":
        os.makedirs(served.path, exist_ok=True)      # nothing to serve: an empty artifact
        metrics.log_metric("skipped", 1)
        return
    served.metadata.update(backend=backend, format=outcome["served"]["format"], sha256=outcome["served"]["sha256"])
    for key in ("accuracy", "agreement", "reference_accuracy", "prepare_seconds", "threads"):
        metrics.log_metric(key, round(outcome[key], 4))
    for name, lat in outcome["latency"].items():
        for key in ("median_ms", "p90_ms", "p99_ms", "images_per_second"):
            metrics.log_metric(f"{name}_{key}", round(lat[key], 4))
    confusion.log_confusion_matrix(list(CLASS_NAMES), outcome["confusion_matrix"])
