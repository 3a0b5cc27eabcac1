"""One ``/metrics`` for all KServe server workers (prometheus_client's multiprocess mode).

KServe's ``/metrics`` renders the answering process's own registry, so with ``--workers 2`` each
scrape sees one worker's counters, whichever got the connection: request counts jump up and down
between scrapes. Here the parent gives the workers a fresh ``PROMETHEUS_MULTIPROC_DIR`` before
they start (prometheus_client then keeps every metric in a per-process file there), and each
worker's ``/metrics`` sums the files of all workers, dead ones included, so counters only grow.
As prometheus_client documents for this mode, per-process collectors (``process_*``,
``python_gc_*``) are not exported.
"""

from __future__ import annotations

import os

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, exposition, multiprocess

from components.runtime import process_temp_dir

ENV = "PROMETHEUS_MULTIPROC_DIR"
PATH = "/metrics"


def prepare(workers: int) -> str | None:
    """In the parent, before any worker starts: an empty directory for the workers' metric files
    (removed at exit), unless the environment names one already, which must then exist and hold no
    earlier run's files (they would be summed in). Nothing to do for one worker."""
    if workers < 2:
        return None
    if os.environ.get(ENV):
        named = os.environ[ENV]
        if not os.path.isdir(named):
            raise ValueError(f"{ENV}={named} is not a directory")
        if any(name.endswith(".db") for name in os.listdir(named)):
            raise ValueError(f"{ENV}={named} holds metric files of an earlier run, which /metrics would add "
                             f"to this one's; empty it or unset {ENV}")
        return named
    directory = str(process_temp_dir("gtsrb-metrics-"))
    os.environ[ENV] = directory
    return directory


async def all_workers(request: Request) -> Response:
    """Every worker's metrics, summed over the processes (same encoding choice as KServe's)."""
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    encoder, content_type = exposition.choose_encoder(request.headers.get("accept"))
    return Response(content=encoder(registry), headers={"content-type": content_type})


def serve_all_workers(app: FastAPI) -> None:
    """Answer ``/metrics`` on ``app`` with :func:`all_workers` when this process keeps its metrics
    in :data:`ENV`. Call it before KServe registers its routes (a worker does, while unpickling
    its model): Starlette answers with the first matching route, so this one wins."""
    if os.environ.get(ENV):
        app.add_api_route(PATH, all_workers, methods=["GET"], include_in_schema=False)
