"""``fastdiff serve``: loads a network, builds the runner and the app, and serves it with uvicorn.

SIGTERM (or Ctrl-C) stops taking requests at once but keeps the listening socket open: ``/readyz`` and new
requests answer 503 with ``Retry-After`` while the runner finishes every accepted request. Once none is left,
uvicorn closes the listener, sends the last responses, the runner stops and the process exits by that signal
(uvicorn re-raises it, so a supervisor sees how the process ended). A second Ctrl-C exits at once.

Connections are bounded: request headers must be complete :attr:`ServeSettings.header_timeout_s` after a
connection opens or after its previous response (:func:`with_header_timeout`; uvicorn's ``timeout_keep_alive``
only covers an idle connection after a response, until its next byte), and the app's guards bound the body's
size and read time (:class:`~fastdiff.serving.guards.BodyGuard`).
"""

from __future__ import annotations

import asyncio
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
    from uvicorn.config import HTTP_PROTOCOLS
    from uvicorn.importer import import_from_string
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

from fastdiff.diffusers.text_to_image import TextToImage, load_text_to_image
from fastdiff.pipeline import Pipeline
from fastdiff.serving.api import Limits
from fastdiff.serving.app import create_app
from fastdiff.serving.guards import HttpGuards
from fastdiff.serving.images import ImageLimits
from fastdiff.serving.metrics import ServingMetrics
from fastdiff.serving.prompts import PromptFrontend
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


def load_text_to_image_pipeline(path: str, device: str | None = None) -> TextToImage:
    """``fastdiff serve --diffusers PATH``: the diffusers pipeline saved at ``path`` (or a hub id), checked to be
    one of :data:`~fastdiff.diffusers.text_to_image.SUPPORTED_PIPELINES`; needs diffusers and transformers."""
    for module in ("diffusers", "transformers"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise missing_extra("images", exc) from exc
    return load_text_to_image(path, device)


def make_app(
    model: Pipeline | TextToImage, settings: ServeSettings = ServeSettings(), replica: str | None = None
) -> FastAPI:
    """The HTTP app over a new runner for ``model`` (its metrics on), as ``fastdiff serve`` and each Ray replica
    run it: a :class:`Pipeline` (``/v1/samples``), or a text-to-image pipeline (also
    ``/v1/images/generations``: its prompts encoded and its latents decoded around the engine)."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    pipe, frontend = (model.pipe, PromptFrontend(model)) if isinstance(model, TextToImage) else (model, None)
    runner = Runner(
        pipe,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        batching=settings.batching,
        batch_wait_s=settings.batch_wait_s,
        metrics=ServingMetrics(),
        frontend=frontend,
    )
    limits = Limits(max_n=min(settings.max_n, settings.max_batch), default_timeout_s=settings.request_timeout_s)
    guards = HttpGuards(settings.max_body_bytes, settings.body_timeout_s, settings.api_key)
    return create_app(runner, limits, replica=replica, guards=guards, image_limits=ImageLimits(settings.max_pixels))


def serve(
    pipe: Pipeline | TextToImage,
    host: str = "127.0.0.1",
    port: int = 8000,
    settings: ServeSettings = ServeSettings(),
    log_level: str = "warning",
    **uvicorn_kwargs: Any,
) -> None:
    """Serves ``pipe`` (or a text-to-image pipeline, :func:`make_app`) until SIGTERM/SIGINT (see the module
    docstring). ``port=0`` picks a free port; the address served is printed as ``fastdiff serving on
    http://host:port``."""
    app = make_app(pipe, settings)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made once the address is printed wait in the backlog until uvicorn runs
    server = draining_server(app, settings.header_timeout_s, log_level, **uvicorn_kwargs)
    print(
        f"fastdiff serving on http://{host}:{sock.getsockname()[1]} (batching: {settings.batching}, max batch "
        f"{settings.max_batch}, max queue {settings.max_queue})",
        flush=True,
    )
    server.run(sockets=[sock])


def draining_server(
    app: FastAPI, header_timeout_s: float = 10.0, log_level: str = "warning", **uvicorn_kwargs: Any
) -> DrainingServer:
    """The uvicorn server ``fastdiff serve`` runs ``app`` (from :func:`make_app`) with: its HTTP protocol
    (``http=``, default ``"auto"``) under :func:`with_header_timeout`, draining as the module docstring says."""
    http = uvicorn_kwargs.pop("http", "auto")
    protocol = import_from_string(HTTP_PROTOCOLS[http]) if isinstance(http, str) else http
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=None,
        http=with_header_timeout(protocol, header_timeout_s),
        **uvicorn_kwargs,
    )
    return DrainingServer(config, app.state.runner)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, with the runner closed to new requests the moment a shutdown signal arrives and the
    listener kept open (answering 503) until the runner holds no request."""

    def __init__(self, config: uvicorn.Config, runner: Runner):
        super().__init__(config)
        self.runner = runner

    def handle_exit(self, sig: int, frame: Any) -> None:
        """Closes the runner to new requests, then uvicorn's own handling (a second SIGINT: exit at once)."""
        self.runner.close()
        print(
            f"fastdiff: signal {sig}: draining {self.runner.queue_depth} queued requests and "
            f"{self.runner.running_rows} running rows",
            file=sys.stderr,
            flush=True,
        )
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's check (every 0.1 s), holding a signalled exit back while accepted requests remain."""
        should_exit = await super().on_tick(counter)
        if should_exit and self.should_exit and not self.force_exit:
            return self.runner.in_flight == 0
        return should_exit


def with_header_timeout(protocol: type[asyncio.Protocol], timeout_s: float) -> type[asyncio.Protocol]:
    """``protocol`` (uvicorn's h11 or httptools HTTP/1.1 protocol) closing a connection whose request headers are
    not complete ``timeout_s`` after it opened or after its previous response; when part of a request came, it
    answers 408 first. (A request whose headers arrived is the body guard's to time out.)"""

    class HeaderDeadline(protocol):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _awaited: Any = None  # the cycle that was current when the deadline was set
        _partial = 0  # bytes received since then, while no request was in progress

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._set_deadline()

        def data_received(self, data: bytes) -> None:
            if self.cycle is None or self.cycle.response_complete:
                self._partial += len(data)
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._set_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

        def _set_deadline(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._awaited, self._partial = self.cycle, 0
            if not self.transport.is_closing():
                self._deadline = self.loop.call_later(timeout_s, self._deadline_passed)

        def _deadline_passed(self) -> None:
            self._deadline = None
            waiting = self.cycle is self._awaited and (self.cycle is None or self.cycle.response_complete)
            if not waiting or self.transport.is_closing():
                return
            if self._partial:
                self.transport.write(REQUEST_TIMEOUT_RESPONSE)
            self.transport.close()

    HeaderDeadline.__name__ = HeaderDeadline.__qualname__ = f"HeaderDeadline{protocol.__name__}"
    return HeaderDeadline


REQUEST_TIMEOUT_RESPONSE = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
