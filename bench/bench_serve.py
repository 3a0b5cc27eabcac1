"""Serving benchmark: the KServe predictor vs two Flask baselines, same model, same request.

    python -m bench.bench_serve [--summary runs/latest/summary.json | --model-dir DIR --backend NAME]
    (DIR: a served artifact, i.e. summary.json's served.path, or a model artifact for a torch backend)
                                [--image file.ppm] [--duration 10] [--concurrency 1,8] [--workers N]

Servers, all on 127.0.0.1 (all run; only the one being measured gets requests):
- ``kserve``:   ``python -m components.serving`` (kserve.ModelServer, N worker processes);
- ``noop``:     KServe's ceiling: a ``kserve.Model`` that answers a constant, on the same server
                settings (workers, sockets, request guard, routes, logging, /metrics);
- ``flask``:    a Flask app written and run the way the common ONNX+Flask tutorial ships it
                (model loaded at import, ``app.run(threaded=True)`` development server);
- ``gunicorn``: the same Flask app under gunicorn with N sync worker processes.
The request is the V1 body ``{"instances": [{"image": {"b64": ...}}]}`` with one image. The KServe
server is also measured with the same image as the client's normalized FP32 tensor in a V2 request,
once as binary tensor (``kserve-v2bin``: 12 KB raw float32 after a JSON header) and once as JSON
(``kserve-v2json``: 3,072 numbers as text). For each
server and concurrency level, closed-loop clients (one asyncio process, keep-alive where the server
allows it) send requests for a fixed total duration, split into interleaved rounds so that
background load weighs on all three alike. Reported: req/s, p50, p99 and the server's CPU time
per request; the last line is the req/s ratios at the highest concurrency (kserve_vs_noop: the
share of KServe's own ceiling our predictor reaches).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import orjson

from components.measure import percentile
from components.serving.client import MODEL_NAME, free_port, predictor_command, stop

ROOT = Path(__file__).resolve().parent.parent
SERVERS = ("kserve", "noop", "flask", "gunicorn")
V2_VARIANTS = ("kserve-v2bin", "kserve-v2json")     # the kserve server, other requests
KSERVE_PATH = f"/v1/models/{MODEL_NAME}:predict"
KSERVE_V2_PATH = f"/v2/models/{MODEL_NAME}/infer"
FLASK_PATH = "/predict"
STARTUP_SECONDS = 120


# --------------------------------------------------------------------------- the baseline app
def flask_app():
    """The tutorial's Flask app, serving the same artifact + backend with the same transforms.
    Configured by BENCH_MODEL_DIR, BENCH_BACKEND and BENCH_THREADS (threads per process,
    as for the KServe workers); gunicorn imports it as ``flask_app()``."""
    import io

    from flask import Flask, jsonify, request
    from PIL import Image

    from components.serving.model import prepare_served, top_classes
    from components.transforms import normalize, to_uint8_32

    run, card = prepare_served(os.environ["BENCH_MODEL_DIR"], os.environ["BENCH_BACKEND"],
                               threads=int(os.environ["BENCH_THREADS"]))
    norm, names = card["normalization"], card["class_names"]
    app = Flask(__name__)

    @app.route(FLASK_PATH, methods=["POST"])
    def predict():
        instance = request.get_json()["instances"][0]
        image = Image.open(io.BytesIO(base64.b64decode(instance["image"]["b64"])))
        x = normalize(to_uint8_32(image)[None], norm["mean"], norm["std"])
        ids, probabilities = top_classes(run(x), 1)
        class_id = int(ids[0, 0])
        return jsonify({"predictions": [{"class_id": class_id, "class_name": names[class_id],
                                         "probability": float(probabilities[0, 0])}]})

    return app


# --------------------------------------------------------------------------- load generator
class HTTPClientError(RuntimeError):
    pass


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bool, bytes]:
    """(status, keep-alive, body) of one HTTP/1.x response."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    version, status = lines[0].split(" ", 2)[:2]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version == "HTTP/1.1" or connection == "keep-alive")
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        chunks = []
        while size := int((await reader.readuntil(b"\r\n")).strip(), 16):
            chunks.append(await reader.readexactly(size))
            await reader.readexactly(2)
        await reader.readuntil(b"\r\n")
        body = b"".join(chunks)
    else:
        body, keep_alive = await reader.read(), False
    return int(status), keep_alive, body


