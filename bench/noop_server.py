"""KServe's ceiling for `make bench-serve`: a ``kserve.Model`` that answers a constant, served
exactly as ``python -m components.serving`` serves the predictor (same worker processes and
sockets, request guard, offered routes, error handlers, logging and ``/metrics``).

    python -m bench.noop_server --port P [--workers N]
"""

from __future__ import annotations

import argparse
import sys

from kserve import Model
from kserve import logging as kserve_logging

from components.serving import server, worker_metrics
from components.serving.client import MODEL_NAME, free_port


class NoopModel(Model):
    """Answers every V1 request with one constant prediction, without looking at it (torch is
    not imported: a spawned worker must answer KServe's liveness ping within 5 s)."""

    ANSWER = {"predictions": [{"class_id": 0, "class_name": "Speed limit (20km/h)", "probability": 1.0}]}

    def __init__(self, name: str, settings: server.ServerSettings):
        super().__init__(name)
        self.server, self.ready = settings, True

    def __setstate__(self, state):            # in a spawned worker: the predictor's set-up
        self.__dict__.update(state)
        self.server.set_up_worker()

    def predict(self, payload, headers=None):
        return self.ANSWER


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    server.fixed_mmap_threshold()
    settings = server.ServerSettings(logging=server.logging_config(False))
    kserve_logging.configure_logging(settings.logging)
    worker_metrics.prepare(args.workers)
    server.start(NoopModel(MODEL_NAME, settings), settings, args.workers, args.port, free_port(), enable_grpc=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
