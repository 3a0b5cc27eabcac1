"""The V2 binary tensor extension (KServe and Triton): tensors as raw bytes instead of JSON text.

Over REST the body is a JSON header of ``Inference-Header-Content-Length`` bytes followed by each
binary input's bytes, in the order of the header's inputs; an input's ``parameters.binary_data_size``
says how many bytes are its own. Over gRPC the same bytes come as ``raw_input_contents``. Raw
FP32 is little-endian float32; raw BYTES is each element as a 4-byte little-endian length and then
its bytes. Everything is checked before use (KServe's own reader slices the body unchecked and
turns BYTES into UTF-8 text, which raw image bytes are not): any inconsistency is
``kserve.errors.InvalidInput`` saying what.
"""

from __future__ import annotations

import struct

import numpy as np
import orjson
from kserve import InferInput, InferRequest
from kserve.errors import InvalidInput
from kserve.protocol.infer_type import RequestedOutput

from components.serving import v2keys

HEADER = "inference-header-content-length"


def _fail(message: str):
    raise InvalidInput(message)


def _size(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(f"{where}: expected a byte count (an integer >= 0), got {value!r}")
    return value


def _object(value, where: str) -> dict:
    if not isinstance(value, dict):
        _fail(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _optional_object(container: dict, key: str, where: str) -> dict:
    value = container.get(key)
    return {} if value is None else _object(value, f"{where}.{key}")


def parse_request(body: bytes, header_length: str | None, model_name: str) -> InferRequest:
    """A REST V2 body that is not JSON alone -> InferRequest whose binary inputs carry their raw
    bytes (the same form as a gRPC request's ``raw_input_contents``)."""
    if header_length is None:
        _fail("a V2 request body that is not JSON needs the Inference-Header-Content-Length header "
              "(binary tensor extension); send JSON tensors with Content-Type: application/json")
    text = header_length.strip()
    if not text.isdigit() or not text.isascii():
        _fail(f"Inference-Header-Content-Length: expected an integer, got {header_length!r}")
    json_length = int(text)
    if json_length > len(body):
        _fail(f"Inference-Header-Content-Length is {json_length} but the body has only {len(body)} bytes")
    try:
        header = orjson.loads(body[:json_length])
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"the first {json_length} bytes (Inference-Header-Content-Length) "
                           f"are not a JSON object ({e})") from None
    _object(header, "request header")
    v2keys.check(header, model_name, binary=True)
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        _fail("request header: 'inputs' must be a non-empty list")
    infer_inputs, raw_inputs = [], []
    offset = json_length
    for i, item in enumerate(inputs):
        where = f"inputs[{i}]"
        _object(item, where)
        name, datatype, shape = item.get("name"), item.get("datatype"), item.get("shape")
        if not isinstance(name, str) or not isinstance(datatype, str):
            _fail(f"{where}: 'name' and 'datatype' must be strings")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            _fail(f"{where} '{name}': 'shape' must be a list of integers >= 0, got {shape!r}")
        parameters = _optional_object(item, "parameters", f"{where} '{name}'")
        if "binary_data_size" in parameters:
            if "data" in item:
                _fail(f"{where} '{name}': has both 'data' and parameters.binary_data_size")
            size = _size(parameters["binary_data_size"], f"{where} '{name}'.parameters.binary_data_size")
            if offset + size > len(body):
                _fail(f"{where} '{name}': binary_data_size {size} runs past the end of the body "
                      f"({len(body) - offset} bytes left after the header and earlier inputs)")
            raw_inputs.append(body[offset:offset + size])
            offset += size
            data = None
        elif "data" in item:
            data = item["data"]
            if not isinstance(data, list):
                _fail(f"{where} '{name}': 'data' must be a list")
            raw_inputs.append(None)
        else:
            _fail(f"{where} '{name}': neither 'data' nor parameters.binary_data_size")
        infer_inputs.append(InferInput(name, shape, datatype, data, parameters))
    if offset != len(body):
        _fail(f"the body has {len(body) - offset} bytes after the header and the binary inputs' "
              f"binary_data_size bytes ({len(body)} in all): sizes and body disagree")
    outputs = header.get("outputs")
    if outputs is not None and not isinstance(outputs, list):
        _fail("request header: 'outputs' must be a list")
    requested = []
    for i, output in enumerate(outputs or []):
        _object(output, f"outputs[{i}]")
        if not isinstance(output.get("name"), str):
            _fail(f"outputs[{i}]: 'name' must be a string")
        requested.append(RequestedOutput(output["name"], _optional_object(output, "parameters", f"outputs[{i}]")))
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        _fail("request header: 'id' must be a string")
    return InferRequest(model_name, infer_inputs, request_id=request_id, raw_inputs=raw_inputs,
                        parameters=header.get("parameters"), request_outputs=requested or None)


def raw_bytes(item: InferInput) -> bytes | None:
    """The raw bytes of a binary input (REST binary extension or gRPC raw_input_contents), or None
    for a tensor sent as data. KServe keeps them in ``InferInput._raw_data``; its own ``as_numpy``
    reads them unchecked."""
    return item._raw_data


def fp32(raw: bytes, count: int, where: str) -> np.ndarray:
    """Raw little-endian float32 -> ``count`` values (flat)."""
    if len(raw) != 4 * count:
        _fail(f"{where}: {len(raw)} bytes of FP32 data are not the 4 x {count} bytes its shape needs")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)      # a writable copy, native order


def bytes_elements(raw: bytes, where: str) -> list[bytes]:
    """Raw BYTES (4-byte little-endian length + bytes, repeated) -> the elements."""
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            _fail(f"{where}: BYTES data ends inside element {len(elements)}'s 4-byte length")
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            _fail(f"{where}: BYTES element {len(elements)} claims {length} bytes but only "
                  f"{len(raw) - offset} are left")
        elements.append(raw[offset:offset + length])
        offset += length
    return elements
