"""The served artifact: what the predictor loads for one backend, written by the evaluate task
that measured that backend (components/artifact.py describes the format).

- a backend that exports a file (``Backend.exports``: the ONNX Runtime backends) -> that very
  file, copied byte for byte from the session that was measured, + the model card with a
  ``serving`` entry (its sha256) and neither weights nor calibration sample;
- any other backend -> the model artifact's own files + the card with a ``serving`` entry.
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path

from components.artifact import CARD_FILE, ONNX_FILE, SERVING, artifact_files, sha256_file, verified_card
from components.runtime import atomic_dir


class ServedArtifactError(RuntimeError):
    pass


def served_card(card: dict, backend: str, fmt: str, file: str, sha256: str) -> dict:
    """The model card of a served artifact: ``card`` + the serving entry (an exported file
    replaces the weights and the calibration sample)."""
    entry = {"backend": backend, "format": fmt, "file": file, "sha256": sha256}
    if fmt == "torch":
        return {**card, SERVING: entry}
    dropped = ("weights_file", "calibration")
    runtime = {"onnxruntime_version": metadata.version("onnxruntime")} if fmt == "onnx" else {}
    return {**{k: v for k, v in card.items() if k not in dropped}, SERVING: {**entry, **runtime}}


def write_served(out_dir: str | Path, model_dir: str | Path, backend: str, predict) -> dict:
    """Write the served artifact of ``backend`` into ``out_dir`` (whole or not at all); ``predict``
    is the callable ``backends.get(backend).prepare`` returned and the evaluation measured.
    Returns the served card."""
    from components import backends

    spec = backends.get(backend)
    card = verified_card(model_dir)
    with atomic_dir(out_dir) as partial:
        if spec.exports:
            source = Path(getattr(predict, "exported", ""))
            if not source.is_file():
                raise ServedArtifactError(f"backend {backend!r} exports {spec.exports} but its prepared "
                                          f"callable names no exported file ({source})")
            sha256 = sha256_file(source)              # the bytes the measured session was made from
            shutil.copyfile(source, partial / ONNX_FILE)
            if sha256_file(partial / ONNX_FILE) != sha256:
                raise ServedArtifactError(f"{source}: changed while it was copied")
            served = served_card(card, backend, spec.exports, ONNX_FILE, sha256)
        else:
            for name in artifact_files(card):
                shutil.copyfile(Path(model_dir) / name, partial / name)
            served = served_card(card, backend, "torch", card["weights_file"], card["weights_sha256"])
        (partial / CARD_FILE).write_text(json.dumps(served, indent=2) + "\n")
        verified_card(partial)
    return served


def export_served(model_dir: str | Path, backend: str, out_dir: str | Path) -> dict:
    """Prepare ``backend`` on a model artifact as an evaluation does (int8: calibrated with the
    artifact's own sample) and write its served artifact, without measuring anything (tests,
    `make bench-serve --model-dir`). Returns the served card."""
    import torch

    from components import backends
    from components.model import calibration_images, load_model_artifact

    spec = backends.get(backend)
    model, card = load_model_artifact(model_dir)
    calibration = calibration_images(model_dir, card) if spec.needs_calibration else None
    predict = spec.prepare(model, torch.zeros(1, *card["input_shape"]), calibration=calibration)
    return write_served(out_dir, model_dir, backend, predict)
