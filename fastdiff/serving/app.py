"""The HTTP server's application (FastAPI): ``POST /v1/samples``, ``GET /v1/info``, ``/healthz``, ``/readyz``,
``/metrics``.

Every accepted request gets its samples or an error, never silence: 422 for a field the server refuses, 429 with
``Retry-After`` when the queue is full, 503 while shutting down, 504 past its deadline, 500 when its samples
became NaN/Inf or the network raised (only that request fails). A client that disconnects has its rows dropped
at the next tick. Before the app, the guards (:mod:`fastdiff.serving.guards`) answer 401 without the API key,
413 for a body over the limit and 408 for one that does not arrive in time; every answer to ``POST /v1/samples``
is counted in ``fastdiff_requests_total{outcome}``.
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
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response
    from pydantic import ValidationError
    from starlette.formparsers import MultiPartException
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

from fastdiff.serving.api import (
    ECHO_CHARS,
    FieldError,
    InvalidBody,
    Limits,
    SamplesBody,
    npy_bytes,
    parse_body,
    png_payload,
    servable_samplers,
    short,
    to_sample_request,
    validation_detail,
)
from fastdiff.serving.engine import RequestCancelled, RequestFailed
from fastdiff.serving.guards import AnswerHook, ApiKeyGuard, BodyGuard, HttpGuards, Scope
from fastdiff.serving.images import (
    EDITS_PATH,
    IMAGE_MODES,
    IMAGES_PATH,
    MASK_MODES,
    EditsBody,
    ImageLimits,
    ImagesBody,
    ImagesCall,
    edits_form_fields,
    images_payload,
    pipeline_defaults,
    read_image,
    to_edits_call,
    to_images_call,
)
from fastdiff.serving.metrics import CONTENT_TYPE_LATEST, ServingMetrics
from fastdiff.serving.runner import DeadlineExceeded, QueueFull, Runner, ShuttingDown

DISCONNECT_POLL_S = 0.05
NPY_MEDIA_TYPE = "application/x-npy"
SAMPLES_PATH = "/v1/samples"
SUBMITTED = "fastdiff_submitted"  # set in the request's state once the runner has it (the runner counts it)
# How the answers the runner never saw are counted in fastdiff_requests_total{outcome}.
STATUS_OUTCOMES = {
    400: "bad_request",
    401: "unauthorized",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "body_too_large",
    422: "invalid_request",
    429: "queue_full",
    500: "server_error",
    503: "shutting_down",
}


def _body_schema(body_type: Any) -> dict[str, Any]:
    """OpenAPI's description of a JSON body of ``body_type`` (the endpoints read their bodies themselves)."""
    schema = body_type.model_json_schema(ref_template="#/components/{model}")
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


BODY_SCHEMA = _body_schema(SamplesBody)


# How a request that did not finish is answered: the first matching exception type gives the status.
FAILURE_STATUS = ((DeadlineExceeded, 504), (RequestCancelled, 499), (RequestFailed, 500), (ShuttingDown, 503))


def create_app(
    runner: Runner,
    limits: Limits = Limits(),
    replica: str | None = None,
    guards: HttpGuards = HttpGuards(),
    image_limits: ImageLimits = ImageLimits(),
) -> FastAPI:
    """The app serving ``runner`` (started with the app, drained when it shuts down), behind ``guards`` (body
    size and read deadline, API key). With ``replica`` (a name), every response carries
    ``X-Fastdiff-Replica: <replica>`` and ``X-Fastdiff-Pid`` (Ray Serve replicas). A runner whose frontend is a
    text-to-image pipeline's (:class:`~fastdiff.serving.prompts.PromptFrontend`) also answers
    ``POST /v1/images/generations`` (within ``image_limits``)."""

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
    samplers = servable_samplers(runner.pipe)  # once: the network and its schedule do not change under a server
    app.post(SAMPLES_PATH, openapi_extra=BODY_SCHEMA)(_samples_endpoint(runner, limits, samplers))
    t2i = getattr(runner.frontend, "t2i", None)
    if t2i is not None:
        app.post(IMAGES_PATH, openapi_extra=_body_schema(ImagesBody))(
            _images_endpoint(runner, t2i, limits, image_limits, samplers)
        )
        app.post(EDITS_PATH)(_edits_endpoint(runner, t2i, limits, image_limits, samplers))
    app.exception_handler(RequestValidationError)(_invalid_request)
    _add_status_routes(app, runner, limits, samplers, None if t2i is None else _images_info(t2i, image_limits))
    _add_guards(app, runner.metrics, guards)
    return app


