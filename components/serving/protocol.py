"""The request protocol: a V1 or V2 request -> one validated, normalized batch; the answer back.

Requests (the same transforms as training: decode, upright, RGB, bilinear resize to 32x32, normalize):
- V1 ``POST /v1/models/<name>:predict``: ``{"instances": [I, ...], "parameters": {"top_k": k}}``
  where ``I`` is ``{"image": {"b64": "<base64 PNG/JPEG/PPM>"}}`` or a normalized 3x32x32 number array.
- V2 (Open Inference Protocol) ``POST /v2/models/<name>/infer`` or gRPC ``ModelInfer``: one input,
  either ``image`` (BYTES, shape [N]: each element an encoded image's own bytes, or their base64
  text; JSON strings are base64) or ``input`` (FP32, shape [N, 3, 32, 32]); as JSON data, gRPC
  contents or raw bytes (components/serving/binary.py); ``parameters: {"top_k": k}``.
Any bad request raises ``kserve.errors.InvalidInput`` (answered 400 / INVALID_ARGUMENT) saying what was wrong; a
request whose images together exceed the decoded-pixel budget raises :class:`RequestTooLarge`
(413) after reading only image headers, before any image is decoded.
Answers: class id, class name and probability per instance (and the top k when asked).
"""

from __future__ import annotations

import binascii
import functools
import io
import itertools
import math
import re
import warnings
from dataclasses import dataclass

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput, ModelNotFound
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from components import transforms
from components.serving import binary
from components.serving.imagefile import (
    EXIF_PREFIX,
    JPEG_SOI,
    JPEG_SOS,
    MAX_EXIF_ENTRIES,
    PNG_SIGNATURE,
    exif_entries,
    jpeg_header_problem,
    png_chunks,
    png_data_problem,
    pnm_problem,
)

MAX_REQUEST_PIXELS = 4096 * 4096           # decoded pixels per request, all its images together
MAX_SIDE = 4096                            # pixels, either side of one image: 1 x 16M decodes 10-20x slower than 4096^2
# A JPEG's decoder walks every block once per scan: past this many scans (libjpeg writes 10 for a
# progressive colour image), each scan counts as the image's pixels again in the request's budget.
# A 99 KB 4096x4096 JPEG of 1,000 scans took 14 s to decode.
FREE_JPEG_SCANS = 20
# A PGM/PPM whose maxval is not 255 (nor 65535 for grey) goes through PIL's Python decoder, ~1.3 us a
# sample against ~0.03 us a pixel for the others (a 1000x1000 one took 1.4 s): each pixel counts this many.
PY_DECODER_COST = 256
MAX_EXIF_BYTES = 65535                     # a JPEG's APP1 segment holds no more; a PNG eXIf chunk could
# PIL inflates every iCCP, zTXt and iTXt chunk of a PNG, keeping the text, each to at most
# PNG_TEXT_BYTES (PIL's MAX_TEXT_CHUNK), and all its text together to at most PNG_TEXT_BYTES (PIL's
# MAX_TEXT_MEMORY; 64 KB of EXIF as "Raw profile type exif" hex text takes 130 KB). PIL handles each
# chunk in Python: image-data chunks past FREE_PNG_CHUNKS count as PNG_CHUNK_COST pixels each in the
# request's budget.
PNG_TEXT_BYTES = 256 * 1024
FREE_PNG_CHUNKS = 1024
PNG_CHUNK_COST = 512
MOST_PNG_CHUNKS = FREE_PNG_CHUNKS + MAX_REQUEST_PIXELS // PNG_CHUNK_COST + 1   # more spend any budget
PngImagePlugin.MAX_TEXT_CHUNK = PngImagePlugin.MAX_TEXT_MEMORY = PNG_TEXT_BYTES
# PIL warns about what a client sent (a corrupt EXIF tag, a large image) on stderr, a line or two
# per tag: 5,000 bad tags in a 60 KB EXIF wrote 10,000 log lines. This server checks images itself
# and logs one line per refusal, so PIL's warnings are not printed.
warnings.filterwarnings("ignore", module=r"PIL\.")
# libjpeg keeps a coefficient plane per component for a progressive JPEG and PIL converts CMYK to RGB
# after it: a 4096x4096 CMYK progressive JPEG took 0.69 s and +210 MB. A 4-component JPEG's pixels
# count this many times.
CMYK_JPEG_COST = 2
IMAGE_FORMATS = ("PNG", "JPEG", "PPM")
# An encoded image's first bytes; base64 text never starts like this (PPM's magic has whitespace after it).
IMAGE_SIGNATURE = re.compile(rb"\x89PNG\r\n\x1a\n|\xff\xd8\xff|P[1-6]\s")
V1_KEYS = {"instances", "parameters"}
V2_INPUTS = {"image": "BYTES", "input": "FP32"}
V2_OUTPUTS = ("class_id", "class_name", "probability", "top_k_class_id", "top_k_probability")
V2_PARAMETERS = ("top_k", "binary_data_output")   # the latter: KServe's binary tensor extension, for outputs
V2_OUTPUT_PARAMETERS = ("binary_data",)
# An input's: the binary extension's size; content_type, which MLServer-style clients send (its value
# is not read: the input's name and datatype say what the data is)
V2_INPUT_PARAMETERS = ("binary_data_size", "content_type")
NORMALIZED_SLACK = 0.01     # of a channel's normalized range, beyond which client-normalized values are refused


