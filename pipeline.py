"""The GTSRB pipeline: ingest -> preprocess -> train -> evaluate (one task per backend) -> select
-> gate (is the winner at least as accurate as the served champion?) -> on promote, serve the
winner (local smoke test, or deploy as a KServe InferenceService on a cluster).

    python pipeline.py compile   [--output pipeline.yaml]
    python pipeline.py run-local [--data-dir DIR] [--epochs N] [--backends a,b] [--output-dir DIR] [--verbose]
                                 [--champion-dir runs/champion] [--max-regression P] [--force-deploy]
    python pipeline.py submit    --host URL ...      (a KFP cluster; used by `make pipeline`)

`run-local` runs the same graph on KFP's embedded local runner (no cluster): one line per task,
then the results table, the winner and the gate's decision; OUTPUT_DIR/summary.json,
OUTPUT_DIR/pipeline.log (every task's full output; `--verbose` streams it too). On promote the
winner becomes the champion in --champion-dir.
"""

import argparse
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

from kfp import compiler, dsl, kubernetes

from components import cluster, local_run
from components.artifact import read_card
from components.backends import BACKENDS, unknown_backends
from components.deploy import deploy
from components.evaluate import evaluate
from components.gate import PROMOTE, gate, identity, install_local_champion, summary_line
from components.images import image
from components.ingest import ingest, layout_problem
from components.measure import SHORT_SPIN
from components.model import DEFAULT_ARCH
from components.preprocess import preprocess
from components.selection import RUN_COLUMNS, median_ms, results_table, select
from components.serve import serve
from components.train import MAX_PLANNED_EPOCHS, TrainConfig, train

ROOT = Path(__file__).resolve().parent
DEFAULT_BACKENDS = list(BACKENDS)
DEFAULT_EPOCHS = TrainConfig.epochs    # 0: the recipe's length in images seen (components/train.py)
# Latency is only comparable when backends do not race for the same cores: evaluate one
# backend at a time. Raise on a cluster whose nodes give each task its own cores.
EVAL_PARALLELISM = 1
# Cluster resources of the heavy tasks (train; evaluate, which also runs torch.compile and ONNX
# Runtime): no CPU limit, since CFS throttling would distort the latencies evaluate measures.
# kfp.local ignores them. The memory sizes follow evaluate's measured peak (docs/measurements.md).
TASK_CPU, TASK_MEMORY, TASK_MEMORY_LIMIT = "1", "2Gi", "6Gi"


def heavy(task):
    return task.set_cpu_request(TASK_CPU).set_memory_request(TASK_MEMORY).set_memory_limit(TASK_MEMORY_LIMIT)


def short_spin(task):
    """evaluate's OpenMP workers spin as briefly as bench's (components/measure.py: SHORT_SPIN),
    so eager's batch-64 time is the same figure in both. Set in the task's environment, as libgomp
    reads it when the component's module imports torch. Not the thread binding: bound that early,
    the initial thread would confine ONNX Runtime's pool to one core."""
    for name, value in SHORT_SPIN.items():
        task.set_env_variable(name, value)
    return task


# deploy_target="kserve": how long the deploy step waits for the InferenceService to be Ready,
# and the task's own deadline beyond that (storage check, apply, smoke test).
DEPLOY_READY_SECONDS = 900
DEPLOY_TASK_EXTRA_SECONDS = 300
# The deploy task itself only talks to the API server and smoke-tests once (loading the model in-process).
DEPLOY_CPU, DEPLOY_CPU_LIMIT, DEPLOY_MEMORY, DEPLOY_MEMORY_LIMIT = "500m", "2", "1Gi", "2Gi"


def with_s3_secret(task):
    """The object store's credentials from the S3 secret, as KServe's storage-initializer gets them."""
    return kubernetes.use_secret_as_env(task, secret_name=cluster.S3_SECRET,
                                        secret_key_to_env={"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
                                                           "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"})


DEFAULT_CHAMPION_DIR = "runs/champion"    # run-local's champion (the cluster's is the live InferenceService)
# run-local downloads GTSRB only into this folder (relative to the working directory, `make`'s: the
# checkout); any other --data-dir must already hold it in torchvision's layout.
DEFAULT_DATA_DIR = "data"