async def _client(port: int, request: bytes, deadline: float, latencies: list[float], failures: list[str]):
    reader = writer = None
    try:
        while time.perf_counter() < deadline:
            start = time.perf_counter()          # a reconnect is part of that request's latency
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(request)
            status, keep_alive, body = await _read_response(reader)
            latencies.append(time.perf_counter() - start)
            if status != 200:
                failures.append(f"HTTP {status}: {body[:200]!r}")
            if not keep_alive:
                writer.close()
                await writer.wait_closed()
                writer = None
    finally:
        if writer is not None:
            writer.close()


def http_request(path: str, body: bytes, binary_header_length: int | None = None) -> bytes:
    """The whole HTTP request; a JSON body, or with ``binary_header_length`` a V2 binary tensor body."""
    kind = ("Content-Type: application/json\r\n" if binary_header_length is None
            else f"Inference-Header-Content-Length: {binary_header_length}\r\n")
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{kind}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def client_tensor(image: bytes, model_dir: str):
    """The image as the normalized float32 1x3x32x32 array a client computes (numpy)."""
    import io

    from PIL import Image

    from components.model import CARD_FILE, normalize, to_uint8_32

    norm = json.loads((Path(model_dir) / CARD_FILE).read_text())["normalization"]
    return normalize(to_uint8_32(Image.open(io.BytesIO(image))).unsqueeze(0), norm["mean"], norm["std"]).numpy()


def v2_fp32_requests(image: bytes, model_dir: str) -> dict[str, bytes]:
    """The image as the normalized 1x3x32x32 FP32 tensor a client computes: V2 binary and V2 JSON."""
    x = client_tensor(image, model_dir)
    tensor = {"name": "input", "datatype": "FP32", "shape": list(x.shape)}
    header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}]})
    return {"kserve-v2bin": http_request(KSERVE_V2_PATH, header + x.tobytes(), len(header)),
            "kserve-v2json": http_request(KSERVE_V2_PATH, orjson.dumps({"inputs": [{**tensor,
                                                                                   "data": x.ravel().tolist()}]}))}


def measure(port: int, request: bytes, concurrency: int, duration: float) -> tuple[list[float], float]:
    """Closed loop: ``concurrency`` clients for ``duration`` seconds; (latencies in s, wall seconds)."""
    import uvloop

    latencies: list[float] = []
    failures: list[str] = []

    async def run():
        deadline = time.perf_counter() + duration
        await asyncio.gather(*(_client(port, request, deadline, latencies, failures) for _ in range(concurrency)))

    start = time.perf_counter()
    uvloop.run(run())
    wall = time.perf_counter() - start
    if failures:
        raise HTTPClientError(f"{len(failures)} of {len(latencies)} requests failed, first: {failures[0]}")
    if not latencies:
        raise HTTPClientError("no request completed")
    return latencies, wall


def summarize(latencies: list[float], wall: float, cpu_seconds: float) -> dict:
    ordered = sorted(latencies)
    return {"requests": len(ordered), "rps": len(ordered) / wall, "p50_ms": 1000 * percentile(ordered, 50),
            "p99_ms": 1000 * percentile(ordered, 99), "cpu_ms": 1000 * cpu_seconds / len(ordered)}


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (the server's workers, which
    the predictor forks from a forkserver child of its own)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:                      # exited meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
        ticks[int(stat.parent.name)] = int(fields[11]) + int(fields[12])
    tree, grown = {pid}, True
    while grown:
        children = {p for p, parent in parents.items() if parent in tree} - tree
        tree |= children
        grown = bool(children)
    return sum(ticks.get(p, 0) for p in tree) / tick


def post_once(port: int, request: bytes) -> dict:
    """One request on a fresh connection; the decoded JSON answer (raises on non-200)."""
    async def run():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(request)
            return await _read_response(reader)
        finally:
            writer.close()

    status, _, answer = asyncio.run(run())
    if status != 200:
        raise HTTPClientError(f"HTTP {status}: {answer[:300]!r}")
    return json.loads(answer)


# --------------------------------------------------------------------------- servers
def server_command(name: str, port: int, model_dir: str, backend: str, workers: int) -> list[str]:
    if name == "kserve":      # exactly what `make serve` and the InferenceService run
        return predictor_command(model_dir, backend, port, workers)
    if name == "noop":
        return [sys.executable, "-m", "bench.noop_server", f"--port={port}", f"--workers={workers}"]
    if name == "flask":
        return [sys.executable, "-m", "bench.bench_serve", "flask-dev-server", f"--port={port}"]
    if name == "gunicorn":
        return [sys.executable, "-m", "gunicorn", f"--workers={workers}", f"--bind=127.0.0.1:{port}",
                "bench.bench_serve:flask_app()"]
    raise ValueError(f"unknown server {name!r}; known: {', '.join(SERVERS)}")


