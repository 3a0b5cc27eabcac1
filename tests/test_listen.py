"""Each KServe server worker listens on its own SO_REUSEPORT socket, so connections spread."""

import socket

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
