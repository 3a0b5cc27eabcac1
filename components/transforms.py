"""The image transforms, in numpy and PIL: decoded image -> uint8 3x32x32 -> normalized float32.

The one definition every path uses: preprocess and train (through components/model.py's torch
views of these arrays), evaluate, and the predictor, whose ONNX processes never import torch.
"""

from __future__ import annotations

import numpy as np
from PIL import ExifTags, Image

IMAGE_SIZE = 32
INPUT_SHAPE = (3, IMAGE_SIZE, IMAGE_SIZE)


def to_uint8_32(image: Image.Image) -> np.ndarray:
    """Decoded image of any size -> uint8 array 3x32x32 (upright, RGB, bilinear, antialiased).

    Same as torchvision's ``transforms.Resize((32, 32))`` on a PIL image, stored as uint8 so
    a whole split fits in memory (39k images = 120 MB).
    """
    return np.ascontiguousarray(_rgb_32(image).transpose(2, 0, 1))


# Greyscale modes deeper than 8 bits that PIL decodes PNG and PPM into: 16-bit PNG ("I;16") and PPM
# with a maxval above 255 ("I", which PIL scales to 0..65535).
DEEP_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _eight_bit_grey(image: Image.Image) -> Image.Image:
    """16-bit greyscale -> 8-bit "L", v * 255 / 65535 rounded, as PIL reads a 16-bit RGB PPM. PIL's
    own convert("RGB") clips these modes at 255 instead: a mid-grey 16-bit image became pure white."""
    deep = np.asarray(image)          # uint16 ("I;16") or int32 ("I"); uint32 holds 65535 * 255 + 32767
    scaled = deep.astype(np.uint32) if deep.dtype == np.uint16 else np.clip(deep, 0, 65535).astype(np.uint32)
    scaled *= 255                     # in place: a 4096x4096 image took +300 MB through int64 temporaries
    scaled += 32767
    scaled //= 65535
    return Image.fromarray(scaled.astype(np.uint8), "L")


# EXIF orientation -> the transpose that shows the image upright (ImageOps.exif_transpose's table; it
# also rewrites the EXIF for the copy, which took 16.7 s for 65,535 tags)
ORIENTATIONS = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def upright(image: Image.Image) -> Image.Image:
    """The image as a viewer shows it: a camera's EXIF (or XMP) orientation applied. A phone photo
    is often stored sideways with orientation 6; GTSRB's PPMs carry none (unchanged)."""
    method = ORIENTATIONS.get(image.getexif().get(ExifTags.Base.Orientation, 1))
    return image if method is None else image.transpose(method)


def _rgb_32(image: Image.Image) -> np.ndarray:
    """Decoded image -> uint8 32x32x3 (height, width, RGB): the resize of :func:`to_uint8_32`."""
    image = upright(image)
    if image.mode in DEEP_GREY:
        image = _eight_bit_grey(image)
    if image.mode != "RGB":            # an RGB image is resized as it is (convert would copy it)
        image = image.convert("RGB")
    return np.asarray(image.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR), dtype=np.uint8)


def normalize(images: np.ndarray, mean, std) -> np.ndarray:
    """uint8 batch Nx3x32x32 -> float32, scaled to [0, 1] then standardized per channel."""
    mean = np.asarray(mean, dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(std, dtype=np.float32).reshape(1, -1, 1, 1)
    return (images.astype(np.float32) / np.float32(255.0) - mean) / std


class Normalizer:
    """:func:`normalize` for one image at a time, written in place: the per-channel scale and
    shift are folded once (x / 255 - mean) / std = x * scale - shift, so an image costs one
    multiply and one subtract (the predictor's per-request path). Equal to :func:`normalize`
    up to float32 rounding (< 1e-6, tests/test_model.py)."""

    def __init__(self, mean, std):
        mean = np.asarray(mean, dtype=np.float64).reshape(-1, 1, 1)
        std = np.asarray(std, dtype=np.float64).reshape(-1, 1, 1)
        self.scale = (1.0 / (255.0 * std)).astype(np.float32)
        self.shift = (mean / std).astype(np.float32)
        self.mean, self.std = mean.ravel().tolist(), std.ravel().tolist()
        # Per channel, the values an 8-bit image takes once normalized: pixel 0 and pixel 255.
        self.low = (-mean / std).ravel()
        self.high = ((1.0 - mean) / std).ravel()

    def into(self, out: np.ndarray, image: Image.Image) -> None:
        """Decoded image -> ``out`` (float32 3x32x32): the transform of :func:`to_uint8_32` then
        :func:`normalize`."""
        np.multiply(_rgb_32(image).transpose(2, 0, 1), self.scale, out=out)
        np.subtract(out, self.shift, out=out)
