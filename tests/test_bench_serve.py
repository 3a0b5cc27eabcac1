"""bench/bench_serve.py: its HTTP client and statistics, and one short real run of all four servers."""

import asyncio
import re

import pytest

from bench import bench_serve

LAST_LINE = re.compile(r"^kserve_vs_flask=\d+\.\d\dx kserve_vs_gunicorn=\d+\.\d\dx kserve_vs_noop=\d+\.\d\dx "
                       r"noop_bound=\d+\.\d\dx v2bin_vs_v1=\d+\.\d\dx$")


def parse(raw: bytes):
    async def run():
        reader = asyncio.StreamReader()
        reader.feed_data(raw)
        reader.feed_eof()
        return await bench_serve._read_response(reader)

    return asyncio.run(run())


def test_reads_the_three_ways_a_response_ends():
    assert parse(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi") == (200, True, b"hi")
    assert parse(b"HTTP/1.1 400 Bad\r\nconnection: close\r\ncontent-length: 1\r\n\r\nx") == (400, False, b"x")
    assert parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx") == (200, False, b"x")   # werkzeug's dev server
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    assert parse(chunked) == (200, True, b"abcde")
    assert parse(b"HTTP/1.1 200 OK\r\n\r\nuntil close") == (200, False, b"until close")


def test_request_bytes_and_statistics():
    request = bench_serve.http_request("/p", b"{}")
    assert request == (b"POST /p HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                       b"Content-Length: 2\r\n\r\n{}")
    values = [i / 100 for i in range(101)]
    assert bench_serve.percentile(values, 50) == 0.5 and bench_serve.percentile(values, 99) == 0.99


def test_report_ends_with_the_ratio_line():
    def level(rps):
        return bench_serve.summarize([0.001] * 49 + [0.002], 50 / rps, 0.1)

    results = {"kserve": {1: level(100), 8: level(300)}, "noop": {1: level(150), 8: level(400)},
               "flask": {1: level(90), 8: level(120)}, "gunicorn": {1: level(95), 8: level(250)},
               "kserve-v2bin": {1: level(150), 8: level(600)}}
    lines = bench_serve.report(results, [1, 8])
    assert len(lines) == 1 + 10 + 1                   # header, a row per server and level, the ratios
    assert lines[1].split() == ["kserve", "1", "50", "100.0", "1.00", "2.00", "2.00"]   # 0.1 CPU-s / 50
    assert lines[-1] == "kserve_vs_flask=2.50x kserve_vs_gunicorn=1.20x kserve_vs_noop=0.75x v2bin_vs_v1=2.00x"
    # with the model's own time: the no-op's 2 ms CPU per request + 0.5 ms of model allow 0.80x
    lines = bench_serve.report(results, [1, 8], model=0.5)
    assert lines[-2] == ("at c=8 kserve spends 0.000 ms of server CPU per request more than the no-op; the model "
                         "alone takes 0.500 ms per image (batch 1, in-process)")
    assert lines[-1] == ("kserve_vs_flask=2.50x kserve_vs_gunicorn=1.20x kserve_vs_noop=0.75x noop_bound=0.80x "
                         "v2bin_vs_v1=2.00x")


@pytest.mark.slow
def test_a_short_run_measures_all_four_servers(trained_model, sample_dir, tmp_path, capsys):
    image = sample_dir / "gtsrb" / "GTSRB" / "Final_Test" / "Images" / "00000.ppm"
    assert bench_serve.main(["--model-dir", str(trained_model), "--backend", "eager", "--image", str(image),
                             "--duration", "2", "--rounds", "2", "--concurrency", "1,4", "--workers", "2",
                             "--log-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert LAST_LINE.match(out[-1]), out[-1]
    names = ("flask", "gunicorn", "kserve", "kserve-v2bin", "kserve-v2json", "noop")
    rows = [line.split() for line in out if line.split()[:1] in ([n] for n in names) and len(line.split()) == 7]
    assert sorted((r[0], int(r[1])) for r in rows) == [(s, c) for s in names for c in (1, 4)]
    for _, _, requests, rps, p50, p99, cpu_ms in rows:
        assert int(requests) > 0 and float(rps) > 0 and 0 < float(p50) <= float(p99) and float(cpu_ms) > 0
    answers = [line for line in out if ": answered " in line and not line.startswith("noop")]
    assert len(answers) == 5 and len({a.split("'class_id': ")[1].split(",")[0] for a in answers}) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flask.log", "gunicorn.log", "kserve.log", "noop.log"]
