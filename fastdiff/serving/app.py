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
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from fastdiff.extras import missing_extra

try:
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

from fastdiff.serving.api import BATCHABLE_SAMPLERS, FieldError, Limits, SamplesBody, npy_bytes, png_payload, to_sample_request
from fastdiff.serving.engine import RequestCancelled, RequestFailed
from fastdiff.serving.metrics import CONTENT_TYPE_LATEST
from fastdiff.serving.runner import DeadlineExceeded, QueueFull, Runner, ShuttingDown

DISCONNECT_POLL_S = 0.05
NPY_MEDIA_TYPE = "application/x-npy"


def create_app(runner: Runner, limits: Limits = Limits(), replica: Optional[str] = None) -> FastAPI:
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

    app = FastAPI(title="fastdiff", description="Diffusion sampling with step-level continuous batching",
                  lifespan=lifespan)
    app.state.runner = runner
    app.state.limits = limits
    if replica is not None:
        @app.middleware("http")
        async def name_the_replica(request: Request, call_next: Any) -> Response:
            response = await call_next(request)
            response.headers["X-Fastdiff-Replica"] = replica
            response.headers["X-Fastdiff-Pid"] = str(os.getpid())
            return response

    @app.post("/v1/samples")
    async def samples(body: SamplesBody, request: Request) -> Response:
        """Samples ``body.n`` images; the body is a float32 ``.npy`` (``format: "npy"``) or JSON of PNGs."""
        try:
            sample_request, timeout = to_sample_request(body, runner.pipe, limits)
        except FieldError as exc:
            return JSONResponse({"detail": exc.detail()}, status_code=422)
        try:
            ticket = runner.submit(sample_request, timeout)
        except QueueFull as exc:
            return JSONResponse({"detail": str(exc)}, status_code=429,
                                headers={"Retry-After": str(math.ceil(exc.retry_after))})
        except ShuttingDown as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "1"})
        future = asyncio.wrap_future(ticket.future)
        while not future.done():
            await asyncio.wait([future], timeout=DISCONNECT_POLL_S)
            if not future.done() and await request.is_disconnected():
                runner.cancel(ticket, RequestCancelled(f"request {ticket.id}: the client disconnected"))
                await asyncio.wait([future])
        headers = {"X-Fastdiff-Request-Id": str(ticket.id),
                   "X-Fastdiff-Latency": f"{time.monotonic() - ticket.submitted:.4f}"}
        try:
            result = future.result()
        except DeadlineExceeded as exc:
            return JSONResponse({"detail": str(exc)}, status_code=504, headers=headers)
        except RequestCancelled as exc:  # nobody is listening; answer for the log's sake
            return JSONResponse({"detail": str(exc)}, status_code=499, headers=headers)
        except RequestFailed as exc:
            return JSONResponse({"detail": str(exc)}, status_code=500, headers=headers)
        except ShuttingDown as exc:
            return JSONResponse({"detail": str(exc)}, status_code=503, headers=headers)
        except Exception as exc:  # noqa: BLE001  (the network raised: this request fails, the server goes on)
            return JSONResponse({"detail": f"sampling failed: {exc}"}, status_code=500, headers=headers)
        if body.format == "png":
            return JSONResponse(png_payload(result), headers=headers)
        headers["X-Fastdiff-Shape"] = ",".join(str(s) for s in result.shape)
        return Response(npy_bytes(result), media_type=NPY_MEDIA_TYPE, headers=headers)

    @app.get("/v1/info")
    async def info() -> dict:
        """What this server samples: sample shape, class count, prediction, samplers and limits."""
        pipe = runner.pipe
        return {"sample_shape": None if pipe.sample_shape is None else list(pipe.sample_shape),
                "num_classes": pipe.num_classes, "prediction": pipe.prediction, "samplers": list(BATCHABLE_SAMPLERS),
                "max_n": limits.max_n, "max_steps": limits.max_steps, "batching": runner.batching,
                "max_batch": runner.max_batch}

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Readiness: 200 while requests are taken, 503 once shutting down."""
        if runner.accepting:
            return JSONResponse({"status": "ready", "queue_depth": runner.queue_depth,
                                 "running_rows": runner.running_rows})
        return JSONResponse({"status": "shutting down"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format (``fastdiff_*``)."""
        if runner.metrics is None:
            return Response("metrics are off\n", status_code=404, media_type="text/plain")
        return Response(runner.metrics.render(runner.queue_depth, runner.running_rows),
                        media_type=CONTENT_TYPE_LATEST)

    return app
