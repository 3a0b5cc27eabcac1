"""Process-level helpers shared by the steps: the CPU (/proc/cpuinfo) and its budget, thread settings,
atomic output directories, temporary directories that live as long as the process."""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


@dataclass
class CPU:
    machine: str
    vendor: str = ""
    family: int = 0
    model: int = 0
    name: str = ""
    flags: frozenset = frozenset()
    mhz: float | None = None
    part: int | None = None               # arm64 "CPU part"
    sve_bits: int | None = None           # arm64 SVE vector length


def parse_cpuinfo(text: str, machine: str, sve_bytes: int | None = None) -> CPU:
    """The first processor's entry of /proc/cpuinfo."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = frozenset((fields.get("flags") or fields.get("Features") or "").split())
    model = fields.get("model", "")
    return CPU(machine=machine, vendor=fields.get("vendor_id", ""), family=int(fields.get("cpu family") or 0),
               model=int(model) if model.isdigit() else 0,
               name=fields.get("model name", ""), flags=flags,
               mhz=float(fields["cpu MHz"]) if "cpu MHz" in fields else None,
               part=int(fields["CPU part"], 16) if "CPU part" in fields else None,
               sve_bits=sve_bytes * 8 if sve_bytes and "sve" in flags else None)


def read_cpu() -> CPU:
    sve = Path("/proc/sys/abi/sve_default_vector_length")
    return parse_cpuinfo(Path("/proc/cpuinfo").read_text(), platform.machine(),
                         int(sve.read_text()) if sve.is_file() else None)


def cpu_count() -> int:
    """CPUs this process may use: affinity mask, capped by a cgroup v2 quota (pod CPU limit)."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            count = min(count, max(1, int(int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def set_threads(threads: int | None = None) -> int:
    import torch

    threads = threads or cpu_count()
    torch.set_num_threads(threads)
    return threads


def process_temp_dir(prefix: str) -> Path:
    """A new temporary directory, removed when this process exits."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@contextmanager
def atomic_dir(output_dir: str | Path) -> Iterator[Path]:
    """A fresh ``<output_dir>.partial`` to write into. It replaces ``output_dir`` only when the
    block succeeds and is removed when it fails, so no partial output ever has the final name."""
    out = Path(output_dir)
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        shutil.rmtree(out, ignore_errors=True)
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
