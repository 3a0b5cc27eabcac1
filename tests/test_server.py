"""The predictor as a real server process (kserve.ModelServer, 2 worker processes) on 127.0.0.1:
health, metrics, V1/V2 answers equal to the artifact in-process, and a suite of bad requests that
must all be 4xx with a message, after which a good request still succeeds."""

import base64
import glob
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from collections import Counter

import pytest
import requests
from PIL import Image

from components import backends
from components.serving.check import check_endpoint, sample_images
from components.serving.client import free_port, local_predictor, predictor_command
from components.serving.model import GTSRBModel

pytestmark = pytest.mark.slow
MODEL = "gtsrb"
MAX_BATCH = 8
MAX_BODY = 256 * 1024
BACKEND = backends.REFERENCE


@pytest.fixture(scope="module")
def server(trained_model):
    """One predictor process for the module: 2 workers, small limits so the suite can hit them."""
    limits = (f"--max_batch={MAX_BATCH}", f"--max_body_bytes={MAX_BODY}")
    with local_predictor(str(trained_model), BACKEND, workers=2, extra_args=limits) as served:
        yield served


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def good_v1() -> dict:
    return {"instances": [{"image": {"b64": b64(sample_images()[0])}}]}


def test_health_readiness_metadata_and_metrics(server):
    base = server.url
    assert requests.get(f"{base}/", timeout=5).json() == {"status": "alive"}
    assert requests.get(f"{base}/v2/health/live", timeout=5).json() == {"live": True}
    assert requests.get(f"{base}/v2/health/ready", timeout=5).json() == {"ready": True}
    assert requests.get(f"{base}/v1/models/{MODEL}", timeout=5).json() == {"name": MODEL, "ready": True}
    metadata = requests.get(f"{base}/v2/models/{MODEL}", timeout=5).json()
    assert {i["name"]: i["datatype"] for i in metadata["inputs"]} == {"image": "BYTES", "input": "FP32"}
    # the server lists the extensions it offers: not KServe's model repository (its routes are 404)
    assert requests.get(f"{base}/v2", timeout=5).json()["extensions"] == ["binary_tensor_data"]
    # /metrics sums both workers' counters: new connections spread over the workers, yet every
    # scrape, whichever worker answers it, counts every request.
    before = predict_count(base)
    for _ in range(12):
        response = requests.post(f"{base}/v1/models/{MODEL}:predict", json=good_v1(), timeout=30,
                                 headers={"Connection": "close"})
        assert response.status_code == 200
    assert [predict_count(base) - before for _ in range(6)] == [12] * 6
    assert "Warning" not in server.log.read_text()      # e.g. FastAPI's deprecation of KServe's ORJSONResponse


def predict_count(base: str) -> int:
    """KServe's predict-latency histogram count for the model, from one scrape on a new connection."""
    metrics = requests.get(f"{base}/metrics", timeout=5, headers={"Connection": "close"})
    assert metrics.status_code == 200
    counts = [line for line in metrics.text.splitlines()
              if line.startswith(f'request_predict_seconds_count{{model_name="{MODEL}"}}')]
    assert len(counts) <= 1, counts
    return int(float(counts[0].split()[-1])) if counts else 0


def test_v1_and_v2_answers_equal_the_artifact_in_process(server, trained_model):
    result = check_endpoint(server.url, str(trained_model), BACKEND)
    assert result["checks"] == ["v1 array", "v1 images", "v2 BYTES", "v2 FP32", "v1 bad request -> 400"]
    assert result["max_probability_gap"] <= 1e-4


