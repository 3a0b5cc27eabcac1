"""The server process around the model: KServe's FastAPI app set up once per process (request
guard, one ``/metrics`` for all workers, no per-request timing unless asked for), the logging
configuration, and starting ``kserve.ModelServer`` with one SO_REUSEPORT socket per worker (and,
when enabled, KServe's gRPC server in the parent process).

A body larger than the limit is answered 413 before KServe reads it (gRPC: RESOURCE_EXHAUSTED
past the same limit). A body without a Content-Type is JSON; a V2 body with the binary tensor
extension's header reaches KServe as bytes and is read by :mod:`components.serving.binary`; an
inference body (V1 or V2) declared as anything but JSON (or V2 binary) is refused with 415. Routes and error answers:
components/serving/surface.py.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import re
import warnings
from dataclasses import dataclass

import orjson
from fastapi.exceptions import FastAPIDeprecationWarning
from kserve import ModelServer, model_server
from kserve import logging as kserve_logging
from kserve.errors import InvalidInput, ModelNotFound
from kserve.protocol.dataplane import DataPlane

from components.serving import binary, listen, surface, v2keys, worker_metrics
from components.serving.metadata import correct_metadata
from components.serving.surface import CLOSE, declares_body, send_error

DEFAULT_MAX_BODY_BYTES = 8 << 20
MMAP_THRESHOLD = 128 << 10  # bytes: glibc's starting value, kept (fixed_mmap_threshold)
M_MMAP_THRESHOLD = -3       # mallopt's parameter number (malloc.h)
BODY_TIMEOUT_S = 30.0       # the longest wait for the next part of a request body (surface.HEAD_TIMEOUT_S: its head)
MIN_BODY_RATE = 1024        # bytes/s a body must arrive at over each BODY_TIMEOUT_S window of its arrival
WAIT_SLICES = 30            # a body's wait is counted in BODY_TIMEOUT_S / WAIT_SLICES steps (RequestGuard._read_body)


class RequestGuard:
    """ASGI middleware: a body larger than ``max_body_bytes`` is answered 413 before KServe reads
    it; a body without a Content-Type is JSON; a V2 /infer body with the binary tensor extension's
    header is handed on as bytes (FastAPI would parse an application/json one as JSON and fail).
    A header that frames the body given twice, and a missing or invalid Host, are a 400."""

    BINARY_HEADER = binary.HEADER.encode()

    def __init__(self, app, max_body_bytes: int, body_timeout_s: float = BODY_TIMEOUT_S):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if len(headers) < len(scope["headers"]) and (twice := _repeated(scope["headers"])):
            return await send_error(scope, send, 400, f"header {twice} is given more than once; send it once",
                                    [CLOSE])
        if (wrong := host_problem(scope, headers)) is not None:
            return await send_error(scope, send, 400, wrong, [CLOSE])
        if scope["method"] not in ("POST", "PUT"):
            if declares_body(scope):
                return await send_error(scope, send, 400, f"a {scope['method']} request has no body here; send "
                                        "it without one")
            return await self.app(scope, receive, send)
        if (refused := content_type_refusal(scope, headers)) is not None:
            return await send_error(scope, send, 415, refused)
        if headers.get(b"content-encoding", b"").strip().lower() not in (b"", b"identity"):
            encoding = headers[b"content-encoding"].decode(errors="replace")
            return await send_error(scope, send, 415,
                                    f"Content-Encoding {encoding} is not supported; send the body uncompressed")
        if b"transfer-encoding" in headers and not _decodable(headers[b"transfer-encoding"]):
            coding = headers[b"transfer-encoding"].decode(errors="replace")
            return await send_error(scope, send, 415,
                                    f"Transfer-Encoding {coding} is not supported; send the body as it is or chunked")
        if self.BINARY_HEADER in headers:
            if not scope["path"].endswith("/infer"):
                return await send_error(scope, send, 400, "the binary tensor extension "
                                        "(Inference-Header-Content-Length) is for V2 /infer requests only")
            scope = _with_content_type(scope, b"application/octet-stream")
        elif b"content-type" not in headers:
            scope = _with_content_type(scope, b"application/json")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await send_error(scope, send, 413, f"request body of {declared.decode(errors='replace')} bytes "
                                                      f"exceeds the limit of {self.max_body_bytes} bytes")
        try:                              # a body that stops arriving would hold its buffer for good
            body = await self._read_body(receive)
        except BodyTooSlow as e:
            return await send_error(scope, send, 408, str(e), [CLOSE])
        if body is None:                  # the client went away
            return
        if len(body) > self.max_body_bytes:         # a chunked body: the rest is unread
            return await send_error(scope, send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
        parsed, refused = v2_json_body(scope, headers, body)
        if refused is not None:
            return await send_error(scope, send, 400, refused, body_read=True)
        if parsed is not None:                # FastAPI's Request.json() takes it (read_json_once)
            scope = {**scope, JSON_BODY: parsed}
        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, typed_binary_answer(send) if _v2_infer(scope) else send)

    async def _read_body(self, receive) -> bytearray | None:
        """The whole body, or its first bytes past the limit (a chunked body has no content-length:
        it is counted as it arrives), or None if the client disconnected. Raises BodyTooSlow when
        the client sends nothing for ``body_timeout_s`` (as nginx's client_body_timeout: between two
        reads), or when less than :data:`MIN_BODY_RATE` arrives over a window of ``body_timeout_s``
        (wall time: what a busy worker did not read meanwhile arrives at once when it does). The
        rate is per window, not averaged over the whole body, and not over idle time alone: 50
        bodies sent fast up to their last bytes, then a byte every 20 s, kept 8 MB each in the
        workers for as long as the average allowed (8,192 s for 8 MB), and a byte every 0.9 s never
        left a wait slice idle.

        Only time this worker was free to read counts as the client's: a worker busy with other
        requests (their preprocessing runs in its event loop) reads a body late, and a valid 7.9 MB
        body was answered 408 that way, blaming the client. The wait is kept in
        :data:`WAIT_SLICES` slices of the timeout; a slice that ends late (the loop was busy) counts
        as one slice, however long it took."""
        body, waited = bytearray(), 0.0
        clock = asyncio.get_running_loop().time
        window_start, window_bytes = clock(), 0      # the rate is over windows of body_timeout_s
        while True:
            message, waited = await self._next_message(receive, waited, len(body))
            if message["type"] != "http.request":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes or not message.get("more_body"):
                return body
            if (now := clock()) - window_start > self.body_timeout_s:
                rate = (len(body) - window_bytes) / (now - window_start)
                if rate < MIN_BODY_RATE:
                    raise BodyTooSlow(f"the request body arrives at {rate:.0f} bytes/s, under the minimum of "
                                      f"{MIN_BODY_RATE} bytes/s")
                window_start, window_bytes = now, len(body)

    async def _next_message(self, receive, waited: float, received: int) -> tuple[dict, float]:
        """(the next ASGI message, the time waited for the body so far, this wait included). A
        slice that times out cancels ``receive()`` while it waits for data, which takes nothing
        (uvicorn keeps what has arrived for the next call)."""
        step, idle = self.body_timeout_s / WAIT_SLICES, 0.0
        while True:
            try:
                async with asyncio.timeout(step):
                    return await receive(), waited
            except TimeoutError:
                idle, waited = idle + step, waited + step
                if idle >= self.body_timeout_s:
                    raise BodyTooSlow(f"the request body stopped arriving: nothing for {self.body_timeout_s:g} "
                                      f"seconds after {received} bytes") from None


def typed_binary_answer(send):
    """``send``, giving a V2 answer with binary tensors (the extension's header) the Content-Type
    the binary tensor extension shows, application/octet-stream; KServe sends such an answer with
    none."""
    async def typed(message):
        if message["type"] == "http.response.start":
            names = {name.lower() for name, _ in message.get("headers", ())}
            if RequestGuard.BINARY_HEADER in names and b"content-type" not in names:
                message = {**message, "headers": [*message["headers"], (b"content-type", b"application/octet-stream")]}
        await send(message)
    return typed


class BodyTooSlow(Exception):
    """A request body that stopped arriving, or arrives too slowly (408)."""


# Headers that decide how the body is read: given twice, the guard (the last value) and the parser
# or KServe (the first, or both joined) would read the body differently.
SINGLE_HEADERS = (b"content-length", b"content-type", b"content-encoding", b"transfer-encoding",
                  RequestGuard.BINARY_HEADER, b"host")
# RFC 9112 3.2: Host is uri-host [":" port]; uri-host an IP literal in brackets, or a reg-name / IPv4
# address (unreserved, percent-encoded and sub-delims characters; empty when the target has no authority).
HOST = re.compile(rb"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?")


def host_problem(scope, headers: dict) -> str | None:
    """Why a request's Host header is refused, or None (RFC 9112 3.2: a server MUST answer 400 to an
    HTTP/1.1 request without Host, with two Host lines, which :data:`SINGLE_HEADERS` refuses, or with
    an invalid Host: a proxy in front and this server could each take another host)."""
    host = headers.get(b"host")
    if host is None:
        return "an HTTP/1.1 request needs a Host header" if scope.get("http_version") == "1.1" else None
    if not HOST.fullmatch(host):
        return f"Host {host[:100].decode(errors='replace')!r} is not a host name or address with an optional port"
    return None


def _repeated(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first of :data:`SINGLE_HEADERS` that ``headers`` hold more than once, or None."""
    names = [name for name, _ in headers]
    return next((name.decode() for name in SINGLE_HEADERS if names.count(name) > 1), None)


