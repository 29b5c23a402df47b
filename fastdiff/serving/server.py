"""``fastdiff serve``: loads a network, builds the runner and the app, and serves it with uvicorn.

SIGTERM (or Ctrl-C) stops taking requests at once (``/readyz`` answers 503, new requests 503), lets uvicorn
finish the responses in flight (the runner keeps ticking until every accepted request has its answer), then
stops the runner and exits by that signal (uvicorn re-raises it, so a supervisor sees how the process ended).
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from typing import Any

import torch

from fastdiff.extras import missing_extra

try:
    import uvicorn
    from fastapi import FastAPI
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

from fastdiff.pipeline import Pipeline
from fastdiff.serving.api import Limits
from fastdiff.serving.app import create_app
from fastdiff.serving.metrics import ServingMetrics
from fastdiff.serving.runner import Runner
from fastdiff.serving.settings import ServeSettings


def load_pipeline(spec: str | None = None, device: str | None = None) -> Pipeline:
    """The pipeline named by ``spec``: None or ``"digits"`` (the embedded digits network), a checkpoint path
    (``*.safetensors``, :func:`fastdiff.load`) or ``"package.module:factory"`` (a callable returning a
    :class:`Pipeline`)."""
    if spec is None or spec == "digits":
        from fastdiff.pretrained import digits

        return digits(device=device)
    if spec.endswith(".safetensors"):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"no checkpoint at {spec!r}")
        from fastdiff.checkpoint import load

        return load(spec, device=device)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(
            f"--model must be 'digits', a .safetensors checkpoint or 'package.module:factory', got {spec!r}"
        )
    factory = getattr(importlib.import_module(module_name), attr)
    pipe = factory()
    if not isinstance(pipe, Pipeline):
        raise TypeError(f"{spec} returned {type(pipe).__name__}, expected a fastdiff.Pipeline")
    return pipe


def make_app(pipe: Pipeline, settings: ServeSettings = ServeSettings(), replica: str | None = None) -> FastAPI:
    """The HTTP app over a new runner for ``pipe`` (its metrics on), as ``fastdiff serve`` and each Ray replica
    run it."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    runner = Runner(
        pipe,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        batching=settings.batching,
        batch_wait_s=settings.batch_wait_s,
        metrics=ServingMetrics(),
    )
    limits = Limits(max_n=min(settings.max_n, settings.max_batch), default_timeout_s=settings.request_timeout_s)
    return create_app(runner, limits, replica=replica)


def serve(
    pipe: Pipeline,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings = ServeSettings(),
    log_level: str = "warning",
    **uvicorn_kwargs: Any,
) -> None:
    """Serves ``pipe`` until SIGTERM/SIGINT (see the module docstring). ``port=0`` picks a free port; the
    address served is printed as ``fastdiff serving on http://host:port``."""
    app = make_app(pipe, settings)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made once the address is printed wait in the backlog until uvicorn runs
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=None, **uvicorn_kwargs)
    server = DrainingServer(config, app.state.runner)
    print(
        f"fastdiff serving on http://{host}:{sock.getsockname()[1]} (batching: {settings.batching}, max batch "
        f"{settings.max_batch}, max queue {settings.max_queue})",
        flush=True,
    )
    server.run(sockets=[sock])


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the runner closed to new requests the moment a shutdown signal arrives."""

    def __init__(self, config: uvicorn.Config, runner: Runner):
        super().__init__(config)
        self.runner = runner

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.runner.close()
        print(
            f"fastdiff: signal {sig}: draining {self.runner.queue_depth} queued requests and "
            f"{self.runner.running_rows} running rows",
            file=sys.stderr,
            flush=True,
        )
        super().handle_exit(sig, frame)
