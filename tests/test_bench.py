"""`make bench`: the fp32 peak derivation, the figures on its last line, and a short real run."""

import json
import re
import statistics
import time
from pathlib import Path

import pytest

from bench import bench
from components.backends import BACKENDS
from components.model import DEFAULT_ARCH
from components.runtime import parse_cpuinfo, read_cpu
from tests.test_selection import result

LAST_LINE = re.compile(r"^winner=(\S+) winner_vs_eager=(\d+\.\d\d)x roofline_gap=(\d+\.\d\d)x "
                       r"best_fp32_gap=(\d+\.\d\d)x winner_vs_eager_95=(\d+\.\d\d)-(\d+\.\d\d)x$")


def cpuinfo(vendor="GenuineIntel", family=6, model=85, flags="fpu sse sse2 avx avx2 fma", mhz="2600.000"):
    return (f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"
            f"model name\t: test cpu\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
            "vendor_id\t: Other\n")


def arm_cpuinfo(part, features="fp asimd"):
    return f"processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: {features}\nCPU implementer\t: 0x41\nCPU part\t: {part}\n"


@pytest.mark.parametrize("text, machine, sve_bytes, per_cycle, says", [
    (cpuinfo("AuthenticAMD", 23, 1), "x86_64", None, 16, "Zen 1/Zen+"),            # this dev machine
    (cpuinfo("AuthenticAMD", 23, 0x31), "x86_64", None, 32, "AVX2 + FMA"),          # Zen 2
    (cpuinfo(flags="avx avx2 fma avx512f avx512bw amx_bf16"), "x86_64", None, 64, "2 FMA units x 16"),
    (cpuinfo("AuthenticAMD", 25, 0x11, "avx2 fma avx512f"), "x86_64", None, 32, "Zen 4"),
    (cpuinfo(flags="sse sse2 avx"), "x86_64", None, 16, "AVX without FMA"),
    (cpuinfo(flags="sse sse2"), "x86_64", None, 8, "SSE"),
    (arm_cpuinfo("0xd49", "fp asimd sve sve2 bf16 i8mm"), "aarch64", 16, 16, "Neoverse N2: 2 SVE FMA pipes x 4"),
    (arm_cpuinfo("0xd40", "fp asimd sve bf16"), "aarch64", 32, 32, "Neoverse V1: 2 SVE FMA pipes x 8"),
    (arm_cpuinfo("0xd40", "fp asimd"), "aarch64", None, 32, "Neoverse V1: 4 NEON FMA pipes"),
    (arm_cpuinfo("0xd0c"), "aarch64", None, 16, "Neoverse N1: 2 NEON FMA pipes x 4"),
    (arm_cpuinfo("0xfff"), "aarch64", None, 16, "unknown core (part 4095): 2 NEON FMA pipes (assumed)"),
])
def test_flop_per_cycle_follows_the_cpu(text, machine, sve_bytes, per_cycle, says):
    got, why = bench.flops_per_cycle(parse_cpuinfo(text, machine, sve_bytes))
    assert got == per_cycle and says in why


def test_peak_uses_cores_clock_and_flop_per_cycle(tmp_path):
    cpu = parse_cpuinfo(cpuinfo("AuthenticAMD", 23, 1, mhz="1996.249"), "x86_64")
    assert (cpu.vendor, cpu.family, cpu.model, cpu.mhz) == ("AuthenticAMD", 23, 1, 1996.249)
    assert cpu.flags == frozenset("fpu sse sse2 avx avx2 fma".split())
    ghz, source = bench.clock_ghz(cpu, tmp_path)                         # no cpufreq directory
    assert ghz == pytest.approx(1.996249) and "cpu MHz" in source
    peak = bench.fp32_peak(2, cpu)
    assert peak.gflops == pytest.approx(2 * ghz * 16)
    assert peak.derivation().startswith("fp32 peak = 2 cores x 1.996 GHz x 16 FLOP/cycle = 63.9 GFLOP/s")
    (tmp_path / "cpuinfo_max_freq").write_text("2600000\n")
    assert bench.clock_ghz(cpu, tmp_path)[0] == pytest.approx(2.6)
    assert bench.fp32_peak(2, cpu, ghz=3.0).gflops == pytest.approx(96.0)
    arm = parse_cpuinfo(arm_cpuinfo("0xd49"), "aarch64")                  # arm64: no 'cpu MHz', no cpufreq
    ghz, source = bench.clock_ghz(arm, tmp_path / "none")
    assert ghz is None and "pass --clock-ghz" in source
    unknown = bench.Peak(2, ghz, 32, "why", source)
    assert unknown.gflops is None and "x ? GHz x 32 FLOP/cycle = unknown" in unknown.derivation()
    assert unknown.share(50.0) == " (spec-sheet peak unknown)"
    assert bench.fp32_peak(2, cpu).share(31.9) == " = 50 % of the spec-sheet peak"


