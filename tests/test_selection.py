"""The select rule on synthetic evaluation results: guard first, then latency, then the tie-break."""

import pytest

from components.selection import NoEligibleBackend, latency_chart, markdown_report, select_winner

REFERENCE_ACCURACY = 95.0


def result(name, b1, b64, accuracy=REFERENCE_ACCURACY, agreement=100.0, precision="fp32"):
    return {"backend": name, "description": f"{name} backend", "enabled_by": "x", "precision": precision,
            "status": "ok", "accuracy": accuracy, "agreement": agreement, "reference_accuracy": REFERENCE_ACCURACY,
            "test_images": 817, "threads": 2, "prepare_seconds": 0.5, "confusion_matrix": [[1]],
            "latency": {"batch1": {"batch": 1, "runs": 50, "median_ms": b1, "p90_ms": b1 * 1.1, "p99_ms": b1 * 1.3,
                                   "images_per_second": 1000 / b1},
                        "batch64": {"batch": 64, "runs": 50, "median_ms": b64, "p90_ms": b64 * 1.1,
                                    "p99_ms": b64 * 1.3, "images_per_second": 64000 / b64}}}


def skipped(name, reason="no bf16 here"):
    return {"backend": name, "description": "d", "enabled_by": "e", "precision": "bf16", "status": "skipped",
            "reason": reason}


RESULTS = [
    result("eager", 1.6, 60.0),
    result("onednn", 1.4, 40.0),
    result("onnxruntime", 0.5, 20.0),
    result("int8-lossy", 0.3, 10.0, accuracy=94.2, agreement=97.0, precision="int8"),   # fastest, less accurate
    result("int8-disagrees", 0.4, 12.0, accuracy=95.1, agreement=98.5, precision="int8"),
    skipped("onednn-bf16"),
]


def test_the_guard_rejects_a_faster_but_less_accurate_backend():
    s = select_winner(RESULTS)
    assert s["winner"] == "onnxruntime"
    v = {name: r["verdict"] for name, r in s["backends"].items()}
    assert v["int8-lossy"] == ("rejected: accuracy 94.20 % is -0.80 points from the reference 95.00 % "
                               "(tolerance ±0.5); top-1 agreement with the reference 97.00 % < 99.0 %"), "both reasons"
    assert v["int8-disagrees"] == "rejected: top-1 agreement with the reference 98.50 % < 99.0 %"
    assert v["onednn-bf16"] == "skipped: no bf16 here"
    assert v["onnxruntime"] == "winner: 0.500 ms median at batch 1"
    assert v["eager"] == "slower: 1.600 ms vs 0.500 ms median at batch 1 (3.20x)"
    assert s["ranking"] == ["onnxruntime", "onednn", "eager"]
    assert "confusion_matrix" not in s["backends"]["eager"]
    assert list(s["backends"]) == [r["backend"] for r in RESULTS], "every backend is reported, skipped ones too"


def test_the_parameters_move_the_decision():
    assert select_winner(RESULTS, accuracy_tolerance=1.0)["winner"] == "onnxruntime", "agreement still guards"
    assert select_winner(RESULTS, min_agreement=98.0)["winner"] == "int8-disagrees"
    assert select_winner(RESULTS, accuracy_tolerance=1.0, min_agreement=97.0)["winner"] == "int8-lossy"
    s = select_winner(RESULTS, serving_batch=64)
    assert s["winner"] == "onnxruntime" and s["parameters"]["serving_batch"] == 64
    assert "lowest median latency at batch 64" in s["rule"]


def test_accuracy_above_the_reference_by_more_than_the_tolerance_is_also_rejected():
    s = select_winner([result("eager", 2.0, 60.0), result("odd", 0.1, 5.0, accuracy=96.0)])
    assert s["winner"] == "eager" and "+1.00 points" in s["backends"]["odd"]["verdict"]


def test_a_tie_at_the_serving_batch_is_broken_by_batch_64():
    s = select_winner([result("eager", 2.0, 60.0), result("a", 0.5, 30.0), result("b", 0.5, 25.0)])
    assert s["winner"] == "b"
    assert s["backends"]["a"]["verdict"] == ("slower: tied within noise at batch 1 (0.500 vs 0.500 ms, 1.00x), "
                                             "then 30.000 vs 25.000 ms at batch 64")


def timed(r, b1_rounds):
    """``r`` with the round medians its batch-1 median came from."""
    r["latency"]["batch1"]["round_medians_ms"] = b1_rounds
    return r


