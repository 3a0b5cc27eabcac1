"""One listening socket per KServe server worker (SO_REUSEPORT), so Linux spreads the connections.

KServe's multi-process REST server binds one socket in the parent and hands that same socket to
every worker. Each worker's event loop accepts every connection waiting when it wakes, so a burst
of keep-alive connections (a client's or a proxy's connection pool) often lands on one worker
while the others idle (measured: docs/measurements.md).

With :class:`ReusePortMultiProcess` every worker listens on its own socket, all bound to the port
with SO_REUSEPORT, and the kernel assigns each new connection to one of them by a hash of its
addresses (what gunicorn's ``--reuse-port`` and nginx's ``listen ... reuseport`` do, and what
uvicorn PR #2472 proposes). The parent keeps one more socket of the group, bound but not
listening until KServe hands it to a worker it restarts (after which it stays in the group: a
connection that reaches it while no worker holds it waits for the next restart).

KServe 0.21 also hard-codes the addresses it listens on: REST 0.0.0.0, gRPC [::] (every
interface, what a pod needs). :func:`install` with a ``host`` binds both to that address instead
(`make serve`, the local predictor: 127.0.0.1).
"""

from __future__ import annotations

import multiprocessing
import os
import socket

from grpc import aio
from kserve.logging import logger
from kserve.protocol.grpc import server as kserve_grpc
from kserve.protocol.rest.multiprocess import server as kserve_multiprocess
from kserve.protocol.rest.multiprocess.server import RESTServerMultiProcess, RESTServerProcess
from kserve.protocol.rest.server import RESTServer

from components.serving.grpc_guard import GrpcGuard

FORKSERVER = multiprocessing.get_context("forkserver")
# Imported once by the forkserver, before any worker is forked from it: the serving stack
# (kserve, numpy, PIL, this package) and ONNX Runtime (skipped where it is not installed).
PRELOAD = ["components.serving.__main__", "components.serving.model", "onnxruntime"]


class ForkServerProcess(RESTServerProcess):
    """A KServe server worker forked from a forkserver that has already imported :data:`PRELOAD`.

    KServe spawns each worker as a fresh interpreter, which must import KServe (seconds of CPU)
    before it can answer the parent's 5 s liveness ping, and KServe kills and replaces a worker that
    does not: on a busy node workers never come up. Forked from the forkserver, a worker starts
    with everything imported and shares those pages with its siblings (copy-on-write). The
    forkserver is a fresh interpreter itself (not a fork of this process and its threads)."""

    def __init__(self, sockets: list[socket.socket], target, log_config_file: str | None = None):
        super().__init__(sockets, target, log_config_file)
        self._process = FORKSERVER.Process(target=self.target, args=[sockets])


def reuse_port_socket(address: tuple) -> socket.socket:
    """A TCP socket bound to ``address`` (host, port) with SO_REUSEPORT, inheritable by workers."""
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


class ReusePortMultiProcess(RESTServerMultiProcess):
    """KServe's multi-process REST server, each worker with its own SO_REUSEPORT socket."""

    def init_processes(self, sockets: list[socket.socket]) -> None:
        address = sockets[0].getsockname()[:2]
        sockets[0].close()                       # bound without SO_REUSEPORT, it would keep the others out
        sockets[0] = reuse_port_socket(address)  # what KServe gives a restarted worker
        for _ in range(self._rest_server.config.workers):
            process = ForkServerProcess([reuse_port_socket(address)], self._rest_server.run,
                                        log_config_file=self.log_config_file)
            self._processes.append(process)
            process.start()
            logger.info("Started child process [%s] on its own SO_REUSEPORT socket", process.pid)


class BoundRESTServer(RESTServer):
    """KServe's REST server (one process, or each worker's) on :attr:`host` instead of 0.0.0.0."""

    host: str | None = None         # None: KServe's 0.0.0.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.host:
            self.config.host = self.host     # read when uvicorn (or ReusePortMultiProcess) binds


def grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


GRPC_CONNECTION_AGE_S = 300      # then GOAWAY; clients reconnect (env GTSRB_GRPC_CONNECTION_AGE_S)
GRPC_CONNECTION_GRACE_S = 30     # for the calls still open on it, then the connection closes


def connection_age_options() -> list[tuple[str, int]]:
    """gRPC server options that end every connection after a while. A unary call whose client
    half-closes without sending its request is never answered by grpc.aio (its handler returns
    without a status): 3,000 such calls stayed open, +42 MB, until each client's deadline, or for
    good without one. After the connection's age and grace, they end (UNAVAILABLE); a client with
    a good call reconnects at once (GOAWAY lets its open calls finish)."""
    age = float(os.environ.get("GTSRB_GRPC_CONNECTION_AGE_S", GRPC_CONNECTION_AGE_S))
    return [("grpc.max_connection_age_ms", int(age * 1000)),
            ("grpc.max_connection_age_grace_ms", int(min(age, GRPC_CONNECTION_GRACE_S) * 1000))]


class GuardedAio:
    """Stands in for ``grpc.aio`` in KServe's gRPC server module: the servers it makes run
    :class:`components.serving.grpc_guard.GrpcGuard` before KServe's interceptors, and, given a
    ``host``, listen on that host at the port KServe's ``GRPCServer.start`` asks for
    (``[::]:<port>``). Everything else is grpc.aio's."""

    def __init__(self, host: str | None = None):
        self.host = host

    def __getattr__(self, name):
        return getattr(aio, name)

    def server(self, *args, **kwargs):
        kwargs["interceptors"] = (GrpcGuard(), *kwargs.get("interceptors", ()))
        # No limit on concurrent streams per connection ("grpc.max_concurrent_streams"): with 100,
        # gRPC's own clients opened more all the same and got UNAVAILABLE for them (REFUSED_STREAM;
        # 44 of 1,000 concurrent calls on a warm channel, 1 of 200), docs/serving-hardening.md.
        kwargs["options"] = [*kwargs.get("options", ()), *connection_age_options()]
        server = aio.server(*args, **kwargs)
        if self.host is None:
            return server
        add = server.add_insecure_port

        def add_insecure_port(address: str) -> int:
            bound = grpc_address(self.host, int(address.rsplit(":", 1)[1]))
            logger.info("gRPC server listens on %s (not %s)", bound, address)
            return add(bound)
        server.add_insecure_port = add_insecure_port
        return server


def start_forkserver() -> None:
    """Start the forkserver now, so that it imports :data:`PRELOAD` while this process loads the
    model (otherwise it starts with the first worker). Call it after every environment variable
    the workers read at import time is set (worker_metrics.prepare)."""
    from multiprocessing import forkserver

    FORKSERVER.set_forkserver_preload(PRELOAD)
    forkserver.ensure_running()


def install(host: str | None = None) -> None:
    """Make ``kserve.ModelServer(workers > 1)`` in this process use :class:`ReusePortMultiProcess`,
    and start (and restart) its workers as :class:`ForkServerProcess`; its REST and gRPC servers
    listen on ``host`` (None: every interface, KServe's 0.0.0.0 and [::]); its gRPC server checks
    requests with :class:`GuardedAio`."""
    from kserve import model_server

    FORKSERVER.set_forkserver_preload(PRELOAD)
    model_server.RESTServerMultiProcess = ReusePortMultiProcess
    kserve_multiprocess.RESTServerProcess = ForkServerProcess
    BoundRESTServer.host = host
    model_server.RESTServer = kserve_multiprocess.RESTServer = BoundRESTServer
    kserve_grpc.aio = GuardedAio(host)
