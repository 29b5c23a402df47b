"""The client's retries against a stand-in server that fails the way a replica dying behind a proxy does: the
status line and headers arrive, then the connection closes before the body's end."""

from __future__ import annotations

import http.client
import io
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from fastdiff.serving.client import Client

pytestmark = pytest.mark.http

SAMPLES = np.arange(6, dtype=np.float32).reshape(3, 2)


@contextmanager
def cut_off_server(failures: int):
    """Answers POSTs; the first ``failures`` promise a body and close the connection without sending it."""
    buf = io.BytesIO()
    np.save(buf, SAMPLES)
    body = buf.getvalue()
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if len(seen) > failures:
                self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_a_response_cut_off_mid_body_is_retried_with_the_same_request():
    with cut_off_server(failures=2) as (url, seen):
        client = Client(url, timeout=10, retries=2, backoff=0.01)
        assert np.array_equal(client.sample(n=3, seed=5), SAMPLES)
        assert client.attempts == 3 and seen == ["/v1/samples"] * 3


def test_without_retries_a_cut_off_response_raises():
    with cut_off_server(failures=1) as (url, _):
        with pytest.raises(http.client.IncompleteRead):
            Client(url, timeout=10).sample(n=3, seed=5)