def _add_guards(app: FastAPI, metrics: ServingMetrics | None, guards: HttpGuards) -> None:
    """Outermost first: the answer counter, the API key, the body guard."""
    app.add_middleware(BodyGuard, max_body_bytes=guards.max_body_bytes, body_timeout_s=guards.body_timeout_s)
    if guards.api_key:
        app.add_middleware(ApiKeyGuard, api_key=guards.api_key)
    if metrics is not None:
        app.add_middleware(
            AnswerHook, on_answer=_answer_counter(metrics), paths=(SAMPLES_PATH, IMAGES_PATH, EDITS_PATH)
        )


def _answer_counter(metrics: ServingMetrics) -> Callable[[Scope, int, float], None]:
    def count(scope: Scope, status: int, seconds: float) -> None:
        if not scope.get("state", {}).get(SUBMITTED):  # the runner counted the ones it took
            metrics.observe_answer(STATUS_OUTCOMES.get(status, f"http_{status}"), seconds)

    return count


async def _invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, with each error's ``input`` cut short (it may be megabytes, or a NaN JSON cannot write)."""
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


def _replica_headers(replica: str) -> Callable[..., Any]:
    async def name_the_replica(request: Request, call_next: Any) -> Response:
        response = await call_next(request)
        response.headers["X-Fastdiff-Replica"] = replica
        response.headers["X-Fastdiff-Pid"] = str(os.getpid())
        return response

    return name_the_replica


def _samples_endpoint(runner: Runner, limits: Limits, samplers: tuple[str, ...]) -> Callable[..., Any]:
    async def samples(request: Request) -> Response:
        """Samples ``n`` images (the body: :class:`SamplesBody`); answers a float32 ``.npy`` (``format:
        "npy"``) or JSON of PNGs."""
        try:
            body = parse_body(await request.body())
            sample_request, timeout = to_sample_request(body, runner.pipe, limits, samplers)
        except InvalidBody as exc:
            return JSONResponse({"detail": exc.detail()}, status_code=422)
        try:
            future, headers = await _submit_and_wait(runner, request, sample_request, timeout)
        except _Refused as refused:
            return refused.response
        return _answer(future, body.format, headers)

    return samples


def _images_endpoint(
    runner: Runner, t2i: Any, limits: Limits, image_limits: ImageLimits, samplers: tuple[str, ...]
) -> Callable[..., Any]:
    async def images(request: Request) -> Response:
        """Draws ``n`` images for a prompt (the body: :class:`~fastdiff.serving.images.ImagesBody`); answers JSON
        of base64 images, or the final latents as float32 ``.npy`` (``response_format: "latents"``)."""
        try:
            body = parse_body(await request.body(), ImagesBody)
            call = to_images_call(body, t2i, limits, image_limits, samplers)
        except InvalidBody as exc:
            return JSONResponse({"detail": exc.detail()}, status_code=422)
        return await _run_images_call(runner, call, request)

    return images


def _edits_endpoint(
    runner: Runner, t2i: Any, limits: Limits, image_limits: ImageLimits, samplers: tuple[str, ...]
) -> Callable[..., Any]:
    async def edits(request: Request) -> Response:
        """Edits an image for a prompt (multipart/form-data: the ``image`` file, an optional ``mask`` file, and the
        fields of :class:`~fastdiff.serving.images.EditsBody`); answers as ``/v1/images/generations`` does."""
        try:
            async with request.form(max_files=2, max_fields=64) as form:
                fields = edits_form_fields(form)
                files = {name: await _file_bytes(form.get(name), name) for name in ("image", "mask")}
            image = read_image(files["image"], "image", IMAGE_MODES)  # first: a JSON body has no image file
            mask = None if files["mask"] is None else read_image(files["mask"], "mask", MASK_MODES)
            body = EditsBody.model_validate(fields)
            call = await asyncio.to_thread(to_edits_call, body, image, mask, t2i, limits, image_limits, samplers)
        except InvalidBody as exc:
            return JSONResponse({"detail": exc.detail()}, status_code=422)
        except ValidationError as exc:
            return JSONResponse({"detail": validation_detail(exc.errors(include_url=False))}, status_code=422)
        except MultiPartException as exc:
            return JSONResponse({"detail": [{"loc": ["body"], "msg": exc.message, "type": "form_invalid"}]}, 422)
        return await _run_images_call(runner, call, request)

    return edits


async def _file_bytes(value: Any, name: str) -> bytes | None:
    """An uploaded file's bytes (None when the form has no such field; a 422 when it is text, not a file)."""
    if value is None:
        return None
    if isinstance(value, str):
        raise FieldError(name, "must be a file (multipart/form-data)")
    return await value.read()


class _Refused(Exception):
    """The runner did not take a request (queue full: 429; shutting down: 503); ``response`` says so."""

    def __init__(self, response: Response):
        super().__init__(response.status_code)
        self.response = response