def test_the_roofline_uses_the_fastest_measured_gemm():
    measured = {"torch.mm": 80.0, "oneDNN": 150.0}
    assert bench.attainable_peak(measured) == (150.0, "oneDNN")
    rates = bench.gemm_gflops(bench.gemm_kernels(128), min_seconds=0.0, min_repeats=2)
    assert len(rates) == 2 and all(r > 0 for r in rates.values())


def test_load_meter_sees_this_process_working():
    meter = bench.LoadMeter()
    meter.start()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    load = meter.stop()
    assert load["own_cpu_percent"] > 0 and 0 <= load["other_cpu_percent"] <= 100
    assert load["own_cpu_percent"] * load["seconds"] * load["cpus"] / 100 == pytest.approx(0.3, abs=0.05)


def test_the_real_cpu_is_read():
    cpu = read_cpu()
    per_cycle, why = bench.flops_per_cycle(cpu)
    assert per_cycle in (8, 16, 32, 64) and why


def with_rounds(r, rounds):
    r["latency"]["batch64"]["round_medians_ms"] = rounds
    return r


def test_figures_and_the_last_line_from_a_selection():
    from components.selection import select_winner

    selection = select_winner([result("eager", 2.0, 80.0), result("onnxruntime", 0.5, 22.0),
                               result("int8", 0.4, 8.0, accuracy=95.2, agreement=99.5, precision="int8"),
                               result("lossy", 0.1, 4.0, accuracy=90.0, precision="int8")])
    # 40 GFLOP/s in every round (no per-round medians here): a 0.8 GFLOP batch takes 20 ms at the peak
    f = bench.figures(selection, batch_gflop=0.8, peak_rates=[40.0, 40.0])
    assert f == {"winner": "int8", "winner_vs_eager": 10.0, "winner_vs_eager_95": [10.0, 10.0], "roofline_gap": 0.4,
                 "best_fp32": "onnxruntime", "best_fp32_gap": pytest.approx(1.1), "best_int8": "int8",
                 "int8_vs_best_fp32": 2.75, "int8_vs_best_fp32_95": [2.75, 2.75]}
    line = bench.summary_line(f)
    assert LAST_LINE.match(line).groups() == ("int8", "10.00", "0.40", "1.10", "10.00", "10.00")
    # each CPU is held to one of the two: int8's speed-up where it has an int8 dot product, fp32's roofline elsewhere
    assert bench.target_report(f, int8_dot=True) == (
        "targets: winner_vs_eager 10.00x >= 8.0x: met; roofline_gap 0.40x <= 0.5x: met; best_fp32_gap 1.10x <= "
        "1.2x: not a target on this CPU: it has an int8 dot product, int8_vs_best_fp32 is; int8_vs_best_fp32 "
        "2.75x >= 2.0x: met")
    assert bench.target_report(dict(f, int8_vs_best_fp32=1.5), int8_dot=False).endswith(
        "best_fp32_gap 1.10x <= 1.2x: met; int8_vs_best_fp32 1.50x >= 2.0x: not a target on this CPU: no int8 dot "
        "product (VNNI/AMX, SDOT)")
    assert bench.target_report(dict(f, int8_vs_best_fp32=1.5), int8_dot=True).endswith("1.50x >= 2.0x: MISSED")
    del f["int8_vs_best_fp32"]
    assert bench.target_report(f, int8_dot=True).endswith("int8_vs_best_fp32: not measured (no eligible backend of "
                                                          "that kind)")


@pytest.mark.parametrize("arm, flags, dot", [
    (False, {"avx2", "fma"}, []),
    (False, {"avx512f", "avx512_vnni", "amx_int8", "amx_bf16"}, ["amx_int8", "avx512_vnni"]),
    (False, {"avx2", "avx_vnni"}, ["avx_vnni"]),
    (True, {"asimd"}, []),
    (True, {"asimd", "asimddp", "i8mm"}, ["asimddp", "i8mm"])])
def test_the_int8_dot_products_are_read_from_the_cpu_flags(arm, flags, dot):
    from components.backends import int8_dot_products, int8_types
    assert int8_dot_products(arm, flags) == dot
    assert int8_types(arm, flags)[2] == (not arm and not dot)          # 7-bit weights: x86 without a dot product


def test_the_roofline_gap_pairs_each_round_with_the_peak_of_that_round():
    ms = [40.0, 40.0, 40.0, 22.0, 22.0]       # ms per batch of 2 GFLOP: the machine ran at half speed 3 times
    peak = [50.0, 50.0, 50.0, 100.0, 100.0]   # GFLOP/s the GEMM reached in the same rounds: roofline 40, 20 ms
    r = with_rounds(result("onnxruntime", 0.5, 40.0), ms)
    assert bench.roofline_gap(r, batch_gflop=2.0, peak_rates=peak) == pytest.approx(1.0)   # median of 1, 1, 1, 1.1, 1.1
    assert bench.roofline_gap(r, batch_gflop=2.0, peak_rates=peak[:2]) == pytest.approx(40.0 * 50 / 2.0 / 1e3)


