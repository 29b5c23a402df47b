"""An in-process server for tests: ``fastdiff serve``'s uvicorn server (draining, guarded) in a thread on a free
loopback port."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastdiff.pipeline import Pipeline
from fastdiff.serving.api import Limits
from fastdiff.serving.app import create_app
from fastdiff.serving.client import Client
from fastdiff.serving.guards import HttpGuards
from fastdiff.serving.metrics import ServingMetrics
from fastdiff.serving.runner import Runner
from fastdiff.serving.server import draining_server


@contextmanager
def serving(
    pipe: Pipeline,
    limits: Limits = Limits(),
    guards: HttpGuards = HttpGuards(),
    header_timeout_s: float = 10.0,
    **runner_kwargs: Any,
) -> Iterator[tuple[Client, Runner]]:
    """An in-process server on a free loopback port (``fastdiff serve``'s uvicorn server in a thread), stopped on
    exit."""
    runner = Runner(pipe, metrics=ServingMetrics(), **runner_kwargs)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = draining_server(create_app(runner, limits, guards=guards), header_timeout_s, log_level="error")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield Client(f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=60), runner
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        assert not thread.is_alive()
