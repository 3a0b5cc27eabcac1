"""Tiny synthetic GTSRB in torchvision's on-disk layout, for self-contained tests.

Each class gets a distinct colour and a class-dependent bar pattern, so a small CNN learns it in
an epoch or two; image sizes vary like real GTSRB crops.
"""

import colorsys
import random
from pathlib import Path

from PIL import Image, ImageDraw

from components.model import NUM_CLASSES


def sign_image(label: int, rng: random.Random) -> Image.Image:
    size = rng.randint(24, 48)
    r, g, b = (int(255 * c) for c in colorsys.hsv_to_rgb(label / NUM_CLASSES, 0.9, 0.9))
    image = Image.new("RGB", (size, size), (rng.randint(0, 60),) * 3)
    draw = ImageDraw.Draw(image)
    m = size // 8
    draw.ellipse([m, m, size - m, size - m], fill=(r, g, b))
    for bit in range(6):  # class id as bars
        if label >> bit & 1:
            x = m + (bit + 1) * (size - 2 * m) // 8
            draw.rectangle([x, size // 3, x + max(1, size // 16), 2 * size // 3], fill=(255, 255, 255))
    return image


def make_gtsrb(root: Path, tracks_per_class: int = 2, images_per_track: int = 3, test_per_class: int = 2,
               seed: int = 0) -> Path:
    """Write train + test splits under ``root`` (the torchvision GTSRB root); returns root."""
    rng = random.Random(seed)
    base = Path(root) / "gtsrb"
    rows = ["Filename;ClassId"]
    index = 0
    for label in range(NUM_CLASSES):
        folder = base / "GTSRB" / "Training" / f"{label:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for track in range(tracks_per_class):
            for i in range(images_per_track):
                sign_image(label, rng).save(folder / f"{track:05d}_{i:05d}.ppm")
        test_dir = base / "GTSRB" / "Final_Test" / "Images"
        test_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(test_per_class):
            name = f"{index:05d}.ppm"
            sign_image(label, rng).save(test_dir / name)
            rows.append(f"{name};{label}")
            index += 1
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return Path(root)