async def _submit_and_wait(
    runner: Runner, request: Request, sample_request: Any, timeout: float | None, job: Any = None
) -> tuple[asyncio.Future, dict[str, str]]:
    """Submits to the runner and waits for the ticket (dropping it if the client goes away): its future and the
    answer's headers (request id, latency). Raises :class:`_Refused` when the runner does not take it."""
    try:
        ticket = runner.submit(sample_request, timeout, job=job)
    except (QueueFull, ShuttingDown) as exc:
        status = 429 if isinstance(exc, QueueFull) else 503
        headers = retry_after_header(exc.retry_after)
        raise _Refused(JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)) from None
    setattr(request.state, SUBMITTED, True)
    future = await _until_done(runner, ticket, request)
    headers = {
        "X-Fastdiff-Request-Id": str(ticket.id),
        "X-Fastdiff-Latency": f"{time.monotonic() - ticket.submitted:.4f}",
    }
    return future, headers


async def _run_images_call(runner: Runner, call: ImagesCall, request: Request) -> Response:
    """Submits an images job and answers with its images (or latents, or error)."""
    try:
        future, headers = await _submit_and_wait(runner, request, call.request, call.timeout, job=call.job)
    except _Refused as refused:
        return refused.response
    if call.warnings:
        headers["X-Fastdiff-Warning"] = "; ".join(call.warnings)
    return await _images_answer(future, call, headers)


async def _images_answer(future: asyncio.Future, call: ImagesCall, headers: dict) -> Response:
    """The images as JSON (encoded off the event loop), the latents as ``.npy``, or the request's error."""
    if future.exception() is not None:
        return _answer(future, "npy", headers)
    result = future.result()
    if call.response_format == "latents":
        headers["X-Fastdiff-Shape"] = ",".join(str(s) for s in result.latents.shape)
        headers["X-Fastdiff-Seeds"] = ",".join(str(s) for s in result.seeds)
        return Response(npy_bytes(result.latents), media_type=NPY_MEDIA_TYPE, headers=headers)
    return JSONResponse(await asyncio.to_thread(images_payload, result, call), headers=headers)


def _images_info(t2i: Any, image_limits: ImageLimits) -> dict[str, Any]:
    """What ``/v1/info`` adds for a text-to-image server."""
    defaults = pipeline_defaults(t2i)
    return {
        "pipeline": t2i.kind,
        "default_size": f"{t2i.default_size[0]}x{t2i.default_size[1]}",
        "size_multiple": t2i.size_factor,
        "max_pixels": image_limits.max_pixels,
        "default_sampler": t2i.pipe.setup.sampler,
        "default_steps": defaults["num_inference_steps"],
        "default_guidance_scale": defaults["guidance_scale"],
        "prompt_tokens": t2i.token_limit(),
        "output_formats": ["png", "jpeg", "webp"],
    }


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
                return JSONResponse({"detail": short(str(exc), 3 * ECHO_CHARS)}, status_code=status, headers=headers)
        return JSONResponse(
            {"detail": short(f"sampling failed: {exc}", 3 * ECHO_CHARS)}, status_code=500, headers=headers
        )
    if fmt == "png":
        return JSONResponse(png_payload(result), headers=headers)
    headers["X-Fastdiff-Shape"] = ",".join(str(s) for s in result.shape)
    return Response(npy_bytes(result), media_type=NPY_MEDIA_TYPE, headers=headers)


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, rounded up."""
    return {"Retry-After": str(math.ceil(seconds))}


def _add_status_routes(
    app: FastAPI, runner: Runner, limits: Limits, samplers: tuple[str, ...], images: dict[str, Any] | None
) -> None:
    """``/v1/info``, ``/healthz``, ``/readyz`` and ``/metrics``."""

    @app.get("/v1/info")
    async def info() -> dict:
        """What this server samples: sample shape, class count, prediction, samplers and limits (and for a
        text-to-image server, its pipeline class, sizes and defaults)."""
        pipe = runner.pipe
        return (images or {}) | {
            "sample_shape": None if pipe.sample_shape is None else list(pipe.sample_shape),
            "num_classes": pipe.num_classes,
            "prediction": pipe.prediction,
            "samplers": list(samplers),
            "tuned": [dict(sampler=s, steps=k, guidance_scale=w) for s, k, w in pipe.tuned.settings()],
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
        headers = retry_after_header(runner.retry_after())
        return JSONResponse({"status": "shutting down"}, status_code=503, headers=headers)

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format (``fastdiff_*``)."""
        if runner.metrics is None:
            return Response("metrics are off\n", status_code=404, media_type="text/plain")
        return Response(runner.metrics.render(runner.queue_depth, runner.running_rows), media_type=CONTENT_TYPE_LATEST)
