"""Step 4 — evaluate: one backend, measured on the test split.

Accuracy, top-1 agreement with the fp32 ``eager`` reference, a confusion matrix, and
latency at batch 1 and batch 64 (warm-up, then timed runs: median / p90 / p99) with a fixed
thread count. A backend that is unavailable here is reported as skipped with its reason.
"""


import json
import statistics
import time
from pathlib import Path

import torch
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from components import backends
from components.kfp_step import step
from components.model import NUM_CLASSES, load_model_artifact, normalize
from components.preprocess import load_split
from components.runtime import set_threads

LATENCY_BATCHES = (1, 64)


def predict_all(predict, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([predict(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def time_batches(predict, x: torch.Tensor, batch: int, runs: int, warmup: int) -> dict:
    sample = x[:batch] if len(x) >= batch else x.repeat(batch // len(x) + 1, 1, 1, 1)[:batch]
    sample = sample.contiguous()
    for _ in range(warmup):
        predict(sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(sample)
        times.append((time.perf_counter() - start) * 1000)
    times.sort()

    def pct(p):
        return times[min(len(times) - 1, round(p / 100 * (len(times) - 1)))]

    median = statistics.median(times)
    return {"batch": batch, "runs": runs, "median_ms": median, "p90_ms": pct(90), "p99_ms": pct(99),
            "images_per_second": batch / median * 1000}


def confusion_matrix(labels: torch.Tensor, predictions: torch.Tensor) -> list[list[int]]:
    flat = labels * NUM_CLASSES + predictions
    return torch.bincount(flat, minlength=NUM_CLASSES ** 2).view(NUM_CLASSES, NUM_CLASSES).tolist()


def evaluate_backend(model_dir: str, data_dir: str, backend: str, threads: int = 0, runs: int = 50,
             warmup: int = 10) -> dict:
    """Measure ``backend``; returns a JSON-serialisable result (status ok or skipped)."""
    spec = backends.get(backend)
    result = {"backend": backend, "description": spec.description, "enabled_by": spec.enabled_by,
              "precision": spec.precision}
    reason = spec.unavailable()
    if reason:
        print(f"evaluate: {backend}: skipped ({reason})", flush=True)
        return {**result, "status": "skipped", "reason": reason}

    threads = set_threads(threads or None)
    model, card = load_model_artifact(model_dir)
    test = load_split(data_dir, "test")
    norm = card["normalization"]
    x, y = normalize(test["images"], norm["mean"], norm["std"]), test["labels"]

    reference = predict_all(backends.get(backends.REFERENCE).prepare(model, x[:1]), x)
    start = time.perf_counter()
    predict = spec.prepare(model, x[:64])
    prepare_seconds = time.perf_counter() - start
    predictions = predict_all(predict, x)
    accuracy = 100.0 * (predictions == y).float().mean().item()
    agreement = 100.0 * (predictions == reference).float().mean().item()
    latency = {f"batch{b}": time_batches(predict, x, b, runs, warmup) for b in LATENCY_BATCHES}
    result.update(status="ok", accuracy=accuracy, agreement=agreement,
                  reference_accuracy=100.0 * (reference == y).float().mean().item(),
                  test_images=len(y), threads=threads, prepare_seconds=prepare_seconds,
                  latency=latency, confusion_matrix=confusion_matrix(y, predictions))
    print(f"evaluate: {backend}: accuracy {accuracy:.2f}% agreement {agreement:.2f}% "
          + " ".join(f"b{v['batch']} median {v['median_ms']:.3f} ms p99 {v['p99_ms']:.3f} ms"
                     for v in latency.values()), flush=True)
    return result


def write_result(result: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


@step("evaluate")
def evaluate(model: Input[Model], data: Input[Dataset], backend: str, result: Output[Artifact],
             metrics: Output[Metrics], confusion: Output[ClassificationMetrics]):
    """Accuracy, agreement with fp32 eager, confusion matrix and latency for one backend."""
    from components.evaluate import evaluate_backend, write_result
    from components.model import CLASS_NAMES

    outcome = evaluate_backend(model.path, data.path, backend)
    write_result(outcome, result.path)
    result.metadata.update(backend=backend, status=outcome["status"])
    if outcome["status"] != "ok":
        metrics.log_metric("skipped", 1)
        return
    metrics.log_metric("accuracy", round(outcome["accuracy"], 3))
    metrics.log_metric("agreement", round(outcome["agreement"], 3))
    for name, lat in outcome["latency"].items():
        metrics.log_metric(f"{name}_median_ms", round(lat["median_ms"], 4))
        metrics.log_metric(f"{name}_p99_ms", round(lat["p99_ms"], 4))
        metrics.log_metric(f"{name}_images_per_second", round(lat["images_per_second"], 1))
    confusion.log_confusion_matrix(list(CLASS_NAMES), outcome["confusion_matrix"])
