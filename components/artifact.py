"""Model artifacts on disk, without torch: the model card, its files' sha256, the served artifact.

A *model artifact* (the train step's output) is WEIGHTS_FILE + CALIBRATION_FILE + CARD_FILE (written
last; it records every other file's sha256). A *served artifact* (an evaluate task's ``served``
output, forwarded by select for the winner) is what the predictor loads for one backend: the card
gains a ``serving`` entry naming the backend, the format and the one file that backend runs, e.g.
the ONNX file the evaluation measured, byte for byte (``format: onnx``: no weights file, no
calibration sample: nothing is exported or quantized when a server starts), or the weights
themselves (``format: torch``). Every reader goes through :func:`read_card` / :func:`verified_card`.

Nothing here imports torch: the ONNX predictor's processes verify artifacts with this module only.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHTS_FILE = "model.pt"
CARD_FILE = "model_card.json"
CALIBRATION_FILE = "calibration.pt"     # uint8 training images int8 backends calibrate with
SERVING = "serving"                     # the served artifact's card entry
ONNX_FILE = "model.onnx"
FORMATS = ("torch", "onnx")


class ModelArtifactError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_card(directory: str | Path) -> dict:
    """The model card of the artifact in ``directory`` (not verified: see :func:`verified_card`)."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ModelArtifactError(f"{path}: model card missing (is {directory} a model artifact?)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelArtifactError(f"{path}: not a JSON model card ({e})") from None


def artifact_files(card: dict) -> dict[str, str]:
    """File name -> expected sha256 of every file the card vouches for (weights, calibration, the
    served file)."""
    serving = card.get(SERVING)
    files = {}
    if serving is None or serving["format"] == "torch":
        files[card.get("weights_file", WEIGHTS_FILE)] = card.get("weights_sha256")
    if "calibration" in card:
        files[card["calibration"]["file"]] = card["calibration"]["sha256"]
    if serving is not None:
        files[serving["file"]] = serving["sha256"]
    return files


def verified_card(directory: str | Path) -> dict:
    """The model card, after checking that every file it names is there with its sha256."""
    directory = Path(directory)
    card = read_card(directory)
    for name, expected in artifact_files(card).items():
        path = directory / name
        if not path.is_file():
            raise ModelArtifactError(f"{path}: {name} missing from the model artifact")
        actual = sha256_file(path)
        if actual != expected:
            raise ModelArtifactError(f"{path}: sha256 {actual} does not match the model card's {expected}")
    return card


def serving_format(card: dict) -> str:
    """``onnx`` or ``torch``: what a served artifact's card says its backend runs (a plain model
    artifact: ``torch``)."""
    fmt = card.get(SERVING, {}).get("format", "torch")
    if fmt not in FORMATS:
        raise ModelArtifactError(f"unknown serving format {fmt!r} in the model card; known: {', '.join(FORMATS)}")
    return fmt


def check_served(card: dict, backend: str, expected_sha256: str | None = None) -> None:
    """Refuse to serve ``card`` with ``backend`` when it was exported for another backend, or when
    its weights are not the ``expected_sha256`` ones."""
    if expected_sha256 and card.get("weights_sha256") != expected_sha256:
        raise ModelArtifactError(f"the artifact holds weights {card.get('weights_sha256')}, "
                                 f"not the expected {expected_sha256}")
    exported_for = card.get(SERVING, {}).get("backend")
    if exported_for is not None and exported_for != backend:
        raise ModelArtifactError(f"the artifact was exported for backend {exported_for!r}, not {backend!r}; "
                                 f"serve it with --backend {exported_for}")
