"""The Open Inference Protocol's standard clients against a real predictor process (REST and gRPC,
2 workers, gRPC in the parent as KServe runs it): tritonclient http and grpc (in a subprocess,
tests/triton_clients.py) and KServe's InferenceRESTClient / InferenceGRPCClient, every way of
sending (JSON or binary tensors, BYTES images raw or base64, FP32 tensors; batch 1 and 8, top_k),
answer like V1 for the same images. Malformed binary bodies and bad gRPC requests get a 4xx /
an error status naming the problem, one WARNING line each, and the server keeps answering."""

import asyncio
import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest
from kserve.inference_client import RESTConfig

from components import backends
from components.serving.check import PROBABILITY_TOLERANCE
from components.serving.client import local_predictor
from components.serving.model import GTSRBModel

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
MODEL = "gtsrb"
BACKEND = backends.REFERENCE
MAX_BATCH = 8
MAX_BODY = 1 << 20            # a JSON FP32 batch of 8 is ~0.5 MB as tritonclient writes it
TOP_K = 3
V1, V2 = f"/v1/models/{MODEL}:predict", f"/v2/models/{MODEL}/infer"


@pytest.fixture(scope="module")
def server(trained_model):
    limits = (f"--max_batch={MAX_BATCH}", f"--max_body_bytes={MAX_BODY}")
    with local_predictor(str(trained_model), BACKEND, workers=2, extra_args=limits, grpc=True) as served:
        yield served


@pytest.fixture(scope="module")
def image_files(sample_dir) -> list[Path]:
    files = sorted((sample_dir / "gtsrb" / "GTSRB" / "Final_Test" / "Images").glob("*.ppm"))[:MAX_BATCH]
    assert len(files) == MAX_BATCH
    return files


@pytest.fixture(scope="module")
def images(image_files) -> list[bytes]:
    return [f.read_bytes() for f in image_files]


def v1_body(images: list[bytes]) -> dict:
    return {"instances": [{"image": {"b64": base64.b64encode(d).decode()}} for d in images],
            "parameters": {"top_k": TOP_K}}


@pytest.fixture(scope="module")
def expected(server, images) -> dict[int, list[list[tuple[int, float]]]]:
    """V1's answers (top-k ids and probabilities per image) for batch 1 and the whole batch."""
    answers = {}
    for n in (1, len(images)):
        response = requests.post(server.url + V1, json=v1_body(images[:n]), timeout=60)
        assert response.status_code == 200, response.text
        answers[n] = [[(t["class_id"], t["probability"]) for t in p["top_k"]] for p in response.json()["predictions"]]
    return answers


@pytest.fixture(scope="module")
def fp32(trained_model, images) -> np.ndarray:
    """The images' normalized tensors, as the served artifact's own preprocessing makes them."""
    model = GTSRBModel(MODEL, str(trained_model), BACKEND, max_batch=MAX_BATCH)
    return model.preprocess(v1_body(images)).x


def assert_like_v1(case: str, ids: list[list[int]], probabilities: list[list[float]], expected) -> None:
    want = expected[len(ids)]
    assert [row[0] for row in ids] == [w[0][0] for w in want], case
    for got_ids, got_p, w in zip(ids, probabilities, want, strict=True):
        assert got_ids == [c for c, _ in w], case
        assert np.abs(np.array(got_p) - [p for _, p in w]).max() <= PROBABILITY_TOLERANCE, case


# --------------------------------------------------------------------------- the standard clients
def test_tritonclient_http_and_grpc_answer_like_v1(server, image_files, fp32, expected, tmp_path):
    np.save(tmp_path / "x.npy", fp32)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "tests.triton_clients", f"--http={server.url[len('http://'):]}",
                           f"--grpc={server.grpc_target}", f"--fp32={tmp_path / 'x.npy'}", *map(str, image_files)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert len(results) == 16                           # 8 ways of sending x batch 1 and 8
    for case, answer in results.items():
        assert "error" not in answer, f"{case}: {answer}"
        k = TOP_K
        ids = answer["top_k_class_id"]
        assert_like_v1(case, ids, answer["top_k_probability"], expected)
        assert answer["class_id"] == [row[0] for row in ids] and all(len(row) == k for row in ids)


