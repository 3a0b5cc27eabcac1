import os
from pathlib import Path

import pytest

from tests.synthetic import make_gtsrb

SAMPLE_DIR = Path(os.environ.get("GTSRB_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared" / "gtsrb-sample"))


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A tiny GTSRB (43 classes x 2 tracks x 3 images train, 2 test per class)."""
    return make_gtsrb(tmp_path_factory.mktemp("gtsrb"))


def ingest_and_preprocess(root: Path, work: Path) -> Path:
    """``root`` (torchvision GTSRB layout) through the ingest and preprocess cores: ``work/raw``
    and ``work/data``; returns the data directory (train.pt / test.pt)."""
    from components.ingest import ingest_dataset
    from components.preprocess import preprocess_dataset

    ingest_dataset(str(root), str(work / "raw"))
    preprocess_dataset(str(work / "raw"), str(work / "data"))
    return work / "data"


@pytest.fixture(scope="session")
def prepared(synthetic_root, tmp_path_factory) -> Path:
    """Ingested + preprocessed synthetic data directory (train.pt / test.pt)."""
    return ingest_and_preprocess(synthetic_root, tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="session")
def trained_model(prepared, tmp_path_factory) -> Path:
    """A small model artifact (lp, a few epochs) trained on the synthetic data."""
    from components.train import TrainConfig, train_model

    out = tmp_path_factory.mktemp("model") / "model"
    train_model(str(prepared), str(out), TrainConfig(arch="lp", epochs=8, val_fraction=0.0, seed=0))
    return out


@pytest.fixture
def tampered_model(trained_model, tmp_path) -> Path:
    """A copy of ``trained_model`` whose weights no longer match its model card (4 bytes changed)."""
    import shutil

    from components.model import WEIGHTS_FILE

    artifact = tmp_path / "tampered-model"
    shutil.copytree(trained_model, artifact)
    with open(artifact / WEIGHTS_FILE, "r+b") as f:
        f.seek(100)
        original = f.read(4)
        f.seek(100)
        f.write(bytes(b ^ 0xFF for b in original))
    return artifact


@pytest.fixture
def uncalibrated_model(trained_model, tmp_path) -> Path:
    """A copy of ``trained_model`` as written before calibration.pt existed (the card names none)."""
    import json
    import shutil

    from components.model import CARD_FILE

    artifact = tmp_path / "older-model"
    shutil.copytree(trained_model, artifact)
    card = json.loads((artifact / CARD_FILE).read_text())
    del card["calibration"]
    (artifact / CARD_FILE).write_text(json.dumps(card))
    return artifact


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The real GTSRB sample (../shared/gtsrb-sample or $GTSRB_SAMPLE_DIR)."""
    if not (SAMPLE_DIR / "gtsrb" / "GTSRB" / "Training").is_dir():
        pytest.fail(f"real GTSRB sample not found at {SAMPLE_DIR}; set GTSRB_SAMPLE_DIR")
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def sample_data(sample_dir, tmp_path_factory) -> Path:
    """The real sample, ingested + preprocessed once per session (its raw dir is beside it)."""
    return ingest_and_preprocess(sample_dir, tmp_path_factory.mktemp("sample"))


@pytest.fixture(scope="session")
def compiled_ir(tmp_path_factory) -> Path:
    """The pipeline compiled once per session: KFP IR YAML (pipeline spec, then platform spec)."""
    import pipeline

    return Path(pipeline.compile_pipeline(str(tmp_path_factory.mktemp("ir") / "pipeline.yaml")))


@pytest.fixture(scope="session")
def served_onnx(trained_model, tmp_path_factory) -> dict[str, Path]:
    """``trained_model``'s served artifacts for the ONNX Runtime backends (backend -> directory),
    written as an evaluation writes them (components/served.py)."""
    from components import backends
    from components.served import export_served

    out = tmp_path_factory.mktemp("served")
    names = [n for n, b in backends.BACKENDS.items() if b.exports == "onnx"]
    for name in names:
        export_served(trained_model, name, out / name)
    return {name: out / name for name in names}