def test_a_difference_within_the_timing_noise_is_a_tie_broken_by_batch_64():
    """Two backends whose batch-1 round medians overlap (one noisy round each way) are not told apart
    by their medians: batch 64 decides. A clear difference still wins at batch 1."""
    a = timed(result("a", 0.50, 30.0), [0.50, 0.49, 0.51, 0.50, 0.70, 0.50, 0.48, 0.52, 0.50, 0.49])
    b = timed(result("b", 0.52, 20.0), [0.52, 0.51, 0.53, 0.40, 0.52, 0.50, 0.54, 0.52, 0.51, 0.53])
    slow = timed(result("slow", 1.00, 10.0), [1.0, 0.98, 1.02, 1.01, 0.99, 1.0, 1.03, 0.97, 1.0, 1.0])
    s = select_winner([timed(result("eager", 2.0, 60.0), [2.0] * 10), a, b, slow])
    assert s["winner"] == "b" and s["ranking"] == ["b", "a", "slow", "eager"]
    v = {name: r["verdict"] for name, r in s["backends"].items()}
    assert v["b"] == ("winner: 0.520 ms median at batch 1, tied within noise with a; fastest of them at batch 64 "
                      "(20.000 ms)")
    assert v["a"].startswith("slower: tied within noise at batch 1 (0.500 vs 0.520 ms, 0.96x, 95 % interval 0.")
    assert v["a"].endswith("then 30.000 vs 20.000 ms at batch 64")
    assert v["slow"].startswith("slower: 1.000 ms vs 0.520 ms median at batch 1 (1.92x, 95 % interval 1.")
    steady = timed(result("a", 0.50, 30.0), [0.50, 0.49, 0.51, 0.50, 0.50, 0.50, 0.49, 0.51, 0.50, 0.50])
    assert select_winner([steady, timed(result("b", 0.52, 20.0), [0.52, 0.52, 0.53, 0.52, 0.52, 0.51, 0.52, 0.53,
                                                                    0.52, 0.52])])["winner"] == "a"


def test_serving_batch_picks_the_batch_64_winner_when_asked():
    results = [result("eager", 2.0, 60.0), result("small", 0.4, 30.0), result("big", 0.6, 15.0)]
    assert select_winner(results)["winner"] == "small"
    assert select_winner(results, serving_batch=64)["winner"] == "big"


def test_no_eligible_backend_is_an_error_naming_every_reason():
    with pytest.raises(NoEligibleBackend, match=r"int8-lossy: rejected.*; onednn-bf16: skipped: no bf16 here$"):
        select_winner([RESULTS[3], RESULTS[5]])
    with pytest.raises(NoEligibleBackend, match="no evaluation results"):
        select_winner([])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="batch 8 was not measured"):
        select_winner(RESULTS, serving_batch=8)
    with pytest.raises(ValueError, match="duplicate backend results"):
        select_winner([RESULTS[0], RESULTS[0]])


def test_report_shows_table_rule_winner_and_why_each_loser_lost():
    s = select_winner(RESULTS)
    s["model"] = {"architecture": "signnet", "weights_sha256": "ab" * 32, "flops_per_image": 21_179_136}
    png = latency_chart(s)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 2000
    text = markdown_report(s, png)
    assert "**Winner: `onnxruntime`**" in text and s["rule"] in text
    assert "| **onnxruntime** | fp32 | 95.00 | 100.00 | 0.500 | 0.650 | 20.000 | 26.000 | 3200 | 0.5 | winner" in text
    assert "| onednn-bf16 | bf16 | – |" in text
    assert "21.2 MFLOP per image" in text and "2 threads, 50 timed runs" in text
    losers = text.split("## Why the others lost")[1]
    for name in ("eager", "onednn", "int8-lossy", "int8-disagrees", "onednn-bf16"):
        assert f"- `{name}`: {s['backends'][name]['verdict']}" in losers
    assert "![latency chart](data:image/png;base64," in text


def test_the_report_names_the_winners_failing_signs():
    matrix = [[0] * 43 for _ in range(43)]
    matrix[37][37], matrix[37][35], matrix[14][14] = 50, 22, 30       # "Go straight or left" taken for "Ahead only"
    winner = {**result("onnxruntime", 0.5, 20.0), "confusion_matrix": matrix}
    s = select_winner([result("eager", 1.6, 60.0), winner])
    assert s["quality"]["most_confused"][0] == {"true_id": 37, "true_name": "Go straight or left",
                                                "predicted_id": 35, "predicted_name": "Ahead only", "images": 22,
                                                "share_of_true": 100 * 22 / 72}
    assert [(r["class_id"], r["images"]) for r in s["quality"]["per_class_accuracy"]] == [(14, 30), (37, 72)]
    report = markdown_report(s)
    assert "| 37 Go straight or left | 35 Ahead only | 22 | 30.6 % |" in report
    assert "| 37 | Go straight or left | 72 | 50 | 69.44 |" in report