@dataclass(frozen=True)
class Signature:
    """What a request is checked against: the model's input shape, classes, normalization and
    the largest batch the server accepts."""
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    normalizer: transforms.Normalizer    # the model card's per-channel mean and std
    max_batch: int
    max_pixels: int = MAX_REQUEST_PIXELS


class VersionNotServed(ModelNotFound):
    """A request pinned to a model version this server does not serve (404 / NOT_FOUND)."""

    def __init__(self, model_name: str, requested: str, served: str):
        super().__init__(model_name)
        self.reason = (f"model {model_name} version {requested!r} is not served here; this server serves version "
                       f"{served!r} (or send no version)")


class RequestTooLarge(InvalidInput):
    """A request within the body limit whose images would decode to more pixels than allowed (413)."""


@dataclass
class Batch:
    """What preprocess hands to predict: one normalized batch and how to answer it."""
    x: np.ndarray                        # float32 N x 3 x 32 x 32, normalized
    top_k: int                           # 0 = answer without a top-k list
    v2: InferRequest | None = None       # the V2 request (None for V1)


# --------------------------------------------------------------------------- values
def _fail(where: str, message: str):
    raise InvalidInput(f"{where}: {message}")


def decode_base64(value, where: str) -> bytes:
    if not isinstance(value, (str, bytes)):
        _fail(where, f"expected a base64 string, got {type(value).__name__}")
    try:                              # strict: only the base64 alphabet, padding only at the end
        data = binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError) as e:
        prefix = value[:5].lower() if isinstance(value, str) else value[:5].lower().decode("latin-1")
        hint = "; send the base64 text alone, without the data: URL prefix" if prefix == "data:" else ""
        _fail(where, f"not valid base64 ({e}){hint}")
    if not data:
        _fail(where, "empty image (zero bytes)")
    return data


def open_image(data: bytes, where: str, budget: PixelBudget) -> Image.Image:
    """Encoded PNG/JPEG/PPM bytes -> a PIL image with its header read and checked (format, size)
    and its decoding cost spent from the request's ``budget``; no pixel is decoded yet."""
    png, problem = None, None
    if data.startswith(JPEG_SOI):
        problem = jpeg_header_problem(data)
    elif data.startswith(PNG_SIGNATURE):
        png = png_chunks(data, MOST_PNG_CHUNKS)
        problem = png.problem
    elif data[:1] == b"P":
        problem = pnm_problem(data)
    if problem is not None:
        _fail(where, problem)
    try:                              # only these formats' header parsers ever see the bytes
        image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
    except Image.DecompressionBombError as e:
        raise RequestTooLarge(f"{where}: image too large to decode ({e})") from None
    except UnidentifiedImageError:
        _fail(where, f"cannot decode image: not a {', '.join(IMAGE_FORMATS)} image (the formats accepted)")
    except (OSError, ValueError, SyntaxError) as e:
        _fail(where, f"cannot decode image ({type(e).__name__}: {e})")
    width, height = image.size
    if width < 1 or height < 1:
        _fail(where, f"image has zero size ({width}x{height})")
    if width > MAX_SIDE or height > MAX_SIDE:
        raise RequestTooLarge(f"{where}: a {width}x{height} image; this server decodes images of at most "
                              f"{MAX_SIDE} pixels a side")
    check_metadata(image, where)
    budget.spend(image, data, where, png.chunks if png else None)
    if png is not None and (problem := png_data_problem(png)) is not None:    # its size is within the limits
        _fail(where, problem)
    return image


