"""Each KServe server worker listens on its own SO_REUSEPORT socket, so connections spread."""

import socket
import subprocess
from pathlib import Path

import pytest

from components.serving.listen import ReusePortMultiProcess, install, reuse_port_socket


def test_sockets_of_one_port_share_the_connections():
    first = reuse_port_socket(("127.0.0.1", 0))
    port = first.getsockname()[1]
    second = reuse_port_socket(("127.0.0.1", port))
    listeners = [first, second]
    clients = []
    try:
        for sock in listeners:
            sock.listen(64)
            sock.setblocking(False)
        clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(32)]
        accepted = []
        for sock in listeners:
            count = 0
            while True:
                try:
                    sock.accept()[0].close()
                except BlockingIOError:
                    break
                count += 1
            accepted.append(count)
        assert sum(accepted) == 32
        assert min(accepted) >= 1, accepted      # all 32 on one socket: probability 2 / 2**32
    finally:
        for sock in listeners + clients:
            sock.close()


def test_a_port_in_use_without_reuse_port_is_refused():
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        try:
            reuse_port_socket(plain.getsockname())
        except OSError as e:
            assert e.errno == 98              # EADDRINUSE: the group cannot include a plain socket
        else:
            raise AssertionError("bound next to a socket without SO_REUSEPORT")


def test_install_makes_kserve_use_it(monkeypatch):
    from kserve import model_server

    monkeypatch.setattr(model_server, "RESTServerMultiProcess", model_server.RESTServerMultiProcess)
    install()
    assert model_server.RESTServerMultiProcess is ReusePortMultiProcess


def listening_addresses(port: int) -> set[str]:
    """The addresses a TCP socket listens on at ``port`` (Linux: /proc/net/tcp and tcp6; an IPv6
    socket on an IPv4-mapped address, as gRPC binds 127.0.0.1, is that IPv4 address)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:            # 0A: LISTEN
                raw = b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, len(address), 8))
                text = socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)
                found.add(text.removeprefix("::ffff:") if text.startswith("::ffff:") and "." in text else text)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("host, rest, grpc", [("127.0.0.1", {"127.0.0.1"}, {"127.0.0.1"}),
                                              (None, {"0.0.0.0"}, {"::"})])
def test_a_started_server_listens_on_its_host_only(trained_model, host, rest, grpc):
    """`make serve` (--host 127.0.0.1): REST (both workers' sockets) and gRPC on loopback only; no
    --host (the InferenceService's pod): every interface, as KServe binds them."""
    from components.serving.client import local_predictor

    with local_predictor(str(trained_model), "eager", workers=2, grpc=True, host=host) as served:
        rest_port, grpc_port = int(served.url.rsplit(":", 1)[1]), int(served.grpc_target.rsplit(":", 1)[1])
        assert listening_addresses(rest_port) == rest
        assert listening_addresses(grpc_port) == grpc


def test_make_serve_listens_on_loopback():
    out = subprocess.run(["make", "-n", "serve"], cwd=Path(__file__).resolve().parents[1], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    assert "-m components.serving --summary runs/latest/summary.json --host 127.0.0.1 " in out


@pytest.mark.slow
def test_a_grpc_call_that_never_sends_its_request_ends_with_its_connection(trained_model, monkeypatch):
    """grpc.aio never answers a unary call whose client half-closes without a request: it stayed
    open until the client's deadline (for good without one). Connections now end after an age
    (GTSRB_GRPC_CONNECTION_AGE_S, 1 s here; 300 s by default) plus a grace, and the call with them;
    the client's next call is answered on a new connection."""
    import time

    import grpc
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb

    from components.serving.client import local_predictor

    monkeypatch.setenv("GTSRB_GRPC_CONNECTION_AGE_S", "1")
    with local_predictor(str(trained_model), "eager", workers=1, grpc=True) as served, \
            grpc.insecure_channel(served.grpc_target) as channel:
        method = "/inference.GRPCInferenceService/ModelInfer"
        silent = channel.stream_stream(method, request_serializer=bytes, response_deserializer=bytes)
        start = time.monotonic()
        with pytest.raises(grpc.RpcError) as ended:
            list(silent(iter([]), timeout=30))
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - start < 10
        infer = channel.unary_unary(method, request_serializer=pb.ModelInferRequest.SerializeToString,
                                    response_deserializer=pb.ModelInferResponse.FromString)
        tensor = pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3, 32, 32],
                                                       contents=pb.InferTensorContents(fp32_contents=[0.0] * 3072))
        answer = infer(pb.ModelInferRequest(model_name="gtsrb", inputs=[tensor]), timeout=30)
        assert 0 <= answer.outputs[0].contents.int64_contents[0] < 43