def _decodable(transfer_encoding: bytes) -> bool:
    """Whether uvicorn decodes these transfer codings (it decodes chunked only)."""
    return set(transfer_encoding.lower().replace(b" ", b"").split(b",")) <= {b"", b"chunked", b"identity"}


def _with_content_type(scope: dict, content_type: bytes) -> dict:
    headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
    return {**scope, "headers": [*headers, (b"content-type", content_type)]}


class OpenInferenceDataPlane(DataPlane):
    """KServe's data plane, reading a V2 REST body that is not JSON alone with the checked reader
    of components.serving.binary (KServe's own slices it unchecked and turns raw BYTES into text)."""

    def decode_inference_request(self, body, headers, model_name):
        if isinstance(body, bytes):
            return binary.parse_request(body, headers.get(binary.HEADER), model_name)
        return super().decode_inference_request(body, headers, model_name)


class GrpcLogFilter(logging.Filter):
    """KServe's gRPC server logs a line for every call and a traceback at ERROR for every bad
    request; here a bad request is one WARNING line, and the per-call line goes with the request
    logs, as over REST."""

    CLIENT_ERRORS = ((InvalidInput, "INVALID_ARGUMENT"), (ModelNotFound, "NOT_FOUND"))   # as KServe maps them

    def __init__(self, request_logs: bool):
        super().__init__()
        self.request_logs = request_logs

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("grpc method: "):
            return self.request_logs
        error = record.exc_info[1] if record.exc_info else None
        status = next((s for kind, s in self.CLIENT_ERRORS if isinstance(error, kind)), None)
        if status and "grpc_method" in str(record.msg):
            record.msg, record.args = f"gRPC %s: {status}: %s", (record.args[-1], surface.printable(error.reason))
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def _v2_infer(scope) -> bool:
    return scope["path"].startswith("/v2/") and scope["path"].endswith("/infer")