def test_kserve_clients_answer_like_v1(server, images, fp32, expected):
    raw = np.array(images, dtype=np.object_)
    b64 = np.array([base64.b64encode(d) for d in images], dtype=np.object_)

    def request(name, datatype, data, binary):
        tensor = InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data, binary_data=binary)
        return InferRequest(MODEL, [tensor], parameters={"top_k": TOP_K})

    def top(response):
        outputs = {o.name: o.as_numpy() for o in response.outputs}
        return outputs["top_k_class_id"].tolist(), outputs["top_k_probability"].tolist()

    async def run():
        rest = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
        channel = InferenceGRPCClient(server.grpc_target, retries=0)
        answers = {}
        try:
            for n in (1, len(images)):
                for case, (name, datatype, data, binary) in {
                        "rest json BYTES base64": ("image", "BYTES", b64, False),
                        "rest binary BYTES raw": ("image", "BYTES", raw, True),
                        "rest json FP32": ("input", "FP32", fp32, False),
                        "rest binary FP32": ("input", "FP32", fp32, True)}.items():
                    sent = request(name, datatype, data[:n], binary)
                    answers[f"{case} x{n}"] = top(await rest.infer(server.url, sent, model_name=MODEL))
                for case, (name, datatype, data) in {"grpc BYTES raw": ("image", "BYTES", raw),
                                                     "grpc FP32": ("input", "FP32", fp32)}.items():
                    answers[f"{case} x{n}"] = top(await channel.infer(request(name, datatype, data[:n], True)))
        finally:
            await rest.close()
            await channel.close()
        return answers

    answers = asyncio.run(run())
    assert len(answers) == 12
    for case, (ids, probabilities) in answers.items():
        assert_like_v1(case, ids, probabilities, expected)


# --------------------------------------------------------------------------- malformed requests
def binary_body(header: dict, *tensors: bytes) -> tuple[bytes, str]:
    text = json.dumps(header).encode()
    return text + b"".join(tensors), str(len(text))


def fp32_header(n: int = 1, size: int | None = None, **extra) -> dict:
    size = 4 * 3072 * n if size is None else size
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [n, 3, 32, 32],
                        "parameters": {"binary_data_size": size}}], **extra}


ZEROS = bytes(4 * 3072)
GOOD_BODY, GOOD_LENGTH = binary_body(fp32_header(), ZEROS)
BYTES_HEADER = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}]}
# name: (body, Inference-Header-Content-Length or None, extra headers, status, text the error must contain)
BAD_BINARY = {
    "header not an integer": (GOOD_BODY, "12x", {}, 400, "expected an integer"),
    "header negative": (GOOD_BODY, "-5", {}, 400, "expected an integer"),
    "header longer than the body": (GOOD_BODY, str(len(GOOD_BODY) + 1), {}, 400, "the body has only"),
    "header cuts the JSON": (GOOD_BODY, str(int(GOOD_LENGTH) - 3), {}, 400, "not a JSON object"),
    "header JSON is a list": (*binary_body([1, 2]), {}, 400, "expected a JSON object"),
    "no inputs": (*binary_body({"inputs": []}), {}, 400, "non-empty list"),
    "a misspelled key": (*binary_body(fp32_header() | {"output": [{"name": "class_id"}]}, ZEROS), {}, 400,
                         "request: unknown key(s) ['output']"),
    "an unknown tensor key": (*binary_body({"inputs": [fp32_header()["inputs"][0] | {"binary": True}]}, ZEROS), {},
                              400, "inputs[0]: unknown key(s) ['binary']"),
    "binary_data_size a string": (*binary_body(fp32_header(size="12288"), ZEROS), {}, 400, "expected a byte count"),
    "binary_data_size negative": (*binary_body(fp32_header(size=-1), ZEROS), {}, 400, "expected a byte count"),
    "binary_data_size past the body": (*binary_body(fp32_header(size=99999), ZEROS), {}, 400, "runs past the end"),
    "bytes after the tensors": (*binary_body(fp32_header(), ZEROS, b"xx"), {}, 400, "sizes and body disagree"),
    "FP32 bytes do not fill the shape": (*binary_body(fp32_header(size=100), ZEROS[:100]), {}, 400,
                                         "not the 4 x 3072 bytes"),
    "FP32 NaN": (*binary_body(fp32_header(), np.full(3072, np.nan, np.float32).tobytes()), {}, 400, "NaN"),
    "FP32 batch too large": (*binary_body(fp32_header(MAX_BATCH + 1), ZEROS * (MAX_BATCH + 1)), {}, 400,
                             "maximum batch"),
    "both data and binary_data_size": (*binary_body({"inputs": [{**fp32_header()["inputs"][0], "data": [0]}]}, ZEROS),
                                       {}, 400, "both 'data'"),
    "BYTES length prefix past the end": (*binary_body(BYTES_HEADER, b"\xff\0\0\0abcde"), {}, 400, "claims 255 bytes"),
    "BYTES cut inside a length": (*binary_body({"inputs": [{**BYTES_HEADER["inputs"][0],
                                                            "parameters": {"binary_data_size": 2}}]}, b"\1\0"),
                                  {}, 400, "4-byte length"),
    "BYTES neither image nor base64": (*binary_body(BYTES_HEADER, b"\5\0\0\0<svg>"), {}, 400, "not valid base64"),
    "output parameter unknown": (*binary_body(fp32_header(outputs=[{"name": "class_id",
                                                                     "parameters": {"classification": 3}}]), ZEROS),
                                 {}, 400, "unknown parameter"),
    "oversized binary body": (*binary_body(fp32_header(100), ZEROS * 100), {}, 413, "exceeds the limit"),
    "gzip body": (GOOD_BODY, GOOD_LENGTH, {"Content-Encoding": "gzip"}, 415, "uncompressed"),
    "binary header on V1": (GOOD_BODY, GOOD_LENGTH, {"_path": V1}, 400, "V2 /infer requests only"),
    "not JSON, no binary header": (b"\0\1\2", None, {"Content-Type": "application/octet-stream"}, 415,
                                   "send application/json"),
}


