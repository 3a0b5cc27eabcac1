"""Serving footprint: how long the predictor takes to be ready, and how much memory it and its
workers use, read from /proc (Linux).

    python -m bench.serve_footprint [--summary runs/latest/summary.json | --model-dir DIR --backend NAME]
                                    [--workers 2] [--requests 200]

Starts ``python -m components.serving`` on a free port of 127.0.0.1 and reports:
- seconds from process start until ``/v2/models/<name>/ready`` answers 200, and until every
  worker listens (polled every 20 ms), with the load average beside them;
- per process of the server (the parent, each worker, multiprocessing's forkserver and resource
  tracker):
  PSS and RSS from ``/proc/<pid>/smaps_rollup`` after ``--requests`` predictions, CPU seconds
  used, and whether libtorch is mapped (``/proc/<pid>/maps``).
The last line is one JSON object with all of it.
"""

from __future__ import annotations

import argparse
import base64
import glob
import json
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from components.serving.client import MODEL_NAME, free_port, is_ready, post_json, predictor_command, stop

POLL_SECONDS = 0.02
STARTUP_SECONDS = 180
TORCH_LIBRARIES = ("libtorch", "libc10")


@dataclass
class ProcessFootprint:
    pid: int
    role: str                 # parent | worker | helper
    pss_mb: float
    rss_mb: float
    cpu_seconds: float
    torch_mappings: int       # mappings of libtorch*/libc10* files


def smaps_rollup(pid: int) -> dict[str, int]:
    """``/proc/<pid>/smaps_rollup`` as {field: kB}."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[-1] == "kB":
            fields[key.strip()] = int(parts[0])
    return fields


def torch_mappings(pid: int) -> int:
    """How many of the process's memory mappings are libtorch / libc10 files."""
    return sum(1 for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
               if any(name in line.rsplit("/", 1)[-1] for name in TORCH_LIBRARIES))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    found = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            if int(Path(stat).read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.split("/")[2]))
        except (OSError, ValueError):
            continue
    return sorted(found)


def workers_and_helpers(parent: int) -> tuple[list[int], list[int]]:
    """The server's worker processes (the forkserver's children, or spawned processes) and its
    helpers (multiprocessing's forkserver and resource tracker)."""
    workers, helpers = [], []
    for child in children(parent):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.forkserver" in command:
            helpers.append(child)
            workers += children(child)
        elif b"--multiprocessing-fork" in command:
            workers.append(child)
        else:
            helpers.append(child)
    return workers, helpers


def footprint(pid: int, role: str) -> ProcessFootprint:
    rollup = smaps_rollup(pid)
    return ProcessFootprint(pid, role, round(rollup["Pss"] / 1024, 1), round(rollup["Rss"] / 1024, 1),
                            round(cpu_seconds(pid), 2), torch_mappings(pid))


def server_footprint(parent: int) -> list[ProcessFootprint]:
    """The parent, its workers and its helper processes."""
    workers, helpers = workers_and_helpers(parent)
    out = [footprint(parent, "parent")]
    for pids, role in ((workers, "worker"), (helpers, "helper")):
        for pid in pids:
            try:
                out.append(footprint(pid, role))
            except OSError:
                continue
    return out


def listening_workers(parent: int, port: int) -> int:
    """How many worker processes of ``parent`` hold a listening socket on ``port``."""
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                listening.add(fields[9])
    count = 0
    for child in workers_and_helpers(parent)[0]:
        try:
            held = {os.readlink(fd)[8:-1] for fd in glob.glob(f"/proc/{child}/fd/*")}
        except OSError:
            continue
        count += bool(held & listening)
    return count


def sample_request() -> dict:
    from components.serving.check import sample_images

    return {"instances": [{"image": {"b64": base64.b64encode(sample_images()[0]).decode()}}]}


def measure(model_dir: str, backend: str, workers: int = 2, requests: int = 200,
            startup_seconds: float = STARTUP_SECONDS) -> dict:
    """Start the predictor, time it to ready, send ``requests`` predictions, read every process's
    footprint, stop it; returns the figures."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="footprint-") as tmp:
        log_path = Path(tmp) / "predictor.log"
        with open(log_path, "wb") as log:
            start = time.monotonic()
            process = subprocess.Popen(predictor_command(model_dir, backend, port, workers),
                                       stdout=log, stderr=subprocess.STDOUT)
        try:
            ready = all_listening = None
            while all_listening is None:
                if process.poll() is not None or time.monotonic() - start > startup_seconds:
                    raise RuntimeError(f"predictor not ready after {time.monotonic() - start:.0f}s:\n"
                                       f"{log_path.read_text(errors='replace')[-3000:]}")
                if ready is None and is_ready(url, MODEL_NAME):
                    ready = time.monotonic() - start
                if ready is not None and (workers < 2 or listening_workers(process.pid, port) == workers):
                    all_listening = time.monotonic() - start
                time.sleep(POLL_SECONDS)
            load = os.getloadavg()
            body = sample_request()
            for _ in range(requests):
                status, answer = post_json(f"{url}/v1/models/{MODEL_NAME}:predict", body)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {answer}")
            processes = server_footprint(process.pid)
        finally:
            stop(process)
    served = [p for p in processes if p.role in ("parent", "worker")]
    return {"backend": backend, "workers": workers, "ready_seconds": round(ready, 2),
            "all_workers_listening_seconds": round(all_listening, 2), "load_average_at_ready": load,
            "requests": requests, "processes": [asdict(p) for p in processes],
            "pss_mb_parent_and_workers": round(sum(p.pss_mb for p in served), 1),
            "pss_mb_all": round(sum(p.pss_mb for p in processes), 1),
            "max_worker_pss_mb": max((p.pss_mb for p in processes if p.role == "worker"), default=None),
            "torch_mapped": any(p.torch_mappings for p in processes)}


def main(argv=None) -> int:
    import signal
    import sys

    from components.local_run import serving_target

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))     # stop the predictor on the way out

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--summary", default="runs/latest/summary.json")
    parser.add_argument("--model-dir", help="served artifact directory (instead of --summary)")
    parser.add_argument("--backend", help="backend (with --model-dir)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--startup-seconds", type=float, default=STARTUP_SECONDS, help="give up after this long")
    args = parser.parse_args(argv)
    model_dir, backend = (args.model_dir, args.backend) if args.model_dir else serving_target(args.summary)
    result = measure(model_dir, backend, args.workers, args.requests, args.startup_seconds)
    cpu = " ".join(open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t").split())
    result["cpu"] = f"{cpu}, {os.cpu_count()} CPUs"
    for p in result["processes"]:
        print(f"{p['role']:<7} pid {p['pid']:>7}  PSS {p['pss_mb']:7.1f} MB  RSS {p['rss_mb']:7.1f} MB  "
              f"CPU {p['cpu_seconds']:5.2f} s  libtorch mappings {p['torch_mappings']}")
    print(f"{backend}, {args.workers} workers: ready {result['ready_seconds']} s, all workers listening "
          f"{result['all_workers_listening_seconds']} s (load average {result['load_average_at_ready'][0]:.1f}); "
          f"PSS parent + workers {result['pss_mb_parent_and_workers']} MB, all {result['pss_mb_all']} MB; {cpu}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
