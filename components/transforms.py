"""The image transforms, in numpy and PIL: decoded image -> uint8 3x32x32 -> normalized float32.

The one definition every path uses: preprocess and train (through components/model.py's torch
views of these arrays), evaluate, and the predictor, whose ONNX processes never import torch.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

IMAGE_SIZE = 32
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)


def to_uint8_32(image: Image.Image) -> np.ndarray:
    """Decoded image of any size -> uint8 array 3x32x32 (RGB, bilinear, antialiased).

    Same as torchvision's ``transforms.Resize((32, 32))`` on a PIL image, stored as uint8 so
    a whole split fits in memory (39k images = 120 MB).
    """
    image = image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 batch Nx3x32x32 -> float32, scaled to [0, 1] then standardized per channel."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std
