"""The server process around the model: KServe's FastAPI app set up once per process (request
guard, one ``/metrics`` for all workers, no per-request timing unless asked for), the logging
configuration, and starting ``kserve.ModelServer`` with one SO_REUSEPORT socket per worker.

A body larger than the limit is answered 413 before KServe reads it; the V2 binary tensor
extension (whose header KServe parses unchecked) is refused with 415.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import orjson
from kserve import ModelServer, model_server
from kserve import logging as kserve_logging

from components.serving import listen, worker_metrics
from components.serving.metadata import report_weights_in_metadata

DEFAULT_MAX_BODY_BYTES = 8 << 20


class RequestGuard:
    """ASGI middleware: a body larger than ``max_body_bytes`` is answered 413 before KServe reads
    it, and the V2 binary tensor extension is refused."""

    BINARY_HEADER = b"inference-header-content-length"

    def __init__(self, app, max_body_bytes: int):
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT"):
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.BINARY_HEADER in headers:
            return await _error(send, 415, "the V2 binary tensor extension is not supported; send JSON tensors")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_body_bytes:
            return await _error(send, 413, f"request body of {declared.decode(errors='replace')} bytes exceeds "
                                           f"the limit of {self.max_body_bytes} bytes")
        body = bytearray()
        while True:                       # a chunked body has no content-length: count as it arrives
            message = await receive()
            if message["type"] != "http.request":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body_bytes:
                return await _error(send, 413, f"request body exceeds the limit of {self.max_body_bytes} bytes")
            if not message.get("more_body"):
                break
        replay = [{"type": "http.request", "body": bytes(body), "more_body": False}]

        async def replay_receive():
            return replay.pop() if replay else await receive()

        return await self.app(scope, replay_receive, send)


async def _error(send, status: int, message: str) -> None:
    body = orjson.dumps({"error": message})
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


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
        report_weights_in_metadata()
        worker_metrics.serve_all_workers(app)
        if not self.request_logs:
            app.router.on_startup.append(drop_timing_middleware)
        app.state.gtsrb_configured = True


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
          enable_grpc: bool) -> None:
    """Run ``model`` in kserve.ModelServer with ``workers`` processes, each on its own socket; blocks."""
    settings.apply()
    listen.install()
    ModelServer(http_port=http_port, grpc_port=grpc_port, workers=workers, enable_grpc=enable_grpc,
                enable_latency_logging=settings.request_logs).start([model])