@contextmanager
def running(name: str, port: int, model_dir: str, backend: str, workers: int, log_path: Path):
    """Start one server, wait until it answers a real request, yield, always stop it."""
    from components.runtime import cpu_count

    processes = 1 if name == "flask" else workers       # threads: the CPUs shared by the processes
    env = dict(os.environ, BENCH_MODEL_DIR=str(model_dir), BENCH_BACKEND=backend,
               BENCH_THREADS=str(max(1, cpu_count() // processes)),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    with open(log_path, "wb") as log:
        process = subprocess.Popen(server_command(name, port, model_dir, backend, workers), cwd=ROOT, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        stop(process)


def wait_ready(process: subprocess.Popen, port: int, request: bytes, log_path: Path) -> dict:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; log:\n{log_path.read_text()[-2000:]}")
        try:
            return post_once(port, request)
        except (OSError, HTTPClientError, asyncio.IncompleteReadError):
            time.sleep(0.5)
    raise TimeoutError(f"server did not answer within {STARTUP_SECONDS}s; log:\n{log_path.read_text()[-2000:]}")


def run_rounds(servers: dict, levels: list[int], duration: float, rounds: int) -> dict:
    """Measure every (server, concurrency) for ``duration`` seconds in total, in ``rounds`` interleaved
    slices, so background load that comes and goes during the run weighs on all three alike."""
    slices = {(name, c): ([], 0.0, 0.0) for name in servers for c in levels}
    for _ in range(rounds):
        for name, (process, port, request) in servers.items():
            for c in levels:
                cpu = tree_cpu_seconds(process.pid)
                latencies, wall = measure(port, request, c, duration / rounds)
                kept, walls, cpus = slices[name, c]
                slices[name, c] = (kept + latencies, walls + wall, cpus + tree_cpu_seconds(process.pid) - cpu)
    return {name: {c: summarize(*slices[name, c]) for c in levels} for name in servers}


def model_ms(model_dir: str, backend: str, threads: int, image: bytes, seconds: float = 3.0) -> float:
    """The served model alone on one image (batch 1, ``threads`` threads, as in a worker), in this
    process: median milliseconds over ``seconds``. What no server code can save."""
    from components.serving.model import prepare_served

    run, _ = prepare_served(model_dir, backend, threads=threads)
    x = client_tensor(image, model_dir)
    times, deadline = [], time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return 1e3 * percentile(times[len(times) // 10:], 50)       # the first tenth warms up


def noop_bound(results: dict, concurrency: int, model: float) -> float:
    """The kserve_vs_noop of a predictor that costs the no-op's server CPU plus the model and nothing
    else: noop CPU / (noop CPU + model), per request (a CPU-bound server's req/s is inversely
    proportional to its CPU per request)."""
    noop = results["noop"][concurrency]["cpu_ms"]
    return noop / (noop + model)


def ratio_line(results: dict, concurrency: int, model: float | None = None) -> str:
    def rps(name):
        return results[name][concurrency]["rps"]

    line = (f"kserve_vs_flask={rps('kserve') / rps('flask'):.2f}x "
            f"kserve_vs_gunicorn={rps('kserve') / rps('gunicorn'):.2f}x "
            f"kserve_vs_noop={rps('kserve') / rps('noop'):.2f}x")
    if model is not None:
        line += f" noop_bound={noop_bound(results, concurrency, model):.2f}x"
    if "kserve-v2bin" in results:
        line += f" v2bin_vs_v1={rps('kserve-v2bin') / rps('kserve'):.2f}x"
    return line


def report(results: dict, levels: list[int], model: float | None = None) -> list[str]:
    """The table (server CPU ms/request: its processes' CPU time per answered request), the model's
    own time, and the ratio line (noop_bound: the kserve_vs_noop the model alone allows)."""
    lines = [f"{'server':<14}{'conc':>5}{'requests':>10}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'cpu ms/req':>12}"]
    for name, result in results.items():
        for c in levels:
            r = result[c]
            lines.append(f"{name:<14}{c:>5}{r['requests']:>10}{r['rps']:>10.1f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                         f"{r['cpu_ms']:>12.2f}")
    if model is not None:
        c = max(levels)
        lines.append(f"at c={c} kserve spends {results['kserve'][c]['cpu_ms'] - results['noop'][c]['cpu_ms']:.3f} ms "
                     f"of server CPU per request more than the no-op; the model alone takes {model:.3f} ms per "
                     "image (batch 1, in-process)")
    lines.append(ratio_line(results, max(levels), model))
    return lines


def default_image() -> Path:
    sample = Path(os.environ.get("GTSRB_SAMPLE_DIR", ROOT.parent / "shared" / "gtsrb-sample"))
    return sample / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00000.ppm"


def main(argv=None) -> int:
    from components.runtime import cpu_count

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="bench", choices=["bench", "flask-dev-server"])
    parser.add_argument("--port", type=int, help="flask-dev-server: port on 127.0.0.1")
    parser.add_argument("--summary", type=Path, default=ROOT / "runs" / "latest" / "summary.json",
                        help="run-local summary naming the model and the winning backend")
    parser.add_argument("--model-dir", help="served artifact directory (instead of --summary)")
    parser.add_argument("--backend", help="backend (instead of the summary's winner)")
    parser.add_argument("--image", type=Path, default=default_image(), help="the image every request carries")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per server and concurrency")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved slices the duration is split into")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated concurrency levels")
    parser.add_argument("--workers", type=int, default=cpu_count(), help="KServe and gunicorn worker processes")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "runs" / "bench-serve", help="server logs")
    args = parser.parse_args(argv)

    if args.command == "flask-dev-server":     # how the tutorial runs it
        flask_app().run(host="127.0.0.1", port=args.port, threaded=True)
        return 0

    model_dir, backend = args.model_dir, args.backend
    if not (model_dir and backend):
        if not args.summary.is_file():
            parser.error(f"{args.summary} not found: run `make local` first or pass --model-dir and --backend")
        from components.local_run import NotServable, serving_choice

        try:
            choice = serving_choice(args.summary)        # what the run's gate decided to serve
        except NotServable as e:
            parser.error(str(e))
        print(f"bench-serve: {choice.describe()}", flush=True)
        summary_dir, winner = choice.model_dir, choice.backend
        model_dir, backend = model_dir or summary_dir, backend or winner
    levels = sorted({int(c) for c in args.concurrency.split(",")})
    body = orjson.dumps({"instances": [{"image": {"b64": base64.b64encode(args.image.read_bytes()).decode()}}]})
    args.log_dir.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    print(f"bench-serve: model {model_dir}, backend {backend}, image {args.image.name} ({args.image.stat().st_size} "
          f"bytes), {args.workers} workers, {args.duration:g}s per level, load average {load[0]:.2f} "
          f"{load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs", flush=True)
    threads = max(1, cpu_count() // args.workers)      # as each KServe worker runs it
    model = model_ms(model_dir, backend, threads, args.image.read_bytes())
    print(f"the model alone: {model:.3f} ms per image (batch 1, {threads} thread(s))", flush=True)
    with ExitStack() as stack:
        servers, answers = {}, {}
        for name in SERVERS:                 # all up (idle ones use no CPU), then measured in turns
            port, log_path = free_port(), args.log_dir / f"{name}.log"
            request = http_request(KSERVE_PATH if name in ("kserve", "noop") else FLASK_PATH, body)
            process = stack.enter_context(running(name, port, model_dir, backend, args.workers, log_path))
            answers[name] = wait_ready(process, port, request, log_path)["predictions"][0]
            print(f"{name}: answered {answers[name]}", flush=True)
            measure(port, request, max(levels), 1.0)        # warm every worker
            servers[name] = (process, port, request)
            if name == "kserve":
                for variant, v2_request in v2_fp32_requests(args.image.read_bytes(), model_dir).items():
                    outputs = {o["name"]: o["data"] for o in post_once(port, v2_request)["outputs"]}
                    answers[variant] = {"class_id": outputs["class_id"][0], "probability": outputs["probability"][0]}
                    print(f"{variant}: answered {answers[variant]}", flush=True)
                    servers[variant] = (process, port, v2_request)
        if len({a["class_id"] for name, a in answers.items() if name != "noop"}) != 1:
            raise SystemExit(f"servers disagree on the image's class: {answers}")
        results = run_rounds(servers, levels, args.duration, args.rounds)
    print("\n".join(report(results, levels, model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
