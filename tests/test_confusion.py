from components.confusion import analysis, markdown, most_confused, per_class_accuracy
from components.model import CLASS_NAMES, NUM_CLASSES


def matrix_with(cells: dict) -> list[list[int]]:
    m = [[0] * NUM_CLASSES for _ in range(NUM_CLASSES)]
    for (t, p), n in cells.items():
        m[t][p] = n
    return m


def test_per_class_accuracy_skips_classes_without_images():
    rows = per_class_accuracy(matrix_with({(1, 1): 9, (1, 2): 1, (2, 2): 4}))
    assert [(r["class_id"], r["images"], r["correct"], r["accuracy"]) for r in rows] == [(1, 10, 9, 90.0),
                                                                                       (2, 4, 4, 100.0)]
    assert rows[0]["class_name"] == "Speed limit (30km/h)"


def test_most_confused_orders_by_count_then_ids_and_names_both_classes():
    m = matrix_with({(1, 1): 50, (1, 2): 3, (2, 2): 40, (2, 1): 5, (5, 5): 10, (5, 3): 3, (7, 8): 1, (7, 7): 9,
                     (9, 10): 1, (9, 9): 1, (11, 12): 1})
    pairs = most_confused(m)
    assert [(p["true_id"], p["predicted_id"], p["images"]) for p in pairs] == [(2, 1, 5), (1, 2, 3), (5, 3, 3),
                                                                               (7, 8, 1), (9, 10, 1)]
    assert pairs[0]["true_name"] == CLASS_NAMES[2] and pairs[0]["predicted_name"] == CLASS_NAMES[1]
    assert round(pairs[0]["share_of_true"], 3) == round(100 * 5 / 45, 3)


def test_markdown_lists_worst_class_first_and_says_when_nothing_failed():
    text = markdown(analysis(matrix_with({(1, 1): 9, (1, 2): 1, (2, 2): 4})))
    assert "| 1 Speed limit (30km/h) | 2 Speed limit (50km/h) | 1 | 10.0 % |" in text
    assert text.index("| 1 | Speed limit (30km/h)") < text.index("| 2 | Speed limit (50km/h)")
    assert "No test image misclassified." in markdown(analysis(matrix_with({(3, 3): 2})))
