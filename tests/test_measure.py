"""Measurement: rounds, the median of round medians, interleaving and ratio intervals, on known numbers."""

import os
import subprocess
import sys

import pytest
import torch

from components.measure import (
    PINNED_THREADS,
    batch_of,
    interleaved,
    latency_stats,
    percentile,
    pin_threads,
    ratio_interval,
    robust_median,
)


def test_latency_statistics_are_exact_on_known_times():
    rounds = [[float(t) for t in range(r * 10 + 10, r * 10, -1)] for r in range(10)]   # 1..100 ms
    stats = latency_stats(rounds, batch=64, flops_per_image=1_000_000)
    medians = [r * 10 + 5.5 for r in range(10)]
    assert stats == {"batch": 64, "runs": 100, "rounds": 10, "median_ms": 50.5, "p90_ms": 90.0, "p99_ms": 99.0,
                     "min_ms": 1.0, "images_per_second": pytest.approx(64 / 50.5 * 1000),
                     "gflops_per_second": pytest.approx(64e6 / 50.5e-3 / 1e9), "round_medians_ms": medians}


def test_the_median_of_round_medians_ignores_noisy_rounds():
    quiet = [[10.0, 10.2, 9.9, 10.1, 10.0]] * 7
    noisy = [[30.0, 45.0, 12.0, 80.0, 25.0]] * 3          # another process took the cores
    assert robust_median(quiet + noisy) == 10.0
    pooled = sorted(t for r in quiet + noisy for t in r)
    assert pooled[len(pooled) // 2] == 10.1 and pooled[int(0.8 * len(pooled))] >= 25.0   # a pooled p80 would move


def test_percentile_is_nearest_rank():
    values = [i / 100 for i in range(101)]
    assert percentile(values, 50) == 0.5 and percentile(values, 99) == 0.99 and percentile(values, 100) == 1.0


def test_batch_of_repeats_a_short_split():
    x = torch.arange(5.0).view(5, 1, 1, 1).expand(5, 3, 2, 2)
    b = batch_of(x, 12)
    assert b.shape == (12, 3, 2, 2) and b.is_contiguous()
    assert torch.equal(b[5:10], x) and torch.equal(b[:3], batch_of(x, 3))


def test_interleaved_rounds_rotate_the_order_and_time_every_pair():
    calls = []

    def backend(name):
        return lambda x: calls.append((name, len(x)))

    samples = {1: torch.zeros(1, 3, 2, 2), 4: torch.zeros(4, 3, 2, 2)}
    times = interleaved({"a": backend("a"), "b": backend("b"), "c": backend("c")}, samples, rounds=3,
                        runs_per_round=2, warmup=1)
    assert set(times) == {(n, b) for n in "abc" for b in (1, 4)}
    assert all(len(rounds) == 3 and all(len(r) == 2 and min(r) > 0 for r in rounds) for rounds in times.values())
    firsts = [calls[i * 18][0] for i in range(3)]           # 3 backends x 2 batches x 3 calls per round
    assert firsts == ["a", "b", "c"]
    assert calls[:6] == [("a", 1)] * 3 + [("a", 4)] * 3


def test_ratio_interval_is_paired_and_covers_the_ratio():
    slow = [20.0, 21.0, 19.0, 40.0, 20.5, 20.0, 19.5, 22.0, 20.0, 21.0]
    fast = [t / 4 for t in slow]                              # every round exactly 4x: no doubt at all
    assert ratio_interval(slow, fast) == (4.0, 4.0, 4.0)
    jitter = [5.0, 5.5, 4.5, 5.2, 4.8, 5.1, 4.9, 5.3, 4.7, 5.0]
    ratio, low, high = ratio_interval(slow, jitter)
    assert ratio == pytest.approx(20.25 / 5.0) and low < ratio < high and high / low < 1.3
    with pytest.raises(ValueError, match="paired rounds"):
        ratio_interval(slow, jitter[:5])
    same, low, high = ratio_interval(slow, fast, paired=False)          # rounds timed apart: no pairing
    assert same == 4.0 and low < 4.0 < high
    assert ratio_interval(slow, jitter[:5], paired=False)[0] == pytest.approx(20.25 / 5.0)


def test_threads_are_pinned_only_before_torch_is_imported():
    assert pin_threads() == {}                                # torch is imported here: nothing changes
    # OpenMP binds the initial thread to one core; pin_threads gives it back every CPU it had, so
    # threads created later (ONNX Runtime's pool) and cpu_count() are not confined to that core.
    code = ("from components.measure import pin_threads; import os; before = os.sched_getaffinity(0); "
            "print(pin_threads()); import torch; from components.runtime import cpu_count; "
            "print(os.environ['OMP_PROC_BIND'], torch.get_num_threads() > 0, os.sched_getaffinity(0) == before, "
            "cpu_count() == len(before))")
    env = {k: v for k, v in os.environ.items() if k not in PINNED_THREADS}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [str(PINNED_THREADS), "close True True True"]
