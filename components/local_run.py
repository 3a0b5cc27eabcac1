"""What a ``pipeline.py run-local`` output directory holds, in one place, and what `make serve`
serves from it.

    OUTPUT_DIR/summary.json     select's summary + the gate's decision + the run (artifacts folder,
                                wall time, epochs trained, champion dir) + serving check
    OUTPUT_DIR/pipeline.log     every task's full output
    OUTPUT_DIR/artifacts/       kfp.local's pipeline root: <pipeline>-<timestamp>/<task>/<output>
    CHAMPION_DIR/champion.json  the champion's record (components/gate.py) + model_dir, beside
    CHAMPION_DIR/model-<sha16>/ a copy of the champion's served artifact

Nothing here imports torch or kfp: the predictor's process reads summaries with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from components.artifact import SERVING, ModelArtifactError, verified_card

SUMMARY_FILE = "summary.json"
LOG_FILE = "pipeline.log"
ARTIFACTS_DIR = "artifacts"
CHAMPION_RECORD = "champion.json"
PROMOTE = "promote"                 # the gate's decision (components/gate.py) that serves this run's winner


class NotServable(RuntimeError):
    """A run-local summary names nothing to serve; the message says why and what to run."""


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


@dataclass(frozen=True)
class ServingChoice:
    """What `make serve` serves for a run-local summary, and why."""
    model_dir: str          # a served artifact (its card's ``serving`` entry names backend and file)
    backend: str
    run: str                # the run that trained and measured it
    file: str               # the file the backend runs (the measured .onnx, or the weights)
    sha256: str             # that file's, verified against the card
    why: str

    def describe(self) -> str:
        return (f"serving run {self.run}: backend {self.backend}, {self.file} sha256 {self.sha256} "
                f"({self.model_dir}); {self.why}")


def serving_choice(summary_path: str | Path) -> ServingChoice:
    """What the gate of the run-local ``summary_path`` decided to serve: on promote, the run's
    served artifact (select's ``served``: for an ONNX Runtime winner, the very file its evaluation
    measured) with its winning backend; on keep, the champion it kept, from the champion dir (a
    copy of that run's served artifact). NotServable when there is no such thing, including a
    missing summary and an artifact that fails its checks (the one error its callers catch)."""
    try:
        return _serving_choice(summary_path)
    except (FileNotFoundError, ModelArtifactError) as e:
        raise NotServable(str(e)) from e


def _serving_choice(summary_path: str | Path) -> ServingChoice:
    summary = read_summary(summary_path)
    if "served" not in summary or "gate" not in summary:
        raise NotServable(f"{summary_path} records no served artifact or no gate decision (a run from an "
                          "older version): run `make local` again")
    gate = summary["gate"]
    if gate["decision"] == PROMOTE:
        directory, run = Path(summary["served"]["path"]), Path(summary["run"]["artifacts"]).name
        why = f"the gate promoted this run's winner: {gate['reason']}"
    else:
        directory, run = kept_champion(summary, summary_path)
        why = f"the gate kept the champion: {gate['reason']}"
    serving = verified_card(directory).get(SERVING)
    if serving is None and gate["decision"] != PROMOTE:
        raise NotServable(f"the champion {directory} is a model artifact from before champions kept their served "
                          "artifact: its backend is not on record; make this run's model the champion with "
                          "`make local FORCE_DEPLOY=1`, or serve it with --model_dir and --backend")
    if serving is None:
        raise NotServable(f"{directory} is a model artifact, not a served one: it names no backend")
    return ServingChoice(str(directory), serving["backend"], run, serving["file"], serving["sha256"], why)


def kept_champion(summary: dict, summary_path: str | Path) -> tuple[Path, str]:
    """(served artifact, run) of the champion the gate of ``summary`` kept, as the champion dir holds it."""
    kept, directory = summary["gate"]["champion"], Path(summary["run"]["champion_dir"])
    if kept is None:
        raise NotServable(f"the gate of {summary_path} kept the champion in {directory} without being able to "
                          f"read it ({summary['gate']['problem']}): nothing to serve; fix it, or make this run's "
                          "model the champion with `make local FORCE_DEPLOY=1`")
    path = directory / CHAMPION_RECORD
    try:
        record = json.loads(path.read_text())
        model_dir = directory / record["model_dir"]
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise NotServable(f"{path}: cannot read the champion the gate kept ({type(e).__name__}: {e})") from None
    if record.get("weights_sha256") != kept["weights_sha256"]:
        raise NotServable(f"{path} now names weights {record.get('weights_sha256')}, not the champion the gate of "
                          f"{summary_path} kept ({kept['weights_sha256']}): another run changed the champion since; "
                          "run `make local` again")
    return model_dir, record.get("run_id") or "?"


def serving_target(summary_path: str | Path) -> tuple[str, str]:
    """(served artifact directory, backend) that `make serve`, `make bench-serve` and
    ``python -m components.serve check`` serve for a run-local summary.json (:func:`serving_choice`)."""
    choice = serving_choice(summary_path)
    return choice.model_dir, choice.backend
