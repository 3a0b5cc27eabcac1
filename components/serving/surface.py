"""What the server answers, and how it refuses the rest.

KServe registers more routes than this predictor offers: the V2 model-repository extension
(``/v2/repository/models/<name>/load`` and ``/unload``: one unauthenticated request would unload
the model from a worker that still reports ready), ``:explain`` (501 without an explainer),
versioned V2 routes (501) and its OpenAPI page. :class:`OfferedRoutes` answers every request
outside :data:`OFFERED` itself, before KServe routes it: 404, or 405 with ``Allow`` where the path
exists with other methods, with a JSON message. Over gRPC, :class:`NoModelRepository` refuses the
repository RPCs (UNIMPLEMENTED).

Errors: a client error (4xx) is answered ``{"error": message}`` and logged as ONE warning line
(method, path, status, reason); only a server fault (5xx) is logged with its traceback (KServe's
handlers, kept for those).
"""

from __future__ import annotations

import re
import socket
import struct
from http import HTTPStatus

import orjson
from fastapi.exceptions import RequestValidationError
from kserve.errors import InvalidInput, ModelNotFound
from kserve.logging import logger
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse

from components.serving.protocol import RequestTooLarge

# Path -> methods this server answers (HEAD wherever GET), the inference routes first (checked
# in this order). A model name has no '/' and no ':' (so GET or HEAD on ":predict" is a 405).
OFFERED = {
    "/v1/models/{model_name}:predict": {"POST"},
    "/v2/models/{model_name}/infer": {"POST"},
    "/": {"GET"},
    "/metrics": {"GET"},
    "/v1/models": {"GET"},
    "/v1/models/{model_name}": {"GET"},
    "/v2": {"GET"},
    "/v2/health/live": {"GET"},
    "/v2/health/ready": {"GET"},
    "/v2/models": {"GET"},
    "/v2/models/{model_name}": {"GET"},
    "/v2/models/{model_name}/ready": {"GET"},
}
LOGGED_CHARS = 300          # of a client-supplied reason or path in the log line
SHOWN_PROBLEMS = 5          # of a V2 body's schema problems, in its 422 answer
MAX_MESSAGE = 1000          # characters of an error message answered (REST body, gRPC details)


def _compile(offered: dict) -> list[tuple[re.Pattern, frozenset, str]]:
    routes = []
    for template, methods in offered.items():
        pattern = re.escape(template).replace(re.escape("{model_name}"), "[^/:]+")
        allowed = set(methods) | ({"HEAD"} if "GET" in methods else set())
        routes.append((re.compile(pattern), frozenset(allowed), ", ".join(sorted(allowed))))
    return routes


class OfferedRoutes:
    """ASGI middleware: a request for a route outside :data:`OFFERED` is answered here (404, or
    405 + Allow), so KServe's other routes are unreachable whatever its router holds."""

    ROUTES = _compile(OFFERED)

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "websocket":
            return await refuse_websocket(scope, receive, send)
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, path = scope["method"], scope["path"]
        allowed = None
        for pattern, methods, allow in self.ROUTES:
            if pattern.fullmatch(path):
                if method == "HEAD" and "HEAD" in methods:   # KServe's routes are GET only: route it as
                    scope = {**scope, "method": "GET"}       # GET; uvicorn sends no body for a HEAD
                if scope["method"] in methods:
                    return await self.app(scope, receive, send)
                allowed = allow
        if allowed is None:
            return await send_error(scope, send, HTTPStatus.NOT_FOUND,
                                    f"Not Found: this server has no route {method} {path}")
        return await send_error(scope, send, HTTPStatus.METHOD_NOT_ALLOWED,
                                f"Method Not Allowed: {method} {path}; this path answers {allowed}",
                                [(b"allow", allowed.encode())])


