"""The KServe predictor: the trained model artifact, run by the winning backend, behind KServe.

    python -m components.predictor --model_dir DIR --backend NAME [--model_name gtsrb]
        [--http_port 8080] [--workers N] [--max_batch 64] [--max_body_bytes 8388608]
        [--request_logs]
    python -m components.predictor --summary runs/latest/summary.json ...   (a run-local's model + winner)

``load`` verifies the artifact (weights sha256 against the model card; a mismatch stops the
server before it listens) and prepares the backend once; ``preprocess`` turns a V1 or V2 request
into one normalized batch, validating every instance; ``predict`` runs the batch and answers with
class id, class name and probability per instance (and the top k when asked).

Requests (the same transforms as training: decode, RGB, bilinear resize to 32x32, normalize):
- V1 ``POST /v1/models/<name>:predict``: ``{"instances": [I, ...], "parameters": {"top_k": k}}``
  where ``I`` is ``{"image": {"b64": "<base64 PNG/JPEG/PPM>"}}`` or a normalized 3x32x32 number array.
- V2 ``POST /v2/models/<name>/infer``: one input, either ``image`` (BYTES, shape [N], base64
  strings) or ``input`` (FP32, shape [N, 3, 32, 32]); ``parameters: {"top_k": k}``.
Any bad request is answered 4xx with what was wrong (``kserve.errors.InvalidInput`` is 400;
an oversized body is 413 before KServe reads it).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import copy
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer, model_server
from kserve import logging as kserve_logging
from kserve.errors import InvalidInput
from PIL import Image

from components import listen, worker_metrics
from components.cluster import INFERENCE_SERVICE
from components.runtime import cpu_count, set_threads

# torch (and so components.model / components.backends) is imported where it is used, not here:
# a multi-worker ModelServer unpickles the model in each spawned worker, which imports this
# module, and KServe kills a worker that has not answered its 5 s liveness ping by then.

DEFAULT_MODEL_NAME = INFERENCE_SERVICE          # the model is served under its InferenceService name
DEFAULT_MODEL_DIR = "/mnt/models"          # where KServe's storage-initializer puts the storageUri
DEFAULT_MAX_BATCH = 64
DEFAULT_MAX_BODY_BYTES = 8 << 20
MAX_IMAGE_PIXELS = 4096 * 4096             # decoded size limit (decompression bombs)
IMAGE_FORMATS = ("PNG", "JPEG", "PPM")
V1_KEYS = {"instances", "parameters"}
V2_INPUTS = {"image": "BYTES", "input": "FP32"}
V2_OUTPUTS = ("class_id", "class_name", "probability", "top_k_class_id", "top_k_probability")
V2_PARAMETERS = ("top_k", "binary_data_output")   # the latter: KServe's binary tensor extension, for outputs
CALIBRATION_FILE = "calibration.pt"        # int8 backends: the images evaluate calibrated with


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a request is padded to: powers of two below ``max_batch``, then ``max_batch``."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


def serving_bundle(model_dir: str | Path, data_dir: str | Path, backend: str, out_dir: str | Path) -> str:
    """The directory to serve ``backend`` from: the model artifact itself, or, for a backend that
    needs calibration images (int8), a copy of it plus CALIBRATION_FILE holding the very images
    the evaluate step calibrated with, so the served model is the one that was measured."""
    from components import backends

    if not backends.get(backend).needs_calibration:
        return str(model_dir)
    import torch

    from components.evaluate import calibration_images
    from components.model import CARD_FILE

    card = json.loads((Path(model_dir) / CARD_FILE).read_text())
    out = Path(out_dir)
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    torch.save(calibration_images(data_dir, card["normalization"]), out / CALIBRATION_FILE)
    return str(out)


def prepare_served(model_dir: str | Path, backend: str, expected_sha256: str | None = None):
    """Verify and load a serving directory (see serving_bundle) and prepare ``backend`` on it:
    (run, model card). Raises on any problem: weights that fail their sha256 or are not the
    expected ones, missing calibration images, a backend unavailable here."""
    import torch

    from components import backends
    from components.model import ModelArtifactError, load_model_artifact

    spec = backends.get(backend)
    model, card = load_model_artifact(model_dir)
    if expected_sha256 and card["weights_sha256"] != expected_sha256:
        raise ModelArtifactError(f"{model_dir} holds weights {card['weights_sha256']}, "
                                 f"not the expected {expected_sha256}")
    calibration = None
    if spec.needs_calibration:
        path = Path(model_dir) / CALIBRATION_FILE
        if not path.is_file():
            raise ModelArtifactError(f"backend {backend!r} needs calibration images and {path} is "
                                     "missing (serving_bundle() writes it)")
        calibration = torch.load(path, weights_only=True)
    return spec.prepare(model, torch.zeros(1, *card["input_shape"]), calibration=calibration), card


@dataclass
class Batch:
    """What preprocess hands to predict: one normalized batch and how to answer it."""
    x: object                            # torch float32 N x 3 x 32 x 32, normalized
    top_k: int                           # 0 = answer without a top-k list
    v2: InferRequest | None = None       # the V2 request (None for V1)


# --------------------------------------------------------------------------- validation
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


def decode_image(data: bytes, where: str):
    """Encoded PNG/JPEG/PPM bytes -> uint8 3x32x32 tensor through the training transform."""
    from components.model import to_uint8_32

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
            return to_uint8_32(image)
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


# --------------------------------------------------------------------------- request guard
class RequestGuard:
    """ASGI middleware: a body larger than ``max_body_bytes`` is answered 413 before KServe reads
    it, and the V2 binary tensor extension (whose header KServe parses unchecked) is refused."""

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


# --------------------------------------------------------------------------- the model
class GTSRBModel(Model):
    def __init__(self, name: str, model_dir: str, backend: str, max_batch: int = DEFAULT_MAX_BATCH,
                 threads: int | None = None, expected_sha256: str | None = None,
                 server: ServerSettings | None = None):
        super().__init__(name)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model_dir, self.backend, self.max_batch, self.threads = model_dir, backend, max_batch, threads
        self.expected_sha256 = expected_sha256   # the deployed weights: refuse any other artifact
        self.server = server or ServerSettings()
        self.ready = False
        self.load()

    def load(self) -> bool:
        """Verify + load the artifact, prepare the backend once and run every batch bucket once
        (kernels, compilation and caches are built now, not on a request); raises on any problem."""
        import torch

        start = time.perf_counter()
        self.threads = set_threads(self.threads)
        self._run, card = prepare_served(self.model_dir, self.backend, self.expected_sha256)
        self.class_names = list(card["class_names"])
        self.input_shape = tuple(card["input_shape"])
        self.mean = torch.tensor(card["normalization"]["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(card["normalization"]["std"], dtype=torch.float32).view(1, -1, 1, 1)
        self.weights_sha256 = card["weights_sha256"]
        self.buckets = batch_buckets(self.max_batch)
        for n in self.buckets:
            self._run(torch.zeros(n, *self.input_shape))
        self.ready = True
        kserve_logging.logger.info(f"{self.name}: {self.backend} ready in {time.perf_counter() - start:.1f}s "
                                   f"({self.threads} threads, batch buckets {self.buckets})")
        return self.ready

    def _logits(self, x):
        """Run the batch padded to its bucket (a shape-specialising backend only ever sees those)."""
        import torch

        n = len(x)
        size = next(b for b in self.buckets if b >= n)
        if size > n:
            x = torch.cat([x, x.new_zeros(size - n, *x.shape[1:])])
        return self._run(x)[:n]

    # A multi-worker ModelServer pickles the model into each spawned worker: ship the settings
    # only; the worker verifies and loads the artifact itself when its server starts (it accepts
    # no connection before that), and sets up its own logging and request guard.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_run", "mean", "std")} | {"ready": False}

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.server.logging:                  # before KServe would apply its default config
            kserve_logging.configure_logging(self.server.logging)
        model_server.app.router.on_startup.append(self.load)
        self.server.apply()

    def get_input_types(self):
        return [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                {"name": "input", "datatype": "FP32", "shape": [-1, *self.input_shape]}]

    def get_output_types(self):
        return [{"name": "class_id", "datatype": "INT64", "shape": [-1]},
                {"name": "class_name", "datatype": "BYTES", "shape": [-1]},
                {"name": "probability", "datatype": "FP32", "shape": [-1]},
                {"name": "top_k_class_id", "datatype": "INT64", "shape": [-1, -1]},
                {"name": "top_k_probability", "datatype": "FP32", "shape": [-1, -1]}]

    def validate(self, payload):
        return payload          # preprocess has validated every instance

    # ----------------------------------------------------------------------- preprocess
    def preprocess(self, payload, headers=None) -> Batch:
        if isinstance(payload, InferRequest):
            return self._v2_batch(payload)
        if isinstance(payload, (bytes, bytearray)):   # JSON sent with another content type
            try:
                payload = orjson.loads(payload)
            except orjson.JSONDecodeError as e:
                raise InvalidInput(f"request body is not JSON ({e})") from None
        return self._v1_batch(payload)

    def _check_count(self, n: int, where: str) -> None:
        if n < 1:
            _fail(where, "no instances; send at least one")
        if n > self.max_batch:
            _fail(where, f"{n} instances exceed the maximum batch of {self.max_batch}")

    def _image(self, value, where: str):
        """A base64 image -> normalized float 3x32x32."""
        from components.model import normalize

        return normalize(decode_image(decode_base64(value, where), where).unsqueeze(0), self.mean, self.std)[0]

    def _v1_batch(self, body) -> Batch:
        import torch

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
        self._check_count(len(instances), "instances")
        top_k = parse_parameters(body.get("parameters"), len(self.class_names))
        x = torch.empty(len(instances), *self.input_shape)
        for i, instance in enumerate(instances):
            x[i] = self._v1_instance(instance, f"instances[{i}]")
        return Batch(x, top_k)

    def _v1_instance(self, instance, where: str):
        import torch

        if isinstance(instance, list):
            array = as_numbers(instance, where)
            if array.shape != self.input_shape:
                _fail(where, f"array shape {list(array.shape)} is not {list(self.input_shape)}")
            return torch.from_numpy(array)
        if not isinstance(instance, dict):
            _fail(where, f"expected {{\"image\": {{\"b64\": ...}}}} or a 3x32x32 number array, "
                         f"got {type(instance).__name__}")
        if set(instance) != {"image"}:
            _fail(where, f"expected exactly the key 'image', got {sorted(instance)}")
        image = instance["image"]
        if not isinstance(image, dict) or set(image) != {"b64"}:
            _fail(f"{where}.image", "expected {\"b64\": \"<base64 PNG/JPEG/PPM>\"}")
        return self._image(image["b64"], f"{where}.image.b64")

    def _v2_batch(self, request: InferRequest) -> Batch:
        import torch

        if len(request.inputs) != 1:
            raise InvalidInput(f"expected exactly one input ('image' or 'input'), got {len(request.inputs)}")
        item = request.inputs[0]
        where = f"input '{item.name}'"
        expected = V2_INPUTS.get(item.name)
        if expected is None:
            _fail(where, "unknown input; send 'image' (BYTES, shape [N], base64 PNG/JPEG/PPM) "
                         f"or 'input' (FP32, shape [N, {', '.join(map(str, self.input_shape))}])")
        if item.datatype != expected:
            _fail(where, f"datatype {item.datatype} is not {expected}")
        top_k = parse_parameters(request.parameters, len(self.class_names), V2_PARAMETERS)
        for output in request.request_outputs or []:
            if output.name not in V2_OUTPUTS:
                _fail(f"output '{output.name}'", f"unknown output; known: {', '.join(V2_OUTPUTS)}")
            if output.name.startswith("top_k_") and not top_k:
                _fail(f"output '{output.name}'", "needs parameters.top_k")
        shape, data = list(item.shape), item.data
        if item.name == "input":
            if len(shape) != 4 or tuple(shape[1:]) != self.input_shape:
                _fail(where, f"shape {shape} is not [N, {', '.join(map(str, self.input_shape))}]")
            self._check_count(shape[0], where)
            array = as_numbers(data, where)
            if array.size != int(np.prod(shape)):
                _fail(where, f"{array.size} values do not fill shape {shape}")
            return Batch(torch.from_numpy(array.reshape(shape)), top_k, request)
        if len(shape) != 1 or shape[0] != len(data):
            _fail(where, f"shape {shape} does not match its {len(data)} data elements (expected [N])")
        self._check_count(len(data), where)
        x = torch.empty(len(data), *self.input_shape)
        for i, value in enumerate(data):
            x[i] = self._image(value, f"{where} data[{i}]")
        return Batch(x, top_k, request)

    # ----------------------------------------------------------------------- predict
    def predict(self, batch: Batch, headers=None):
        import torch

        probabilities = torch.softmax(self._logits(batch.x).float(), dim=1)
        top_p, top_i = probabilities.topk(max(1, batch.top_k), dim=1)
        ids, probs = top_i.tolist(), top_p.tolist()
        if batch.v2 is None:
            return {"predictions": [self._v1_answer(i, p, batch.top_k) for i, p in zip(ids, probs, strict=True)]}
        return self._v2_answer(batch, ids, probs)

    def _v1_answer(self, ids: list[int], probs: list[float], top_k: int) -> dict:
        names = self.class_names
        answer = {"class_id": ids[0], "class_name": names[ids[0]], "probability": probs[0]}
        if top_k:
            answer["top_k"] = [{"class_id": c, "class_name": names[c], "probability": p}
                               for c, p in zip(ids, probs, strict=True)]
        return answer

    def _v2_answer(self, batch: Batch, ids: list[list[int]], probs: list[list[float]]) -> InferResponse:
        n, k = len(ids), batch.top_k
        outputs = [InferOutput("class_id", [n], "INT64", [row[0] for row in ids]),
                   InferOutput("class_name", [n], "BYTES", [self.class_names[row[0]] for row in ids]),
                   InferOutput("probability", [n], "FP32", [row[0] for row in probs])]
        if k:
            outputs += [InferOutput("top_k_class_id", [n, k], "INT64", [c for row in ids for c in row]),
                        InferOutput("top_k_probability", [n, k], "FP32", [p for row in probs for p in row])]
        return InferResponse(response_id=batch.v2.id or "", model_name=self.name, infer_outputs=outputs,
                             requested_outputs=batch.v2.request_outputs,
                             use_binary_outputs=batch.v2.use_binary_outputs)


# --------------------------------------------------------------------------- entry point
def serving_target(summary_path: str | Path) -> tuple[str, str]:
    """(serving directory, winning backend) of a run-local summary.json: the run's model artifact,
    bundled with the run's calibration images (next to the summary) if the winner needs them."""
    path = Path(summary_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make local` first")
    summary = json.loads(path.read_text())
    data_dir = Path(summary["run"]["artifacts"]) / "preprocess" / "data"
    return serving_bundle(summary["model"]["path"], data_dir, summary["winner"], path.parent / "serving-model"), \
        summary["winner"]


def build_parser() -> argparse.ArgumentParser:
    from components.backends import BACKENDS

    env = os.environ.get
    parser = argparse.ArgumentParser(parents=[model_server.parser], description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=env("GTSRB_MODEL_DIR", DEFAULT_MODEL_DIR),
                        help="model artifact directory: model.pt + model_card.json (env GTSRB_MODEL_DIR)")
    parser.add_argument("--backend", default=env("GTSRB_BACKEND"),
                        help=f"inference backend, one of {', '.join(BACKENDS)} (env GTSRB_BACKEND)")
    parser.add_argument("--summary", help="serve the model and winning backend of this run-local summary.json")
    parser.add_argument("--expected_sha256", default=env("GTSRB_WEIGHTS_SHA256"),
                        help="refuse an artifact whose weights have another sha256 (env GTSRB_WEIGHTS_SHA256)")
    parser.add_argument("--max_batch", type=int, default=int(env("GTSRB_MAX_BATCH", DEFAULT_MAX_BATCH)),
                        help="most instances in one request (env GTSRB_MAX_BATCH)")
    parser.add_argument("--max_body_bytes", type=int, default=int(env("GTSRB_MAX_BODY_BYTES", DEFAULT_MAX_BODY_BYTES)),
                        help="largest request body accepted; larger is 413 (env GTSRB_MAX_BODY_BYTES)")
    parser.add_argument("--request_logs", action="store_true",
                        help="log every request (uvicorn access log + KServe timing lines); off by default")
    # workers 0 = one per CPU this container may use; gRPC off: this predictor speaks REST V1/V2.
    parser.set_defaults(model_name=env("GTSRB_MODEL_NAME", DEFAULT_MODEL_NAME), workers=0, enable_grpc=False)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.summary:
        args.model_dir, args.backend = serving_target(args.summary)
    if not args.backend:
        print("predictor: --backend (or GTSRB_BACKEND) is required", file=sys.stderr)
        return 2
    cpus = cpu_count()
    workers = args.workers or cpus
    log_config = None if args.log_config_file else logging_config(args.request_logs)
    if log_config:
        kserve_logging.configure_logging(log_config)
    try:
        server = ServerSettings(args.max_body_bytes, args.request_logs, log_config)
        model = GTSRBModel(args.model_name, args.model_dir, args.backend, max_batch=args.max_batch,
                           threads=max(1, cpus // workers), expected_sha256=args.expected_sha256, server=server)
        worker_metrics.prepare(workers)
    except Exception as e:  # refuse to start, and say why
        print(f"predictor: refusing to serve {args.model_dir} with backend {args.backend!r}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    server.apply()
    listen.install()
    if workers > 1:                              # workers reuse the exports this process just made
        from components import backends
        backends.share_exports()
    ModelServer(http_port=args.http_port, grpc_port=args.grpc_port, workers=workers, enable_grpc=args.enable_grpc,
                enable_latency_logging=args.request_logs).start([model])
    return 0


if __name__ == "__main__":
    sys.exit(main())
