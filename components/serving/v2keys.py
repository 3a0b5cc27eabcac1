"""The shape of a V2 (Open Inference Protocol) REST request, checked before KServe parses it.

KServe's pydantic models drop keys they do not know, so a misspelled ``"output"`` or
``"paramters"`` used to be ignored without a word and the request answered as if it were absent.
V1 requests already refuse unknown keys (components/serving/protocol.py); V2 now does too, for the
JSON body and for the binary extension's JSON header alike. The known keys are the protocol's,
plus ``model_name``, which KServe's own REST client writes into every request (it must name the
model the route names).

What pydantic would coerce or never look at is refused here too, as the client wrote it:
- a datatype not in upper case (``"fp32"``: the protocol's datatypes are ``FP32``, ``BYTES``, ...),
- a shape entry that is not a JSON integer (``true``, ``"1"``, ``1.0``), or more than
  :data:`MAX_DIMS` of them,
- ``data`` nested in another shape than the declared one (``[1][32][32][3]`` for shape
  ``[1, 3, 32, 32]`` would be reshaped, silently, into another image); leading dimensions may be
  merged (``[3][32][32]``, row-major all the same),
- ``parameters.binary_data_size`` in a JSON body (there is no binary data to size),
- more tensors than this model has: pydantic checks every one of 200,000 ``{}`` inputs (6.5 s) and
  names each problem (a 2.8 MB answer) before any of our checks runs.
"""

from __future__ import annotations

import math

from kserve.errors import InvalidInput

REQUEST = ("id", "inputs", "outputs", "parameters", "model_name")
TENSOR = ("name", "shape", "datatype", "parameters", "data")
OUTPUT = ("name", "parameters")
MAX_INPUTS = 1              # the model takes one input ('image' or 'input')
MAX_OUTPUTS = 5             # and has five outputs (components/serving/protocol.py: V2_OUTPUTS)
MAX_DIMS = 8


def check(body, model_name: str | None = None, binary: bool = False) -> None:
    """Raise InvalidInput naming the first part of a V2 request (the JSON body, or the binary
    extension's JSON header when ``binary``) that breaks the rules above. Values of other wrong
    types are left to the parsers that read them."""
    if not isinstance(body, dict):
        raise InvalidInput(f"request: expected a JSON object with 'inputs', got {type(body).__name__}")
    _known(body, REQUEST, "request")
    if model_name is not None and "model_name" in body and body["model_name"] != model_name:
        raise InvalidInput(f"request: model_name {_shown(body['model_name'])} is not {model_name!r}, "
                           "the model this route serves")
    for field, keys in (("inputs", TENSOR), ("outputs", OUTPUT)):
        items = body.get(field)
        if not isinstance(items, list):
            continue
        if (problem := too_many(field, len(items))) is not None:
            raise InvalidInput(f"request: {problem}")
        for i, item in enumerate(items):
            if isinstance(item, dict):
                _known(item, keys, f"{field}[{i}]")
                if field == "inputs":
                    _tensor(item, f"inputs[{i}]", binary)


def too_many(field: str, count: int) -> str | None:
    """Why ``count`` tensors in ``field`` ("inputs" or "outputs") are more than this model has, or
    None (REST here, gRPC in components/serving/grpc_guard.py)."""
    if field == "inputs" and count > MAX_INPUTS:
        return f"{count} inputs; expected exactly one input ('image' or 'input')"
    if field == "outputs" and count > MAX_OUTPUTS:
        return f"{count} outputs; expected at most {MAX_OUTPUTS}, one of each"
    return None


def _tensor(item: dict, where: str, binary: bool) -> None:
    datatype, shape = item.get("datatype"), item.get("shape")
    if isinstance(datatype, str) and datatype != datatype.upper():
        raise InvalidInput(f"{where}: datatype {_shown(datatype)} is not a V2 datatype; they are upper case "
                           f"({datatype.upper()!r})")
    if not isinstance(shape, list):
        return
    if len(shape) > MAX_DIMS or not all(type(d) is int for d in shape):
        raise InvalidInput(f"{where}: shape {_shown(shape)} is not a list of at most {MAX_DIMS} integers")
    data = item.get("data")
    if isinstance(data, list) and data and isinstance(data[0], list):
        nested = []
        while isinstance(data, list):
            nested.append(len(data))
            data = data[0] if data else None
        if not _row_major(nested, shape):
            raise InvalidInput(f"{where}: data nested as {nested} does not match shape {shape}; send the data "
                               "nested as the shape (leading dimensions may be merged), or flat in row-major order")
    parameters = item.get("parameters")
    if not binary and isinstance(parameters, dict) and "binary_data_size" in parameters:
        raise InvalidInput(f"{where}: parameters.binary_data_size belongs to the binary tensor extension "
                           "(Inference-Header-Content-Length); this request is JSON alone")


def _row_major(nested: list[int], shape: list[int]) -> bool:
    """Whether data nested as ``nested`` is ``shape`` in row-major order: the shape itself, or the
    shape with its leading dimensions merged ([3, 32, 32] for [1, 3, 32, 32])."""
    merged = len(shape) - len(nested) + 1
    if merged < 1:
        return False
    return nested[1:] == shape[merged:] and nested[0] == math.prod(shape[:merged])


def _known(item: dict, keys: tuple[str, ...], where: str) -> None:
    unknown = set(item) - set(keys)
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {_shown(sorted(unknown))}; known: {list(keys)}")


def _shown(value, limit: int = 80) -> str:
    """A client's value in a message, cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"