async def refuse_websocket(scope, receive, send) -> None:
    """This server has no WebSocket route. An upgrade request is refused with a JSON 404 through
    ASGI's ``websocket.http.response`` extension, which uvicorn offers. Without it, uvicorn sends an
    empty text/plain 403."""
    message = f"Not Found: this server has no WebSocket route {scope.get('path', '')}; it answers HTTP requests only"
    log_client_error({**scope, "method": "GET (WebSocket upgrade)"}, HTTPStatus.NOT_FOUND, message)
    await receive()                                   # websocket.connect
    if "websocket.http.response" not in scope.get("extensions", {}):
        return await send({"type": "websocket.close"})
    body = orjson.dumps({"error": message})
    await send({"type": "websocket.http.response.start", "status": HTTPStatus.NOT_FOUND,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "websocket.http.response.body", "body": body})


class NoModelRepository:
    """KServe's model-repository extension, refused: what ``kserve.ModelServer`` hands its gRPC
    servicer (and REST endpoints) in place of the real one. KServe's gRPC servicer offers
    ``RepositoryModelLoad`` / ``RepositoryModelUnload`` whatever the REST routes do: one
    unauthenticated Unload call removed the model from the gRPC server (every later call: NOT_FOUND
    "Model with name gtsrb does not exist") and answered INTERNAL. Each call is now UNIMPLEMENTED,
    gRPC's status for a method a server does not offer, logged as one warning line; the model
    stays loaded."""

    async def index(self, filter_ready: bool = False):
        self._refuse("RepositoryIndex", "")

    async def load(self, model_name: str):
        self._refuse("RepositoryModelLoad", model_name)

    async def unload(self, model_name: str):
        self._refuse("RepositoryModelUnload", model_name)

    @staticmethod
    def _refuse(method: str, model_name: str):
        from grpc_interceptor.exceptions import Unimplemented

        message = (f"{method} is not offered: this server does not load or unload models "
                   "(the model-repository extension is off)")
        logger.warning("client error: gRPC %s(%s) -> UNIMPLEMENTED: %s", method, printable(model_name), message)
        raise Unimplemented(message)


CLOSE = (b"connection", b"close")


def declares_body(scope) -> bool:
    headers = dict(scope["headers"])
    return bool(headers.get(b"content-length", b"").strip().lstrip(b"0")) or b"transfer-encoding" in headers


async def send_error(scope, send, status: int, message: str, headers=(), body_read: bool = False) -> None:
    """Answer ``{"error": message}`` with ``status`` from ASGI middleware, logged as a client error.
    (A HEAD answer has no body, as HTTP requires; its headers still give the JSON's type and length.)
    An answer to a request whose body was not read closes the connection: kept alive, the unread
    body trickling in a byte at a time kept it open past every timeout (200 connections, 200 s)."""
    log_client_error(scope, status, message)
    body = orjson.dumps({"error": bounded(message)})
    close = [CLOSE] if not body_read and CLOSE not in headers and declares_body(scope) else []
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers, *close]})
    await send({"type": "http.response.body", "body": body})


MAX_HEAD_BYTES = 256 << 10     # request line + headers (nginx: 32 KiB, Node: 16 KiB, uvicorn/httptools: none)
# Requests parsed and waiting behind the one being answered on a connection (HTTP/1.1 pipelining). uvicorn
# resumes reading after every answer, and one read of tiny pipelined requests queues ~1,000: a client
# that pipelined health checks and never read its answers took both workers to 13.5 GB in 50 s.
MAX_PIPELINED = 16
# Header fields per request (Apache's LimitRequestFields default). uvicorn keeps each as a tuple of two
# bytes objects, ~50x its size on the wire: 100 heads of 51,200 one-letter fields (256 KB each) grew
# a worker by 277 MB while they waited for their 408, and it kept 56 MB after.
MAX_HEADER_FIELDS = 100
HEAD_TIMEOUT_S = 30.0          # for the request line + headers to arrive (nginx client_header_timeout: 60 s)
WRITE_TIMEOUT_S = 30.0         # for a client to read what an answer left in the socket (nginx send_timeout: 60 s)


