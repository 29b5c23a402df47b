"""Servers for tests: ``fastdiff serve``'s uvicorn server (draining, guarded) in a thread on a free loopback port,
a ``fastdiff serve`` process, and one raw HTTP exchange."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from repo_paths import TESTS

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


def start_serve(flags: list[str], **env: str) -> tuple[subprocess.Popen, str]:
    """``python -m fastdiff serve *flags`` as a process (tests/ importable, ``env`` added to the environment), once it
    says where it serves: (the process, its base URL). The caller stops it."""
    environment = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), **env)
    proc = subprocess.Popen([sys.executable, "-m", "fastdiff", "serve", *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=environment)  # fmt: skip
    line = proc.stdout.readline()
    if "fastdiff serving on http://127.0.0.1:" not in line:
        proc.kill()
        raise AssertionError((line, proc.stderr.read()))
    return proc, line.split()[3]


def raw_exchange(port: int, payload: bytes) -> bytes:
    """Sends ``payload`` and nothing more on a new connection; everything the server sends until it closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as conn:
        conn.sendall(payload)
        got = b""
        while chunk := conn.recv(65536):
            got += chunk
        return got