def check_metadata(image: Image.Image, where: str) -> None:
    """EXIF, which reading the orientation parses tag by tag, at most :data:`MAX_EXIF_BYTES` and
    :data:`MAX_EXIF_ENTRIES` in its first directory: an eXIf/APP1 block, or the hex "Raw profile
    type exif" text PIL reads when there is none (a 2.5 KB zTXt held 480 KB of it). Run on the
    header, and again once the pixels are loaded (a PNG's chunks after its image data only arrive
    then)."""
    exif = image.info.get("exif") or b""
    size = len(exif) - len(EXIF_PREFIX) if exif.startswith(EXIF_PREFIX) else len(exif)
    raw = image.info.get("Raw profile type exif")
    if isinstance(raw, str) and not exif:       # as PIL reads it: hex lines after a 3-line preamble
        lines = raw.split("\n")[3:]
        size = sum(map(len, lines)) // 2
        if size <= MAX_EXIF_BYTES:
            try:
                exif = bytes.fromhex("".join(lines))
            except ValueError:
                _fail(where, "EXIF as \"Raw profile type exif\" text that is not hexadecimal")
    if size > MAX_EXIF_BYTES:
        _fail(where, f"EXIF of {size} bytes; at most {MAX_EXIF_BYTES} (what a JPEG can carry)")
    if (entries := exif_entries(exif)) > MAX_EXIF_ENTRIES:
        _fail(where, f"EXIF whose first directory has {entries} entries; at most {MAX_EXIF_ENTRIES}")


def decode_image(image: Image.Image, where: str, out: np.ndarray, normalizer: transforms.Normalizer) -> None:
    """An opened image -> ``out`` (float32 3x32x32) through the training transform, normalized."""
    try:
        with image:
            image.load()
            check_metadata(image, where)
            check_palette(image, where)
            normalizer.into(out, image)
    except InvalidInput:                              # check_metadata's, already saying where
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        _fail(where, f"cannot decode image ({type(e).__name__}: {e})")


def check_palette(image: Image.Image, where: str) -> None:
    """A palette image's pixels must index its palette (PIL shows an index past a PNG's PLTE as
    black; the PNG specification calls it an error). One pass over the decoded indices."""
    if image.mode == "P" and image.palette is not None:
        entries = len(image.palette.palette) // len(image.palette.mode)
        if entries < 256 and (largest := int(np.asarray(image).max())) >= entries:
            _fail(where, f"a palette image with a pixel of index {largest}; its palette has {entries} entries")


