"""The KServe model: a served artifact (or a plain model artifact, for a torch backend), run by
one backend.

``load`` verifies the artifact (every file's sha256 against the model card; a mismatch stops
the server before it listens) and prepares the backend once; ``preprocess`` turns a V1 or V2
request into one normalized batch (components.serving.protocol); ``predict`` runs it.

An ONNX artifact (the file the winner's evaluation measured) is run by ONNX Runtime with numpy
pre- and post-processing: such a server process never imports torch. Torch backends import it
when they load.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from kserve import Model, model_server
from kserve import logging as kserve_logging

from components import transforms
from components.artifact import SERVING, ModelArtifactError, check_served, serving_format, verified_card
from components.cluster import INFERENCE_SERVICE
from components.rollout import weights_version
from components.runtime import cpu_count
from components.serving import protocol
from components.serving.server import ServerSettings

# torch (and so components.model / components.backends) is imported where it is used, not here:
# ONNX servers never import it, and a multi-worker ModelServer unpickles the model in each spawned
# worker, which imports this module; KServe kills a worker that has not answered its 5 s liveness
# ping by then.

DEFAULT_MODEL_NAME = INFERENCE_SERVICE     # the model is served under its InferenceService name
DEFAULT_MODEL_DIR = "/mnt/models"          # where KServe's storage-initializer puts the storageUri
DEFAULT_MAX_BATCH = 64


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a request is padded to: powers of two below ``max_batch``, then ``max_batch``."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


def prepare_served(model_dir: str | Path, backend: str, expected_sha256: str | None = None,
                   threads: int | None = None):
    """Verify and load an artifact and prepare ``backend`` on it with ``threads`` threads (default:
    one per CPU): (run: float32 N x 3 x 32 x 32 ndarray -> float32 logits, model card). Raises on
    any problem: files that fail their sha256, weights that are not the expected ones, an artifact
    exported for another backend, an ONNX backend without its exported file, a backend unavailable
    here."""
    card = verified_card(model_dir)
    check_served(card, backend, expected_sha256)
    threads = threads or cpu_count()
    if serving_format(card) == "onnx":
        from components import ort

        return ort.session(Path(model_dir) / card[SERVING]["file"], threads), card
    return _torch_run(model_dir, backend, card, threads), card


def _torch_run(model_dir: str | Path, backend: str, card: dict, threads: int):
    import torch

    from components import backends
    from components.model import calibration_images, load_model_artifact

    spec = backends.get(backend)
    if spec.exports:
        raise ModelArtifactError(f"backend {backend!r} serves the {spec.exports} file its evaluation measured, and "
                                 f"{model_dir} has none (a model artifact, not a served one): serve the select "
                                 "step's `served` artifact (summary.json: served.path), or write one with "
                                 "components.served.export_served")
    torch.set_num_threads(threads)
    model, card = load_model_artifact(model_dir)
    calibration = calibration_images(model_dir, card) if spec.needs_calibration else None
    predict = spec.prepare(model, torch.zeros(1, *card["input_shape"]), calibration=calibration)
    return lambda x: predict(torch.from_numpy(x)).numpy()


def top_classes(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax over the classes, then the ``k`` most probable: (class ids, probabilities), each
    N x k, best first (ties: lower class id first). k = 1, every default request, takes argmax
    instead of a sort (a third of the time for one image)."""
    p = logits.astype(np.float32) - logits.max(axis=1, keepdims=True)
    np.exp(p, out=p)
    p /= p.sum(axis=1, keepdims=True)
    if k == 1:                          # argmax: the first of equal maxima, as the stable sort
        ids = p.argmax(axis=1)
        return ids[:, None], p[np.arange(len(p)), ids][:, None]
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(p, ids, axis=1)


class GTSRBModel(Model):
    def __init__(self, name: str, model_dir: str, backend: str, max_batch: int = DEFAULT_MAX_BATCH,
                 threads: int | None = None, expected_sha256: str | None = None,
                 server: ServerSettings | None = None, max_pixels: int = protocol.MAX_REQUEST_PIXELS):
        super().__init__(name)
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.model_dir, self.backend, self.max_batch, self.threads = model_dir, backend, max_batch, threads
        self.max_pixels = max_pixels
        self.expected_sha256 = expected_sha256   # the deployed weights: refuse any other artifact
        self.server = server or ServerSettings()
        self.ready = False
        self.load()

    def load(self) -> bool:
        """Verify + load the artifact, prepare the backend once and run every batch bucket once
        (kernels, compilation and caches are built now, not on a request); raises on any problem."""
        start = time.perf_counter()
        self.threads = self.threads or cpu_count()
        self._run, card = prepare_served(self.model_dir, self.backend, self.expected_sha256, self.threads)
        self.class_names = list(card["class_names"])
        self.input_shape = tuple(card["input_shape"])
        norm = card["normalization"]
        self.signature = protocol.Signature(
            self.input_shape, tuple(self.class_names), transforms.Normalizer(norm["mean"], norm["std"]),
            self.max_batch, self.max_pixels)
        self.weights_sha256 = card["weights_sha256"]
        self.served_sha256 = card.get(SERVING, {}).get("sha256", self.weights_sha256)
        self.buckets = batch_buckets(self.max_batch)
        for n in self.buckets:
            self._run(np.zeros((n, *self.input_shape), dtype=np.float32))
        self.ready = True
        kserve_logging.logger.info(f"{self.name}: {self.backend} ready in {time.perf_counter() - start:.1f}s "
                                   f"({self.threads} threads, batch buckets {self.buckets})")
        return self.ready

    def _logits(self, x: np.ndarray) -> np.ndarray:
        """Run the batch padded to its bucket (a shape-specialising backend only ever sees those)."""
        n = len(x)
        size = next(b for b in self.buckets if b >= n)
        if size > n:
            x = np.concatenate([x, np.zeros((size - n, *x.shape[1:]), dtype=x.dtype)])
        return self._run(x)[:n]

    # A multi-worker ModelServer pickles the model into each spawned worker: ship the settings
    # only; the worker verifies and loads the artifact itself when its server starts (it accepts
    # no connection before that), and sets up its own logging and request guard.
    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ("_run", "signature")} | {"ready": False}

    def __setstate__(self, state):
        self.__dict__.update(state)
        model_server.app.router.on_startup.append(self.load)
        self.server.set_up_worker()

    def get_input_types(self):
        return protocol.input_types(self.input_shape)

    def get_output_types(self):
        return protocol.output_types()

    def validate(self, payload):
        return payload          # preprocess validates every instance

    def preprocess(self, payload, headers=None) -> protocol.Batch:
        version = getattr(payload, "model_version", None)      # gRPC's ModelInfer carries one
        if version and version != weights_version(self.weights_sha256):
            raise protocol.VersionNotServed(self.name, version, weights_version(self.weights_sha256))
        return protocol.parse_request(payload, self.signature)

    def predict(self, batch: protocol.Batch, headers=None):
        ids, probabilities = top_classes(self._logits(batch.x), max(1, batch.top_k))
        if not np.isfinite(probabilities).all():    # a request that passed preprocess: our fault, a 500
            raise RuntimeError(f"{self.name}: {self.backend} gave non-finite scores for a validated batch "
                               f"of {len(batch.x)}; refusing to answer them")
        return protocol.answer(batch, ids.tolist(), probabilities.tolist(), self.class_names, self.name)