JSON_BODY = "gtsrb.json_body"     # scope key: a V2 JSON infer body as the request guard parsed it


def v2_json_body(scope, headers: dict, body: bytearray) -> tuple[object, str | None]:
    """(a V2 JSON infer body as orjson reads it, why it is refused); the body is None when the
    request is refused or is not a V2 JSON infer request. Refused: a body orjson cannot read (NaN,
    Infinity, a lone surrogate, a byte-order mark, a number beyond float64: FastAPI's ``json.loads``
    takes the first four, and a lone surrogate echoed in the answer was a 500), and whatever
    :func:`v2keys.check` refuses (KServe's models would drop an unknown key unread). The binary
    extension's header is checked where it is read (components/serving/binary.py)."""
    if not _v2_infer(scope) or RequestGuard.BINARY_HEADER in headers:
        return None, None
    try:
        parsed = orjson.loads(body)
        v2keys.check(parsed, scope["path"].split("/")[3])
    except orjson.JSONDecodeError as e:
        return None, (f"request body is not JSON this server reads ({e}); NaN, Infinity, lone surrogates, a "
                      "byte-order mark and numbers beyond float64 are refused")
    except InvalidInput as e:
        return None, e.reason
    return parsed, None


def read_json_once() -> None:
    """FastAPI parses a JSON body with Starlette's ``Request.json()``, the standard library's
    ``json.loads``: 1.2 ms for a V2 tensor of 3,072 numbers, against orjson's 0.16 ms, and the
    request guard has parsed the body already. ``Request.json()`` now returns the guard's object
    when the request carries one (:data:`JSON_BODY`), and parses as before otherwise. For a text
    orjson reads, it reads what ``json.loads`` reads, except integers beyond 64 bits, which it
    makes floats (refused all the same: no such number is a valid tensor value, shape or top_k).
    A body orjson refuses (NaN, Infinity, lone surrogates, a BOM, a number beyond float64) is refused
    by the guard."""
    from starlette.requests import Request

    if getattr(Request.json, "reads_guard_body", False):
        return
    parse = Request.json

    async def json(self):
        if not hasattr(self, "_json") and JSON_BODY in self.scope:
            self._json = self.scope[JSON_BODY]
        return await parse(self)

    json.reads_guard_body = True
    Request.json = json