def worker_sockets(server_pid: int, port: int) -> dict[int, dict[str, set]]:
    """{worker pid: {"listen": inodes, "established": inodes}} for the server's TCP sockets on
    ``port``, read from /proc (which process holds which socket; no tool needed)."""
    states = {}                                 # inode -> "listen" | "established"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] in ("0A", "01"):
                states[fields[9]] = "listen" if fields[3] == "0A" else "established"
    parents = {}                                # pid -> parent pid
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            parents[int(stat.split("/")[2])] = int(open(stat).read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
    # the server's children (forkserver, resource tracker) and theirs (the workers, forked by the forkserver)
    family = {pid for pid, ppid in parents.items() if ppid == server_pid}
    family |= {pid for pid, ppid in parents.items() if ppid in family}
    workers = {}
    for pid in family:
        try:
            held = {os.readlink(fd)[8:-1] for fd in glob.glob(f"/proc/{pid}/fd/*")}
        except OSError:                         # exited meanwhile, or not a worker of ours
            continue
        mine = {"listen": set(), "established": set()}
        for inode in held & states.keys():
            mine[states[inode]].add(inode)
        if mine["listen"]:
            workers[pid] = mine
    return workers


def both_workers_listening(server, port: int, dead: int | None = None) -> dict[int, dict[str, set]]:
    """:func:`worker_sockets` once both workers listen. A worker calls listen() only after its
    startup (model load and warm-up), so the server is ready as soon as its first worker is."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        workers = worker_sockets(server.process.pid, port)
        if len(workers) == 2 and dead not in workers:
            return workers
        time.sleep(0.2)
    raise AssertionError(f"not two workers listening: {workers}\n{server.log.read_text()[-2000:]}")


def test_every_server_process_keeps_the_mmap_threshold_fixed(server):
    """The workers fork from a forkserver started by the server: each has glibc's mmap threshold
    fixed at 128 KiB from its environment (large buffers go back to the OS when freed). The server
    process itself sets it with mallopt (its /proc environ is the one it started with)."""
    port = int(server.url.rsplit(":", 1)[1])
    workers = both_workers_listening(server, port)
    for pid in workers:
        environ = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        assert b"MALLOC_MMAP_THRESHOLD_=131072" in environ, pid


def test_each_worker_listens_on_its_own_socket_so_keep_alive_connections_spread(server):
    """KServe hands every worker the parent's one socket, and a worker's event loop accepts a whole
    burst of connections at once; here each worker has its own SO_REUSEPORT socket instead."""
    port = int(server.url.rsplit(":", 1)[1])
    both_workers_listening(server, port)
    sessions = [requests.Session() for _ in range(16)]
    try:
        for session in sessions:                  # 16 keep-alive connections, held open
            assert session.get(f"{server.url}/", timeout=5).status_code == 200
        workers = worker_sockets(server.process.pid, port)
        assert len(workers) == 2, workers
        listening = [w["listen"] for w in workers.values()]
        assert all(len(inodes) == 1 for inodes in listening) and listening[0] != listening[1]
        held = [len(w["established"]) for w in workers.values()]
        assert sum(held) == 16 and min(held) >= 1, held     # all on one worker: probability 2 / 2**16
    finally:
        for session in sessions:
            session.close()


def test_real_gtsrb_images(server, trained_model, sample_dir):
    files = sorted((sample_dir / "gtsrb" / "GTSRB" / "Final_Test" / "Images").glob("*.ppm"))[:MAX_BATCH]
    body = {"instances": [{"image": {"b64": b64(f.read_bytes())}} for f in files]}
    served = requests.post(f"{server.url}/v1/models/{MODEL}:predict", json=body, timeout=30).json()
    local = GTSRBModel(MODEL, str(trained_model), BACKEND, max_batch=MAX_BATCH)
    expected = local.predict(local.preprocess(body))
    assert [p["class_id"] for p in served["predictions"]] == [p["class_id"] for p in expected["predictions"]]


# --------------------------------------------------------------------------- bad input
def png(size=(40, 40), mode="RGB", noise=False) -> bytes:
    buffer = io.BytesIO()
    (Image.effect_noise(size, 64) if noise else Image.new(mode, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def many_scans(side: int, repeats: int) -> bytes:
    """A progressive greyscale JPEG of ``side`` x ``side`` whose sixth scan (an AC refinement) is
    repeated ``repeats`` more times: a valid file that libjpeg decodes by walking every block once
    per scan (99 KB at 4096 x 4096 and 1,000 repeats took 14 s)."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, format="JPEG", progressive=True, quality=50)
    data, out, i, scans = buffer.getvalue(), bytearray(b"\xff\xd8"), 2, 0
    while data[i + 1] != 0xD9:
        end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if data[i + 1] == 0xDA:               # the scan's entropy-coded data runs to the next marker
            while not (data[end] == 0xFF and data[end + 1] != 0 and not 0xD0 <= data[end + 1] <= 0xD7):
                end += 1
            scans += 1
        out += data[i:end] * (1 + repeats * (data[i + 1] == 0xDA and scans == 6))
        i = end
    return bytes(out + b"\xff\xd9")


def mpo_wrapped(jpeg: bytes) -> bytes:
    """``jpeg`` with a multi-picture (MPF) index after its SOI: PIL opens it as format MPO."""
    buffer = io.BytesIO()
    Image.new("L", (8, 8)).save(buffer, format="MPO", save_all=True, append_images=[Image.new("L", (8, 8))])
    mpo = buffer.getvalue()
    start = mpo.index(b"\xff\xe2")                       # the APP2 segment holding "MPF\0"
    end = start + 2 + int.from_bytes(mpo[start + 2:start + 4], "big")
    return jpeg[:2] + mpo[start:end] + jpeg[2:]


def exif_tags(count: int, orientation: int = 6) -> bytes:
    """A 32x32 PNG whose eXIf chunk holds ``count`` SHORT tags, one of them its orientation
    (65,535 of them took 16.7 s to turn upright through ImageOps.exif_transpose)."""
    tags = sorted(set(range(count - 1)) | {0x0112})
    ifd = len(tags).to_bytes(2, "big") + b"".join(
        struct.pack(">HHIHH", tag, 3, 1, orientation if tag == 0x0112 else 1, 0) for tag in tags) + bytes(4)
    exif = b"MM\0*\0\0\0\x08" + ifd
    plain = png((32, 32))
    chunk = len(exif).to_bytes(4, "big") + b"eXIf" + exif + zlib.crc32(b"eXIf" + exif).to_bytes(4, "big")
    return plain[:33] + chunk + plain[33:]            # after the 8-byte signature and the IHDR chunk


def raw_profile_exif(size: int) -> bytes:
    """A 32x32 PNG carrying ``size`` bytes of EXIF as ImageMagick's hex "Raw profile type exif" text
    in a zTXt chunk (what PIL's getexif reads when there is no eXIf): 480 KB of it fit in 2.5 KB."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("Raw profile type exif", f"\nexif\n{size:8d}\n" + "00" * size, zip=True)
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32)).save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def after_image_data(png_bytes: bytes, chunk_type: bytes) -> bytes:
    """``png_bytes`` with its ``chunk_type`` chunk moved after the image data (before IEND): PIL
    reads such a chunk only when it loads the pixels."""
    start = png_bytes.index(chunk_type) - 4
    end = start + 12 + int.from_bytes(png_bytes[start:start + 4], "big")
    rest = png_bytes[:start] + png_bytes[end:]
    return rest[:-12] + png_bytes[start:end] + rest[-12:]


def mpf_segment(entries: int) -> bytes:
    """A JPEG APP2 "MPF" segment whose directory has ``entries`` SHORT entries (PIL parses each)."""
    tiff = (b"II*\0" + struct.pack("<LH", 8, entries)
            + b"".join(struct.pack("<HHLL", 0x1000 + i, 3, 1, 0) for i in range(entries)) + bytes(4))
    return b"\xff\xe2" + struct.pack(">H", 2 + 4 + len(tiff)) + b"MPF\0" + tiff


def png_chunk(kind: bytes, data: bytes = b"") -> bytes:
    return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")


def png_with(chunks: bytes) -> bytes:
    """A 32x32 PNG with ``chunks`` after its header (IHDR)."""
    plain = png((32, 32))
    return plain[:33] + chunks + plain[33:]


def png_corrupted(kind: bytes) -> bytes:
    """A 32x32 PNG with one byte of its ``kind`` chunk's data changed (its CRC no longer matches)."""
    plain = png((32, 32))
    at = plain.index(kind) + 4
    return plain[:at] + bytes([plain[at] ^ 0x55]) + plain[at + 1:]


def png_made(width: int, height: int, colour: int, rows: list[bytes], extra: bytes = b"", tail: bytes = b"") -> bytes:
    """An 8-bit PNG written chunk by chunk: IHDR, ``extra`` chunks, one IDAT of ``rows`` (each a
    filter byte then its pixels) deflated with ``tail`` after the stream, IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + extra
            + png_chunk(b"IDAT", zlib.compress(b"".join(rows)) + tail) + png_chunk(b"IEND"))


def png_split(parts: int) -> bytes:
    """A 32x32 PNG whose image data is followed by ``parts`` - 1 empty image-data (IDAT) chunks."""
    plain = png((32, 32))
    start = plain.index(b"IDAT") - 4
    end = start + 12 + int.from_bytes(plain[start:start + 4], "big")
    return plain[:end] + png_chunk(b"IDAT") * (parts - 1) + plain[end:]


def jpeg(extra_header: bytes = b"") -> bytes:
    """A 32x32 JPEG with ``extra_header`` right after its SOI."""
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 90)).save(buffer, format="JPEG")
    data = buffer.getvalue()
    return data[:2] + extra_header + data[2:]


GOOD = b64(png())
HUGE = b64(png((4096, 4096), "1"))        # 2 KB on the wire, 16.7 M pixels decoded: the whole budget
V1, V2 = f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"
JSON = {"Content-Type": "application/json"}


def v2(name="image", datatype="BYTES", shape=(1,), data=(GOOD,), **extra) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape), "data": list(data)}], **extra}


def image(b64_value) -> dict:
    return {"instances": [{"image": {"b64": b64_value}}]}


# name: (method, path, body bytes or JSON, extra headers, expected status, text the error must contain)
BAD = {
    "v1 body not JSON": ("POST", V1, b"{instances:", JSON, 400, "Unrecognized request format"),
    "v1 body not JSON, text/plain": ("POST", V1, b"hello", {"Content-Type": "text/plain"}, 415,
                                     "Content-Type text/plain is not accepted for V1 prediction; send"),
    "v1 JSON as form data": ("POST", V1, json.dumps(image(GOOD)).encode(),
                             {"Content-Type": "application/x-www-form-urlencoded"}, 415, "send application/json"),
    "v1 empty body": ("POST", V1, b"", JSON, 400, "Unrecognized request format"),
    "v1 body is a list": ("POST", V1, [1, 2, 3], {}, 400, "JSON object"),
    "v1 missing instances": ("POST", V1, {"inputs": [GOOD]}, {}, 400, "missing key 'instances'"),
    "v1 instances not a list": ("POST", V1, {"instances": "abc"}, {}, 400, "expected a list"),
    "v1 empty instances": ("POST", V1, {"instances": []}, {}, 400, "no instances"),
    "v1 too many instances": ("POST", V1, {"instances": [{"image": {"b64": GOOD}}] * (MAX_BATCH + 1)}, {}, 400,
                              f"maximum batch of {MAX_BATCH}"),
    "v1 instance is a number": ("POST", V1, {"instances": [7]}, {}, 400, "got int"),
    "v1 missing image key": ("POST", V1, {"instances": [{"img": {"b64": GOOD}}]}, {}, 400, "the key 'image'"),
    "v1 missing b64 key": ("POST", V1, {"instances": [{"image": GOOD}]}, {}, 400, "b64"),
    "v1 b64 not a string": ("POST", V1, image(["x"]), {}, 400, "base64 string"),
    "v1 b64 invalid": ("POST", V1, image("not*base64!"), {}, 400, "not valid base64"),
    "v1 zero-size image": ("POST", V1, image(""), {}, 400, "zero bytes"),
    "v1 undecodable image": ("POST", V1, image(b64(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)), {}, 400,
                             "a PNG whose first chunk is ageg, not IHDR"),
    "v1 truncated image": ("POST", V1, image(b64(png((200, 200), noise=True)[:20000])), {}, 400,
                           "a PNG cut short: its IDAT chunk runs past the end of the data"),
    "v1 unsupported format": ("POST", V1, image(b64(b"GIF89a" + b"\0" * 64)), {}, 400, "not a PNG, JPEG, PPM image"),
    "v1 image too large a side": ("POST", V1, image(b64(png((5000, 4000), "1"))), {}, 413,
                                  "a 5000x4000 image; this server decodes images of at most 4096 pixels a side"),
    "v1 array wrong shape": ("POST", V1, {"instances": [[[0.0] * 32] * 32]}, {}, 400, "is not [3, 32, 32]"),
    "v1 array ragged": ("POST", V1, {"instances": [[[[0.0] * 32] * 32, [[0.0] * 32] * 31, [[0.0] * 32] * 32]]},
                        {}, 400, "rectangular"),
    "v1 array strings": ("POST", V1, {"instances": [[[["a"] * 32] * 32] * 3]}, {}, 400,
                         "instances[0][0][0][0]: expected a number, got"),
    "v1 array booleans": ("POST", V1, {"instances": [[[True] * 32] * 32] * 3}, {}, 400,
                          "instances[0][0][0]: expected a number, got true"),
    "v1 array NaN literal": ("POST", V1, b'{"instances": [[[NaN]]]}', JSON, 400, "Unrecognized request format"),
    "v1 array too large number": ("POST", V1, b'{"instances": [[[1e999]]]}', JSON, 400, "infinity"),
    "v1 top_k out of range": ("POST", V1, {**image(GOOD), "parameters": {"top_k": 99}}, {}, 400, "top_k"),
    "v1 oversized payload": ("POST", V1, image("A" * (MAX_BODY + 1)), {}, 413, "exceeds the limit"),
    "v1 oversized chunked payload": ("POST", V1, iter([b'{"instances": "' + b"A" * MAX_BODY, b'"}']), JSON, 413,
                                     "exceeds the limit"),
    "v2 body not JSON": ("POST", V2, b"inputs", JSON, 400, "request body is not JSON this server reads"),
    "v2 missing inputs": ("POST", V2, {"id": "1"}, {}, 422, "inputs"),
    "v2 input missing shape": ("POST", V2, {"inputs": [{"name": "image", "datatype": "BYTES", "data": [GOOD]}]},
                               {}, 422, "shape"),
    "v2 two inputs": ("POST", V2, {"inputs": v2()["inputs"] * 2}, {}, 400, "exactly one input"),
    "v2 unknown input name": ("POST", V2, v2(name="pixels"), {}, 400, "unknown input"),
    "v2 wrong datatype": ("POST", V2, v2(datatype="UINT8"), {}, 400, "datatype UINT8 is not BYTES"),
    "v2 shape mismatch": ("POST", V2, v2(shape=(3,)), {}, 400, "does not match"),
    "v2 bytes not strings": ("POST", V2, v2(data=(1.5,)), {}, 400, "base64 string"),
    "v2 fp32 wrong shape": ("POST", V2, v2("input", "FP32", (1, 32, 32), [0.0] * 1024), {}, 400, "is not [N, 3"),
    "v2 fp32 too few values": ("POST", V2, v2("input", "FP32", (1, 3, 32, 32), [0.0] * 10), {}, 400,
                               "do not fill shape"),
    "v2 fp32 NaN": ("POST", V2, json.dumps(v2("input", "FP32", (1, 3, 32, 32), [float("nan")] * 3072)).encode(),
                    JSON, 400, "request body is not JSON this server reads (unexpected character"),
    "v1 array of raw pixels": ("POST", V1, {"instances": [[[[255] * 32] * 32] * 3]}, {}, 400,
                               "channel 0 holds 255, outside"),
    "v2 fp32 finite values that would overflow the network": (
        "POST", V2, v2("input", "FP32", (1, 3, 32, 32), [-3.4e38] * 3072), {}, 400, "channel 0 holds -3.4e+38"),
    "v2 a misspelled key": ("POST", V2, v2(output=[{"name": "class_id"}]), {}, 400,
                            "request: unknown key(s) ['output']; known: ['id', 'inputs', 'outputs', 'parameters'"),
    "v2 an unknown tensor key": ("POST", V2, {"inputs": [v2()["inputs"][0] | {"contents": []}]}, {}, 400,
                                 "inputs[0]: unknown key(s) ['contents']"),
    "v2 an unknown input parameter": ("POST", V2,
                                      {"inputs": [v2()["inputs"][0] | {"parameters": {"shared_memory_region": "r"}}]},
                                      {}, 400, "input 'image': unknown parameter(s) ['shared_memory_region']; known: "
                                      "['binary_data_size', 'content_type']"),
    "v2 an unknown output key": ("POST", V2, v2(outputs=[{"name": "class_id", "binary_data": True}]), {}, 400,
                                 "outputs[0]: unknown key(s) ['binary_data']; known: ['name', 'parameters']"),
    "v2 fp32 strings": ("POST", V2, v2("input", "FP32", (1, 3, 32, 32), ["0.5"] * 3072), {}, 400,
                        "input 'input' data[0]: expected a number, got"),
    "v2 too many images": ("POST", V2, v2(shape=(MAX_BATCH + 1,), data=[GOOD] * (MAX_BATCH + 1)), {}, 400,
                           "maximum batch"),
    "v2 unknown output": ("POST", V2, v2(outputs=[{"name": "logits"}]), {}, 400, "unknown output"),
    "v2 binary header not a number": ("POST", V2, b"{}", {**JSON, "Inference-Header-Content-Length": "x"}, 400,
                                      "Inference-Header-Content-Length: expected an integer"),
    "unknown model": ("POST", "/v1/models/nope:predict", good_v1(), {}, 404, "nope"),
    "wrong method": ("PUT", V2, v2(), {}, 405, "Method Not Allowed"),
    "GET on :predict": ("GET", V1, None, {}, 405, "this path answers POST"),
    # issue 12: the stock KServe routes this server does not offer, non-numbers in numeric inputs,
    # the decoded-pixel budget per request, V2 sent as another content type
    "v2 repository load": ("POST", f"/v2/repository/models/{MODEL}/load", b"", {}, 404, "no route POST"),
    "v2 repository load, unknown model": ("POST", "/v2/repository/models/nope/load", b"", {}, 404, "no route"),
    "v2 repository index": ("POST", "/v2/repository/index", {}, {}, 404, "no route"),
    "v1 explain": ("POST", f"/v1/models/{MODEL}:explain", good_v1(), {}, 404, "no route POST"),
    "v2 versioned infer": ("POST", f"/v2/models/{MODEL}/versions/1/infer", v2(), {}, 404, "no route"),
    "v2 versioned metadata": ("GET", f"/v2/models/{MODEL}/versions/1", None, {}, 404, "no route"),
    "OpenAPI page": ("GET", "/openapi.json", None, {}, 404, "no route"),
    "DELETE on :predict": ("DELETE", V1, None, {}, 405, "this path answers POST"),
    "POST on readiness": ("POST", "/v2/health/ready", {}, {}, 405, "this path answers GET, HEAD"),
    "v1 array, first value true": ("POST", V1, {"instances": [[[[True] + [0.0] * 31] + [[0.0] * 32] * 31] * 3]}, {},
                                   400, "instances[0][0][0][0]: expected a number, got true"),
    "v1 array, a false among numbers": ("POST", V1, {"instances": [[[[0.0] * 32] * 32] * 2 + [[[0.0] * 31 + [False]]
                                                                                                + [[0.0] * 32] * 31]]},
                                        {}, 400, "instances[0][2][0][31]: expected a number, got false"),
    "v2 fp32, first value true": ("POST", V2, v2("input", "FP32", (1, 3, 32, 32), [True] + [0.5] * 3071), {}, 400,
                                  "input 'input' data[0]: expected a number, got true"),
    "v2 fp32, null among numbers": ("POST", V2, v2("input", "FP32", (1, 3, 32, 32), [0.5] * 3071 + [None]), {}, 400,
                                    "input 'input' data[3071]: expected a number, got null"),
    "v2 fp32, an integer beyond 64 bits": ("POST", V2, v2("input", "FP32", (1, 3, 32, 32), [0] * 3071 + [10**1000]),
                                           {}, 400, "number is infinity when parsed as double"),
    "v1 images over the pixel budget": ("POST", V1, {"instances": [{"image": {"b64": HUGE}}] * MAX_BATCH}, {}, 413,
                                        "instances[1].image.b64: a 4096x4096 image brings the request to 33554432 "
                                        "decoded pixels, more than the limit of 16777216 pixels per request"),
    "v2 images over the pixel budget": ("POST", V2, v2(shape=(2,), data=[HUGE, HUGE]), {}, 413,
                                        "data[1]: a 4096x4096 image"),
    "v2 as text/plain": ("POST", V2, json.dumps(v2()).encode(), {"Content-Type": "text/plain"}, 415,
                         "send application/json"),
    "v2 as form data": ("POST", V2, b"inputs=1", {"Content-Type": "application/x-www-form-urlencoded"}, 415,
                        "send application/json"),
    # a lone surrogate: json.loads took it, and echoing it (id, input or output name) was a 500
    "v2 a lone surrogate in the id": ("POST", V2, json.dumps(v2(id="\ud800")).encode(), JSON, 400,
                                      "lone surrogates"),
    "v2 a lone surrogate in an input name": ("POST", V2, json.dumps(v2(name="\ud800")).encode(), JSON, 400,
                                             "lone surrogates"),
    "v2 NaN beside an unknown key": ("POST", V2, json.dumps(v2(paramters={"top_k": 3}, x=float("nan"))).encode(),
                                     JSON, 400, "NaN, Infinity"),
    "v2 a lower-case datatype": ("POST", V2, v2(datatype="bytes"), {}, 400,
                                 "inputs[0]: datatype 'bytes' is not a V2 datatype; they are upper case ('BYTES')"),
    "v2 a boolean in the shape": ("POST", V2, v2(shape=(True,)), {}, 400,
                                  "inputs[0]: shape [True] is not a list of at most 8 integers"),
    "v2 a string in the shape": ("POST", V2, v2(shape=("1",)), {}, 400, "shape ['1'] is not a list"),
    "v2 a float in the shape": ("POST", V2, v2(shape=(1.0,)), {}, 400, "shape [1.0] is not a list"),
    "v2 a shape of 50,000 entries": ("POST", V2, v2(shape=[1] * 50_000), {}, 400,
                                      "is not a list of at most 8 integers"),
    "v2 data nested as NHWC": ("POST", V2, v2("input", "FP32", (1, 3, 32, 32), [[[[0.0] * 3] * 32] * 32]), {}, 400,
                               "inputs[0]: data nested as [1, 32, 32, 3] does not match shape [1, 3, 32, 32]"),
    "v2 data nested as a column": ("POST", V2, v2("input", "FP32", (1, 3, 32, 32), [[0.0]] * 3072), {}, 400,
                                   "data nested as [3072, 1] does not match shape"),
    "v2 binary_data_size in a JSON body": ("POST", V2, {"inputs": [v2()["inputs"][0] | {
        "parameters": {"binary_data_size": 4}}]}, {}, 400, "binary_data_size belongs to the binary tensor extension"),
    "v2 another model's name": ("POST", V2, v2(model_name="other"), {}, 400,
                                "model_name 'other' is not 'gtsrb', the model this route serves"),
    "v2 20,000 inputs": ("POST", V2, {"inputs": [{}] * 20_000}, {}, 400,
                         "request: 20000 inputs; expected exactly one input"),
    "v2 six outputs": ("POST", V2, v2(outputs=[{"name": "class_id"}] * 6), {}, 400, "6 outputs; expected at most 5"),
    "v2 schema problems, five named": ("POST", V2, {"inputs": [{"name": 1, "datatype": 2, "shape": "x", "data": 3,
                                                               "parameters": 4}], "outputs": 5, "id": 6}, {}, 422,
                                       "; and "),
    "v1 a JPEG of 1,000 scans": ("POST", V1, image(b64(many_scans(2048, 1000))), {}, 413,
                                 "a 2048x2048 JPEG of 1006 scans (decoded once per scan: it counts as 210973491 "
                                 "pixels) brings the request to 210973491 decoded pixels, more than the limit"),
    "v1 a line of 4,097 pixels": ("POST", V1, image(b64(b"P4\n4097 1\n" + b"\0" * 513)), {}, 413,
                                  "a 4097x1 image; this server decodes images of at most 4096 pixels a side"),
    "v1 a plain PGM": ("POST", V1, image(b64(b"P2\n2 2\n255\n" + b"#x\n" * 1000 + b"1 2 3 4\n")), {}, 400,
                       "a plain (ASCII) PBM/PGM/PPM image; send it binary (P4/P5/P6), or as PNG or JPEG"),
    "v2 an input name of 20,000 characters": ("POST", V2, v2(name="n" * 20_000), {}, 400,
                                              "n... (20117 chars)"),
    "v1 a JPEG of 1,000 scans as an MPO": ("POST", V1, image(b64(mpo_wrapped(many_scans(2048, 1000)))), {}, 413,
                                           "a 2048x2048 JPEG of 1006 scans"),
    "v1 EXIF of 6,000 tags": ("POST", V1, image(b64(exif_tags(6_000))), {}, 400,
                              "EXIF of 72002 bytes; at most 65535"),
    "v1 a PGM of maxval 254, 400x400": ("POST", V1, image(b64(b"P5 400 400 254\n" + bytes(160_000))), {}, 413,
                                        "a 400x400 PGM/PPM of maxval 254 (PIL decodes it in Python: it counts "
                                        "as 40960000 pixels; send maxval 255, or PNG)"),
    "v1 EXIF as 70,000 bytes of raw-profile text": ("POST", V1, image(b64(raw_profile_exif(70_000))), {}, 400,
                                                    "EXIF of 70000 bytes; at most 65535"),
    "v1 EXIF as raw-profile text after the image data": (
        "POST", V1, image(b64(after_image_data(raw_profile_exif(70_000), b"zTXt"))), {}, 400,
        '"error": "instances[0].image.b64: EXIF of 70000 bytes; at most 65535'),          # said once, not nested
    "v1 EXIF of 300 entries": ("POST", V1, image(b64(exif_tags(300))), {}, 400,
                               "instances[0].image.b64: EXIF whose first directory has 299 entries; at most 256"),
    "v1 a JPEG padded with 100,000 fill bytes": ("POST", V1, image(b64(jpeg(b"\xff" * 100_000))), {}, 400,
                                                 "a JPEG with more than 4096 bytes outside its header segments"),
    "v1 a JPEG of 2,000 comment segments": ("POST", V1, image(b64(jpeg(b"\xff\xfe\x00\x03x" * 2000))), {}, 400,
                                            "a JPEG with more than 1024 segments before its first scan"),
    "v1 a JPEG whose MPF directory has 300 entries": ("POST", V1, image(b64(jpeg(mpf_segment(300)))), {}, 400,
                                                      "a JPEG whose MPF (multi-picture) directory has 300 entries"),
    "v1 a PNG of 500 unknown chunks": ("POST", V1, image(b64(png_with(png_chunk(b"abCd") * 500))), {}, 400,
                                       "a PNG with more than 256 chunks besides its image data"),
    "v1 a PNG of 9 compressed text chunks": (
        "POST", V1, image(b64(png_with(b"".join(png_chunk(b"zTXt", b"k%d\0\0" % i + zlib.compress(b"a"))
                                                 for i in range(9))))), {}, 400,
        "a PNG with more than 8 compressed chunks (iCCP, zTXt, iTXt)"),
    "v1 a PNG whose text inflates to 1 MB": (
        "POST", V1, image(b64(png_with(png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"a" * 1_000_000))))), {}, 400,
        "Decompressed data too large"),
    "v1 a PNG of 1,100 image-data chunks after a whole budget's pixels": (
        "POST", V1, {"instances": [{"image": {"b64": HUGE}}, {"image": {"b64": b64(png_split(1_100))}}]}, {}, 413,
        "instances[1].image.b64: a 32x32 PNG of 1102 chunks (PIL reads each in Python: past 1024 they count as 512 "
        "pixels each, 40960 in all) brings the request to 16818176 decoded pixels"),
    "v1 a PNG whose image data fails its CRC": ("POST", V1, image(b64(png_corrupted(b"IDAT"))), {}, 400,
                                                "a PNG whose IDAT chunk (number 2) fails its CRC"),
    "v1 a PNG whose header fails its CRC": ("POST", V1, image(b64(png_corrupted(b"IHDR"))), {}, 400,
                                            "a PNG whose IHDR chunk (number 1) fails its CRC"),
    "v1 a PNG without its IEND chunk": ("POST", V1, image(b64(png((32, 32))[:-12])), {}, 400,
                                        "a PNG cut short after 2 chunks, without its IEND chunk"),
    "v1 a PNG cut inside its image data": ("POST", V1, image(b64(png((32, 32))[:-20])), {}, 400,
                                           "a PNG cut short: its IDAT chunk runs past the end of the data"),
    "v1 a PNG with a chunk named in digits": ("POST", V1, image(b64(png_with(png_chunk(b"1234")))), {}, 400,
                                              "a PNG whose chunk 2 is named '1234', not in ASCII letters"),
    "v1 a PNG whose image data holds 3 of its 8 rows": (
        "POST", V1, image(b64(png_made(8, 8, 0, [b"\0" + bytes(8)] * 3))), {}, 400,
        "a PNG whose image data inflates to 27 bytes where its 8x8 header needs 72 (rows missing)"),
    "v1 a PNG with data after its image data's zlib stream": (
        "POST", V1, image(b64(png_made(8, 8, 0, [b"\0" + bytes(8)] * 8, tail=b"junk"))), {}, 400,
        "a PNG with data after the end of its image data's zlib stream"),
    "v1 a palette PNG without its palette": ("POST", V1, image(b64(png_made(8, 8, 3, [b"\0" + bytes(8)] * 8))), {},
                                             400, "a palette PNG (colour type 3) without its PLTE chunk"),
    "v1 a palette PNG with an index past its palette": (
        "POST", V1, image(b64(png_made(8, 8, 3, [b"\0" + bytes([200] * 8)] * 8, png_chunk(b"PLTE", bytes(6))))), {},
        400, "a palette image with a pixel of index 200; its palette has 2 entries"),
    "v1 a PNG with an unknown critical chunk": ("POST", V1, image(b64(png_with(png_chunk(b"ABCD")))), {}, 400,
                                                "a PNG with an unknown critical chunk ABCD"),
    "v1 a PNG with a second IHDR": (
        "POST", V1, image(b64(png_made(8, 8, 0, [b"\0" + bytes(8)] * 8,
                                       png_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))))), {}, 400,
        "a PNG with a second IHDR chunk"),
    "v1 a PNG whose palette comes after its image data": (
        "POST", V1, image(b64(after_image_data(png_made(8, 8, 3, [b"\0" + bytes(8)] * 8, png_chunk(b"PLTE", bytes(6))),
                                               b"PLTE"))), {}, 400,
        "a PNG whose PLTE chunk comes after its image data"),
    "v1 a grey PNG with a 3-byte tRNS": (
        "POST", V1, image(b64(png_made(8, 8, 0, [b"\0" + bytes(8)] * 8, png_chunk(b"tRNS", bytes(3))))), {}, 400,
        "a PNG whose tRNS chunk is 3 bytes, the wrong length for its colour type 0"),
    "v1 a JPEG whose MPF directory hides behind a marker without a length": (
        "POST", V1, image(b64(jpeg(b"\xff\xc8" + mpf_segment(300)))), {}, 400,
        "a JPEG whose MPF (multi-picture) directory has 300 entries"),
    "v1 a PIL-only PyRGBA image": ("POST", V1, image(b64(b"PyRGBA 1 1 255\n" + bytes(4))), {}, 400,
                                   "a 'PyRGBA' image, not a Netpbm type this server reads; send P4, P5 or P6"),
    "v1 a PGM with a sample above its maxval": ("POST", V1, image(b64(b"P5 2 2 100\n" + bytes([0, 50, 200, 7]))), {},
                                                400, "a PGM/PPM with a sample of 200 above its maxval 100"),
    "v1 a PPM whose width is '+8'": ("POST", V1, image(b64(b"P6 +8 1 255\n" + bytes(24))), {}, 400,
                                     "a PBM/PGM/PPM whose header is not its type then width, height and maxval"),
    "v1 a PPM with 100,000 bytes of comment in its header": (
        "POST", V1, image(b64(b"P6\n#" + b"x" * 100_000 + b"\n1 1\n255\n" + bytes(3))), {}, 400,
        "each ended by whitespace, ending within its first 1024 bytes"),
    "v1 a PPM with 100,000 newlines before its maxval": (
        "POST", V1, image(b64(b"P6 1 1" + b"\n" * 100_000 + b"255\n" + bytes(3))), {}, 400,
        "each ended by whitespace, ending within its first 1024 bytes"),
    "v2 a body that is a JSON string": ("POST", V2, b'"x"', JSON, 400,
                                        "request: expected a JSON object with 'inputs', got str"),
    "get with a body": ("GET", "/v2/health/ready", b"x" * 10, {}, 400,
                        "a GET request has no body here; send it without one"),
}


def send(base: str, method: str, path: str, body, headers: dict) -> requests.Response:
    if isinstance(body, (dict, list)):
        return requests.request(method, base + path, json=body, headers=headers, timeout=30)
    return requests.request(method, base + path, data=body, headers=headers, timeout=30)


def test_bad_requests_are_4xx_with_a_message_and_the_server_survives(server):
    assert len(BAD) >= 123
    logged = len(server.log.read_text())
    statuses = {}
    for name, (method, path, body, headers, status, text) in BAD.items():
        response = send(server.url, method, path, body, headers)
        statuses[name] = response.status_code
        assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
        message = json.dumps(response.json())
        assert text.lower() in message.lower(), f"{name}: {message[:300]}"
        good = requests.post(f"{server.url}{V1}", json=good_v1(), timeout=30)
        assert good.status_code == 200 and 0 <= good.json()["predictions"][0]["class_id"] < 43, name
    assert all(400 <= s < 500 for s in statuses.values())
    print(f"\nbad-input suite: {len(statuses)} requests, statuses {sorted(set(statuses.values()))}, "
          f"{sum(s >= 500 for s in statuses.values())} 5xx")
    assert server.process.poll() is None
    # each client error is one WARNING line (method, path, status, reason), no traceback
    lines = wait_for_log_lines(server, logged, "client error:", len(BAD))
    assert all(" WARNING " in line for line in lines), lines
    assert Counter(map(_logged_request, lines)) == Counter((m, p, s) for m, p, _, _, s, _ in BAD.values())
    new_log = server.log.read_text()[logged:]
    assert "Traceback" not in new_log and " ERROR " not in new_log, new_log[:3000]


def raw_exchange(server, data: bytes) -> tuple[str, dict, bytes]:
    """Send ``data`` as it is on a new connection; read until the server closes it: (status line,
    headers in lower case, body)."""
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(data)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.lower().split(": ", 1) for line in lines), body


@pytest.mark.parametrize("request_line", [b"FOO /v1/models/gtsrb:predict HTTP/1.1\r\nHost: x\r\n\r\n",
                                          b"GET / HTTP/1.1\r\nHost x\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n"])
def test_a_request_the_http_parser_refuses_is_a_json_400(server, request_line):
    """An unknown method, a header without a colon, a TLS hello on the plain port: uvicorn's parser
    refuses them before any route; the answer is JSON like every other client error."""
    status, headers, body = raw_exchange(server, request_line)
    assert status == "HTTP/1.1 400 Bad Request" and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "Invalid HTTP request received. The request line or a header is not "
                                         "HTTP/1.1 this server can parse."}
    assert requests.post(f"{server.url}{V1}", json=good_v1(), timeout=30).status_code == 200


@pytest.mark.parametrize("host, message", [
    (None, "an HTTP/1.1 request needs a Host header"),
    (b"Host: a.example\r\nHost: b.example\r\n", "header host is given more than once; send it once"),
    (b"Host: a b\r\n", "Host 'a b' is not a host name or address with an optional port"),
    (b"Host: user@evil:80\r\n", "Host 'user@evil:80' is not a host name"),
    (b"Host: [::1\r\n", "Host '[::1' is not a host name"),
    (b"Host: a/x\r\n", "Host 'a/x' is not a host name")])
def test_an_http11_request_without_one_valid_host_is_a_400(server, host, message):
    """RFC 9112 3.2: a server MUST answer 400 to an HTTP/1.1 request with no Host, two Host lines or
    an invalid Host (a proxy in front could route by another host than the one this server reads)."""
    body = json.dumps(good_v1()).encode()
    status, headers, answer = raw_exchange(server, b"POST /v1/models/gtsrb:predict HTTP/1.1\r\n" + (host or b"")
                                           + b"Content-Length: %d\r\n\r\n" % len(body) + body)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert json.loads(answer)["error"].startswith(message)


@pytest.mark.parametrize("start", [b"GET /v2/health/ready HTTP/1.0\r\n",                    # 1.0: Host optional
                                   b"GET /v2/health/ready HTTP/1.1\r\nHost: [::1]:8080\r\n",
                                   b"GET /v2/health/ready HTTP/1.1\r\nHost: 10.244.0.5:8080\r\n",
                                   b"GET /v2/health/ready HTTP/1.1\r\nHost: gtsrb-predictor.ns.svc.cluster.local\r\n",
                                   b"GET /v2/health/ready HTTP/1.1\r\nHost: \r\n"])       # empty: no authority
def test_valid_host_forms_are_answered(server, start):
    status, _, answer = raw_exchange(server, start + b"Connection: close\r\n\r\n")
    assert status.endswith("200 OK"), (status, answer)


def test_more_than_100_header_fields_is_a_431_and_100_are_answered(server):
    """uvicorn kept every header field as a tuple of two bytes objects: 100 heads of 51,200 one-letter
    fields (256 KB each) grew a worker by 277 MB. Past 100 fields (Apache's default limit) parsing
    stops: 431, the connection closed."""
    body = json.dumps(good_v1()).encode()

    def request(fields: int) -> bytes:
        extra = b"".join(b"x-%d: y\r\n" % i for i in range(fields - 3))     # + Host, Content-Type, -Length
        return (b"POST /v1/models/gtsrb:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra
                + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    status, headers, answer = raw_exchange(server, request(101))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large" and headers["connection"] == "close"
    assert json.loads(answer) == {"error": "the request has more than 100 header fields"}
    status, _, answer = raw_exchange(server, request(99))        # 100 with Connection: close
    assert status == "HTTP/1.1 200 OK", answer


@pytest.mark.parametrize("twice, header", [
    (b"Content-Encoding: gzip\r\nContent-Encoding: identity\r\n", "content-encoding"),
    (b"Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n", "transfer-encoding"),
    (b"Content-Type: text/plain\r\nContent-Type: application/json\r\n", "content-type"),
    (b"Inference-Header-Content-Length: 10\r\nInference-Header-Content-Length: 20\r\n",
     "inference-header-content-length")])
def test_a_header_that_decides_how_the_body_is_read_given_twice_is_a_400(server, twice, header):
    """The request guard read the last value of a repeated header and uvicorn or KServe another:
    gzip then identity passed as plain, and "gzip" + "chunked" on two lines got past the refusal
    of "gzip, chunked"."""
    body = json.dumps(good_v1()).encode()
    chunked = b"transfer-encoding: chunked" in twice.lower()
    framing = b"" if chunked else b"Content-Length: %d\r\n" % len(body)
    payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if chunked else body
    status, headers, answer = raw_exchange(server, b"POST /v1/models/gtsrb:predict HTTP/1.1\r\nHost: x\r\n" + twice
                                           + framing + b"\r\n" + payload)
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert json.loads(answer) == {"error": f"header {header} is given more than once; send it once"}
    assert requests.post(f"{server.url}{V1}", json=good_v1(), timeout=30).status_code == 200


def test_a_get_declaring_an_empty_body_and_an_empty_content_encoding_are_answered(server):
    status, _, _ = raw_exchange(server, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 00\r\n"
                                        b"Connection: close\r\n\r\n")
    assert status == "HTTP/1.1 200 OK"
    answer = requests.post(f"{server.url}{V1}", data=json.dumps(good_v1()), timeout=30,
                           headers={"Content-Type": "application/json", "Content-Encoding": ""})
    assert answer.status_code == 200


def test_a_get_with_a_trickled_body_is_refused_at_once(server):
    """A GET declaring a 1 GB body, sent a byte at a time, held its connection past every timeout
    (the body timeout covered POST and PUT only)."""
    status, headers, answer = raw_exchange(
        server, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\nx")
    assert status == "HTTP/1.1 400 Bad Request" and headers["connection"] == "close"
    assert json.loads(answer) == {"error": "a GET request has no body here; send it without one"}


def test_an_answer_sent_before_the_body_was_read_closes_the_connection(server):
    """A 404, 405, 413 or 415 answered on the head alone was kept alive: the unread body, trickled
    a byte at a time, held the connection open past every timeout (200 connections for 200 s)."""
    for head in (b"POST /nope HTTP/1.1\r\nContent-Length: 100000\r\n",
                 b"POST /v2/health/ready HTTP/1.1\r\nContent-Length: 100000\r\n",
                 b"POST /v1/models/gtsrb:predict HTTP/1.1\r\nContent-Length: 999999999999\r\n",
                 b"POST /v1/models/gtsrb:predict HTTP/1.1\r\nContent-Type: text/plain\r\nContent-Length: 100000\r\n"):
        start = time.monotonic()
        status, headers, _ = raw_exchange(server, head + b"Host: x\r\n\r\nx")     # reads until the server closes
        assert status.split()[1] in ("404", "405", "413", "415") and headers["connection"] == "close", head
        assert time.monotonic() - start < 5, head


def test_trailer_fields_are_dropped_and_bounded(server):
    """uvicorn appended a chunked body's trailer fields to the request's headers without limit: 1 GB
    of them took a worker from 268 to 1,198 MB. They are dropped, and past 256 KiB the request is
    answered 431 and the connection closed."""
    body = json.dumps(good_v1()).encode()
    head = (b"POST /v1/models/gtsrb:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n" % (len(body), body))
    status, _, answer = raw_exchange(server, head + b"X-Trailer: 1\r\n\r\n")
    assert status == "HTTP/1.1 200 OK" and 0 <= json.loads(answer)["predictions"][0]["class_id"] < 43
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head)
        for i in range(64):                       # 64 x 8 KiB of trailer fields, never ended
            try:
                s.sendall(b"X-T%d: %s\r\n" % (i, b"v" * 8192))
            except OSError:                       # the server closed it
                break
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431 ") and b"chunk extensions or trailer fields exceed" in answer
    assert requests.post(f"{server.url}{V1}", json=good_v1(), timeout=30).status_code == 200


def test_pil_warnings_about_a_client_image_are_not_logged(server):
    """PIL warned on stderr for each bad EXIF tag: 5,000 of them in a 60 KB EXIF (answered 200)
    wrote 10,000 log lines."""
    tags = b"".join(struct.pack(">HHII", 0x9000 + i, 7, 1_000_000, 8) for i in range(200))   # under 256 entries
    exif = b"MM\0*\0\0\0\x08" + (200).to_bytes(2, "big") + tags + bytes(4)
    logged = len(server.log.read_text())
    answer = requests.post(f"{server.url}{V1}", json=image(b64(png_with(png_chunk(b"eXIf", exif)))), timeout=30)
    assert answer.status_code == 200 and 0 <= answer.json()["predictions"][0]["class_id"] < 43
    assert requests.post(f"{server.url}{V1}", json=good_v1(), timeout=30).status_code == 200
    new = server.log.read_text()[logged:]
    assert "Warning" not in new and "Skipping tag" not in new, new[:2000]


def test_a_transfer_coding_other_than_chunked_is_a_415(server):
    """uvicorn decodes chunked only: a gzip transfer coding was read as if the body were plain."""
    body = json.dumps(good_v1()).encode()
    request = (b"POST /v1/models/gtsrb:predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n"
               b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    status, headers, answer = raw_exchange(server, request)
    assert status == "HTTP/1.1 415 Unsupported Media Type"
    assert json.loads(answer) == {"error": "Transfer-Encoding gzip, chunked is not supported; send the body as it "
                                           "is or chunked"}
    chunked = request.replace(b"gzip, chunked", b"chunked")
    assert raw_exchange(server, chunked)[0] == "HTTP/1.1 200 OK"


def test_a_websocket_upgrade_is_a_json_404(server):
    """uvicorn answered an upgrade to a route-less app with an empty text/plain 403."""
    upgrade = (b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    status, headers, body = raw_exchange(server, upgrade)
    assert status == "HTTP/1.1 404 Not Found" and headers["content-type"] == "application/json"
    assert json.loads(body) == {"error": "Not Found: this server has no WebSocket route /v2/health/ready; it answers "
                                         "HTTP requests only"}
    assert requests.get(f"{server.url}/v2/health/ready", timeout=10).json() == {"ready": True}


def test_a_request_head_over_the_limit_is_a_json_431(server):
    """uvicorn's parser buffered a head of any size (a 200 MB header: +205 MB RSS, then a 200)."""
    from components.serving.surface import MAX_HEAD_BYTES
    start = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\nX-Big: "
    status, headers, body = raw_exchange(server, start + b"a" * (MAX_HEAD_BYTES + 1 - len(start)))
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert json.loads(body) == {"error": f"the request line and headers exceed {MAX_HEAD_BYTES} bytes"}
    under = start + b"a" * (MAX_HEAD_BYTES - 1000) + b"\r\nConnection: close\r\n\r\n"
    assert raw_exchange(server, under)[0] == "HTTP/1.1 200 OK"
    assert requests.post(f"{server.url}{V1}", json=good_v1(), timeout=30).status_code == 200


def _logged_request(line: str) -> tuple[str, str, int]:
    """(method, path, status) of a "client error: METHOD PATH -> STATUS: reason" log line."""
    request, status = line.split("client error: ", 1)[1].split(": ", 1)[0].split(" -> ")
    method, path = request.split(" ", 1)
    return method, path, int(status)


def wait_for_log_lines(server, offset: int, marker: str, count: int, seconds: float = 10) -> list[str]:
    """The log lines after ``offset`` holding ``marker``, once there are ``count`` (or after ``seconds``)."""
    deadline = time.monotonic() + seconds
    while True:
        lines = [line for line in server.log.read_text()[offset:].splitlines() if marker in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


def test_an_unload_attempt_leaves_the_model_loaded_and_answering_identically(server):
    """KServe's model-repository routes would unload the model from the worker that takes the
    request (while readiness still says ready); here they do not exist, on every worker."""
    def answers() -> list[dict]:
        return [requests.post(f"{server.url}{path}", json=body, timeout=30, headers={"Connection": "close"}).json()
                for path, body in ((V1, good_v1()), (V2, v2()))]

    before = answers()
    for _ in range(8):                            # new connections: both workers get some
        for action in ("unload", "load"):
            response = requests.post(f"{server.url}/v2/repository/models/{MODEL}/{action}", timeout=30,
                                     headers={"Connection": "close"})
            assert response.status_code == 404, response.text
            assert response.json() == {"error": f"Not Found: this server has no route POST "
                                                f"/v2/repository/models/{MODEL}/{action}"}
    for _ in range(8):
        assert answers() == before
        for path in (f"/v2/models/{MODEL}/ready", f"/v1/models/{MODEL}"):
            assert requests.get(f"{server.url}{path}", timeout=5, headers={"Connection": "close"}).json()["ready"]


def test_head_on_predict_is_405_saying_post(server):
    """HTTP gives a HEAD answer no body; its headers are those of the JSON message a GET gets."""
    head = requests.head(f"{server.url}{V1}", timeout=5)
    get = requests.get(f"{server.url}{V1}", timeout=5)
    assert head.status_code == get.status_code == 405 and head.content == b""
    assert head.headers["allow"] == get.headers["allow"] == "POST"
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert get.json() == {"error": f"Method Not Allowed: GET {V1}; this path answers POST"}
    assert int(head.headers["content-length"]) == len(get.content) + 1          # "HEAD" vs "GET"


def test_head_is_answered_wherever_get_is(server):
    """A 405 says "this path answers GET, HEAD", so HEAD works there (load balancers probe with it):
    the GET's status and headers, no body."""
    for path in ("/v2/health/ready", "/v2/health/live", f"/v1/models/{MODEL}", f"/v2/models/{MODEL}", "/v2"):
        head = requests.head(f"{server.url}{path}", timeout=5)
        get = requests.get(f"{server.url}{path}", timeout=5)
        assert head.status_code == get.status_code == 200 and head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"] == "application/json", path
        assert head.headers["content-length"] == get.headers["content-length"], path
    unknown = requests.head(f"{server.url}/v2/models/nope/ready", timeout=5)
    assert unknown.status_code == 404 and unknown.content == b""


def test_the_server_refuses_to_start_on_weights_that_do_not_match_the_card(tampered_model):
    done = subprocess.run(predictor_command(str(tampered_model), BACKEND, free_port()), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert "does not match the model card" in done.stderr and "refusing to serve" in done.stderr


def test_the_server_requires_a_backend(trained_model):
    env = {k: v for k, v in os.environ.items() if k != "GTSRB_BACKEND"}
    done = subprocess.run([sys.executable, "-m", "components.serving", f"--model_dir={trained_model}"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 2 and "--backend" in done.stderr


def test_a_worker_that_dies_is_replaced_and_listens_again(server):
    """KServe restarts a dead worker with the socket its parent kept; it joins the SO_REUSEPORT
    group and serves; /metrics keeps the dead worker's counts. (Runs last: the module's server
    continues with the replacement.)"""
    port = int(server.url.rsplit(":", 1)[1])
    before = both_workers_listening(server, port)
    counted = predict_count(server.url)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    workers = both_workers_listening(server, port, dead=victim)
    listening = [w["listen"] for w in workers.values()]
    assert listening[0] != listening[1] and before[victim]["listen"] not in listening
    for _ in range(16):                       # new connections: whichever worker gets them answers
        response = requests.post(f"{server.url}{V1}", json=good_v1(), timeout=30, headers={"Connection": "close"})
        assert response.status_code == 200
    assert predict_count(server.url) == counted + 16     # the dead worker's counts stay in the sum
