"""The HTTP server's application (FastAPI): ``POST /v1/samples``, ``GET /v1/info``, ``/healthz``, ``/readyz``,
``/metrics``.

Every accepted request gets its samples or an error, never silence: 422 for a field the server refuses, 429 with
``Retry-After`` when the queue is full, 503 while shutting down, 504 past its deadline, 500 when its samples
became NaN/Inf or the network raised (only that request fails). A client that disconnects has its rows dropped
at the next tick.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastdiff.extras import missing_extra

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

from fastdiff.serving.api import (
    BATCHABLE_SAMPLERS,
    FieldError,
    Limits,
    SamplesBody,
    npy_bytes,
    png_payload,
    to_sample_request,
)
from fastdiff.serving.engine import RequestCancelled, RequestFailed
from fastdiff.serving.metrics import CONTENT_TYPE_LATEST
from fastdiff.serving.runner import DeadlineExceeded, QueueFull, Runner, ShuttingDown

DISCONNECT_POLL_S = 0.05
NPY_MEDIA_TYPE = "application/x-npy"


# How a request that did not finish is answered: the first matching exception type gives the status.
FAILURE_STATUS = ((DeadlineExceeded, 504), (RequestCancelled, 499), (RequestFailed, 500), (ShuttingDown, 503))


def create_app(runner: Runner, limits: Limits = Limits(), replica: str | None = None) -> FastAPI:
    """The app serving ``runner`` (started with the app, drained when it shuts down). With ``replica`` (a
    name), every response carries ``X-Fastdiff-Replica: <replica>`` and ``X-Fastdiff-Pid`` (Ray Serve
    replicas)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        runner.start()
        try:
            yield
        finally:
            await asyncio.to_thread(runner.stop, True)

    app = FastAPI(
        title="fastdiff", description="Diffusion sampling with step-level continuous batching", lifespan=lifespan
    )
    app.state.runner = runner
    app.state.limits = limits
    if replica is not None:
        app.middleware("http")(_replica_headers(replica))
    app.post("/v1/samples")(_samples_endpoint(runner, limits))
    _add_status_routes(app, runner, limits)
    return app


def _replica_headers(replica: str) -> Callable[..., Any]:
    async def name_the_replica(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["X-Fastdiff-Replica"] = replica
        response.headers["X-Fastdiff-Pid"] = str(os.getpid())
        return response

    return name_the_replica


def _samples_endpoint(runner: Runner, limits: Limits) -> Callable[..., Any]:
    async def samples(body: SamplesBody, request: Request) -> Response:
        """Samples ``body.n`` images; the body is a float32 ``.npy`` (``format: "npy"``) or JSON of PNGs."""
        try:
            sample_request, timeout = to_sample_request(body, runner.pipe, limits)
        except FieldError as exc:
            return JSONResponse({"detail": exc.detail()}, status_code=422)
        try:
            ticket = runner.submit(sample_request, timeout)
        except QueueFull as exc:
            return JSONResponse(
                {"detail": str(exc)}, status_code=429, headers={"Retry-After": str(math.ceil(exc.retry_after))}
            )
        except ShuttingDown as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        future = await _until_done(runner, ticket, request)
        headers = {
            "X-Fastdiff-Request-Id": str(ticket.id),
            "X-Fastdiff-Latency": f"{time.monotonic() - ticket.submitted:.4f}",
        }
        return _answer(future, body.format, headers)

    return samples


async def _until_done(runner: Runner, ticket: Any, request: Request) -> asyncio.Future:
    """Waits for the ticket's result, cancelling the request if the client goes away meanwhile."""
    future = asyncio.wrap_future(ticket.future)
    while not future.done():
        await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
        if not future.done() and await request.is_disconnected():
            runner.cancel(ticket, RequestCancelled(f"request {ticket.id}: the client disconnected"))
            await asyncio.wait([future])
    return future


def _answer(future: asyncio.Future, fmt: str, headers: dict) -> Response:
    """The samples as ``.npy`` or PNG JSON, or the error a request that did not finish gets."""
    try:
        result = future.result()
    except Exception as exc:  # noqa: BLE001  (the network raised: this request fails, the server goes on)
        for kind, status in FAILURE_STATUS:
            if isinstance(exc, kind):  # RequestCancelled: nobody is listening; answered for the log's sake
                return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)
        return JSONResponse({"detail": f"sampling failed: {exc}"}, status_code=500, headers=headers)
    if fmt == "png":
        return JSONResponse(png_payload(result), headers=headers)
    headers["X-Fastdiff-Shape"] = ",".join(str(s) for s in result.shape)
    return Response(npy_bytes(result), media_type=NPY_MEDIA_TYPE, headers=headers)


def _add_status_routes(app: FastAPI, runner: Runner, limits: Limits) -> None:
    """``/v1/info``, ``/healthz``, ``/readyz`` and ``/metrics``."""

    @app.get("/v1/info")
    async def info() -> dict:
        """What this server samples: sample shape, class count, prediction, samplers and limits."""
        pipe = runner.pipe
        return {
            "sample_shape": None if pipe.sample_shape is None else list(pipe.sample_shape),
            "num_classes": pipe.num_classes,
            "prediction": pipe.prediction,
            "samplers": list(BATCHABLE_SAMPLERS),
            "max_n": limits.max_n,
            "max_steps": limits.max_steps,
            "batching": runner.batching,
            "max_batch": runner.max_batch,
        }

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: 200 while requests are taken, 503 once shutting down."""
        if runner.accepting:
            return JSONResponse(
                {"status": "ready", "queue_depth": runner.queue_depth, "running_rows": runner.running_rows}
            )
        return JSONResponse({"status": "shutting down"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format (``fastdiff_*``)."""
        if runner.metrics is None:
            return Response("metrics are off\n", status_code=404, media_type="text/plain")
        return Response(runner.metrics.render(runner.queue_depth, runner.running_rows), media_type=CONTENT_TYPE_LATEST)