@dsl.pipeline(name="gtsrb-backends", description="Train a GTSRB traffic-sign CNN, benchmark PyTorch "
              "CPU backends, select the fastest accurate one.")
def gtsrb_pipeline(data_dir: str = DEFAULT_DATA_DIR, allow_download: bool = True, arch: str = DEFAULT_ARCH,
                   epochs: int = DEFAULT_EPOCHS, seed: int = 0, backends: list = DEFAULT_BACKENDS,
                   accuracy_tolerance: float = 0.5, min_agreement: float = 99.0,
                   serving_batch: int = 1, deploy_target: str = "local", max_regression: float = 0.0,
                   force_deploy: bool = False, champion_dir: str = DEFAULT_CHAMPION_DIR) -> dsl.Artifact:
    """deploy_target "local": serve the winner with the KServe predictor inside the last task and
    smoke-test it; "kserve": deploy it as the cluster's InferenceService (components/deploy.py).
    Either only when the gate promotes it (components/gate.py): its champion is the record in
    champion_dir ("local") or on the live InferenceService ("kserve")."""
    raw = ingest(data_dir=data_dir, allow_download=allow_download)
    data = preprocess(raw=raw.outputs["raw"])
    trained = train(data=data.outputs["data"], arch=arch, epochs=epochs, seed=seed)
    heavy(trained)
    with dsl.ParallelFor(backends, parallelism=EVAL_PARALLELISM) as backend:
        evaluation = evaluate(model=trained.outputs["model"], data=data.outputs["data"], backend=backend)
        short_spin(heavy(evaluation))
    chosen = select(evaluations=dsl.Collected(evaluation.outputs["result"]),
                    candidates=dsl.Collected(evaluation.outputs["served"]), model=trained.outputs["model"],
                    accuracy_tolerance=accuracy_tolerance, min_agreement=min_agreement,
                    serving_batch=serving_batch)
    winner = chosen.outputs["Output"]          # select's return value: the winning backend's name
    served = chosen.outputs["served"]          # what the winner's evaluation measured (ONNX: that file)
    gated = gate(selection=chosen.outputs["summary"], model=served, data=data.outputs["data"],
                 deploy_target=deploy_target, champion_dir=champion_dir, namespace=cluster.NAMESPACE,
                 name=cluster.INFERENCE_SERVICE, max_regression=max_regression, force_deploy=force_deploy,
                 run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
    gated.set_caching_options(False)           # the champion it reads changes between runs
    with_s3_secret(gated)                      # "kserve": downloads the champion's served artifact
    # The decision is the gate's single return value: kfp.local 2.17 resolves a condition on a task's
    # "Output" but takes a named output (`gate-decision`) for a pipeline input and skips the branch.
    with dsl.If(gated.outputs["Output"] == PROMOTE):
        with dsl.If(deploy_target == "local"):
            serve(model=served, backend=winner)
        with dsl.Else():                        # "kserve"; the step rejects any other value
            deployed = deploy(model=served, verdict=gated.outputs["summary"], backend=winner,
                              deploy_target=deploy_target, serving_image=image("serve"),
                              onnx_serving_image=image("serve-onnx"),
                              namespace=cluster.NAMESPACE, name=cluster.INFERENCE_SERVICE,
                              timeout_seconds=DEPLOY_READY_SECONDS, run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            deployed.set_caching_options(False)    # a deployment is a side effect, never a cache hit
            deployed.set_cpu_request(DEPLOY_CPU).set_cpu_limit(DEPLOY_CPU_LIMIT)
            deployed.set_memory_request(DEPLOY_MEMORY).set_memory_limit(DEPLOY_MEMORY_LIMIT)
            with_s3_secret(deployed)
            kubernetes.set_timeout(deployed, DEPLOY_READY_SECONDS + DEPLOY_TASK_EXTRA_SECONDS)
    return gated.outputs["summary"]


def compile_pipeline(output: str) -> str:
    compiler.Compiler().compile(gtsrb_pipeline, package_path=output)
    return output


class RunLocalFailed(RuntimeError):
    pass


def _count(artifact, *keys) -> str:
    """A count from an artifact's metadata (KFP hands numbers back as floats)."""
    return f"{int(sum(artifact.metadata[k] for k in keys)):,}"


# One key figure per task for run-local's progress lines: task name -> f(outputs, arguments).
KEY_FIGURES = {
    "ingest": lambda o, a: f"{_count(o['raw'], 'train_images')} train + {_count(o['raw'], 'test_images')} "
                           "test images verified",
    "preprocess": lambda o, a: f"{_count(o['data'], 'train_images', 'test_images')} images decoded to 32x32",
    "train": lambda o, a: training_figure(read_card(o["model"].path)["training"]),
    "evaluate": lambda o, a: evaluation_figure(json.loads(Path(o["result"].path).read_text())),
    "select": lambda o, a: f"winner {o['Output']}",
    "gate": lambda o, a: o["Output"],
    "serve": lambda o, a: "answers like the artifact (max probability gap "
                          f"{json.loads(Path(o['result'].path).read_text())['max_probability_gap']:.1e})",
}
FIXED_TASKS = ("ingest", "preprocess", "train", "select", "gate", "serve")   # + one evaluate per backend


def training_figure(training: dict) -> str:
    """The train task's key figure, from the model card: epochs trained (why fewer than planned), accuracy."""
    n = training["epochs_run"]
    epochs = f"{n} epoch{'s' * (n != 1)}"
    if training["stopped_by_time_budget"]:
        epochs += ", stopped by the time budget"
    if training["val_accuracy"] is not None:
        return f"{epochs}, best val accuracy {training['val_accuracy']:.2f} %"
    return f"{epochs}, no validation split, final train accuracy {training['history'][-1]['train_accuracy']:.2f} % " \
           "(augmented)"


def evaluation_figure(result: dict) -> str:
    """An evaluate task's key figure, from its result JSON: the same unrounded numbers the results
    table formats (the task's Metrics are rounded to 4 decimals: 75.76499 % would show as 75.77)."""
    if result["status"] != "ok":
        return "skipped (the table below says why)"
    return f"b1 median {median_ms(result, 1):.3f} ms, accuracy {result['accuracy']:.2f} %"


def run_local(data_dir: str, epochs: int, backends: list[str], output_dir: str, arch: str = DEFAULT_ARCH,
              seed: int = 0, allow_download: bool = True, verbose: bool = False,
              champion_dir: str = DEFAULT_CHAMPION_DIR, max_regression: float = 0.0,
              force_deploy: bool = False) -> dict:
    """Run the pipeline on kfp.local's SubprocessRunner, one line per task on the terminal and the
    full log in OUTPUT_DIR/pipeline.log (``verbose``: streamed too); returns (and writes)
    summary.json. A failed task raises RunLocalFailed with its last lines and the log's path.
    When the gate promotes the winner (and its smoke test passed), it becomes the champion in
    ``champion_dir``. Without ``allow_download`` (the CLI allows it only for the default data/), a
    ``data_dir`` that does not hold GTSRB stops the run before anything starts, naming what it holds."""
    from kfp import local

    from components.run_console import NAME_WIDTH, RunConsole, plain

    if unknown := unknown_backends(backends):
        raise SystemExit(unknown)
    if not allow_download and (problem := layout_problem(Path(data_dir).expanduser().resolve())):
        raise SystemExit(f"run-local: {problem}")
    out = Path(output_dir).resolve()
    if (out / local_run.SUMMARY_FILE).exists():         # the previous run's artifacts make way
        shutil.rmtree(out / local_run.ARTIFACTS_DIR, ignore_errors=True)
    artifacts = out / local_run.ARTIFACTS_DIR
    artifacts.mkdir(parents=True, exist_ok=True)
    # Task subprocesses import `components` from this checkout (the images bake it in instead).
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    # Unbuffered, so a task's error (stderr) lands in the log after what it printed before (stdout).
    os.environ["PYTHONUNBUFFERED"] = "1"
    # Tasks run this checkout's code in this environment, not their images: expected here.
    warnings.filterwarnings("ignore", message="You may be attemping to run a task that uses custom",
                            category=RuntimeWarning)
    # CPU/memory requests are for the cluster (TASK_CPU, ...); the local runner ignores them, as expected.
    warnings.filterwarnings("ignore", message=r"Task '\w+': settings \[.*\] have no effect in the current local runner",
                            category=UserWarning)
    labels = [*FIXED_TASKS, *(f"evaluate {b}" for b in backends)]
    console = RunConsole(out / local_run.LOG_FILE, len(labels), KEY_FIGURES, verbose,
                         name_width=max(NAME_WIDTH, *map(len, labels)))
    length = f"{epochs} epochs" if epochs else f"epochs from the recipe (at most {MAX_PLANNED_EPOCHS})"
    console.line(f"run-local: {arch}, {length}, {len(backends)} backends, data {data_dir}; "
                 f"full log {console.log_path}")
    champion = Path(champion_dir).expanduser().resolve()
    start = time.perf_counter()
    try:
        with console.capture():
            local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(artifacts),
                       raise_on_error=True)
            run = gtsrb_pipeline(data_dir=str(Path(data_dir).expanduser().resolve()), allow_download=allow_download,
                                 arch=arch, epochs=epochs, seed=seed, backends=backends, deploy_target="local",
                                 max_regression=max_regression, force_deploy=force_deploy,
                                 champion_dir=str(champion))
    except RuntimeError as e:                  # kfp.local: a task failed
        raise RunLocalFailed(f"{plain(str(e))}\n{console.failure_report()}") from None
    wall = time.perf_counter() - start
    summary = json.loads(Path(run.output.path).read_text())
    folder = local_run.run_folder(run.output.path)
    trained = read_card(summary["model"]["path"])["training"]
    summary["run"] = {"artifacts": str(folder), "wall_seconds": round(wall, 1), "epochs": trained["epochs_run"],
                      "epochs_requested": epochs, "arch": arch, "data_dir": str(data_dir), "log": str(console.log_path),
                      "champion_dir": str(champion)}
    promoted = summary["gate"]["decision"] == PROMOTE
    if promoted:
        summary["serving"] = json.loads(local_run.run_output(summary, "serve", "result").read_text())
        challenger = summary["gate"]["challenger"]
        record = install_local_champion(champion, summary["served"]["path"], local_champion_record(challenger, folder))
        summary["run"]["champion_record"] = str(record)
    else:
        console.skipped("serve", "the gate kept the champion: nothing new to serve")
    (out / local_run.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    if promoted:
        serving = summary["serving"]
        print(f"served: KServe predictor with {serving['backend']} answered like the artifact "
              f"({', '.join(serving['checks'])}; max probability gap {serving['max_probability_gap']:.1e})")
    print(summary_line(summary["gate"]))
    print(f"champion: {champion}" + (" (now this run's model)" if promoted else " (unchanged)"))
    print(f"summary: {out / local_run.SUMMARY_FILE} ({wall:.0f} s); full log: {console.log_path}")
    return summary


def local_champion_record(challenger: dict, run_folder: Path) -> dict:
    """run-local's champion record of a promoted challenger: the run is named by its folder."""
    return identity(challenger["weights_sha256"], challenger["model_uri"], challenger["accuracy"],
                    challenger["test_fingerprint"], run_folder.name)


def print_table(summary: dict) -> None:
    print(f"\n{results_table(summary, RUN_COLUMNS)}\n\nwinner: {summary['winner']}  model: {summary['model']['path']}")


# KFP's parameter types -> the JSON values `submit --arg` accepts for them (bool is not a number here).
PARAMETER_TYPES = {"String": (str,), "Boolean": (bool,), "Integer": (int,), "Float": (int, float), "List": (list,)}
DEPLOY_TARGETS = ("local", "kserve")


def check_parameters(params: dict) -> None:
    """ValueError (one line) for a parameter the pipeline does not have, a value of another type, an
    unknown backend or deploy target: caught before anything is compiled or submitted."""
    inputs = gtsrb_pipeline.component_spec.inputs
    for name, value in params.items():
        if name not in inputs:
            raise ValueError(f"unknown pipeline parameter {name!r}; known: {', '.join(inputs)}")
        kind = inputs[name].type
        if not isinstance(value, PARAMETER_TYPES[kind]) or (isinstance(value, bool) and kind != "Boolean"):
            hint = ""
            if kind == "List":          # the shell (or make) ate the quotes of ["a","b"]
                hint = f" (quote it for the shell: --arg '{name}=[\"a\",\"b\"]'" + \
                       (", or --backends a,b; make pipeline BACKENDS=a,b)" if name == "backends" else ")")
            raise ValueError(f"{name}={json.dumps(value)}: expected a JSON {kind.lower()}{hint}")
    backends = params.get("backends", DEFAULT_BACKENDS)
    if (unknown := unknown_backends(backends)) or not backends:
        raise ValueError(unknown or "backends is empty")
    if params.get("deploy_target", "local") not in DEPLOY_TARGETS:
        raise ValueError(f"deploy_target={params['deploy_target']!r}: expected one of {', '.join(DEPLOY_TARGETS)}")


def submit(args, params: dict) -> int:
    """Compile, upload (a new version when the pipeline exists), run, wait; 0 only if the run succeeded."""
    import kfp

    from components import mlmd
    from components.storage import client_from_env, parse_uri

    package = compile_pipeline(args.package)
    name = gtsrb_pipeline.name
    deadline = time.monotonic() + 180
    while True:  # the port-forward, or KFP's API server itself, may still be starting
        try:
            client = kfp.Client(host=args.host, ui_host=args.ui_host)  # calls the API's healthz
            break
        except Exception as e:  # connection refused, 503, ...: retried until the deadline
            if time.monotonic() > deadline:
                raise SystemExit(f"submit: KFP API at {args.host} is not reachable: {e}") from e
            time.sleep(3)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    pipeline_id = client.get_pipeline_id(name)
    if pipeline_id is None:  # first upload: the pipeline and its first version
        pipeline_id = client.upload_pipeline(package, pipeline_name=name).pipeline_id
        version_id = client.list_pipeline_versions(pipeline_id).pipeline_versions[0].pipeline_version_id
    else:
        version_id = client.upload_pipeline_version(package, f"{name} {stamp}",
                                                    pipeline_id=pipeline_id).pipeline_version_id
    experiment_id = client.create_experiment(args.experiment).experiment_id
    run_id = client.run_pipeline(experiment_id, f"{name} {stamp}", params=params, pipeline_id=pipeline_id,
                                 version_id=version_id).run_id
    url = f"{args.ui_host.rstrip('/')}/#/runs/details/{run_id}"
    print(f"run: {url}", flush=True)
    try:
        run = client.wait_for_run_completion(run_id, timeout=args.timeout, sleep_duration=15)
    except TimeoutError:
        print(f"final state: still running after {args.timeout} s ({url})", file=sys.stderr)
        return 1
    print(f"final state: {run.state}  ({url})")
    if run.state != "SUCCEEDED":
        for task in (run.run_details.task_details if run.run_details else None) or []:
            if task.state == "FAILED":
                print(f"  task {task.display_name} failed: {task.error.message if task.error else '?'} "
                      f"(pod {task.pod_name})", file=sys.stderr)
        return 1
    if args.summary_out:
        # The gate task's `summary` artifact (select's + `gate`), wherever this run's MLMD records say
        # it is: a cached task points at the run that computed it, not at a path under this run's id
        # (components/mlmd.py).
        try:
            uri = mlmd.run_output_uri(args.mlmd_endpoint, run_id, task="gate", output="summary")
        except mlmd.OutputNotFound as e:
            print(f"submit: cannot find the run's summary: {e}", file=sys.stderr)
            return 1
        bucket, key = parse_uri(uri)
        summary = json.loads(client_from_env(args.s3_endpoint).get_object(bucket, key).read())
        summary["run"] = {"id": run_id, "url": url, "arguments": params, "summary_uri": uri}
        Path(args.summary_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary_out).write_text(json.dumps(summary, indent=2) + "\n")
        print_table(summary)
        print(summary_line(summary["gate"]))
        print(f"summary: {args.summary_out}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compile", help="write the KFP IR YAML")
    c.add_argument("--output", default="pipeline.yaml")
    r = sub.add_parser("run-local", help="run on KFP's embedded local runner (no cluster)")
    r.add_argument("--data-dir", default=os.environ.get("DATA_DIR", DEFAULT_DATA_DIR),
                   help=f"torchvision GTSRB root (contains gtsrb/GTSRB/Training); only the default "
                        f"{DEFAULT_DATA_DIR}/ is downloaded into when it does not hold it yet")
    r.add_argument("--no-download", action="store_true", help=f"never download, not even into {DEFAULT_DATA_DIR}/")
    r.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help="0 (default): the recipe's length, ~300k images seen (14 epochs of gtsrb-dev, 8 of full "
                        f"GTSRB, at most {MAX_PLANNED_EPOCHS}: the sample's 1.7k images train {MAX_PLANNED_EPOCHS})")
    r.add_argument("--arch", default=DEFAULT_ARCH)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--backends", default=",".join(DEFAULT_BACKENDS), help="comma-separated backend names")
    r.add_argument("--output-dir", default="runs/latest")
    r.add_argument("--verbose", action="store_true",
                   help="stream every task's full log (it is always in OUTPUT_DIR/pipeline.log)")
    r.add_argument("--champion-dir", default=DEFAULT_CHAMPION_DIR,
                   help="the served champion's model + record; replaced only when the gate promotes")
    r.add_argument("--max-regression", type=float, default=0.0,
                   help="points of test accuracy the winner may lose against the champion and still be promoted")
    r.add_argument("--force-deploy", action="store_true", help="promote the winner whatever the gate says")
    s = sub.add_parser("submit", help="compile, upload and run on a KFP cluster, wait; non-zero unless it succeeds")
    s.add_argument("--host", default=os.environ.get("KF_PIPELINES_ENDPOINT", "http://127.0.0.1:8888"),
                   help="KFP API (`make pipeline` port-forwards svc/ml-pipeline there)")
    s.add_argument("--ui-host", default=os.environ.get("KF_PIPELINES_UI_ENDPOINT", "http://localhost:8080"),
                   help="KFP UI, for the printed run URL (`make ui` port-forwards it there)")
    s.add_argument("--experiment", default="gtsrb")
    s.add_argument("--arg", action="append", default=[], metavar="NAME=VALUE",
                   help="pipeline argument, repeatable; VALUE is read as JSON when it parses (epochs=3, "
                        "'backends=[\"eager\"]'); checked against the pipeline's parameters before submitting")
    s.add_argument("--backends", help="comma-separated backend names (the same as --arg backends=[...])")
    s.add_argument("--timeout", type=int, default=5400, help="seconds to wait for the run to finish")
    s.add_argument("--package", default="pipeline.yaml", help="where to write the compiled IR")
    s.add_argument("--summary-out", help="copy the run's summary.json here from KFP's object store "
                   "(needs --mlmd-endpoint, --s3-endpoint and AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
    s.add_argument("--s3-endpoint", default=os.environ.get("S3_ENDPOINT", "127.0.0.1:9000"),
                   help="host:port of KFP's object store, SeaweedFS's S3 API (`make pipeline` port-forwards "
                   "svc/minio-service there)")
    s.add_argument("--mlmd-endpoint", default=os.environ.get("MLMD_ENDPOINT", "127.0.0.1:8089"),
                   help="host:port of KFP's ML Metadata gRPC API, where the summary's URI is found "
                   "(`make pipeline` port-forwards svc/metadata-grpc-service there)")
    args = parser.parse_args(argv)
    if args.command == "compile":
        print(compile_pipeline(args.output))
        return 0
    if args.command == "submit":
        params = {}
        for item in args.arg:
            key, sep, value = item.partition("=")
            if not sep:
                parser.error(f"--arg {item!r}: expected NAME=VALUE")
            try:
                params[key] = json.loads(value)
            except json.JSONDecodeError:
                params[key] = value
        if args.backends is not None:
            if "backends" in params:
                raise SystemExit("submit: give the backends once: --backends or --arg backends=..., not both")
            params["backends"] = [b for b in args.backends.split(",") if b]
        try:
            check_parameters(params)
        except ValueError as e:
            raise SystemExit(f"submit: {e}") from None
        return submit(args, params)
    try:
        default_data = Path(args.data_dir).resolve() == Path(DEFAULT_DATA_DIR).resolve()
        run_local(args.data_dir, args.epochs, [b for b in args.backends.split(",") if b], args.output_dir,
                  arch=args.arch, seed=args.seed, allow_download=default_data and not args.no_download,
                  verbose=args.verbose,
                  champion_dir=args.champion_dir, max_regression=args.max_regression,
                  force_deploy=args.force_deploy)
    except RunLocalFailed as e:
        print(f"run-local: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
