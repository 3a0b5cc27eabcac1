"""Process-level helpers shared by the steps: CPU budget and thread settings."""

from __future__ import annotations

import os
from pathlib import Path


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
