"""Step 1 — ingest: GTSRB train + test splits, validated, packed as one artifact.

Reads an existing directory in torchvision's layout (the ``root`` of
``torchvision.datasets.GTSRB``) or, when allowed (run-local: only into the default ``data/``),
downloads it there with torchvision (which verifies md5s). A folder that does not hold that layout
and may not be downloaded into stops the step naming what was expected and what is there.
Every image is fully decoded once to prove it is readable; any problem stops the step with
the offending file's name and leaves no output behind. The artifact is one uncompressed tar in
the same layout plus a JSON manifest (file, label, track), so it moves to and from object
storage as two objects instead of 50,000.
"""


import csv
import json
import os
import shutil
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kfp.dsl import Dataset, Output

from components.kfp_step import step
from components.model import NUM_CLASSES
from components.runtime import atomic_dir

ARCHIVE = "gtsrb.tar"
MANIFEST = "manifest.json"
TRAIN_DIR = Path("gtsrb/GTSRB/Training")
TEST_DIR = Path("gtsrb/GTSRB/Final_Test/Images")
TEST_CSV = Path("gtsrb/GT-final_test.csv")


class IngestError(RuntimeError):
    pass


def _label(value: str, where: str) -> int:
    try:
        label = int(value)
    except ValueError:
        raise IngestError(f"{where}: label {value!r} is not an integer") from None
    if not 0 <= label < NUM_CLASSES:
        raise IngestError(f"{where}: label {label} is outside 0..{NUM_CLASSES - 1}")
    return label


def list_train(root: Path) -> list[tuple[str, int, int]]:
    """(relative path, label, track) for every training image; label = class folder."""
    folder = root / TRAIN_DIR
    if not folder.is_dir():
        raise IngestError(f"train split missing: {folder} is not a directory")
    samples = []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        label = _label(class_dir.name, str(class_dir))
        for image in sorted(class_dir.glob("*.ppm")):
            track = image.stem.split("_")[0]
            if not track.isdigit():
                raise IngestError(f"{image}: name is not TTTTT_IIIII.ppm (track_image)")
            samples.append((str(image.relative_to(root)), label, int(track)))
    if not samples:
        raise IngestError(f"train split missing: no .ppm images under {folder}")
    missing = sorted(set(range(NUM_CLASSES)) - {label for _, label, _ in samples})
    if missing:
        raise IngestError(f"train split {folder} has no images for class(es) {missing}")
    return samples


def list_test(root: Path) -> list[tuple[str, int]]:
    labels_csv = root / TEST_CSV
    if not labels_csv.is_file():
        raise IngestError(f"test split missing: label file {labels_csv} not found")
    samples = []
    with open(labels_csv, newline="") as f:
        for line, row in enumerate(csv.DictReader(f, delimiter=";", skipinitialspace=True), 2):
            where = f"{labels_csv}:{line}"
            if not row.get("Filename") or row.get("ClassId") is None:
                raise IngestError(f"{where}: expected columns Filename;ClassId")
            image = root / TEST_DIR / row["Filename"]
            if not image.is_file():
                raise IngestError(f"{image}: listed in {where} but missing")
            samples.append((str(image.relative_to(root)), _label(row["ClassId"], where)))
    if not samples:
        raise IngestError(f"test split missing: {labels_csv} lists no images")
    return samples


def check_image(path: str) -> str | None:
    """Decode the whole image; returns an error message naming the file, or None."""
    from PIL import Image

    try:
        if os.path.getsize(path) == 0:
            return f"{path}: empty file"
        with Image.open(path) as image:
            image.load()  # raises on truncated data
            if image.width < 1 or image.height < 1:
                return f"{path}: zero-size image"
    except Exception as exc:  # PIL raises many types for corrupt files
        return f"{path}: unreadable image ({type(exc).__name__}: {exc})"
    return None


def _check_all(root: Path, paths: list[str], workers: int) -> None:
    start = time.perf_counter()
    full = [str(root / p) for p in paths]
    # Threads: PIL releases the GIL while decoding; no fork of a process that runs torch.
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for done, error in enumerate(pool.map(check_image, full), 1):
            if error:
                raise IngestError(error)
            if done % 10000 == 0:
                print(f"ingest: verified {done}/{len(full)} images", flush=True)
    print(f"ingest: verified {len(full)} images in {time.perf_counter() - start:.1f}s", flush=True)


LISTED = 8       # entries of a wrong data folder named in the error


