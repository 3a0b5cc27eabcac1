"""The KServe model: the trained model artifact, run by one backend.

``load`` verifies the artifact (every file's sha256 against the model card; a mismatch stops
the server before it listens) and prepares the backend once; ``preprocess`` turns a V1 or V2
request into one normalized batch (components.serving.protocol); ``predict`` runs it.
"""

from __future__ import annotations

import time
from pathlib import Path

from kserve import Model, model_server
from kserve import logging as kserve_logging

from components.cluster import INFERENCE_SERVICE
from components.runtime import set_threads
from components.serving import protocol
from components.serving.server import ServerSettings

# torch (and so components.model / components.backends) is imported where it is used, not here:
# a multi-worker ModelServer unpickles the model in each spawned worker, which imports this
# module, and KServe kills a worker that has not answered its 5 s liveness ping by then.

DEFAULT_MODEL_NAME = INFERENCE_SERVICE     # the model is served under its InferenceService name
DEFAULT_MODEL_DIR = "/mnt/models"          # where KServe's storage-initializer puts the storageUri
DEFAULT_MAX_BATCH = 64


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes a request is padded to: powers of two below ``max_batch``, then ``max_batch``."""
    sizes = [1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch]
    return [*sizes, max_batch]


def prepare_served(model_dir: str | Path, backend: str, expected_sha256: str | None = None):
    """Verify and load a model artifact and prepare ``backend`` on it (int8: calibrated with the
    artifact's own calibration sample): (run, model card). Raises on any problem: files that fail
    their sha256, weights that are not the expected ones, no calibration sample, a backend
    unavailable here."""
    import torch

    from components import backends
    from components.model import ModelArtifactError, calibration_images, load_model_artifact

    spec = backends.get(backend)
    model, card = load_model_artifact(model_dir)
    if expected_sha256 and card["weights_sha256"] != expected_sha256:
        raise ModelArtifactError(f"{model_dir} holds weights {card['weights_sha256']}, "
                                 f"not the expected {expected_sha256}")
    calibration = None
    if spec.needs_calibration:
        try:
            calibration = calibration_images(model_dir, card)
        except ModelArtifactError as e:
            raise ModelArtifactError(f"backend {backend!r} needs calibration images: {e}") from None
    return spec.prepare(model, torch.zeros(1, *card["input_shape"]), calibration=calibration), card


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
        import torch

        start = time.perf_counter()
        self.threads = set_threads(self.threads)
        self._run, card = prepare_served(self.model_dir, self.backend, self.expected_sha256)
        self.class_names = list(card["class_names"])
        self.input_shape = tuple(card["input_shape"])
        norm = card["normalization"]
        self.signature = protocol.Signature(
            self.input_shape, tuple(self.class_names),
            torch.tensor(norm["mean"], dtype=torch.float32).view(1, -1, 1, 1),
            torch.tensor(norm["std"], dtype=torch.float32).view(1, -1, 1, 1), self.max_batch, self.max_pixels)
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
        return protocol.parse_request(payload, self.signature)

    def predict(self, batch: protocol.Batch, headers=None):
        import torch

        probabilities = torch.softmax(self._logits(batch.x).float(), dim=1)
        top_p, top_i = probabilities.topk(max(1, batch.top_k), dim=1)
        return protocol.answer(batch, top_i.tolist(), top_p.tolist(), self.class_names, self.name)