def harden_http_parser(max_head_bytes: int = MAX_HEAD_BYTES, head_timeout_s: float = HEAD_TIMEOUT_S,
                       write_timeout_s: float = WRITE_TIMEOUT_S) -> None:
    """Gaps of uvicorn's httptools protocol, which parses every request before any
    middleware or route sees it (uvicorn takes httptools' parser when httptools is installed,
    "auto", as it is wherever kserve is: uvicorn[standard]):

    - It buffers a request head of any size: a 200 MB header was read whole (worker RSS +205 MB)
      and the request answered 200. A head still incomplete after ``max_head_bytes`` (counted per
      read, so at most one read of ~256 KiB more) is now answered 431 and the connection closed.
    - It waits for a head forever: a connection that sends nothing, or a header a byte at a time
      (slowloris), holds its socket and buffers for good; only a connection idle *after* a response
      has a timeout. A head not complete ``head_timeout_s`` after the connection opened (or after
      the request's first byte, for the next request on a kept-alive connection) is now answered
      408 and the connection closed.
    - It answers a request its parser refuses (a malformed request line or header, a method name
      it does not know) with a plain-text 400. That answer is now the JSON ``{"error": ...}`` of
      every other client error. uvicorn logs one WARNING line for each, as before.
    - It appends a chunked body's trailer fields to the request's headers, without limit. They are
      now dropped, and more than ``max_head_bytes`` of chunk extensions or trailers in a row are
      answered 431 and the connection closed.
    - It keeps every header field, however many: more than :data:`MAX_HEADER_FIELDS` are now
      answered 431 and the connection closed; parsing stops at the first field past the limit
      (uvicorn logs its one "Invalid HTTP request received." line).
    - It waits forever for a client to read its answers: pipelined requests whose answers the
      client never read held each connection, its request and its 8 MB body (30 connections: +311
      MB, still held after 600 s). An answer that cannot be written for ``write_timeout_s`` (the
      socket's buffers full, the transport paused) now aborts the connection, with one log line.
    - It resumes reading after every answer, however many pipelined requests wait: reading now
      stays paused while :data:`MAX_PIPELINED` or more are queued on the connection.

    The limits are class attributes, set on every call (tests shorten the timeouts in-process).
    """
    from uvicorn.protocols.http import httptools_impl as impl

    protocol = impl.HttpToolsProtocol
    protocol.max_head_bytes, protocol.head_timeout_s = max_head_bytes, head_timeout_s
    protocol.write_timeout_s = write_timeout_s
    if getattr(protocol, "hardened", False):
        return
    made, lost = protocol.connection_made, protocol.connection_lost
    paused, resumed = protocol.pause_writing, protocol.resume_writing
    send_on_cycle = impl.RequestResponseCycle.send
    feed, begin, complete = protocol.data_received, protocol.on_message_begin, protocol.on_headers_complete
    response_complete = protocol.on_response_complete
    header, on_body = protocol.on_header, protocol.on_body

    def start_timer(self, name: str, seconds: float, callback) -> None:
        if getattr(self, name, None) is None:
            setattr(self, name, self.loop.call_later(seconds, callback, self))

    def stop_timer(self, name: str) -> None:
        if (timer := getattr(self, name, None)) is not None:
            timer.cancel()
            setattr(self, name, None)

    def start_head_timer(self) -> None:
        start_timer(self, "head_timer", self.head_timeout_s, head_timed_out)

    def stop_head_timer(self) -> None:
        stop_timer(self, "head_timer")

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            start_head_timer(self)                 # a pipelined head waits for the answer before it
        elif not self.transport.is_closing():
            self.logger.warning(f"client error: no complete request head within {self.head_timeout_s:g} s -> 408")
            _answer_and_close(self, 408, f"the request line and headers did not arrive within "
                                         f"{self.head_timeout_s:g} seconds")

    def connection_made(self, transport) -> None:
        made(self, transport)
        start_head_timer(self)

    def on_response_complete(self) -> None:       # uvicorn resumes reading here, whatever is queued
        response_complete(self)
        if len(self.pipeline) >= MAX_PIPELINED and not self.transport.is_closing():
            self.flow.pause_reading()

    def connection_lost(self, exc) -> None:
        stop_head_timer(self)
        stop_timer(self, "write_timer")
        lost(self, exc)

    def pause_writing(self) -> None:              # the transport's buffer is full: the client is not reading
        paused(self)
        start_timer(self, "write_timer", self.write_timeout_s, write_timed_out)

    def resume_writing(self) -> None:
        stop_timer(self, "write_timer")
        resumed(self)

    def write_timed_out(self) -> None:
        self.write_timer = None
        self.logger.warning(f"client error: an answer not read for {self.write_timeout_s:g} s -> connection aborted")
        sock = self.transport.get_extra_info("socket")
        if sock is not None:                      # a reset: the kernel drops what it still holds for the client
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()                    # close() would wait for the buffer to drain

    async def cycle_send(self, message) -> None:
        """uvicorn's send, but a request waiting to write on a connection closed meanwhile (aborted
        above, or lost) writes nothing: uvicorn marks only the newest pipelined request
        disconnected, and uvloop raises on a write to a closed transport (an ERROR and a traceback)."""
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.transport.is_closing():
            self.disconnected = True
        await send_on_cycle(self, message)

    def on_message_begin(self) -> None:
        begin(self)
        self.head_bytes = 0                       # counting: this request's head is incomplete
        self.header_fields = 0
        start_head_timer(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        if getattr(self, "head_bytes", None) is not None:   # a trailer field (after a chunked body) is dropped
            self.header_fields += 1
            if self.header_fields > MAX_HEADER_FIELDS:       # stops the parser: uvicorn calls send_400_response
                raise TooManyHeaderFields
            header(self, name, value)

    def on_body_data(self, body: bytes) -> None:
        self.body_arrived = True
        on_body(self, body)

    def on_headers_complete(self) -> None:
        self.head_bytes = None
        stop_head_timer(self)
        complete(self)

    def data_received(self, data: bytes) -> None:
        self.body_arrived = False
        feed(self, data)                           # the parser calls the methods above
        if self.transport.is_closing():
            return
        if getattr(self, "head_bytes", None) is None:
            stray_bytes(self, data)
            return
        self.head_bytes += len(data)
        if self.head_bytes > self.max_head_bytes:
            self.logger.warning(f"client error: a request head over {self.max_head_bytes} bytes -> 431")
            _answer_and_close(self, 431, f"the request line and headers exceed {self.max_head_bytes} bytes")

    def stray_bytes(self, data: bytes) -> None:
        """Bytes of a request that are neither head nor body: chunk extensions and trailer fields,
        which llhttp buffers (1 GB of trailers took a worker from 268 to 1,198 MB). Past
        ``max_head_bytes`` in a row, 431 and the connection closed."""
        cycle = self.cycle
        if cycle is None or not cycle.more_body or self.body_arrived:
            self.stray = 0
            return
        self.stray = getattr(self, "stray", 0) + len(data)
        if self.stray > self.max_head_bytes:
            self.logger.warning(f"client error: over {self.max_head_bytes} bytes of chunk extensions or trailer "
                                "fields -> 431")
            if cycle.response_started:
                self.transport.close()
            else:
                _answer_and_close(self, 431, f"chunk extensions or trailer fields exceed {self.max_head_bytes} bytes")

    def send_400_response(self, msg: str) -> None:
        if getattr(self, "header_fields", 0) > MAX_HEADER_FIELDS:     # uvicorn logged "Invalid HTTP request"
            _answer_and_close(self, 431, f"the request has more than {MAX_HEADER_FIELDS} header fields")
            return
        _answer_and_close(self, 400, f"{msg} The request line or a header is not HTTP/1.1 this server can parse.")

    protocol.connection_made, protocol.connection_lost = connection_made, connection_lost
    protocol.pause_writing, protocol.resume_writing = pause_writing, resume_writing
    protocol.on_response_complete = on_response_complete
    impl.RequestResponseCycle.send = cycle_send
    protocol.on_message_begin, protocol.on_headers_complete = on_message_begin, on_headers_complete
    protocol.data_received, protocol.send_400_response = data_received, send_400_response
    protocol.on_header, protocol.on_body = on_header, on_body_data
    protocol.hardened = True


class TooManyHeaderFields(Exception):
    """Raised from the parser's header callback past :data:`MAX_HEADER_FIELDS` (httptools stops)."""


def _answer_and_close(connection, status: int, message: str) -> None:
    """Write ``{"error": message}`` with ``status`` straight to a uvicorn connection, then close it."""
    from uvicorn.protocols.http.httptools_impl import STATUS_LINE

    body = orjson.dumps({"error": message})
    defaults = [name + b": " + value + b"\r\n" for name, value in connection.server_state.default_headers]
    head = [STATUS_LINE[status], *defaults, b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body), b"connection: close\r\n\r\n"]
    connection.transport.write(b"".join(head) + body)
    connection.transport.close()