class PixelBudget:
    """The decoded pixels one request may cost, spent image by image as headers are read
    (:func:`decode_cost`)."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def spend(self, image: Image.Image, data: bytes, where: str, png_chunk_count: int | None) -> None:
        cost, what = decode_cost(image, data, png_chunk_count)
        self.used += cost
        if self.used > self.limit:
            raise RequestTooLarge(
                f"{where}: {what} brings the request to {self.used} decoded pixels, more "
                f"than the limit of {self.limit} pixels per request (all its images together)")


def decode_cost(image: Image.Image, data: bytes, png_chunk_count: int | None) -> tuple[int, str]:
    """(the pixels decoding ``image`` counts as, what it is): width x height, more where the decoder
    does more per pixel: a JPEG (or MPO) of more than :data:`FREE_JPEG_SCANS` scans walks its
    pixels once per scan; a CMYK JPEG :data:`CMYK_JPEG_COST` each; a PGM/PPM on PIL's Python
    decoder costs :data:`PY_DECODER_COST` each; a PNG's chunks past :data:`FREE_PNG_CHUNKS` cost
    :data:`PNG_CHUNK_COST` each (``png_chunk_count``: :func:`png_chunks`' count for a PNG, which
    :func:`open_image` walked already; None for other formats)."""
    width, height = image.size
    pixels = width * height
    if data.startswith(JPEG_SOI) and (scans := data.count(JPEG_SOS)) > FREE_JPEG_SCANS:
        cost = pixels * scans // FREE_JPEG_SCANS
        return cost, f"a {width}x{height} JPEG of {scans} scans (decoded once per scan: it counts as {cost} pixels)"
    chunks = png_chunk_count
    if chunks is not None and chunks > FREE_PNG_CHUNKS:
        cost = pixels + (chunks - FREE_PNG_CHUNKS) * PNG_CHUNK_COST
        return cost, (f"a {width}x{height} PNG of {chunks} chunks (PIL reads each in Python: past {FREE_PNG_CHUNKS} "
                      f"they count as {PNG_CHUNK_COST} pixels each, {cost} in all)")
    if data.startswith(JPEG_SOI) and image.mode == "CMYK":
        cost = pixels * CMYK_JPEG_COST
        return cost, (f"a {width}x{height} CMYK JPEG (four components, converted to RGB: it counts as {cost} "
                      "pixels)")
    if image.tile and image.tile[0][0] == "ppm":
        cost = pixels * PY_DECODER_COST
        return cost, (f"a {width}x{height} PGM/PPM of maxval {image.tile[0][3][-1]} (PIL decodes it in Python: "
                      f"it counts as {cost} pixels; send maxval 255, or PNG)")
    return pixels, f"a {width}x{height} image"


def as_numbers(data, where: str) -> np.ndarray:
    """A nested JSON number array -> float32 ndarray; rejects strings, nulls, booleans (even one
    among numbers, which numpy would turn into 1.0 or 0.0), integers beyond 64 bits and ragged
    arrays, naming the position of the first offending value. NaN and infinity are refused by
    :func:`check_normalized`, which every caller runs on the result."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as e:
        _fail(where, f"not a rectangular number array ({e})")
    numeric = array.dtype.kind in "iuf"
    # numpy reads true/false among numbers as 1/0: look for bools only where a 0 or 1 is (C speed)
    maybe_bool = numeric and bool(((array == 0) | (array == 1)).any())
    if isinstance(data, list) and array.ndim and (
            not numeric or (maybe_bool and bool in set(map(type, _leaves(data, array.ndim))))):
        position, value = _first_non_number(data, array.shape)
        if position == ():
            _fail(where, f"expected numbers, got an array of {array.dtype}")
        at = f"{where}{''.join(f'[{i}]' for i in position)}"
        if isinstance(value, int) and not isinstance(value, bool):    # numpy keeps it as an object
            _fail(at, f"an integer of {value.bit_length()} bits, outside the 64-bit range")
        _fail(at, f"expected a number, got {_as_json(value)}")
    if not numeric:
        _fail(where, f"expected numbers, got {type(data).__name__}")
    with np.errstate(over="ignore"):            # past float32's range: infinity, refused by check_normalized
        return array.astype(np.float32, copy=False)


def check_normalized(x: np.ndarray, where: str, normalizer: transforms.Normalizer) -> None:
    """A client-normalized batch (N x C x H x W) must hold what the training transform makes of an
    8-bit image: finite values inside each channel's normalized range (pixel 0 .. pixel 255 under
    the model card's mean and std), give or take 1 % of it for a client's rounding. Anything else
    (NaN, raw 0..255 pixels, another model's normalization, values that overflow the network) is refused."""
    lo, hi = _accepted_range(normalizer)
    low, high = x.min(axis=(0, 2, 3)), x.max(axis=(0, 2, 3))
    if (lo <= low).all() and (high <= hi).all():     # one pass; a NaN fails here (comparisons are false)
        return
    if not np.isfinite(x).all():                # raw FP32 bytes can hold any float32
        _fail(where, "contains NaN or infinity (or a number beyond float32, e.g. 1e308)")
    c = next(c for c in range(len(lo)) if not (lo[c] <= low[c] and high[c] <= hi[c]))
    bad = low[c] if low[c] < lo[c] else high[c]
    _fail(where, f"channel {c} holds {bad:.6g}, outside [{normalizer.low[c]:.4f}, {normalizer.high[c]:.4f}]: "
                 "the range of pixels 0..255 normalized as (x / 255 - mean) / std with this model's mean "
                 f"{_rounded(normalizer.mean)} and std {_rounded(normalizer.std)}; send values normalized that "
                 "way, or the encoded image")