def test_malformed_binary_bodies_are_4xx_naming_the_problem(server):
    for case, (body, length, headers, status, text) in BAD_BINARY.items():
        headers = dict(headers)
        path = headers.pop("_path", V2)
        if length is not None:
            headers["Inference-Header-Content-Length"] = length
        response = requests.post(server.url + path, data=body, headers=headers, timeout=30)
        assert response.status_code == status, f"{case}: {response.status_code} {response.text[:300]}"
        assert text.lower() in response.json()["error"].lower(), f"{case}: {response.text[:300]}"
    good = requests.post(server.url + V2, data=GOOD_BODY, timeout=30,
                         headers={"Inference-Header-Content-Length": GOOD_LENGTH})
    assert good.status_code == 200 and 0 <= good.json()["outputs"][0]["data"][0] < 43
    log = server.log.read_text()
    assert "generic_exception_handler" not in log and "Exception in ASGI application" not in log


def test_an_answer_with_binary_tensors_says_it_is_octet_stream(server):
    """The binary tensor extension's answer is JSON followed by raw tensors: application/octet-stream,
    as the extension's own example answers (KServe sends none); a JSON answer stays JSON."""
    body, length = binary_body(fp32_header(parameters={"binary_data_output": True}), ZEROS)
    answer = requests.post(server.url + V2, data=body, timeout=30, headers={"Inference-Header-Content-Length": length})
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/octet-stream"
    json_length = int(answer.headers["inference-header-content-length"])
    header = json.loads(answer.content[:json_length])
    sizes = [o["parameters"]["binary_data_size"] for o in header["outputs"]]
    assert len(answer.content) == json_length + sum(sizes)
    class_id = np.frombuffer(answer.content[json_length:json_length + sizes[0]], dtype=np.int64)
    assert 0 <= class_id[0] < 43
    plain = requests.post(server.url + V2, data=GOOD_BODY, timeout=30,
                          headers={"Inference-Header-Content-Length": GOOD_LENGTH})
    assert plain.headers["content-type"] == "application/json"
    assert "inference-header-content-length" not in plain.headers


def test_json_without_a_content_type_or_with_a_charset_is_json(server):
    body = json.dumps({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                                   "data": [0.0] * 3072}]}).encode()
    for headers in ({}, {"Content-Type": "application/json; charset=utf-8"}):
        # requests adds no Content-Type for a bytes body
        response = requests.post(server.url + V2, data=body, headers=headers, timeout=30)
        assert response.status_code == 200, f"{headers}: {response.text[:300]}"