def layout_problem(root: Path) -> str | None:
    """Why ``root`` is not a GTSRB root in torchvision's layout, or None when it has the training
    folder (list_train / list_test check the rest). Reads only."""
    expected = f"expected {root / TRAIN_DIR}/ and {root / TEST_CSV} (torchvision's GTSRB layout)"
    if not root.is_dir():
        return f"data folder {root} {'is not a folder' if root.exists() else 'does not exist'}; {expected}"
    if (root / TRAIN_DIR).is_dir():
        return None
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    found = ", ".join(entries[:LISTED]) + (f" (+{len(entries) - LISTED} more)" if len(entries) > LISTED else "")
    problem = f"data folder {root} does not hold GTSRB: {expected}; found {found or 'nothing (empty folder)'}"
    for depth, parent in enumerate(root.parents[:len(TRAIN_DIR.parts)], 1):     # a folder inside a GTSRB root
        if (parent / TRAIN_DIR).is_dir():
            return f"{problem}; that is {depth} level{'s' if depth > 1 else ''} too deep: use {parent}"
    inside = [root / e for e in entries if e.endswith("/") and (root / e / TRAIN_DIR).is_dir()]
    return f"{problem}; GTSRB is one level down: use {inside[0]}" if inside else problem


def download(root: Path) -> None:
    """torchvision's GTSRB download (md5-verified) into ``root``: fetched into a temporary folder
    inside ``root`` and moved to ``root/gtsrb`` only when both splits arrived, so a failed or
    interrupted download leaves nothing behind (nor ``root`` itself, when it made it)."""
    from torchvision.datasets import GTSRB

    target = root / TRAIN_DIR.parts[0]
    try:
        target.rmdir()                          # an empty one (what a failed download used to leave)
    except FileNotFoundError:
        pass
    except OSError:
        raise IngestError(f"{target} exists but holds no {TRAIN_DIR.relative_to(TRAIN_DIR.parts[0])}/: not "
                          "downloading over it. Remove it to download GTSRB there, or point the pipeline at a "
                          "complete copy (`make local DATA_DIR=/path/to/root`)") from None
    made = next((p for p in [*reversed(root.parents), root] if not p.exists()), None)  # the top folder made
    root.mkdir(parents=True, exist_ok=True)
    print(f"ingest: downloading GTSRB into {root} (about 350 MB) ...", flush=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".gtsrb-download-", dir=root) as partial:
            for split in ("train", "test"):
                GTSRB(root=partial, split=split, download=True)
            os.replace(Path(partial) / target.name, target)
    except BaseException as exc:
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if not isinstance(exc, Exception):     # Ctrl-C: cleaned up, then stop as asked
            raise
        raise IngestError(
            f"could not download GTSRB into {root}: {type(exc).__name__}: {exc}\n"
            "Offline? Point the pipeline at a local copy in torchvision's layout "
            "(the folder that contains gtsrb/GTSRB/Training): "
            "`make local DATA_DIR=/path/to/root` or `python pipeline.py run-local --data-dir ...`"
        ) from exc


def ingest_dataset(data_dir: str, output_dir: str, allow_download: bool = False, workers: int | None = None) -> dict:
    """Validate GTSRB at ``data_dir`` (downloading it first if allowed and absent) and pack it
    into ``output_dir`` (created only on success). Returns the manifest's summary."""
    root = Path(data_dir).expanduser().resolve()
    if not (root / TRAIN_DIR).is_dir():
        if not allow_download:
            raise IngestError(layout_problem(root))
        download(root)
    train, test = list_train(root), list_test(root)
    images = [p for p, *_ in train] + [p for p, _ in test]
    _check_all(root, images, workers or os.cpu_count() or 1)
    _check_torchvision_agrees(root, len(train), len(test))

    with atomic_dir(output_dir) as partial:
        with tarfile.open(partial / ARCHIVE, "w") as tar:
            for rel in images + [str(TEST_CSV)]:
                tar.add(root / rel, arcname=rel)
        manifest = {
            "source": str(root),
            "train": [{"file": p, "label": y, "track": t} for p, y, t in train],
            "test": [{"file": p, "label": y} for p, y in test],
        }
        (partial / MANIFEST).write_text(json.dumps(manifest))
    summary = {"train_images": len(train), "test_images": len(test),
               "train_tracks": len({(y, t) for _, y, t in train})}
    print(f"ingest: {summary}", flush=True)
    return summary


def _check_torchvision_agrees(root: Path, n_train: int, n_test: int) -> None:
    """The directory must be exactly what torchvision.datasets.GTSRB reads."""
    from torchvision.datasets import GTSRB

    for split, expected in (("train", n_train), ("test", n_test)):
        found = len(GTSRB(root=str(root), split=split))
        if found != expected:
            raise IngestError(f"{root}: torchvision's GTSRB sees {found} {split} images, "
                              f"the manifest {expected}; is the layout right?")


@step("ingest")
def ingest(data_dir: str, allow_download: bool, raw: Output[Dataset]):
    """Validate GTSRB (train + test) from data_dir, downloading it first if allowed."""
    from components.ingest import ingest_dataset

    raw.metadata.update(ingest_dataset(data_dir, raw.path, allow_download))
