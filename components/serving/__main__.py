"""The KServe predictor: the trained model artifact, run by the winning backend, behind KServe.

    python -m components.serving --model_dir DIR --backend NAME [--model_name gtsrb]
        [--http_port 8080] [--workers N] [--max_batch 64] [--max_body_bytes 8388608]
        [--max_pixels 16777216] [--request_logs] [--enable_grpc true --grpc_port 8081] [--host 127.0.0.1]
    python -m components.serving --summary runs/latest/summary.json ...   (what a run-local's gate decided)

Requests and answers: components/serving/protocol.py (V1 and V2 REST, V2 gRPC); any bad request is
answered 4xx (gRPC: INVALID_ARGUMENT) with what was wrong; docs/serving-protocols.md says which
to use when. The server refuses to start (exit 1, one line saying why) on an artifact whose files
fail their sha256, unexpected weights, an artifact exported for another backend, or a backend
unavailable here. An ONNX winner's server imports neither torch nor torchvision
(components/serving/model.py).
"""

from __future__ import annotations

import argparse
import os
import sys

from kserve import logging as kserve_logging
from kserve import model_server

from components.runtime import cpu_count
from components.serving import listen, protocol, server, worker_metrics
from components.serving.model import DEFAULT_MAX_BATCH, DEFAULT_MODEL_DIR, DEFAULT_MODEL_NAME, GTSRBModel


def build_parser() -> argparse.ArgumentParser:
    env = os.environ.get
    parser = argparse.ArgumentParser(prog="python -m components.serving", parents=[model_server.parser],
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dir", default=env("GTSRB_MODEL_DIR", DEFAULT_MODEL_DIR),
                        help="the select step's served artifact (model_card.json + the file the winner's "
                             "evaluation measured), or a model artifact for a torch backend (env GTSRB_MODEL_DIR)")
    parser.add_argument("--backend", default=env("GTSRB_BACKEND"),
                        help="inference backend: the one the served artifact was exported for "
                             "(components/backends.py lists them; env GTSRB_BACKEND)")
    parser.add_argument("--summary", help="serve what the gate of this run-local summary.json decided: the run's "
                                          "winner if it promoted it, else the champion it kept")
    parser.add_argument("--expected_sha256", default=env("GTSRB_WEIGHTS_SHA256"),
                        help="refuse an artifact whose weights have another sha256 (env GTSRB_WEIGHTS_SHA256)")
    parser.add_argument("--max_batch", type=int, default=int(env("GTSRB_MAX_BATCH", DEFAULT_MAX_BATCH)),
                        help="most instances in one request (env GTSRB_MAX_BATCH)")
    parser.add_argument("--max_body_bytes", type=int,
                        default=int(env("GTSRB_MAX_BODY_BYTES", server.DEFAULT_MAX_BODY_BYTES)),
                        help="largest request body accepted; larger is 413 (env GTSRB_MAX_BODY_BYTES)")
    parser.add_argument("--max_pixels", type=int,
                        default=int(env("GTSRB_MAX_PIXELS", protocol.MAX_REQUEST_PIXELS)),
                        help="most decoded image pixels per request, all its images together; more is 413 "
                             "(env GTSRB_MAX_PIXELS)")
    parser.add_argument("--host", default=env("GTSRB_HOST"),
                        help="address the REST and gRPC servers listen on (env GTSRB_HOST); default: every "
                             "interface, as KServe does (REST 0.0.0.0, gRPC [::]), what the InferenceService's "
                             "pod needs; `make serve` passes 127.0.0.1")
    parser.add_argument("--request_logs", action="store_true",
                        help="log every request (uvicorn access log + KServe timing lines); off by default")
    # workers 0 = one per CPU this container may use; gRPC (V2) only with --enable_grpc true (it runs
    # in the parent process; `make serve` and the InferenceService enable it).
    parser.set_defaults(model_name=env("GTSRB_MODEL_NAME", DEFAULT_MODEL_NAME), workers=0, enable_grpc=False)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    server.fixed_mmap_threshold()
    if args.summary:
        from components.local_run import NotServable, serving_choice

        try:
            choice = serving_choice(args.summary)
        except NotServable as e:
            print(f"predictor: {e}", file=sys.stderr)
            return 1
        print(f"predictor: {choice.describe()}", file=sys.stderr, flush=True)
        args.model_dir, args.backend = choice.model_dir, choice.backend
    if not args.backend:
        print("predictor: --backend (or GTSRB_BACKEND) is required", file=sys.stderr)
        return 2
    cpus = cpu_count()
    workers = args.workers or cpus
    log_config = None if args.log_config_file else server.logging_config(args.request_logs)
    if log_config:
        kserve_logging.configure_logging(log_config)
    try:
        settings = server.ServerSettings(args.max_body_bytes, args.request_logs, log_config)
        if workers > 1:       # the workers' forkserver imports the serving stack while this process loads
            worker_metrics.prepare(workers)
            listen.start_forkserver()
        model = GTSRBModel(args.model_name, args.model_dir, args.backend, max_batch=args.max_batch,
                           threads=max(1, cpus // workers), expected_sha256=args.expected_sha256, server=settings,
                           max_pixels=args.max_pixels)
    except Exception as e:  # refuse to start, and say why
        print(f"predictor: refusing to serve {args.model_dir} with backend {args.backend!r}: "
              f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    server.start(model, settings, workers, args.http_port, args.grpc_port, args.enable_grpc, args.host)
    return 0


if __name__ == "__main__":
    sys.exit(main())
