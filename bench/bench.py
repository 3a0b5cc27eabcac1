"""`make bench`: every available backend side by side in one process, on the default model.

    python -m bench.bench [--run-dir runs/latest] [--model-dir DIR --data-dir DIR]
                          [--sample-dir ../shared/gtsrb-sample] [--backends a,b] [--threads N]
                          [--runs 150] [--rounds 30] [--serving-batch 1] [--clock-ghz G]

Model: the latest run-local output (``--run-dir``) if it holds a ``components.model.DEFAULT_ARCH``
model; otherwise one trained on the sample data under ``runs/bench`` (reused while its
architecture and epoch count still match). Measurement is fair by construction: one process,
one thread count (OpenMP threads bound to cores), the same input tensors; every backend is
prepared (export / quantization / compilation, timed) before any timing starts; latency is taken
in ``--rounds`` short interleaved rounds (``components.measure``: rotating order, warm-up before
each block) and reported as the median of the round medians, so load from other processes on a
shared machine hits every backend alike and a disturbed round moves one figure of many. The
accuracy guard and the winner come from ``components.selection.select_winner``, the pipeline's
own rule. Speed-ups are printed with a 95 % interval (paired bootstrap over the rounds).

The last line is ``winner=<name> winner_vs_eager=<x>x roofline_gap=<y>x best_fp32_gap=<z>x
winner_vs_eager_95=<low>-<high>x``: ``winner_vs_eager`` = eager / winner median latency at batch
64, and a gap = measured batch-64 median / (FLOPs per batch / attainable fp32 peak). Two peaks
are printed: the spec-sheet one derived from /proc/cpuinfo (cores x clock x FLOP/cycle) and the
measured one (the faster of a BLAS sgemm and a oneDNN GEMM); the roofline uses the measured one,
what this machine can attain.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from components.runtime import CPU, read_cpu

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64
TARGETS = {"winner_vs_eager": (">=", 8.0), "roofline_gap": ("<=", 0.5), "best_fp32_gap": ("<=", 1.2),
           "int8_vs_best_fp32": (">=", 2.0)}

# Arm cores: fp32 FMA pipes per core (at the SVE width, and as 128-bit NEON pipes).
ARM_CORES = {0xd0c: ("Neoverse N1", None, 2), 0xd40: ("Neoverse V1", 2, 4), 0xd49: ("Neoverse N2", 2, 2),
             0xd4f: ("Neoverse V2", 4, 4), 0xd8e: ("Neoverse N3", 2, 2)}


# --------------------------------------------------------------------------- the fp32 peak
def flops_per_cycle(cpu: CPU) -> tuple[int, str]:
    """fp32 FLOP per cycle per core (an FMA counts 2), and how that follows from the hardware."""
    f, amd = cpu.flags, cpu.vendor in ("AuthenticAMD", "HygonGenuine")
    if cpu.machine in ("aarch64", "arm64"):
        name, sve_pipes, neon_pipes = ARM_CORES.get(cpu.part, (f"unknown core (part {cpu.part})", None, 2))
        assumed = "" if cpu.part in ARM_CORES else " (assumed)"
        if cpu.sve_bits and sve_pipes:
            lanes = cpu.sve_bits // 32
            return sve_pipes * lanes * 2, (f"{name}: {sve_pipes} SVE FMA pipes x {lanes} fp32 lanes "
                                           f"({cpu.sve_bits}-bit SVE) x 2 FLOP")
        return neon_pipes * 4 * 2, f"{name}: {neon_pipes} NEON FMA pipes{assumed} x 4 fp32 lanes (128-bit) x 2 FLOP"
    if "avx512f" in f:
        if amd and cpu.family == 0x19:
            return 32, "Zen 4 (AMD family 25) AVX-512: 512-bit ops run as two 256-bit halves; 2 FMA pipes x 8 lanes x 2"
        return 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2 FLOP (assumes two 512-bit FMA units)"
    if "avx2" in f and "fma" in f:
        if amd and cpu.family in (0x17, 0x18) and cpu.model < 0x30:
            return 16, (f"Zen 1/Zen+ (AMD family {cpu.family} model {cpu.model:#x} < 0x30): 256-bit AVX2 runs as "
                        "two 128-bit halves; 2 FMA pipes x 4 fp32 lanes x 2 FLOP")
        return 32, "AVX2 + FMA: 2 FMA pipes x 8 fp32 lanes (256-bit) x 2 FLOP"
    if "avx" in f:
        return 16, "AVX without FMA: one 8-lane add + one 8-lane multiply per cycle"
    return 8, "SSE: one 4-lane add + one 4-lane multiply per cycle"


def clock_ghz(cpu: CPU, cpufreq: Path = Path("/sys/devices/system/cpu/cpu0/cpufreq")) -> tuple[float | None, str]:
    """The core clock: cpufreq's maximum if the kernel exposes it, else /proc/cpuinfo's cpu MHz,
    else None (arm64's /proc/cpuinfo has no clock and cloud VMs often no cpufreq): the spec-sheet
    peak is then unknown, which the roofline does not need (it uses the measured peak)."""
    max_freq = cpufreq / "cpuinfo_max_freq"
    if max_freq.is_file():
        return int(max_freq.read_text()) / 1e6, f"{max_freq} (maximum)"
    if cpu.mhz:
        return cpu.mhz / 1000, "/proc/cpuinfo 'cpu MHz' (no cpufreq; under a hypervisor this is the nominal clock)"
    return None, "unknown (no cpufreq, no 'cpu MHz' in /proc/cpuinfo; pass --clock-ghz for a spec-sheet peak)"


@dataclass
class Peak:
    cores: int
    ghz: float | None               # None: the clock could not be read
    per_cycle: int
    why: str
    clock_source: str

    @property
    def gflops(self) -> float | None:
        return None if self.ghz is None else self.cores * self.ghz * self.per_cycle

    def derivation(self) -> str:
        product = (f"{self.cores} cores x {self.ghz:.3f} GHz x {self.per_cycle} FLOP/cycle = {self.gflops:.1f} GFLOP/s"
                   if self.gflops else f"{self.cores} cores x ? GHz x {self.per_cycle} FLOP/cycle = unknown")
        return f"fp32 peak = {product}\n  FLOP/cycle: {self.why}\n  clock: {self.clock_source}"

    def share(self, gflops: float) -> str:
        """' = N % of the spec-sheet peak', or that the spec-sheet peak is unknown."""
        return f" = {100 * gflops / self.gflops:.0f} % of the spec-sheet peak" if self.gflops else \
            " (spec-sheet peak unknown)"


def fp32_peak(cores: int, cpu: CPU | None = None, ghz: float | None = None) -> Peak:
    cpu = cpu or read_cpu()
    per_cycle, why = flops_per_cycle(cpu)
    ghz, source = (ghz, "--clock-ghz") if ghz else clock_ghz(cpu)
    return Peak(cores, ghz, per_cycle, why, source)


def _sgemm(n: int):
    """An n x n fp32 matrix product by torch.mm (the BLAS, current thread count): (run, FLOPs)."""
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    return (lambda: torch.mm(a, b)), 2 * n ** 3


def _onednn_gemm(n: int):
    """A 1x1 convolution (n -> n channels over 32 x 32 pixels: a 1024 x n x n GEMM) run by oneDNN,
    which picks its kernels by instruction set, not by CPU vendor: (run, FLOPs)."""
    import torch

    from components.backends import onednn

    x, w = torch.rand(1, n, 32, 32), torch.rand(n, n, 1, 1)

    def run():
        with onednn(True), torch.inference_mode():
            torch.nn.functional.conv2d(x, w)
    return run, 2 * 32 * 32 * n * n


def gemm_kernels(n: int) -> dict:
    return {f"torch.mm {n}x{n} (BLAS sgemm)": _sgemm(n),
            f"oneDNN 1x1 convolution (GEMM 1024x{n}x{n})": _onednn_gemm(n)}


def gemm_gflops(kernels: dict, min_seconds: float = 3.0, min_repeats: int = 5) -> dict[str, float]:
    """The best rate of each of ``kernels`` (:func:`gemm_kernels`) over at least ``min_seconds`` and
    ``min_repeats`` runs each, the two alternating: printed, and it picks the faster kernel. It is
    not the roofline's peak: on a VM the rate drifts for seconds at a time (127.9-180.8 GFLOP/s from
    this 3 s check across three runs on one idle Zen 3), so :func:`measure` times the faster kernel
    again in every timing round."""
    best = dict.fromkeys(kernels, float("inf"))
    for run, _ in kernels.values():
        run()                                              # warm-up: allocation, kernel selection
    start, repeats = time.perf_counter(), 0
    while repeats < min_repeats or time.perf_counter() - start < min_seconds:
        for name, (run, _) in kernels.items():
            t = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - t)
        repeats += 1
    return {name: flops / best[name] / 1e9 for name, (_, flops) in kernels.items()}


def attainable_peak(measured: dict[str, float]) -> tuple[float, str]:
    """The fastest fp32 rate a GEMM reached here, and which: the roofline a backend can reach.
    The spec-sheet peak assumes the nominal clock and every FMA pipe busy; under a hypervisor or
    next to other load the cores give less (or boost higher), and a BLAS may not use the widest
    vectors on every vendor's CPU (MKL on AMD)."""
    source = max(measured, key=measured.get)
    return measured[source], source