def test_bad_grpc_requests_are_errors_naming_the_problem_in_one_log_line(server):
    def request(data: np.ndarray, model=MODEL, version=None, shape=None, **parameters):
        tensor = InferInput("input", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data.astype(np.float32))
        tensor.shape = shape or tensor.shape
        return InferRequest(model, [tensor], parameters=parameters or None, model_version=version)

    zeros = np.zeros((1, 3, 32, 32))
    cases = {"NaN": (request(np.full((1, 3, 32, 32), np.nan)), grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
             "top_k out of range": (request(zeros, top_k=99), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
             "top_k a string": (request(zeros, top_k="3"), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
             "batch too large": (request(np.zeros((MAX_BATCH + 1, 3, 32, 32))), grpc.StatusCode.INVALID_ARGUMENT,
                                 "maximum batch"),
             "over the body limit": (request(np.zeros((100, 3, 32, 32))), grpc.StatusCode.RESOURCE_EXHAUSTED,
                                     "larger than max"),
             "a negative dimension": (request(zeros, shape=[-1, 3, 32, 32]), grpc.StatusCode.INVALID_ARGUMENT,
                                      "shape [-1, 3, 32, 32] has a negative dimension"),
             "unknown model": (request(zeros, model="nope"), grpc.StatusCode.NOT_FOUND,
                               "Model with name nope does not exist"),
             "a version not served": (request(zeros, version="7"), grpc.StatusCode.NOT_FOUND,
                                      f"model {MODEL} version '7' is not served here; this server serves version "
                                      "'sha256:")}

    async def run():
        client = InferenceGRPCClient(server.grpc_target, retries=0)
        errors = {}
        try:
            for case, (infer_request, _, _) in cases.items():
                try:
                    await client.infer(infer_request)
                except grpc.RpcError as e:
                    errors[case] = (e.code(), e.details())
            good = await client.infer(request(zeros))
            pinned = await client.infer(request(zeros, version=served_version))    # the version served: answered
        finally:
            await client.close()
        return errors, good, pinned

    served_version = requests.get(f"{server.url}/v2/models/{MODEL}", timeout=30).json()["versions"][0]
    before = server.log.read_text()
    errors, good, pinned = asyncio.run(run())
    assert pinned.outputs[0].as_numpy().tolist() == good.outputs[0].as_numpy().tolist()
    for case, (_, code, text) in cases.items():
        assert case in errors, f"{case}: answered"
        assert errors[case][0] == code and text in errors[case][1], f"{case}: {errors[case]}"
    assert 0 <= good.outputs[0].as_numpy()[0] < 43
    new = server.log.read_text()[len(before):]
    # one line per error but the size limit, which is gRPC's own answer
    assert new.count("WARNING") == len(cases) - 1 and new.count("NOT_FOUND") == 2
    assert "Traceback" not in new and "ERROR" not in new


def test_grpc_requests_kserve_would_misread_are_invalid_argument_with_bounded_messages(server, images):
    """What a hostile client got from the gRPC server: UNKNOWN for bytes that are not a
    ModelInferRequest (nothing logged), answers for tensors with two contents fields or an empty
    parameter, RESOURCE_EXHAUSTED ("Stream removed") for a message too long for the trailers,
    and a log line a newline in a tensor's name could forge."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    def tensor(name="image", shape=(1,), contents=None, **parameters):
        contents = contents or pb.InferTensorContents(bytes_contents=[images[0]])
        return pb.ModelInferRequest.InferInputTensor(name=name, datatype="BYTES", shape=list(shape),
                                                     contents=contents, parameters=parameters)

    forged = "x\n2026-12-07 06:00:00.000 1 kserve ERROR [fake.py] injected line"
    cases = {
        "not a ModelInferRequest": (b"\x0a\x02\xff\xfe", "the request is not a valid protobuf message for "
                                                         "/inference.GRPCInferenceService/ModelInfer (DecodeError"),
        "a shape of 5,000 dimensions": (pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(shape=[1] * 5000)]),
                                        "input 'image': a shape of 5000 dimensions; at most 8"),
        "two contents fields": (pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(contents=pb.InferTensorContents(
            bytes_contents=[images[0]], int_contents=[1]))]), "input 'image': contents in 2 fields (int_contents, "
                                                               "bytes_contents); send the one field of datatype BYTES"),
        "an empty parameter": (pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(
            content_type=pb.InferParameter())]), "input 'image': parameters.content_type has no value KServe reads"),
        "a long name": (pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(name="n" * 20_000)]),
                        "... (20117 chars)"),
        "a forged log line": (pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(name=forged)]), "unknown input"),
        "a binary_data_size that lies": (pb.ModelInferRequest(
            model_name=MODEL, inputs=[tensor(contents=pb.InferTensorContents(), binary_data_size=pb.InferParameter(
                int64_param=5))], raw_input_contents=[len(images[0]).to_bytes(4, "little") + images[0]]),
            f"input 'image': parameters.binary_data_size is not the size of its raw_input_contents "
            f"({len(images[0]) + 4} bytes)"),
        "a binary_data_size without raw contents": (pb.ModelInferRequest(model_name=MODEL, inputs=[tensor(
            binary_data_size=pb.InferParameter(int64_param=5))]), "parameters.binary_data_size goes with "
                                                                  "raw_input_contents; this input has none"),
    }
    before = server.log.read_text()
    with grpc.insecure_channel(server.grpc_target) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer",
                                    request_serializer=lambda r: r if isinstance(r, bytes) else r.SerializeToString(),
                                    response_deserializer=pb.ModelInferResponse.FromString)
        for case, (request, text) in cases.items():
            with pytest.raises(grpc.RpcError) as refused:
                infer(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, f"{case}: {refused.value}"
            assert text in refused.value.details() and len(refused.value.details()) <= 1100, case
        good = infer(pb.ModelInferRequest(model_name=MODEL, inputs=[tensor()]), timeout=30)
    assert 0 <= good.outputs[0].contents.int64_contents[0] < 43
    new = server.log.read_text()[len(before):]
    lines = new.splitlines()
    assert len(lines) == len(cases) and all(" WARNING " in line for line in lines), new[-3000:]
    assert "input 'x\\n2026-12-07 06:00:00.000 1 kserve ERROR [fake.py] injected line'" in new    # escaped


def test_grpc_repository_calls_are_unimplemented_and_the_model_stays_loaded(server, images):
    """Issue 12's unload, over gRPC: KServe's servicer offers RepositoryModelLoad/Unload, and one
    Unload call removed the model from the gRPC server (NOT_FOUND from then on). Each call is now
    UNIMPLEMENTED with one WARNING line; the model stays ready and answers exactly as before."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    def infer(stub):
        request = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
            name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[images[0]]))])
        outputs = stub.ModelInfer(request, timeout=30).outputs
        return {o.name: list(o.contents.int64_contents or o.contents.fp32_contents) for o in outputs}

    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        before = infer(stub)
        log_before = server.log.read_text()
        calls = [("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name=MODEL)),
                 ("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name=MODEL)),
                 ("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(model_name="nope"))]
        for method, request in calls:
            with pytest.raises(grpc.RpcError) as refused:
                getattr(stub, method)(request, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
            assert refused.value.details().startswith(f"{method} is not offered"), refused.value.details()
            assert stub.ModelReady(pb.ModelReadyRequest(name=MODEL), timeout=30).ready
            assert infer(stub) == before
        # and the server's metadata does not list the model repository extension
        assert list(stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=30).extensions) == ["binary_tensor_data"]
    new = server.log.read_text()[len(log_before):]
    assert new.count("WARNING") == len(calls) and new.count("-> UNIMPLEMENTED") == len(calls)
    assert "Traceback" not in new and "ERROR" not in new


def test_a_grpc_channel_with_500_concurrent_calls_gets_every_answer(server, images):
    """gRPC clients multiplex calls on one channel: 500 at once must all be answered (a server limit
    of 100 concurrent streams made gRPC's own client fail 16 of them with UNAVAILABLE)."""
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    request = pb.ModelInferRequest(model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
        name="image", datatype="BYTES", shape=[1], contents=pb.InferTensorContents(bytes_contents=[images[0]]))])

    async def run():
        async with grpc.aio.insecure_channel(server.grpc_target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return await asyncio.gather(*(stub.ModelInfer(request, timeout=120) for _ in range(500)),
                                        return_exceptions=True)

    answers = asyncio.run(run())
    failed = [a for a in answers if isinstance(a, Exception)]
    assert not failed, f"{len(failed)} of 500 failed, first: {failed[0]}"
    assert len({a.outputs[0].contents.int64_contents[0] for a in answers}) == 1
