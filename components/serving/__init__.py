"""Serving: the trained model artifact, run by the winning backend, behind KServe.

- :mod:`.protocol`: V1/V2 requests -> one validated, normalized batch; answers back to V1/V2.
- :mod:`.model`: the KServe model (verifies and loads the artifact, prepares the backend once).
- :mod:`.server`: the server process: request guard, settings shipped to workers, logging.
- :mod:`.listen`, :mod:`.worker_metrics`: per-worker sockets, one ``/metrics`` for all workers.
- :mod:`.client`: talking to a running predictor, and running one locally on a free port.
- :mod:`.check`: the smoke check (a served model answers like the artifact in-process).
- ``python -m components.serving``: the command (see :mod:`.__main__`).

Nothing here reads the preprocessed data set: everything served comes from the model artifact.
"""
