"""The evaluate step's core: statistics, batching, quality numbers and one backend end to end."""

import pytest
import torch

from components import backends, evaluate
from components.evaluate import (
    confusion_matrix,
    evaluate_backend,
    predict_all,
    quality,
)
from components.model import NUM_CLASSES, load_model_artifact
from components.preprocess import load_split


def test_predict_all_uses_only_full_batches_and_drops_the_padding():
    x = torch.arange(130, dtype=torch.float32).view(130, 1, 1, 1).expand(130, 3, 2, 2)
    shapes = []

    def predict(batch):                     # "class" = the image's own index, mod 43
        shapes.append(tuple(batch.shape))
        return torch.nn.functional.one_hot(batch[:, 0, 0, 0].long() % NUM_CLASSES, NUM_CLASSES).float()

    assert torch.equal(predict_all(predict, x), torch.arange(130) % NUM_CLASSES)
    assert shapes == [(64, 3, 2, 2)] * 3


def test_quality_and_confusion_matrix_count_correctly():
    labels = torch.tensor([0, 1, 2, 2])
    predictions = torch.tensor([0, 1, 1, 2])
    reference = torch.tensor([0, 1, 1, 1])
    assert quality(predictions, reference, labels) == {"accuracy": 75.0, "agreement": 75.0,
                                                       "reference_accuracy": 50.0, "test_images": 4}
    m = torch.tensor(confusion_matrix(labels, predictions))
    assert m.shape == (NUM_CLASSES, NUM_CLASSES) and m.sum() == 4
    assert m[0, 0] == m[1, 1] == m[2, 1] == m[2, 2] == 1


@pytest.fixture(scope="module")
def onednn_result(trained_model, prepared, tmp_path_factory):
    served = tmp_path_factory.mktemp("evaluate") / "served"
    return evaluate_backend(str(trained_model), str(prepared), "onednn", runs=50, warmup=2, served_dir=str(served))


@pytest.mark.slow
def test_evaluate_measures_accuracy_agreement_and_latency(onednn_result, trained_model, prepared):
    r = onednn_result
    _, card = load_model_artifact(trained_model)
    labels = load_split(prepared, "test")["labels"]
    assert r["status"] == "ok" and r["backend"] == "onednn" and r["precision"] == "fp32"
    assert r["agreement"] == 100.0 and r["accuracy"] == r["reference_accuracy"] > 50.0
    assert r["test_images"] == len(labels) and r["threads"] == torch.get_num_threads()
    assert r["flops_per_image"] == card["flops_per_image"] > 0
    cm = torch.tensor(r["confusion_matrix"])
    assert cm.sum() == len(labels) and cm.sum(1).tolist() == torch.bincount(labels, minlength=NUM_CLASSES).tolist()
    assert cm.trace() / len(labels) * 100 == pytest.approx(r["accuracy"])
    assert set(r["latency"]) == {"batch1", "batch64"}
    for batch, lat in ((1, r["latency"]["batch1"]), (64, r["latency"]["batch64"])):
        assert lat["batch"] == batch and lat["runs"] == 50 and lat["rounds"] == len(lat["round_medians_ms"]) == 10
        assert 0 < lat["min_ms"] <= lat["median_ms"] <= lat["p90_ms"] <= lat["p99_ms"]
        assert lat["images_per_second"] == pytest.approx(batch / lat["median_ms"] * 1000)
    assert r["prepare_seconds"] >= 0 and r["calibration_images"] == 0
    assert r["served"] == {"backend": "onednn", "format": "torch", "file": "model.pt", "sha256": card["weights_sha256"]}


def test_an_unavailable_backend_is_reported_skipped_with_its_reason(monkeypatch, trained_model, prepared):
    fake = backends.Backend("fancy", "a fancy unit", "magic", "int4", lambda m, e, c: m,
                            unavailable=lambda: "this CPU has no fancy unit")
    monkeypatch.setitem(backends.BACKENDS, "fancy", fake)
    r = evaluate_backend(str(trained_model), str(prepared), "fancy")
    assert r == {"backend": "fancy", "description": "a fancy unit", "enabled_by": "magic", "precision": "int4",
                 "needs_calibration": False, "status": "skipped", "reason": "this CPU has no fancy unit"}


def test_a_backend_that_does_not_compute_in_its_precision_is_reported_skipped(monkeypatch, trained_model, prepared):
    fake = backends.Backend("fake-bf16", "fp32 in disguise", "nothing", "bf16", lambda m, e, c: m)
    monkeypatch.setitem(backends.BACKENDS, "fake-bf16", fake)
    r = evaluate_backend(str(trained_model), str(prepared), "fake-bf16")
    assert r["status"] == "skipped" and r["precision"] == "bf16" and "latency" not in r
    assert "claims bf16 but its logits differ from fp32 by" in r["reason"] and "it computed in fp32" in r["reason"]


def test_too_few_timed_runs_are_refused(trained_model, prepared):
    with pytest.raises(ValueError, match="at least 50 timed runs"):
        evaluate_backend(str(trained_model), str(prepared), "eager", runs=10)


def test_min_runs_is_the_issue_minimum():
    assert evaluate.MIN_RUNS == 50 and evaluate.LATENCY_BATCHES == (1, 64)