@functools.lru_cache(maxsize=8)
def _accepted_range(normalizer: transforms.Normalizer) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the lowest and highest client-normalized value accepted (the slack included)."""
    slack = NORMALIZED_SLACK * (normalizer.high - normalizer.low)
    return normalizer.low - slack, normalizer.high + slack


def _rounded(values) -> str:
    return "[" + ", ".join(f"{v:.4f}" for v in values) + "]"


def _as_json(value, limit: int = 60) -> str:
    """A request's value as the client wrote it, cut to ``limit`` characters (its type's name if
    JSON cannot hold it, e.g. an object with an integer beyond 64 bits)."""
    try:
        text = orjson.dumps(value).decode()
    except TypeError:
        return f"a {type(value).__name__}"
    return text if len(text) <= limit else text[:limit] + "..."


def _leaves(data: list, depth: int):
    """The values of a rectangular nested list ``depth`` levels deep, in row-major order."""
    flat = data
    for _ in range(depth - 1):
        flat = itertools.chain.from_iterable(flat)
    return flat


def _first_non_number(data: list, shape: tuple) -> tuple[tuple, object]:
    """(index, value) of the first value in a rectangular nested list of ``shape`` that is not a
    JSON number (a bool, string, null, object, or an integer numpy cannot hold); ((), None) if none."""
    def plain(value) -> bool:
        return type(value) is float or (type(value) is int and -(1 << 63) <= value < 1 << 64)

    found = next(((i, value) for i, value in enumerate(_leaves(data, len(shape))) if not plain(value)), None)
    if found is None:
        return (), None
    return tuple(int(i) for i in np.unravel_index(found[0], shape)), found[1]


def parse_parameters(parameters, num_classes: int, known: tuple[str, ...] = ("top_k",)) -> int:
    """The request's ``parameters``: top_k (0 when absent); any key not in ``known`` is an error."""
    if parameters is None:
        return 0
    if not isinstance(parameters, dict):
        _fail("parameters", f"expected an object, got {type(parameters).__name__}")
    _only_known(parameters, known, "parameters")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        _fail("parameters.binary_data_output", "expected true or false")
    if "top_k" not in parameters:
        return 0
    k = parameters["top_k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        _fail("parameters.top_k", f"expected an integer 1..{num_classes}, got {_as_json(k)}")
    return k


def _check_count(n: int, where: str, sig: Signature) -> None:
    if n < 1:
        _fail(where, "no instances; send at least one")
    if n > sig.max_batch:
        _fail(where, f"{n} instances exceed the maximum batch of {sig.max_batch}")


def encoded_image(value, where: str) -> bytes:
    """A V2 BYTES element: an encoded image's own bytes (binary data, gRPC contents) or base64 text."""
    return value if isinstance(value, bytes) and IMAGE_SIGNATURE.match(value) else decode_base64(value, where)


def grpc_parameters(parameters) -> dict:
    """gRPC parameters (a map of InferParameter) -> the plain dict REST sends."""
    plain = {}
    for key, value in parameters.items():
        kind = value.WhichOneof("parameter_choice")
        if kind is None:
            _fail(f"parameters.{key}", "a value of a type this server does not read; send bool, int64 or string")
        plain[key] = getattr(value, kind)
    return plain


def _decode_images(x: np.ndarray, images: list, sig: Signature) -> None:
    """Decode the opened images into their rows of ``x``, normalized: [(row, image, where)]."""
    for i, image, where in images:
        decode_image(image, where, x[i], sig.normalizer)


# --------------------------------------------------------------------------- requests
def parse_request(payload, sig: Signature) -> Batch:
    """A V2 InferRequest, a V1 JSON object, or JSON bytes sent with another content type -> Batch."""
    if isinstance(payload, InferRequest):
        return _v2_batch(payload, sig)
    if isinstance(payload, (bytes, bytearray)):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError as e:
            raise InvalidInput(f"request body is not JSON ({e})") from None
    return _v1_batch(payload, sig)


def _v1_batch(body, sig: Signature) -> Batch:
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object with an 'instances' list, "
                           f"got {type(body).__name__}")
    if "instances" not in body:
        raise InvalidInput("missing key 'instances' (a list of {\"image\": {\"b64\": ...}} or 3x32x32 arrays)")
    unknown = set(body) - V1_KEYS
    if unknown:
        raise InvalidInput(f"unknown key(s) {sorted(unknown)}; expected {sorted(V1_KEYS)}")
    instances = body["instances"]
    if not isinstance(instances, list):
        _fail("instances", f"expected a list, got {type(instances).__name__}")
    _check_count(len(instances), "instances", sig)
    top_k = parse_parameters(body.get("parameters"), len(sig.class_names))
    x = np.empty((len(instances), *sig.input_shape), dtype=np.float32)
    budget, images = PixelBudget(sig.max_pixels), []
    for i, instance in enumerate(instances):      # every header first: refused before decoding any image
        where = f"instances[{i}]"
        if isinstance(instance, list):
            x[i] = _v1_array(instance, where, sig)
        else:
            images.append((i, *_v1_image(instance, where, budget)))
    _decode_images(x, images, sig)
    return Batch(x, top_k)