def install_error_handlers(app) -> None:
    """Answer and log client errors as :func:`client_error` does. Run after KServe has added its
    handlers (at startup): they log every error with its traceback, at ERROR."""
    app.exception_handlers.update({InvalidInput: invalid_input, ModelNotFound: model_not_found,
                                   HTTPException: http_error, RequestValidationError: validation_error})
    app.middleware_stack = None          # rebuilt with these handlers on the next request


def log_client_error(scope, status: int, reason: str) -> None:
    """One warning line, control characters escaped (the path and reason come from the client)."""
    path = scope.get("path", "?")
    logger.warning("client error: %s %s -> %d: %s", scope.get("method", "?"), printable(path),
                   status, printable(reason))


def printable(text: str) -> str:
    text = text if len(text) <= LOGGED_CHARS else text[:LOGGED_CHARS] + f"... ({len(text)} chars)"
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


def bounded(message: str) -> str:
    """An error message as answered: cut to :data:`MAX_MESSAGE` characters (it can quote the client)."""
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE] + f"... ({len(message)} chars)"


def client_error(request, status: int, message: str, headers=None) -> JSONResponse:
    log_client_error(request.scope, status, message)
    return JSONResponse({"error": bounded(message)}, status_code=status, headers=headers)


async def invalid_input(request, exc: InvalidInput) -> JSONResponse:
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE if isinstance(exc, RequestTooLarge) else HTTPStatus.BAD_REQUEST
    return client_error(request, status, str(exc))