def content_type_refusal(scope, headers: dict) -> str | None:
    """Why an inference body (V1 predict, V2 infer) is refused for its declared content type, or
    None: a JSON body must be sent as JSON. KServe takes any other type as raw bytes: for V2 the
    binary extension (it answered with a message about a missing header), for V1 the model's own
    format (ours parsed it as JSON all the same, so ``text/plain`` passed). No Content-Type (JSON),
    and the binary extension, are decided elsewhere."""
    declared = headers.get(b"content-type")
    if declared is None:
        return None
    if _v2_infer(scope):
        route = "V2 inference"
    elif scope["path"].startswith("/v1/") and scope["path"].endswith(":predict"):
        route = "V1 prediction"
    else:
        return None
    media_type = declared.split(b";", 1)[0].strip().lower()
    if media_type == b"application/json" or media_type.endswith(b"+json") or RequestGuard.BINARY_HEADER in headers:
        return None
    return f"Content-Type {declared.decode(errors='replace')} is not accepted for {route}; send application/json"


@dataclass(frozen=True)
class ServerSettings:
    """How every server process sets up KServe's app (shipped to spawned workers with the model)."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_logs: bool = False               # uvicorn access log, KServe timing lines + middleware
    logging: dict | None = None              # logging config for spawned workers (None: KServe's)

    def __post_init__(self):
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be >= 1, got {self.max_body_bytes}")

    def apply(self) -> None:
        """Set up this process's KServe FastAPI app (once): install :class:`RequestGuard`; in a
        worker of several, answer ``/metrics`` with all workers' metrics; without
        request logs, also drop KServe's per-request timing middleware at startup (it only feeds
        the silenced ``kserve.trace`` log, yet costs two getrusage calls and a route lookup per
        request; KServe adds it when the server starts, so it is removed from the startup hook)."""
        app = model_server.app
        if getattr(app.state, "gtsrb_configured", False):
            return
        app.add_middleware(RequestGuard, max_body_bytes=self.max_body_bytes)
        app.add_middleware(surface.OfferedRoutes)          # outermost: before the body is read
        read_json_once()
        surface.harden_http_parser()
        correct_metadata()
        # KServe 0.21's V1 endpoints answer with FastAPI's ORJSONResponse, which FastAPI deprecates:
        # every worker printed a 3-line warning on its first prediction (KServe's code, not ours).
        warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated", category=FastAPIDeprecationWarning)
        worker_metrics.serve_all_workers(app)
        app.router.on_startup.append(install_error_handlers)
        if not self.request_logs:
            app.router.on_startup.append(drop_timing_middleware)
        app.state.gtsrb_configured = True

    def set_up_worker(self) -> None:
        """In a spawned server worker (unpickling its model): this logging, then :meth:`apply`."""
        if self.logging:                         # before KServe would apply its default config
            kserve_logging.configure_logging(self.logging)
        self.apply()


def fixed_mmap_threshold() -> None:
    """Give large buffers back to the OS when freed: keep glibc's mmap threshold at 128 KiB, in this
    process (mallopt) and in the processes it starts (MALLOC_MMAP_THRESHOLD_, read by glibc at
    start: the forkserver the workers fork from). Call it first thing in a server's main.

    By default glibc raises the threshold to the size of each mmapped block freed (up to 32 MiB),
    after which such blocks come from the heap, which it rarely shrinks. A server that decoded a few
    4096x4096 images and 8 MB bodies kept the memory: RSS of the server's five processes +135 MB
    after four rounds of them (and still rising), +33 MB (flat after the first round) with the fixed
    threshold (docs/serving-hardening.md). A value already in the environment is kept."""
    import ctypes

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:         # glibc applied it when this process started
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    try:
        ctypes.CDLL(None).mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):                  # not glibc: its allocator, its rules
        pass


def install_error_handlers() -> None:
    """Client errors answered and logged as surface.py does (at startup, after KServe's own)."""
    surface.install_error_handlers(model_server.app)


def drop_timing_middleware() -> None:
    """Remove timing_asgi's TimingMiddleware from the KServe app; Starlette rebuilds the middleware
    stack on the next request. The lifespan startup this runs in precedes every request."""
    from timing_asgi import TimingMiddleware

    app = model_server.app
    app.user_middleware[:] = [m for m in app.user_middleware if m.cls is not TimingMiddleware]
    app.middleware_stack = None


def logging_config(request_logs: bool) -> dict:
    """KServe's logging setup, without the per-request lines (access log, timing trace) unless
    asked for: at hundreds of requests per second they cost more than the model. /metrics stays."""
    config = copy.deepcopy(kserve_logging.KSERVE_LOG_CONFIG)
    if not request_logs:
        for name in ("kserve.trace", "uvicorn.access"):
            config["loggers"][name]["level"] = "WARNING"
    return config


def start(model, settings: ServerSettings, workers: int, http_port: int, grpc_port: int,
          enable_grpc: bool, host: str | None = None) -> None:
    """Run ``model`` in kserve.ModelServer with ``workers`` processes, each on its own socket, REST
    and gRPC on ``host`` (None: every interface, as KServe does); blocks."""
    settings.apply()
    listen.install(host)
    if enable_grpc:
        # KServe's gRPC server takes its message limit from its parsed arguments: the REST body limit.
        model_server.args.grpc_max_receive_message_length = settings.max_body_bytes
        kserve_logging.logger.addFilter(GrpcLogFilter(settings.request_logs))
    server = ModelServer(http_port=http_port, grpc_port=grpc_port, workers=workers, enable_grpc=enable_grpc,
                         enable_latency_logging=settings.request_logs)
    server.dataplane = OpenInferenceDataPlane(server.registered_models)   # REST and gRPC servers get it at start
    server.model_repository_extension = surface.NoModelRepository()     # likewise: no load/unload over gRPC
    server.start([model])
