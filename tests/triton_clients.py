"""Triton's Open Inference Protocol clients (tritonclient http and grpc) against a running predictor.

    python -m tests.triton_clients --http 127.0.0.1:8080 --grpc 127.0.0.1:8081 --fp32 x.npy IMAGE...

Prints one JSON object: for each way of sending (client, JSON or binary, BYTES raw or base64, or
FP32 from the .npy of the images' normalized tensors) and batch size (1 and all images), the
answers' top-k class ids and probabilities, or the error. A separate process: tritonclient.grpc
and kserve register the same protobuf message names, so one process cannot import both.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path

import numpy as np

MODEL = "gtsrb"
TOP_K = 3


def _answer(result) -> dict:
    return {"class_id": result.as_numpy("class_id").tolist(),
            "top_k_class_id": result.as_numpy("top_k_class_id").tolist(),
            "top_k_probability": result.as_numpy("top_k_probability").tolist()}


def http_case(client, name: str, datatype: str, data: np.ndarray, binary: bool, binary_outputs: bool) -> dict:
    import tritonclient.http as http

    tensor = http.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    outputs = [http.InferRequestedOutput(o, binary_data=binary_outputs)
               for o in ("class_id", "top_k_class_id", "top_k_probability")]
    return _answer(client.infer(MODEL, [tensor], outputs=outputs, parameters={"top_k": TOP_K}))


def grpc_case(client, name: str, datatype: str, data: np.ndarray) -> dict:
    import tritonclient.grpc as grpc

    tensor = grpc.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return _answer(client.infer(MODEL, [tensor], parameters={"top_k": TOP_K}))


def run(http_target: str, grpc_target: str, images: list[bytes], fp32: np.ndarray) -> dict:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    raw = np.array(images, dtype=np.object_)
    b64 = np.array([base64.b64encode(d) for d in images], dtype=np.object_)
    http_client, grpc_client = http.InferenceServerClient(http_target), grpc.InferenceServerClient(grpc_target)
    cases = {
        "http json BYTES base64": lambda n: http_case(http_client, "image", "BYTES", b64[:n], False, False),
        "http binary BYTES raw": lambda n: http_case(http_client, "image", "BYTES", raw[:n], True, True),
        "http binary BYTES base64": lambda n: http_case(http_client, "image", "BYTES", b64[:n], True, False),
        "http json FP32": lambda n: http_case(http_client, "input", "FP32", fp32[:n], False, True),
        "http binary FP32": lambda n: http_case(http_client, "input", "FP32", fp32[:n], True, True),
        "grpc BYTES raw": lambda n: grpc_case(grpc_client, "image", "BYTES", raw[:n]),
        "grpc BYTES base64": lambda n: grpc_case(grpc_client, "image", "BYTES", b64[:n]),
        "grpc FP32": lambda n: grpc_case(grpc_client, "input", "FP32", fp32[:n]),
    }
    results = {}
    for case, call in cases.items():
        for n in (1, len(images)):
            try:
                results[f"{case} x{n}"] = call(n)
            except Exception as e:       # reported, the caller decides
                results[f"{case} x{n}"] = {"error": f"{type(e).__name__}: {e}"}
    http_client.close()
    grpc_client.close()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--http", required=True, help="host:port of the REST server")
    parser.add_argument("--grpc", required=True, help="host:port of the gRPC server")
    parser.add_argument("--fp32", type=Path, required=True, help=".npy: the images' normalized N x 3 x 32 x 32")
    parser.add_argument("images", type=Path, nargs="+")
    args = parser.parse_args(argv)
    fp32 = np.load(args.fp32).astype(np.float32)
    print(json.dumps(run(args.http, args.grpc, [p.read_bytes() for p in args.images], fp32)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