def _v1_array(instance: list, where: str, sig: Signature) -> np.ndarray:
    array = as_numbers(instance, where)
    if array.shape != sig.input_shape:
        _fail(where, f"array shape {list(array.shape)} is not {list(sig.input_shape)}")
    check_normalized(array[None], where, sig.normalizer)
    return array


def _v1_image(instance, where: str, budget: PixelBudget) -> tuple[Image.Image, str]:
    if not isinstance(instance, dict):
        _fail(where, f"expected {{\"image\": {{\"b64\": ...}}}} or a 3x32x32 number array, "
                     f"got {type(instance).__name__}")
    if set(instance) != {"image"}:
        _fail(where, f"expected exactly the key 'image', got {sorted(instance)}")
    image = instance["image"]
    if not isinstance(image, dict) or set(image) != {"b64"}:
        _fail(f"{where}.image", "expected {\"b64\": \"<base64 PNG/JPEG/PPM>\"}")
    where = f"{where}.image.b64"
    data = decode_base64(image["b64"], where)
    return open_image(data, where, budget), where


def _v2_batch(request: InferRequest, sig: Signature) -> Batch:
    if len(request.inputs) != 1:
        raise InvalidInput(f"expected exactly one input ('image' or 'input'), got {len(request.inputs)}")
    item = request.inputs[0]
    where = f"input '{item.name}'"
    expected = V2_INPUTS.get(item.name)
    if expected is None:
        _fail(where, "unknown input; send 'image' (BYTES, shape [N], base64 PNG/JPEG/PPM) "
                     f"or 'input' (FP32, shape [N, {', '.join(map(str, sig.input_shape))}])")
    if item.datatype != expected:
        _fail(where, f"datatype {item.datatype} is not {expected}")
    _check_input_parameters(item.parameters, where)
    parameters = grpc_parameters(request.parameters) if request.from_grpc else request.parameters
    top_k = parse_parameters(parameters, len(sig.class_names), V2_PARAMETERS)
    names = [output.name for output in request.request_outputs or []]
    if len(set(names)) != len(names):
        twice = next(name for name in names if names.count(name) > 1)
        _fail(f"output '{twice}'", "requested more than once")
    for output in request.request_outputs or []:
        if output.name not in V2_OUTPUTS:
            _fail(f"output '{output.name}'", f"unknown output; known: {', '.join(V2_OUTPUTS)}")
        if output.name.startswith("top_k_") and not top_k:
            _fail(f"output '{output.name}'", "needs parameters.top_k")
        _check_output_parameters(output)
    shape, data, raw = list(item.shape), item.data, binary.raw_bytes(item)
    if any(d < 0 for d in shape):
        _fail(where, f"shape {shape} has a negative dimension")
    if item.name == "input":
        if len(shape) != 4 or tuple(shape[1:]) != sig.input_shape:
            _fail(where, f"shape {shape} is not [N, {', '.join(map(str, sig.input_shape))}]")
        _check_count(shape[0], where, sig)
        count = math.prod(shape)
        if raw is None:
            array = as_numbers(data, f"{where} data")
        else:
            array = binary.fp32(raw, count, where)
        if array.size != count:
            _fail(where, f"{array.size} values do not fill shape {shape}")
        check_normalized(array := array.reshape(shape), where, sig.normalizer)
        return Batch(array, top_k, request)
    if raw is not None:
        data = binary.bytes_elements(raw, where)
    if len(shape) != 1 or shape[0] != len(data):
        _fail(where, f"shape {shape} does not match its {len(data)} data elements (expected [N])")
    _check_count(len(data), where, sig)
    budget, images = PixelBudget(sig.max_pixels), []
    for i, value in enumerate(data):              # every header first: refused before decoding any image
        at = f"{where} data[{i}]"
        encoded = encoded_image(value, at)
        images.append((i, open_image(encoded, at, budget), at))
    x = np.empty((len(data), *sig.input_shape), dtype=np.float32)
    _decode_images(x, images, sig)
    return Batch(x, top_k, request)


