"""ONNX Runtime sessions, set up the same way where a backend is measured (components/backends.py,
in the evaluate step) and where it is served (the predictor, which never imports torch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

Run = Callable[[np.ndarray], np.ndarray]


def session(path: str | Path, threads: int, optimized_to: str | Path | None = None) -> Run:
    """A CPU session on the ONNX file at ``path`` with a fixed thread count: float32 batch
    N x 3 x 32 x 32 -> float32 logits. ``optimized_to``: also write the graph ONNX Runtime's
    optimizer made of the file (what the session runs) there."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Pool threads sleep between runs instead of spinning: a spinning thread burns the core the
    # next backend measured in the same process (make bench interleaves them), the server's event
    # loop or a pod's CPU quota needs. make bench x3 (docs/backends-measurements.md §12):
    # winner_vs_eager 4.57/3.88/4.82x -> 5.40/5.49/4.85x; ORT int8 b64 p99 18.8-23.2 -> 9.4-13.1 ms.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_to:
        options.optimized_model_filepath = str(optimized_to)
        options.log_severity_level = 3   # not the warning that an ENABLE_ALL graph is hardware-specific
    onnx = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = onnx.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return onnx.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]
    run.session = onnx
    return run
