"""The GTSRB pipeline: ingest -> preprocess -> train -> evaluate (one task per backend) -> select.

    python pipeline.py compile   [--output pipeline.yaml]
    python pipeline.py run-local [--data-dir DIR] [--epochs N] [--backends a,b] [--output-dir DIR]

`run-local` runs the same graph on KFP's embedded local runner (no cluster), then writes
OUTPUT_DIR/summary.json and prints a table.
"""

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from kfp import compiler, dsl

from components.backends import BACKENDS
from components.evaluate import evaluate
from components.ingest import ingest
from components.model import DEFAULT_ARCH
from components.preprocess import preprocess
from components.selection import select
from components.train import train

ROOT = Path(__file__).resolve().parent
DEFAULT_BACKENDS = list(BACKENDS)
DEFAULT_EPOCHS = 15
# Latency is only comparable when backends do not race for the same cores: evaluate one
# backend at a time. Raise on a cluster whose nodes give each task its own cores.
EVAL_PARALLELISM = 1


@dsl.pipeline(name="gtsrb-backends", description="Train a GTSRB traffic-sign CNN, benchmark PyTorch "
              "CPU backends, select the fastest accurate one.")
def gtsrb_pipeline(data_dir: str = "data", allow_download: bool = True, arch: str = DEFAULT_ARCH,
                   epochs: int = DEFAULT_EPOCHS, seed: int = 0, backends: list = DEFAULT_BACKENDS,
                   accuracy_tolerance: float = 0.5, min_agreement: float = 99.0,
                   serving_batch: int = 1) -> dsl.Artifact:
    raw = ingest(data_dir=data_dir, allow_download=allow_download)
    data = preprocess(raw=raw.outputs["raw"])
    trained = train(data=data.outputs["data"], arch=arch, epochs=epochs, seed=seed)
    with dsl.ParallelFor(backends, parallelism=EVAL_PARALLELISM) as backend:
        evaluation = evaluate(model=trained.outputs["model"], data=data.outputs["data"], backend=backend)
    chosen = select(evaluations=dsl.Collected(evaluation.outputs["result"]), model=trained.outputs["model"],
                    accuracy_tolerance=accuracy_tolerance, min_agreement=min_agreement,
                    serving_batch=serving_batch)
    return chosen.outputs["summary"]


def compile_pipeline(output: str) -> str:
    compiler.Compiler().compile(gtsrb_pipeline, package_path=output)
    return output


def run_local(data_dir: str, epochs: int, backends: list[str], output_dir: str, arch: str = DEFAULT_ARCH,
              seed: int = 0, allow_download: bool = True) -> dict:
    """Run the pipeline on kfp.local's SubprocessRunner; returns (and writes) summary.json."""
    from kfp import local

    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; known: {', '.join(BACKENDS)}")
    out = Path(output_dir).resolve()
    artifacts = out / "artifacts"
    artifacts.mkdir(parents=True, exist_ok=True)
    # Task subprocesses import `components` from this checkout (the images bake it in instead).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # Tasks run this checkout's code in this environment, not their images: expected here.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(artifacts),
               raise_on_error=True)
    start = time.perf_counter()
    run = gtsrb_pipeline(data_dir=str(Path(data_dir).expanduser().resolve()), allow_download=allow_download,
                   arch=arch, epochs=epochs, seed=seed, backends=backends)
    wall = time.perf_counter() - start
    summary_path = Path(run.output.path)
    summary = json.loads(summary_path.read_text())
    summary["run"] = {"artifacts": str(summary_path.parent.parent), "wall_seconds": round(wall, 1), "epochs": epochs,
                      "arch": arch, "data_dir": str(data_dir)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    print(f"summary: {out / 'summary.json'}")
    return summary


def print_table(summary: dict) -> None:
    print(f"\n{'backend':<16}{'accuracy %':>11}{'agree %':>9}{'b1 ms':>9}{'b64 ms':>9}  verdict")
    for name, r in summary["backends"].items():
        if r["status"] != "ok":
            print(f"{name:<16}{'-':>11}{'-':>9}{'-':>9}{'-':>9}  {r['verdict']}")
            continue
        print(f"{name:<16}{r['accuracy']:>11.2f}{r['agreement']:>9.2f}"
              f"{r['latency']['batch1']['median_ms']:>9.3f}{r['latency']['batch64']['median_ms']:>9.3f}  {r['verdict']}")
    print(f"\nwinner: {summary['winner']}  model: {summary['model']['path']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="write the KFP IR YAML")
    c.add_argument("--output", default="pipeline.yaml")
    r = sub.add_parser("run-local", help="run on KFP's embedded local runner (no cluster)")
    r.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "data"),
                   help="torchvision GTSRB root (contains gtsrb/GTSRB/...); downloaded there if absent")
    r.add_argument("--no-download", action="store_true", help="fail instead of downloading a missing dataset")
    r.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    r.add_argument("--arch", default=DEFAULT_ARCH)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated backend names")
    r.add_argument("--output-dir", default="runs/latest")
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(compile_pipeline(args.output))
        return 0
    out = Path(args.output_dir)
    if out.exists() and (out / "summary.json").exists():
        shutil.rmtree(out / "artifacts", ignore_errors=True)
    run_local(args.data_dir, args.epochs, [b for b in args.backends.split(",") if b], args.output_dir,
              arch=args.arch, seed=args.seed, allow_download=not args.no_download)
    return 0


if __name__ == "__main__":
    sys.exit(main())