async def model_not_found(request, exc: ModelNotFound) -> JSONResponse:
    return client_error(request, HTTPStatus.NOT_FOUND, str(exc))


async def http_error(request, exc: HTTPException) -> JSONResponse:
    """Starlette's own HTTP errors (its 404/405, were a route of OFFERED not registered)."""
    return client_error(request, exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", exc.headers)


async def validation_error(request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's check of a V2 body against KServe's schema: 422, one message per problem
    (without FastAPI's echo of the input, which can be the whole body)."""
    errors = exc.errors()
    # KServe's infer route takes an InferenceRequest or bytes: report the InferenceRequest's problems
    errors = [e for e in errors if tuple(e.get("loc", ()))[:2] != ("body", "bytes")] or errors
    problems = "; ".join(f"{_location(e.get('loc', ()))}: {e.get('msg', '')}" for e in errors[:SHOWN_PROBLEMS])
    more = f"; and {len(errors) - SHOWN_PROBLEMS} more" if len(errors) > SHOWN_PROBLEMS else ""
    return client_error(request, HTTPStatus.UNPROCESSABLE_ENTITY, f"invalid V2 request body: {problems}{more}")


def _location(loc) -> str:
    where = ".".join(str(part) for part in loc if part not in ("body", "InferenceRequest"))
    return where or "body"
