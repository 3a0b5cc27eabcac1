"""`make predict` and `python -m components.serve check`: every problem a newcomer meets first (no
server, a wrong image path, no run yet, something else on the port) is one line and a non-zero exit."""

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from components import serve
from components.serving.client import free_port

IMAGE = "gtsrb/GTSRB/Final_Test/Images/00000.ppm"


def test_predict_an_image_that_does_not_exist(tmp_path, capsys):
    assert serve.main(["predict", str(tmp_path / "nope.ppm")]) == 1
    assert capsys.readouterr().err == f"predict: cannot read {tmp_path / 'nope.ppm'}: No such file or directory\n"


def test_predict_with_no_server(sample_dir, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert serve.main(["predict", str(sample_dir / IMAGE), "--url", url]) == 1
    assert capsys.readouterr().err == (f"predict: no predictor answers at {url} (Connection refused): start it with "
                                       "`make serve`, or check SERVE_PORT\n")


def test_predict_with_another_server_on_the_port(sample_dir, capsys):
    class Html(BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(404)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(b"<html>not here</html>")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Html)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        assert serve.main(["predict", str(sample_dir / IMAGE), "--url", url]) == 1
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert capsys.readouterr().err == (f"predict: the answer from {url} is not JSON: is another server listening "
                                       "on SERVE_PORT?\n")


def test_check_with_no_run(tmp_path, capsys):
    assert serve.main(["check", "--summary", str(tmp_path / "summary.json")]) == 1
    assert capsys.readouterr().err == f"check: {tmp_path / 'summary.json'} not found: run `make local` first\n"
