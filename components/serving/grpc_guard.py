"""The gRPC server's request guard: what KServe's servicer never sees or never checks.

:class:`GrpcGuard` is a ``grpc.aio`` server interceptor placed before KServe's own (listen.py adds
it to every gRPC server KServe makes). For each unary call it

- reads the request itself: bytes that are not a valid protobuf message of the call's type (a
  truncated field, a string that is not UTF-8) were answered UNKNOWN "Unexpected <class
  'google.protobuf.message.DecodeError'>" with nothing logged; now INVALID_ARGUMENT naming the
  problem, and one WARNING line;
- checks a ModelInfer request's structure before KServe turns it into an InferRequest, which keeps
  only the contents field of the tensor's datatype and drops the rest unread (:func:`infer_problem`,
  the gRPC side of components/serving/v2keys.py);
- bounds every error message it sends (surface.MAX_MESSAGE): a 5 KB request with a shape of 5,000
  ones made a message past the 8-16 KB a client accepts in trailers, so the client saw
  RESOURCE_EXHAUSTED "Stream removed" instead of INVALID_ARGUMENT.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import DecodeError
from grpc.aio import ServerInterceptor
from kserve.logging import logger
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

from components.serving import v2keys
from components.serving.surface import bounded, printable

CONTENTS = ("bool_contents", "int_contents", "int64_contents", "uint_contents", "uint64_contents",
            "fp32_contents", "fp64_contents", "bytes_contents")


class Undecodable:
    """What the guard's deserializer hands on for bytes that are not the call's message."""

    def __init__(self, error: Exception):
        self.error = error


# KServe's InferParameter: a value in any other field (Triton's uint64_param, double_param) is unknown to it
READABLE = "KServe reads (bool_param, int64_param or string_param)"


def infer_problem(request: pb.ModelInferRequest) -> str | None:
    """Why a ModelInfer request is refused before KServe reads it, or None."""
    for field in ("inputs", "outputs"):
        if (problem := v2keys.too_many(field, len(getattr(request, field)))) is not None:
            return problem
    for i, tensor in enumerate(request.inputs):
        where = f"input {tensor.name[:80]!r}"
        if len(tensor.shape) > v2keys.MAX_DIMS:
            return f"{where}: a shape of {len(tensor.shape)} dimensions; at most {v2keys.MAX_DIMS}"
        filled = [field for field in CONTENTS if len(getattr(tensor.contents, field))]
        if len(filled) > 1:
            return (f"{where}: contents in {len(filled)} fields ({', '.join(filled)}); send the one field of "
                    f"datatype {tensor.datatype[:20]}")
        if (empty := _empty_parameter(tensor.parameters)) is not None:
            return f"{where}: parameters.{empty[:80]} has no value {READABLE}"
        if "binary_data_size" in tensor.parameters and (problem := _size_problem(request, i)) is not None:
            return f"{where}: {problem}"
    for output in request.outputs:
        if (empty := _empty_parameter(output.parameters)) is not None:
            return f"output {output.name[:80]!r}: parameters.{empty[:80]} has no value {READABLE}"
    return None


def _size_problem(request: pb.ModelInferRequest, i: int) -> str | None:
    """Why input ``i``'s binary_data_size (which KServe's own gRPC client sends with
    raw_input_contents) is wrong, or None: it must be the size of its raw bytes, as REST's binary
    extension checks it. A lying one was answered."""
    parameter = request.inputs[i].parameters["binary_data_size"]
    kind = parameter.WhichOneof("parameter_choice")
    if i >= len(request.raw_input_contents):
        return "parameters.binary_data_size goes with raw_input_contents; this input has none"
    size = len(request.raw_input_contents[i])
    if kind != "int64_param" or parameter.int64_param != size:
        return f"parameters.binary_data_size is not the size of its raw_input_contents ({size} bytes)"
    return None


def _empty_parameter(parameters) -> str | None:
    return next((key for key, value in parameters.items() if value.WhichOneof("parameter_choice") is None), None)


CHECKS = {"/inference.GRPCInferenceService/ModelInfer": infer_problem}


class BoundedContext:
    """A servicer context whose error messages are cut as REST's are (surface.bounded)."""

    def __init__(self, context):
        self._context = context

    def __getattr__(self, name):
        return getattr(self._context, name)

    async def abort(self, code, details: str = "", trailing_metadata=()):
        await self._context.abort(code, bounded(details), trailing_metadata)

    def set_details(self, details: str) -> None:
        self._context.set_details(bounded(details))


class GrpcGuard(ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method, inner, deserialize = handler_call_details.method, handler.unary_unary, handler.request_deserializer
        check = CHECKS.get(method)

        def read(data: bytes):
            try:
                return deserialize(data)
            except DecodeError as e:
                return Undecodable(e)

        async def guarded(request, context):
            context = BoundedContext(context)
            if isinstance(request, Undecodable):
                await _refuse(context, method, f"the request is not a valid protobuf message for {method} "
                                               f"({type(request.error).__name__}: {request.error})")
            if check is not None and (problem := check(request)) is not None:
                await _refuse(context, method, problem)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(guarded, request_deserializer=read,
                                                   response_serializer=handler.response_serializer)


async def _refuse(context, method: str, message: str) -> None:
    logger.warning("client error: gRPC %s -> INVALID_ARGUMENT: %s", method, printable(message))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