def test_the_results_table_as_text_for_the_console():
    from components.selection import RUN_COLUMNS, results_table

    lines = results_table(select_winner(RESULTS), RUN_COLUMNS).splitlines()
    assert lines[0].split() == ["backend", "acc", "%", "agree", "%", "b1", "ms", "b64", "ms", "verdict"]
    assert lines[3].split()[:5] == ["onnxruntime", "95.00", "100.00", "0.500", "20.000"] and "winner" in lines[3]
    assert lines[6].split()[:5] == ["onednn-bf16", "-", "-", "-", "-"] and lines[6].endswith("skipped: no bf16 here")
    assert len({len(line.split("  ")[0]) for line in lines}) >= 1 and len(lines) == 1 + len(RESULTS)


def test_the_select_core_writes_summary_report_and_chart(trained_model, tmp_path):
    import json

    from components.model import read_card
    from components.selection import write_selection

    paths = []
    for r in RESULTS:
        paths.append(tmp_path / f"{r['backend']}.json")
        paths[-1].write_text(json.dumps(r))
    out = {name: tmp_path / name for name in ("summary", "report", "chart")}
    selection = write_selection([str(p) for p in paths], str(trained_model), "minio://b/model", 0.5, 99.0, 1,
                                str(out["summary"]), str(out["report"]), str(out["chart"]))
    card = read_card(trained_model)
    assert json.loads(out["summary"].read_text()) == selection and selection["winner"] == "onnxruntime"
    assert selection["model"] == {"uri": "minio://b/model", "path": str(trained_model), "architecture": "lp",
                                  "weights_sha256": card["weights_sha256"], "flops_per_image": card["flops_per_image"],
                                  "val_accuracy": card["training"]["val_accuracy"]}
    assert "**Winner: `onnxruntime`**" in out["report"].read_text()
    assert out["chart"].read_text().startswith('<img alt="latency per backend" src="data:image/png;base64,')


# --------------------------------------------------------------------------- the winner's served artifact
def served_dir(root, backend: str, payload: bytes, weights: str = "w" * 64):
    """A served artifact as an evaluate task writes it (components/artifact.py's card format)."""
    import hashlib
    import json

    directory = root / backend
    directory.mkdir()
    (directory / "model.onnx").write_bytes(payload)
    card = {"weights_sha256": weights, "serving": {"backend": backend, "format": "onnx", "file": "model.onnx",
                                                   "sha256": hashlib.sha256(payload).hexdigest()}}
    (directory / "model_card.json").write_text(json.dumps(card))
    return str(directory)


def test_select_forwards_the_winners_served_artifact_byte_for_byte(tmp_path):
    from components.selection import forward_served

    candidates = [served_dir(tmp_path, "onnxruntime", b"fp32 graph"), str(tmp_path / "skipped"),
                  served_dir(tmp_path, "onnxruntime-int8", b"int8 graph")]
    (tmp_path / "skipped").mkdir()                                 # a skipped backend's empty artifact
    serving = forward_served(candidates, "onnxruntime-int8", "w" * 64, str(tmp_path / "served"))
    assert serving["backend"] == "onnxruntime-int8"
    assert (tmp_path / "served" / "model.onnx").read_bytes() == b"int8 graph"
    with pytest.raises(NoEligibleBackend, match="no served artifact of the winner 'eager'"):
        forward_served(candidates, "eager", "w" * 64, str(tmp_path / "none"))
    with pytest.raises(ValueError, match="made from weights w+, not the selected model's"):
        forward_served(candidates, "onnxruntime", "v" * 64, str(tmp_path / "other"))
    (tmp_path / "onnxruntime" / "model.onnx").write_bytes(b"changed")
    from components.artifact import ModelArtifactError
    with pytest.raises(ModelArtifactError, match="does not match the model card"):
        forward_served(candidates, "onnxruntime", "w" * 64, str(tmp_path / "tampered"))
    assert not (tmp_path / "none").exists() and not (tmp_path / "other").exists()
    assert not (tmp_path / "tampered").exists() and not (tmp_path / "tampered.partial").exists()
