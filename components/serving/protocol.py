"""The request protocol: a V1 or V2 request -> one validated, normalized batch; the answer back.

Requests (the same transforms as training: decode, RGB, bilinear resize to 32x32, normalize):
- V1 ``POST /v1/models/<name>:predict``: ``{"instances": [I, ...], "parameters": {"top_k": k}}``
  where ``I`` is ``{"image": {"b64": "<base64 PNG/JPEG/PPM>"}}`` or a normalized 3x32x32 number array.
- V2 ``POST /v2/models/<name>/infer``: one input, either ``image`` (BYTES, shape [N], base64
  strings) or ``input`` (FP32, shape [N, 3, 32, 32]); ``parameters: {"top_k": k}``.
Any bad request raises ``kserve.errors.InvalidInput`` (answered 400) saying what was wrong.
Answers: class id, class name and probability per instance (and the top k when asked).
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse
from kserve.errors import InvalidInput
from PIL import Image

from components import transforms

MAX_IMAGE_PIXELS = 4096 * 4096             # decoded size limit (decompression bombs)
IMAGE_FORMATS = ("PNG", "JPEG", "PPM")
V1_KEYS = {"instances", "parameters"}
V2_INPUTS = {"image": "BYTES", "input": "FP32"}
V2_OUTPUTS = ("class_id", "class_name", "probability", "top_k_class_id", "top_k_probability")
V2_PARAMETERS = ("top_k", "binary_data_output")   # the latter: KServe's binary tensor extension, for outputs


@dataclass(frozen=True)
class Signature:
    """What a request is checked against: the model's input shape, classes, normalization and
    the largest batch the server accepts."""
    input_shape: tuple[int, ...]
    class_names: tuple[str, ...]
    mean: np.ndarray                     # float32 1 x 3 x 1 x 1
    std: np.ndarray
    max_batch: int


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
    if not isinstance(value, str):
        _fail(where, f"expected a base64 string, got {type(value).__name__}")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        _fail(where, f"not valid base64 ({e})")
    if not data:
        _fail(where, "empty image (zero bytes)")
    return data


def decode_image(data: bytes, where: str) -> np.ndarray:
    """Encoded PNG/JPEG/PPM bytes -> uint8 3x32x32 array through the training transform."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in IMAGE_FORMATS:
                _fail(where, f"image format {image.format} is not accepted; send {', '.join(IMAGE_FORMATS)}")
            width, height = image.size
            if width < 1 or height < 1:
                _fail(where, f"image has zero size ({width}x{height})")
            if width * height > MAX_IMAGE_PIXELS:
                _fail(where, f"image is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS}")
            image.load()
            return transforms.to_uint8_32(image)
    except InvalidInput:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        _fail(where, f"cannot decode image ({type(e).__name__}: {e})")


def as_numbers(data, where: str) -> np.ndarray:
    """A nested JSON number array -> float32 ndarray; rejects strings, booleans, ragged arrays, NaN/inf."""
    try:
        array = np.asarray(data)
    except (ValueError, TypeError) as e:
        _fail(where, f"not a rectangular number array ({e})")
    if array.dtype.kind not in "iuf":
        kind = "booleans" if array.dtype.kind == "b" else f"non-numbers (array dtype {array.dtype})"
        _fail(where, f"expected numbers, got {kind}")
    array = array.astype(np.float32, copy=False)
    if not np.isfinite(array).all():
        _fail(where, "contains NaN or infinity")
    return array


def parse_parameters(parameters, num_classes: int, known: tuple[str, ...] = ("top_k",)) -> int:
    """The request's ``parameters``: top_k (0 when absent); any key not in ``known`` is an error."""
    if parameters is None:
        return 0
    if not isinstance(parameters, dict):
        _fail("parameters", f"expected an object, got {type(parameters).__name__}")
    unknown = set(parameters) - set(known)
    if unknown:
        _fail("parameters", f"unknown parameter(s) {sorted(unknown)}; known: {list(known)}")
    if not isinstance(parameters.get("binary_data_output", False), bool):
        _fail("parameters.binary_data_output", "expected true or false")
    if "top_k" not in parameters:
        return 0
    k = parameters["top_k"]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_classes:
        _fail("parameters.top_k", f"expected an integer 1..{num_classes}, got {k!r}")
    return k


def _check_count(n: int, where: str, sig: Signature) -> None:
    if n < 1:
        _fail(where, "no instances; send at least one")
    if n > sig.max_batch:
        _fail(where, f"{n} instances exceed the maximum batch of {sig.max_batch}")


def _image(value, where: str, sig: Signature) -> np.ndarray:
    """A base64 image -> normalized float32 3x32x32."""
    return transforms.normalize(decode_image(decode_base64(value, where), where)[None], sig.mean, sig.std)[0]


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
    for i, instance in enumerate(instances):
        x[i] = _v1_instance(instance, f"instances[{i}]", sig)
    return Batch(x, top_k)


def _v1_instance(instance, where: str, sig: Signature) -> np.ndarray:
    if isinstance(instance, list):
        array = as_numbers(instance, where)
        if array.shape != sig.input_shape:
            _fail(where, f"array shape {list(array.shape)} is not {list(sig.input_shape)}")
        return array
    if not isinstance(instance, dict):
        _fail(where, f"expected {{\"image\": {{\"b64\": ...}}}} or a 3x32x32 number array, "
                     f"got {type(instance).__name__}")
    if set(instance) != {"image"}:
        _fail(where, f"expected exactly the key 'image', got {sorted(instance)}")
    image = instance["image"]
    if not isinstance(image, dict) or set(image) != {"b64"}:
        _fail(f"{where}.image", "expected {\"b64\": \"<base64 PNG/JPEG/PPM>\"}")
    return _image(image["b64"], f"{where}.image.b64", sig)


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
    top_k = parse_parameters(request.parameters, len(sig.class_names), V2_PARAMETERS)
    for output in request.request_outputs or []:
        if output.name not in V2_OUTPUTS:
            _fail(f"output '{output.name}'", f"unknown output; known: {', '.join(V2_OUTPUTS)}")
        if output.name.startswith("top_k_") and not top_k:
            _fail(f"output '{output.name}'", "needs parameters.top_k")
    shape, data = list(item.shape), item.data
    if item.name == "input":
        if len(shape) != 4 or tuple(shape[1:]) != sig.input_shape:
            _fail(where, f"shape {shape} is not [N, {', '.join(map(str, sig.input_shape))}]")
        _check_count(shape[0], where, sig)
        array = as_numbers(data, where)
        if array.size != int(np.prod(shape)):
            _fail(where, f"{array.size} values do not fill shape {shape}")
        return Batch(array.reshape(shape), top_k, request)
    if len(shape) != 1 or shape[0] != len(data):
        _fail(where, f"shape {shape} does not match its {len(data)} data elements (expected [N])")
    _check_count(len(data), where, sig)
    x = np.empty((len(data), *sig.input_shape), dtype=np.float32)
    for i, value in enumerate(data):
        x[i] = _image(value, f"{where} data[{i}]", sig)
    return Batch(x, top_k, request)


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