# --------------------------------------------------------------------------- machine load
def _busy_seconds() -> float:
    """CPU-seconds all processes spent busy (non-idle) since boot, from /proc/stat."""
    import os

    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class LoadMeter:
    """Share of the machine's CPUs that *other* processes used between start() and stop()."""

    def start(self) -> None:
        import os

        self.t, self.busy, self.own = time.perf_counter(), _busy_seconds(), sum(os.times()[:2])

    def stop(self) -> dict:
        import os

        elapsed = time.perf_counter() - self.t
        busy, own = _busy_seconds() - self.busy, sum(os.times()[:2]) - self.own
        cpus = os.cpu_count() or 1
        return {"seconds": elapsed, "cpus": cpus, "own_cpu_percent": 100 * own / (elapsed * cpus),
                "other_cpu_percent": max(0.0, 100 * (busy - own) / (elapsed * cpus)),
                "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


# --------------------------------------------------------------------------- the model
def model_from_run(run_dir: Path) -> tuple[Path, Path] | str:
    """(model dir, data dir) of a run-local output holding a default-architecture model, or why not."""
    from components.local_run import SUMMARY_FILE, read_summary, run_output
    from components.model import CARD_FILE, DEFAULT_ARCH
    from components.preprocess import split_path

    summary_path = run_dir / SUMMARY_FILE
    if not summary_path.is_file():
        return f"no {summary_path}"
    summary = read_summary(summary_path)
    model, data = Path(summary["model"]["path"]), run_output(summary, "preprocess", "data")
    if summary["model"]["architecture"] != DEFAULT_ARCH:
        return f"{summary_path}: architecture {summary['model']['architecture']!r} is not the default {DEFAULT_ARCH!r}"
    missing = [p for p in (model / CARD_FILE, split_path(data, "test")) if not p.is_file()]
    if missing:
        return f"{summary_path}: missing {', '.join(map(str, missing))}"
    problem = unloadable(model)
    return f"{model}: {problem}" if problem else (model, data)


def unloadable(model_dir: Path) -> str | None:
    """Why the artifact does not fit today's code (network definition, calibration sample), or None."""
    from components.model import load_model_artifact

    try:
        _, card = load_model_artifact(model_dir)
    except (RuntimeError, KeyError, ValueError, OSError) as e:   # ModelArtifactError is a RuntimeError
        return f"does not load with the current code ({str(e).splitlines()[0]})"
    return None if "calibration" in card else "has no calibration sample (trained by older code)"


def quick_model(sample_dir: Path, work: Path, epochs: int | None, retrain: bool) -> tuple[Path, Path]:
    """A default-architecture model trained on the sample data under ``work``; reused while its
    architecture, epochs and training recipe are still today's and it still loads."""
    from components.ingest import ingest_dataset
    from components.model import CARD_FILE, DEFAULT_ARCH, read_card
    from components.preprocess import preprocess_dataset, split_path
    from components.train import TrainConfig, train_model

    config = TrainConfig(arch=DEFAULT_ARCH, **({"epochs": epochs} if epochs else {}))
    model, data = work / "model", work / "data"
    if not retrain and (model / CARD_FILE).is_file() and split_path(data, "test").is_file():
        trained = read_card(model)
        current = (trained["architecture"] == DEFAULT_ARCH and trained["training"]["epochs"] == config.epochs
                   and trained["training"]["recipe"] == config.recipe() and not unloadable(model))
        if current:
            print(f"bench: reusing {model} ({DEFAULT_ARCH}, {trained['training'].get('epochs_planned')} epochs; "
                  "--retrain to train again)")
            return model, data
        print(f"bench: {model} is out of date (architecture, epochs or recipe changed); retraining")
    print(f"bench: training {DEFAULT_ARCH} for {config.epochs or 'the recipe’s'} epochs on {sample_dir} into {work}",
          flush=True)
    ingest_dataset(str(sample_dir), str(work / "raw"))
    preprocess_dataset(str(work / "raw"), str(data))
    train_model(str(data), str(model), config)
    return model, data


# --------------------------------------------------------------------------- measurement
def measure(data, names: list[str], threads: int, runs: int, rounds: int, warmup: int,
            peak_kernel=None) -> tuple[list[dict], list[float]]:
    """Results in the evaluate step's format, for ``names`` measured side by side in ``rounds``
    interleaved rounds; each ok result's latency keeps its round medians for :func:`ratios`.
    ``peak_kernel`` (run, FLOPs): a GEMM timed at the start of every round (best of 2), so the
    roofline is measured in the same rounds as the backends; returns its GFLOP/s per round too."""
    from components.evaluate import LATENCY_BATCHES, prepare_and_score, reference_predictions, skipped
    from components.measure import batch_of, interleaved, latency_stats, time_runs

    reference = reference_predictions(data)
    results, ready = {}, {}
    for name in names:
        result = skipped(name)
        if result is None:
            print(f"bench: preparing {name} ...", flush=True)
            predict, _, result = prepare_and_score(name, data, reference, threads)
            if predict:
                ready[name] = predict
        results[name] = result
    samples = {b: batch_of(data.x, b) for b in LATENCY_BATCHES}
    peak_rates = []

    def on_round(r: int) -> None:
        if r % 10 == 0 or r == rounds - 1:
            print(f"bench: timing round {r + 1}/{rounds}", flush=True)
        if peak_kernel:
            run, flops = peak_kernel
            peak_rates.append(flops / min(time_runs(lambda _: run(), None, 2, 0)) * 1e3 / 1e9)

    times = interleaved(ready, samples, rounds, -(-runs // rounds), warmup, on_round=on_round)
    for name in ready:
        results[name]["latency"] = {f"batch{b}": latency_stats(times[name, b], b, data.card.get("flops_per_image"))
                                    for b in LATENCY_BATCHES}
    return [results[n] for n in names], peak_rates


def speedup(ran: dict, slow: str, fast: str) -> tuple[float, float, float]:
    """How many times faster ``fast`` ran than ``slow`` at batch 64, with a 95 % interval over the
    paired rounds: (ratio, low, high); the interval is (ratio, ratio) without round medians."""
    from components.measure import ratio_interval
    from components.selection import median_ms

    a, b = (ran[n]["latency"][f"batch{BATCH}"].get("round_medians_ms") for n in (slow, fast))
    if a and b:
        return ratio_interval(a, b)
    ratio = median_ms(ran[slow], BATCH) / median_ms(ran[fast], BATCH)
    return ratio, ratio, ratio


def roofline_gap(result: dict, batch_gflop: float, peak_rates: list[float]) -> float:
    """Measured batch-64 time / roofline time (the batch's FLOPs at the attainable peak), paired by
    round: each round's median against the peak the GEMM reached in that same round, then the
    median over rounds (a slow phase of the machine slows both alike). Without per-round figures,
    the medians against the median peak."""
    from components.selection import median_ms

    rounds = result["latency"][f"batch{BATCH}"].get("round_medians_ms")
    if rounds and len(rounds) == len(peak_rates):
        return statistics.median(t * rate / batch_gflop / 1e3 for t, rate in zip(rounds, peak_rates, strict=True))
    return median_ms(result, BATCH) * statistics.median(peak_rates) / batch_gflop / 1e3


def figures(selection: dict, batch_gflop: float, peak_rates: list[float]) -> dict:
    """winner_vs_eager and the roofline gaps (:func:`roofline_gap`), at batch 64; int8 vs the best
    fp32 backend when an int8 backend passed the guard."""
    from components.backends import REFERENCE
    from components.selection import median_ms

    ran = selection["backends"]
    if ran.get(REFERENCE, {}).get("status") != "ok":
        raise SystemExit(f"the reference backend {REFERENCE!r} did not run; cannot compute winner_vs_eager")
    winner = ran[selection["winner"]]
    eligible = [ran[n] for n in selection["ranking"]]
    best_fp32 = min((r for r in eligible if r["precision"] == "fp32"), key=lambda r: median_ms(r, BATCH))
    ratio, low, high = speedup(ran, REFERENCE, winner["backend"])
    f = {"winner": selection["winner"], "winner_vs_eager": ratio, "winner_vs_eager_95": [low, high],
         "roofline_gap": roofline_gap(winner, batch_gflop, peak_rates),
         "best_fp32": best_fp32["backend"], "best_fp32_gap": roofline_gap(best_fp32, batch_gflop, peak_rates)}
    int8 = [r for r in eligible if r["precision"] == "int8"]
    if int8:
        best_int8 = min(int8, key=lambda r: median_ms(r, BATCH))
        ratio, low, high = speedup(ran, best_fp32["backend"], best_int8["backend"])
        f.update(best_int8=best_int8["backend"], int8_vs_best_fp32=ratio, int8_vs_best_fp32_95=[low, high])
    return f


def summary_line(f: dict) -> str:
    low, high = f["winner_vs_eager_95"]
    return (f"winner={f['winner']} winner_vs_eager={f['winner_vs_eager']:.2f}x "
            f"roofline_gap={f['roofline_gap']:.2f}x best_fp32_gap={f['best_fp32_gap']:.2f}x "
            f"winner_vs_eager_95={low:.2f}-{high:.2f}x")


def ratio_lines(selection: dict) -> list[str]:
    """Every backend's speed-up over eager at batch 64, with its 95 % interval."""
    from components.backends import REFERENCE

    ran = selection["backends"]
    lines = []
    for name in selection["ranking"] + [n for n, r in ran.items()
                                        if r["status"] == "ok" and n not in selection["ranking"]]:
        ratio, low, high = speedup(ran, REFERENCE, name)
        lines.append(f"  {name:<18}{ran[name]['precision']:<6}{ratio:6.2f}x  (95 % interval {low:.2f}-{high:.2f}x)")
    return lines


def target_applies(key: str, int8_dot: bool) -> str | None:
    """Why a target is not for this CPU, or None. The int8 speed-up is a target where int8 has a
    dot product (x86 VNNI/AMX, arm64's SDOT), which does 4x the MACs of an fp32 FMA; the fp32
    roofline gap is the target where it has none (AVX2-only x86), so int8 cannot carry the CPU."""
    if key == "int8_vs_best_fp32" and not int8_dot:
        return "not a target on this CPU: no int8 dot product (VNNI/AMX, SDOT)"
    if key == "best_fp32_gap" and int8_dot:
        return "not a target on this CPU: it has an int8 dot product, int8_vs_best_fp32 is"
    return None


def target_report(f: dict, int8_dot: bool) -> str:
    parts = []
    for key, (op, bound) in TARGETS.items():
        if key not in f:
            parts.append(f"{key}: not measured (no eligible backend of that kind)")
            continue
        met = f[key] >= bound if op == ">=" else f[key] <= bound
        elsewhere = target_applies(key, int8_dot)
        parts.append(f"{key} {f[key]:.2f}x {op} {bound}x: {elsewhere or ('met' if met else 'MISSED')}")
    return "targets: " + "; ".join(parts)


def table(selection: dict, peak_gflops: float) -> str:
    """The selection's results table with the achieved GFLOP/s and share of the fp32 peak at batch 64."""
    from components.selection import COLUMNS, Column, results_table

    def achieved(r: dict) -> float:
        return r["latency"][f"batch{BATCH}"].get("gflops_per_second", float("nan"))

    columns = [*(COLUMNS[k] for k in ("precision", "accuracy", "agreement", "b1", "b1_p99", "b64", "b64_p99",
                                      "throughput")),
               Column("GFLOP/s (b64)", "GFLOP/s", 9, lambda r: f"{achieved(r):.1f}"),
               Column("% of peak", "%peak", 7, lambda r: f"{100 * achieved(r) / peak_gflops:.0f}"),
               COLUMNS["prepare"]]
    return results_table(selection, columns)


def main(argv=None) -> int:
    from components.measure import pin_threads

    pinned = pin_threads()              # before torch is imported (the next line imports it)
    from components.backends import BACKENDS, REFERENCE, int8_dot_products, unknown_backends
    from components.evaluate import MIN_RUNS, load_eval_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, default=ROOT / "runs" / "latest", help="a run-local output dir")
    parser.add_argument("--model-dir", type=Path, help="a model artifact (with --data-dir); skips the search")
    parser.add_argument("--data-dir", type=Path, help="a preprocessed data dir (train.pt, test.pt)")
    parser.add_argument("--sample-dir", type=Path, default=ROOT.parent / "shared" / "gtsrb-sample",
                        help="GTSRB root to train a quick model from when no run output fits")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--epochs", type=int, help="epochs for the quick model (default: TrainConfig's)")
    parser.add_argument("--retrain", action="store_true", help="train the quick model even if one is cached")
    parser.add_argument("--backends", default=",".join(BACKENDS), help="comma-separated backend names")
    parser.add_argument("--threads", type=int, default=0, help="0 = every CPU this process may use")
    parser.add_argument("--runs", type=int, default=150, help="timed runs per backend and batch size (>= 50)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved rounds the runs are spread over")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before each timed block")
    parser.add_argument("--serving-batch", type=int, default=1, choices=(1, BATCH))
    parser.add_argument("--accuracy-tolerance", type=float, default=0.5)
    parser.add_argument("--min-agreement", type=float, default=99.0)
    parser.add_argument("--clock-ghz", type=float, help="override the clock read from the system")
    parser.add_argument("--sgemm-size", type=int, default=2048, help="matrix size of the peak sanity check")
    args = parser.parse_args(argv)
    names = [n for n in args.backends.split(",") if n]
    unknown = unknown_backends(names)
    if unknown or REFERENCE not in names:
        parser.error(unknown or f"the list must include the reference backend {REFERENCE!r}")
    if args.runs < MIN_RUNS:
        parser.error(f"--runs must be at least {MIN_RUNS}")

    from components.runtime import set_threads
    from components.selection import select_winner

    threads = set_threads(args.threads or None)
    cpu = read_cpu()
    peak = fp32_peak(threads, cpu, args.clock_ghz)
    print(f"bench: {cpu.name or cpu.machine} ({cpu.vendor} family {cpu.family} model {cpu.model:#x}), "
          f"{threads} threads\n{peak.derivation()}")
    print("threads pinned: " + (", ".join(f"{k}={v}" for k, v in pinned.items()) if pinned
                                else "no (torch was imported before bench.main)"))
    kernels = gemm_kernels(args.sgemm_size)
    measured = gemm_gflops(kernels)
    for name, gflops in measured.items():
        print(f"measured fp32: {name} on {threads} threads = {gflops:.1f} GFLOP/s{peak.share(gflops)}", flush=True)
    _, source = attainable_peak(measured)
    print(f"roofline: the faster GEMM here, {source}, is timed again at the start of every timing round "
          f"(the attainable peak, measured alongside the backends)",
          flush=True)

    if args.model_dir or args.data_dir:
        if not (args.model_dir and args.data_dir):
            parser.error("--model-dir and --data-dir go together")
        model_dir, data_dir = args.model_dir, args.data_dir
    else:
        found = model_from_run(args.run_dir)
        if isinstance(found, str):
            print(f"bench: not using a run output ({found})")
            found = quick_model(args.sample_dir, args.work_dir, args.epochs, args.retrain)
        model_dir, data_dir = found
    data = load_eval_data(model_dir, data_dir)
    flops = data.card.get("flops_per_image")
    if not flops:
        from components.model import count_flops
        flops = count_flops(data.model)
        data.card["flops_per_image"] = flops
    batch_gflop = flops * BATCH / 1e9
    print(f"model: {model_dir} ({data.card['architecture']}), {flops / 1e6:.2f} MFLOP/image (FlopCounterMode); "
          f"test images: {len(data.y)}; {batch_gflop:.3f} GFLOP per batch of {BATCH}", flush=True)

    meter = LoadMeter()
    meter.start()
    results, peak_rates = measure(data, names, threads, args.runs, args.rounds, args.warmup,
                                  peak_kernel=kernels[source])
    load = meter.stop()
    attainable = statistics.median(peak_rates)
    roofline_ms = batch_gflop / attainable * 1e3
    print(f"roofline peak: {source} in the {len(peak_rates)} timing rounds: median {attainable:.1f} GFLOP/s "
          f"(rounds {min(peak_rates):.1f}-{max(peak_rates):.1f}){peak.share(attainable)}; roofline at batch {BATCH}: "
          f"{roofline_ms:.2f} ms" + (f" (at the spec-sheet peak {batch_gflop / peak.gflops * 1e3:.2f} ms)"
                                     if peak.gflops else ""))
    selection = select_winner(results, args.accuracy_tolerance, args.min_agreement, args.serving_batch)
    f = figures(selection, batch_gflop, peak_rates)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    out = args.work_dir / "bench.json"
    out.write_text(json.dumps({"peak": {**peak.__dict__, "gflops": peak.gflops}, "measured_gflops": measured,
                               "attainable_gflops": attainable, "attainable_source": source,
                               "attainable_gflops_per_round": peak_rates, "pinned": pinned,
                               "model_dir": str(model_dir), "roofline_ms": roofline_ms, "figures": f, "load": load,
                               "selection": selection}, indent=2) + "\n")
    print()
    print(table(selection, attainable))
    timed = next(r["latency"]["batch1"] for r in results if r["status"] == "ok")
    print(f"\nrule: {selection['rule']}; latency: median of the round medians, {timed['runs']} runs in "
          f"{timed['rounds']} interleaved rounds; %peak: of the attainable {attainable:.1f} GFLOP/s")
    print(f"speed-up over eager at batch {BATCH} (paired bootstrap over rounds):")
    print("\n".join(ratio_lines(selection)))
    if "int8_vs_best_fp32" in f:
        low, high = f["int8_vs_best_fp32_95"]
        print(f"int8 vs best fp32 at batch {BATCH}: {f['best_int8']} {f['int8_vs_best_fp32']:.2f}x faster than "
              f"{f['best_fp32']} (95 % interval {low:.2f}-{high:.2f}x)")
    print(f"machine load while measuring ({load['seconds']:.0f} s): this process {load['own_cpu_percent']:.0f} %, "
          f"other processes {load['other_cpu_percent']:.0f} % of {load['cpus']} CPUs; "
          f"loadavg {' '.join(load['loadavg'])}")
    print(f"results: {out}")
    at_spec = (f" (at the spec-sheet peak: best fp32 {f['best_fp32_gap'] * attainable / peak.gflops:.2f}x)"
               if peak.gflops else " (spec-sheet peak unknown)")
    print(f"best fp32: {f['best_fp32']}; winner_vs_eager and gaps use batch-{BATCH} medians; gaps against the "
          f"attainable peak{at_spec}")
    print(target_report(f, int8_dot=bool(int8_dot_products())))
    print(summary_line(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
