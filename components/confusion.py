"""What a confusion matrix says about the model, in words a user reads: per-class test accuracy
and the most-confused class pairs, with class names. Used by select's report and summary."""

from __future__ import annotations

from components.model import CLASS_NAMES

CONFUSED_PAIRS = 5     # how many of the most-confused (true, predicted) pairs the report lists


def per_class_accuracy(matrix: list[list[int]]) -> list[dict]:
    """One row per class that has test images: id, name, images, correct, accuracy (%)."""
    rows = []
    for k, row in enumerate(matrix):
        total = sum(row)
        if total:
            rows.append({"class_id": k, "class_name": CLASS_NAMES[k], "images": total, "correct": row[k],
                         "accuracy": 100.0 * row[k] / total})
    return rows


def most_confused(matrix: list[list[int]], count: int = CONFUSED_PAIRS) -> list[dict]:
    """The ``count`` largest off-diagonal cells: true class taken for predicted class, how often,
    and that share of the true class's test images. Ties: lower true, then predicted class id."""
    cells = [(n, t, p) for t, row in enumerate(matrix) for p, n in enumerate(row) if t != p and n]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true_id": t, "true_name": CLASS_NAMES[t], "predicted_id": p, "predicted_name": CLASS_NAMES[p],
             "images": n, "share_of_true": 100.0 * n / sum(matrix[t])} for n, t, p in cells[:count]]


def analysis(matrix: list[list[int]]) -> dict:
    return {"per_class_accuracy": per_class_accuracy(matrix), "most_confused": most_confused(matrix)}


def markdown(result: dict) -> str:
    """Report section for ``analysis(...)``: the confused pairs, then per-class accuracy (worst first)."""
    lines = ["## Where the model fails\n"]
    pairs = result["most_confused"]
    if pairs:
        lines += ["| true sign | taken for | images | share of the true class |", "|---|---|---|---|"]
        lines += [f"| {c['true_id']} {c['true_name']} | {c['predicted_id']} {c['predicted_name']} | {c['images']} | "
                  f"{c['share_of_true']:.1f} % |" for c in pairs]
    else:
        lines.append("No test image misclassified.")
    lines += ["", "Per-class test accuracy, worst first:", "",
              "| class | name | images | correct | accuracy % |", "|---|---|---|---|---|"]
    for r in sorted(result["per_class_accuracy"], key=lambda r: (r["accuracy"], r["class_id"])):
        lines.append(f"| {r['class_id']} | {r['class_name']} | {r['images']} | {r['correct']} | {r['accuracy']:.2f} |")
    return "\n".join(lines) + "\n"
