"""Latency measurement that evaluate, bench and bench_serve share.

Timing is taken in rounds: each round times a few runs of a callable after a short warm-up,
and a round's median is that round's figure. With several backends, every round times each of
them once, in rotating order (:func:`interleaved`), so load from other processes on a shared
machine falls on all of them alike. The latency reported is the median of the round medians:
a noisy round (another process took the cores for a moment) moves one of many round figures,
not the result. Ratios between two backends come with a 95 % interval from a paired bootstrap
over rounds (:func:`ratio_interval`).
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

Predict = Callable[["torch.Tensor"], "torch.Tensor"]   # torch is imported by the callers, after pin_threads()
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def batch_of(x: torch.Tensor, batch: int) -> torch.Tensor:
    """The first ``batch`` images of ``x`` (repeated when there are fewer), contiguous."""
    if len(x) < batch:
        x = x.repeat(batch // len(x) + 1, 1, 1, 1)
    return x[:batch].contiguous()


def percentile(sorted_values: list[float], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_values[min(len(sorted_values) - 1, round(p / 100 * (len(sorted_values) - 1)))]


# GOMP_SPINCOUNT: how long an idle OpenMP worker busy-waits for the next parallel region before
# it sleeps. libgomp's default (300,000 iterations, several ms) keeps the worker spinning on its
# core while the next thing timed runs on another thread pool (NNPACK's in eager at batch 64, ONNX
# Runtime's), which then gets half a core: eager batch 64 moved 33-72 ms within one process.
# 30,000 still covers the gaps between one forward's operators (batch-1 latency unchanged).
SHORT_SPIN = {"GOMP_SPINCOUNT": "30000"}
PINNED_THREADS = {"OMP_PROC_BIND": "close", "OMP_PLACES": "cores", **SHORT_SPIN}


def pin_threads() -> dict[str, str]:
    """Bind each OpenMP thread of torch to one core for the life of the process, and let an idle
    worker spin only briefly (``GOMP_SPINCOUNT``, above). The OpenMP runtime reads these when
    torch is imported, so this imports torch itself; settings already in the environment win.
    Returns the settings in force, empty if torch was already imported (then nothing is changed).

    OpenMP also binds the process's initial thread to the first core, and every thread created
    afterwards inherits that one-core mask: ONNX Runtime's thread pool would share one core and
    the process would count one CPU. So the initial thread gets the CPUs it had back once torch is
    loaded; the OpenMP workers keep their own cores."""
    import sys

    if "torch" in sys.modules:
        return {}
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    for key, value in PINNED_THREADS.items():
        os.environ.setdefault(key, value)
    import torch

    torch.get_num_threads()                     # starts the OpenMP runtime, which binds this thread
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    return {key: os.environ[key] for key in PINNED_THREADS}


def time_runs(predict: Predict, sample: torch.Tensor, runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        predict(sample)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(sample)
        times.append((time.perf_counter() - start) * 1000)
    return times


def interleaved(predicts: Mapping[str, Predict], samples: Mapping[int, torch.Tensor], rounds: int,
                runs_per_round: int, warmup: int,
                on_round: Callable[[int], None] | None = None) -> dict[tuple[str, int], list[list[float]]]:
    """Times every (backend, batch) once per round, the backends' order rotating by one each
    round; returns {(name, batch): [[ms of each run] per round]}."""
    names = list(predicts)
    times: dict[tuple[str, int], list[list[float]]] = {(n, b): [] for n in names for b in samples}
    for r in range(rounds):
        if on_round:
            on_round(r)
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            for batch, sample in samples.items():
                times[name, batch].append(time_runs(predicts[name], sample, runs_per_round, warmup))
    return times


def round_medians(rounds: list[list[float]]) -> list[float]:
    return [statistics.median(r) for r in rounds]


def robust_median(rounds: list[list[float]]) -> float:
    """The median of the round medians."""
    return statistics.median(round_medians(rounds))


def latency_stats(rounds: list[list[float]], batch: int, flops_per_image: int | None = None) -> dict:
    """Latency figures of one (backend, batch) from its timed rounds: ``median_ms`` is the median
    of the round medians; p90 / p99 / min are over every timed run."""
    times = sorted(t for r in rounds for t in r)
    median = robust_median(rounds)
    stats = {"batch": batch, "runs": len(times), "rounds": len(rounds), "median_ms": median,
             "p90_ms": percentile(times, 90), "p99_ms": percentile(times, 99), "min_ms": times[0],
             "images_per_second": batch / median * 1000, "round_medians_ms": round_medians(rounds)}
    if flops_per_image:
        stats["gflops_per_second"] = flops_per_image * batch / median / 1e6
    return stats


def ratio_interval(numerator: list[float], denominator: list[float], confidence: float = CONFIDENCE,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                   paired: bool = True) -> tuple[float, float, float]:
    """median(numerator) / median(denominator) of per-round figures, with a ``confidence``
    interval from a bootstrap over the rounds: (ratio, low, high). ``paired``: round i of both was
    measured in the same round (``make bench``'s interleaving), so rounds are resampled together;
    otherwise (the pipeline's evaluate tasks, timed one after another) each list on its own."""
    if not numerator or not denominator or (paired and len(numerator) != len(denominator)):
        raise ValueError(f"paired rounds needed: {len(numerator)} vs {len(denominator)}")
    ratio = statistics.median(numerator) / statistics.median(denominator)
    rng = random.Random(seed)
    estimates = []
    for _ in range(resamples):
        top = [rng.randrange(len(numerator)) for _ in numerator]
        bottom = top if paired else [rng.randrange(len(denominator)) for _ in denominator]
        estimates.append(statistics.median(numerator[i] for i in top)
                         / statistics.median(denominator[i] for i in bottom))
    estimates.sort()
    tail = (1 - confidence) / 2
    return ratio, percentile(estimates, 100 * tail), percentile(estimates, 100 * (1 - tail))
