"""What a ``pipeline.py run-local`` output directory holds, in one place.

    OUTPUT_DIR/summary.json     select's summary + the run (artifacts folder, wall time) + serving check
    OUTPUT_DIR/pipeline.log     every task's full output
    OUTPUT_DIR/artifacts/       kfp.local's pipeline root: <pipeline>-<timestamp>/<task>/<output>
"""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY_FILE = "summary.json"
LOG_FILE = "pipeline.log"
ARTIFACTS_DIR = "artifacts"


def run_folder(task_output_path: str | Path) -> Path:
    """The run's folder (``<pipeline root>/<pipeline>-<timestamp>``) from any task output's path."""
    return Path(task_output_path).parent.parent


def task_output(run: str | Path, task: str, output: str) -> Path:
    """Where kfp.local put ``task``'s output ``output`` in the run folder ``run``."""
    return Path(run) / task / output


def read_summary(path: str | Path) -> dict:
    """A run-local summary.json (a FileNotFoundError that says how to make one)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run `make local` first")
    return json.loads(path.read_text())


def run_output(summary: dict, task: str, output: str) -> Path:
    """``task``'s output ``output`` of the run a summary.json describes."""
    return task_output(summary["run"]["artifacts"], task, output)


def serving_target(summary_path: str | Path) -> tuple[str, str]:
    """(served artifact directory, winning backend) of a run-local summary.json: what `make serve`,
    `make bench-serve` and ``python -m components.serve check`` serve (for an ONNX winner, the file
    its evaluation measured)."""
    summary = read_summary(summary_path)
    if "served" not in summary:
        raise FileNotFoundError(f"{summary_path} names no served artifact (a run from before the select "
                                "step forwarded one): run `make local` again")
    return summary["served"]["path"], summary["winner"]
