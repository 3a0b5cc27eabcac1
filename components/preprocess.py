"""Step 2 — preprocess: decode every image once, resize to 32x32, store compact tensors.

Output (a directory): ``train.pt`` and ``test.pt``, each a dict of
``images`` (uint8 N x 3 x 32 x 32), ``labels`` (int64 N), ``class_counts`` (int64 43) and for
train ``tracks`` (int64 N, a global id per physical sign: class * TRACK_STRIDE + track), so training
and every evaluation read two files instead of tens of thousands of images.
"""


import hashlib
import io
import json
import os
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from kfp.dsl import Dataset, Input, Output
from PIL import Image

from components.ingest import ARCHIVE, MANIFEST
from components.kfp_step import step
from components.model import INPUT_SHAPE, NUM_CLASSES, to_uint8_32
from components.runtime import atomic_dir

SPLITS = ("train", "test")
TRACK_STRIDE = 100000           # > any GTSRB track number: class * TRACK_STRIDE + track is unique


def split_path(directory: str | Path, split: str) -> Path:
    return Path(directory) / f"{split}.pt"


def load_split(directory: str | Path, split: str) -> dict[str, torch.Tensor]:
    path = split_path(directory, split)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: preprocessed {split} split missing")
    return torch.load(path, weights_only=True)


def split_fingerprint(split: dict[str, torch.Tensor]) -> str:
    """sha256 of a preprocessed split's images and labels (dtype, shape, bytes, in order): two
    accuracies are comparable only when they were measured on splits with the same fingerprint."""
    digest = hashlib.sha256()
    for key in ("images", "labels"):
        tensor = split[key].contiguous()
        digest.update(f"{key} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def _read_archive(archive: Path) -> dict[str, bytes]:
    """All members' bytes in one sequential pass (random access by name rescans the tar)."""
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}


def _decode_one(data: bytes) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as image:
        return to_uint8_32(image)


def _decode(files: dict[str, bytes], names: list[str], workers: int) -> torch.Tensor:
    # Threads, not processes: PIL releases the GIL while decoding and resizing, and forking a
    # process that has already run torch ops can deadlock in OpenMP.
    out = torch.empty(len(names), *INPUT_SHAPE, dtype=torch.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, image in enumerate(pool.map(_decode_one, (files[n] for n in names))):
            out[i] = image
    return out


def preprocess_dataset(raw_dir: str, output_dir: str, workers: int | None = None) -> dict:
    raw = Path(raw_dir)
    manifest = json.loads((raw / MANIFEST).read_text())
    workers = workers or os.cpu_count() or 1
    summary = {}
    files = _read_archive(raw / ARCHIVE)
    with atomic_dir(output_dir) as partial:
        for split in SPLITS:
            start = time.perf_counter()
            entries = manifest[split]
            labels = torch.tensor([e["label"] for e in entries], dtype=torch.int64)
            tensors = {
                "images": _decode(files, [e["file"] for e in entries], workers),
                "labels": labels,
                "class_counts": torch.bincount(labels, minlength=NUM_CLASSES),
            }
            if split == "train":
                tensors["tracks"] = torch.tensor(
                    [e["label"] * TRACK_STRIDE + e["track"] for e in entries], dtype=torch.int64)
            torch.save(tensors, split_path(partial, split))
            seconds = time.perf_counter() - start
            summary[f"{split}_images"] = len(entries)
            print(f"preprocess: {split}: {len(entries)} images in {seconds:.1f}s "
                  f"({len(entries) / max(seconds, 1e-9):.0f} img/s)", flush=True)
    return summary


@step("preprocess")
def preprocess(raw: Input[Dataset], data: Output[Dataset]):
    """Decode once, resize to 32x32, store uint8 tensors + labels + class counts."""
    from components.preprocess import preprocess_dataset

    data.metadata.update(preprocess_dataset(raw.path, data.path))
