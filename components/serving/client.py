"""Talking to a running predictor over HTTP, and running one locally on a free port of 127.0.0.1
(the serve step, the tests, `make bench-serve`)."""

from __future__ import annotations

import base64
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from components import cluster

MODEL_NAME = cluster.INFERENCE_SERVICE
STARTUP_SECONDS = 180          # a local predictor must be ready by then (compile builds kernels at start-up)
REQUEST_SECONDS = 30
READY_POLL_SECONDS = 0.5
READY_PROBE_SECONDS = 5
STOP_SECONDS = 30              # after SIGTERM, before SIGKILL
LOG_TAIL_CHARS = 3000          # of a predictor's log, quoted when it fails to start
LOCAL_HOST = "127.0.0.1"       # a local predictor listens on loopback only (REST and gRPC)


class SmokeTestFailed(RuntimeError):
    pass


def post_json(url: str, body: dict, timeout: float = REQUEST_SECONDS) -> tuple[int, dict]:
    """POST a JSON body; (status, decoded JSON answer), for 4xx/5xx answers too."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def is_ready(base_url: str, model_name: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/v2/models/{model_name}/ready",
                                    timeout=READY_PROBE_SECONDS) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def image_instances(images: list[bytes]) -> list[dict]:
    return [{"image": {"b64": base64.b64encode(data).decode()}} for data in images]


# --------------------------------------------------------------------------- a local predictor
def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOCAL_HOST, 0))
        return s.getsockname()[1]


def predictor_command(model_dir: str, backend: str, port: int, workers: int = 0,
                      host: str | None = LOCAL_HOST) -> list[str]:
    """The predictor's command line; ``host`` None: it listens on every interface (the pod's default)."""
    return [sys.executable, "-m", "components.serving", f"--model_dir={model_dir}", f"--backend={backend}",
            f"--model_name={MODEL_NAME}", f"--http_port={port}", f"--workers={workers}",
            *([f"--host={host}"] if host else [])]


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=STOP_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_SECONDS)


@dataclass
class LocalPredictor:
    url: str
    process: subprocess.Popen
    log: Path
    startup_seconds: float
    grpc_target: str | None = None      # host:port of the gRPC server, when enabled


def is_listening(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=READY_PROBE_SECONDS):
            return True
    except OSError:
        return False


@contextmanager
def local_predictor(model_dir: str, backend: str, workers: int = 0, extra_args: tuple = (),
                    startup_seconds: float = STARTUP_SECONDS, grpc: bool = False, host: str | None = LOCAL_HOST):
    """Run the predictor (KServe ModelServer) on a free port (and its gRPC server on another, if
    ``grpc``), listening on ``host`` (None: every interface; reached on 127.0.0.1 either way), wait
    until the model is ready, yield, and always stop it. Its log goes to a temporary file (quoted
    when it fails to start)."""
    port = free_port()
    url = f"http://{LOCAL_HOST}:{port}"
    grpc_port = free_port() if grpc else None
    if grpc:
        extra_args = (*extra_args, "--enable_grpc=true", f"--grpc_port={grpc_port}")
    with tempfile.TemporaryDirectory(prefix="predictor-") as tmp:
        log_path = Path(tmp) / "predictor.log"
        start = time.monotonic()
        with open(log_path, "wb") as log:
            process = subprocess.Popen([*predictor_command(model_dir, backend, port, workers, host), *extra_args],
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            while not (is_ready(url, MODEL_NAME) and (not grpc or is_listening(LOCAL_HOST, grpc_port))):
                if process.poll() is not None or time.monotonic() - start > startup_seconds:
                    state = f"exited with {process.returncode}" if process.returncode is not None else "is not ready"
                    raise SmokeTestFailed(f"predictor {state} after {time.monotonic() - start:.0f}s; log tail:\n"
                                          f"{log_path.read_text(errors='replace')[-LOG_TAIL_CHARS:]}")
                time.sleep(READY_POLL_SECONDS)
            yield LocalPredictor(url, process, log_path, time.monotonic() - start,
                                 f"{LOCAL_HOST}:{grpc_port}" if grpc else None)
        finally:
            stop(process)