def test_ratios_carry_a_95_percent_interval_over_the_rounds():
    from components.selection import select_winner

    eager = [80.0, 82.0, 79.0, 120.0, 81.0, 80.5, 78.0, 80.0, 83.0, 79.5]       # one disturbed round
    fast = [10.0, 10.4, 9.8, 16.0, 10.1, 10.0, 9.9, 10.2, 10.3, 9.7]
    selection = select_winner([with_rounds(result("eager", 2.0, 80.25), eager),
                               with_rounds(result("compile", 0.5, 10.05), fast)])
    ratio, low, high = bench.speedup(selection["backends"], "eager", "compile")
    assert ratio == pytest.approx(80.25 / 10.05) and low < ratio < high and high - low < 0.5
    lines = bench.ratio_lines(selection)
    assert lines[0].split()[:3] == ["compile", "fp32", f"{ratio:.2f}x"] and "95 % interval" in lines[0]
    assert lines[1].split()[:3] == ["eager", "fp32", "1.00x"]


def test_a_run_output_is_used_only_with_the_default_architecture(tmp_path, trained_model, prepared):
    assert bench.model_from_run(tmp_path) == f"no {tmp_path / 'summary.json'}"
    run = tmp_path / "run"
    (run / "preprocess").mkdir(parents=True)
    (run / "preprocess" / "data").symlink_to(prepared)
    summary = {"model": {"path": str(trained_model), "architecture": "lp"}, "run": {"artifacts": str(run)}}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert "architecture 'lp' is not the default" in bench.model_from_run(tmp_path)
    summary["model"]["architecture"] = DEFAULT_ARCH
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert bench.model_from_run(tmp_path) == (Path(trained_model), run / "preprocess" / "data")


def test_bench_refuses_too_few_runs_and_a_list_without_the_reference():
    with pytest.raises(SystemExit):
        bench.main(["--runs", "10"])
    with pytest.raises(SystemExit):
        bench.main(["--backends", "onednn,onnxruntime"])


@pytest.mark.slow
def test_bench_measures_side_by_side_and_ends_with_the_parsable_line(trained_model, prepared, tmp_path, capsys):
    assert bench.main(["--model-dir", str(trained_model), "--data-dir", str(prepared), "--work-dir", str(tmp_path),
                       "--backends", "eager,onednn,onednn-bf16,torchscript", "--runs", "50", "--rounds", "2",
                       "--warmup", "1", "--sgemm-size", "256"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    winner, vs_eager, roofline_gap, best_fp32_gap, low, high = LAST_LINE.match(out[-1]).groups()
    saved = json.loads((tmp_path / "bench.json").read_text())
    s = saved["selection"]
    assert winner == s["winner"] == s["ranking"][0] and winner in ("eager", "onednn", "onednn-bf16", "torchscript")
    assert float(low) <= float(vs_eager) <= float(high)
    ran = s["backends"]
    assert ran["onednn-bf16"]["status"] == ("ok" if BACKENDS["onednn-bf16"].unavailable() is None else "skipped")
    for name in ("eager", "onednn", "torchscript"):
        r = ran[name]
        assert r["agreement"] == 100.0 and r["latency"]["batch1"]["runs"] == r["latency"]["batch64"]["runs"] == 50
        assert len(r["latency"]["batch64"]["round_medians_ms"]) == 2
    b64 = {n: ran[n]["latency"]["batch64"]["median_ms"] for n in ("eager", winner)}
    assert float(vs_eager) == pytest.approx(b64["eager"] / b64[winner], abs=0.006)
    flops = ran["eager"]["flops_per_image"] * 64
    rates = saved["attainable_gflops_per_round"]
    assert len(rates) == 2 and saved["attainable_gflops"] == pytest.approx(statistics.median(rates))
    rounds = ran[winner]["latency"]["batch64"]["round_medians_ms"]
    paired = [t * rate / flops * 1e6 for t, rate in zip(rounds, rates, strict=True)]
    assert float(roofline_gap) == pytest.approx(statistics.median(paired), abs=0.006)
    assert saved["roofline_ms"] == pytest.approx(flops / saved["attainable_gflops"] / 1e6)
    assert saved["attainable_source"] == max(saved["measured_gflops"], key=saved["measured_gflops"].get)
    assert saved["peak"]["gflops"] > 0
    assert float(best_fp32_gap) <= float(roofline_gap) + 0.005
    assert any(line.startswith("fp32 peak = ") for line in out) and out[-2].startswith("targets: ")