def _only_known(parameters: dict, known: tuple[str, ...], where: str) -> None:
    unknown = set(parameters) - set(known)
    if unknown:
        _fail(where, f"unknown parameter(s) {sorted(unknown)}; known: {list(known)}")


def _check_input_parameters(parameters, where: str) -> None:
    parameters = parameters or {}               # a dict for gRPC too (KServe converts them)
    _only_known(parameters, V2_INPUT_PARAMETERS, where)
    if not isinstance(parameters.get("content_type", ""), str):
        _fail(f"{where}.parameters.content_type", f"expected a string, got {_as_json(parameters['content_type'])}")


def _check_output_parameters(output) -> None:
    parameters = output.parameters or {}        # a dict for gRPC too (KServe converts them)
    _only_known(parameters, V2_OUTPUT_PARAMETERS, f"output '{output.name}'")
    if not isinstance(parameters.get("binary_data", False), bool):
        _fail(f"output '{output.name}'.parameters.binary_data", "expected true or false")


# --------------------------------------------------------------------------- answers
def answer(batch: Batch, ids: list[list[int]], probs: list[list[float]], class_names, model_name: str):
    """The top classes (ids, probabilities per instance, best first) as a V1 dict or a V2 InferResponse."""
    if batch.v2 is None:
        return {"predictions": [_v1_answer(i, p, batch.top_k, class_names) for i, p in zip(ids, probs, strict=True)]}
    n, k = len(ids), batch.top_k
    outputs = [InferOutput("class_id", [n], "INT64", [row[0] for row in ids]),
               InferOutput("class_name", [n], "BYTES", [class_names[row[0]] for row in ids]),
               InferOutput("probability", [n], "FP32", [row[0] for row in probs])]
    if k:
        outputs += [InferOutput("top_k_class_id", [n, k], "INT64", [c for row in ids for c in row]),
                    InferOutput("top_k_probability", [n, k], "FP32", [p for row in probs for p in row])]
    if batch.v2.request_outputs:      # only those, in that order (KServe's gRPC answer would carry them all)
        by_name = {output.name: output for output in outputs}
        outputs = [by_name[requested.name] for requested in batch.v2.request_outputs]
    return InferResponse(response_id=batch.v2.id or "", model_name=model_name, infer_outputs=outputs,
                         requested_outputs=batch.v2.request_outputs, use_binary_outputs=batch.v2.use_binary_outputs)


def _v1_answer(ids: list[int], probs: list[float], top_k: int, names) -> dict:
    result = {"class_id": ids[0], "class_name": names[ids[0]], "probability": probs[0]}
    if top_k:
        result["top_k"] = [{"class_id": c, "class_name": names[c], "probability": p}
                           for c, p in zip(ids, probs, strict=True)]
    return result


def input_types(input_shape) -> list[dict]:
    return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
            {"name": "input", "datatype": "FP32", "shape": [-1, *input_shape]}]


def output_types() -> list[dict]:
    return [{"name": "class_id", "datatype": "INT64", "shape": [-1]},
            {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "top_k_class_id", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "top_k_probability", "datatype": "FP32", "shape": [-1, -1]}]
