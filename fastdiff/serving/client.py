"""A small Python client for ``fastdiff serve`` (standard library only)::

from fastdiff.serving.client import Client
client = Client("http://127.0.0.1:8000")
x = client.sample(n=4, seed=0, sampler="dpmpp_2m", steps=20, class_label=7)   # numpy [4, 1, 8, 8]
# a text-to-image server (fastdiff serve --diffusers PATH):
out = client.generate("a watercolor fox", n=2, size="512x512", seed=1)     # out.images: PNG files' bytes
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


def npy_base64(array: Any) -> str:
    """``array`` (anything ``np.asarray`` takes) as base64 of a float32 ``.npy`` file: how the samples API takes
    ``init`` and ``mask``."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, dtype=np.float32), allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def multipart_form(fields: Sequence[tuple[str, str]], files: Sequence[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) of text ``fields`` and ``files`` (name, bytes), and its content type."""
    boundary = f"fastdiff-{uuid.uuid4().hex}"
    out = io.BytesIO()
    for name, value in fields:
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode())
        out.write(value.encode() + b"\r\n")
    for name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{name}"\r\n'
        out.write((head + "Content-Type: application/octet-stream\r\n\r\n").encode())
        out.write(data + b"\r\n")
    out.write(f"--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def _encoded(value: Any) -> Any:
    """An array field as the API takes it (None and already encoded strings as they are)."""
    return value if value is None or isinstance(value, str) else npy_base64(value)


class ServerError(RuntimeError):
    """The server answered with an error: ``status`` (422, 429, 500, 503, 504, ...), ``detail`` and, for 429/503,
    ``retry_after`` seconds."""

    def __init__(self, status: int, detail: Any, retry_after: float | None = None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


RETRY_STATUSES = (429, 502, 503)


@dataclass
class Generated:
    """The answer of :meth:`Client.generate`: each image's file bytes (PNG, JPEG or WebP), each image's own seed,
    and the server's warnings (a prompt cut to the text encoder's length)."""

    images: list[bytes]
    seeds: list[int]
    warnings: list[str]


class Client:
    """Talks to one server at ``base_url``; ``timeout`` (seconds) bounds each HTTP call.

    ``retries`` > 0 resends a sampling request that failed with a connection error (refused, reset, or a response
    cut off before its end) or one of ``retry_statuses``
    (default: 429 queue full, 502/503 unavailable; add 500 behind a proxy whose replicas can die), waiting the
    server's ``Retry-After`` (at most ``max_wait`` seconds) or ``backoff`` seconds. A retry sends the same seed, so
    it returns the same samples. ``attempts`` is how many tries the last request took. ``api_key`` is sent as
    ``Authorization: Bearer <api_key>`` (a server started with ``--api-key``)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 600.0,
        retries: int = 0,
        retry_statuses: Sequence[int] = RETRY_STATUSES,
        backoff: float = 0.2,
        max_wait: float = 10.0,
        api_key: str | None = None,
    ):
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.retry_statuses = tuple(retry_statuses)
        self.backoff = backoff
        self.max_wait = max_wait
        self.headers = {} if api_key is None else {"Authorization": f"Bearer {api_key}"}
        self.last_headers: dict[str, str] = {}
        self.attempts = 0

    def sample(self, n: int = 1, **fields: Any) -> np.ndarray:
        """Samples as a float32 array [n, *sample_shape] (``format: "npy"``); ``fields`` are the request's
        other fields (seed, sampler, steps, eta, guidance_scale, class_label, conditioning, shape, timeout_s, and
        for editing init, mask and strength: ``init`` and ``mask`` as arrays, sent as base64 ``.npy``)."""
        fields = {k: _encoded(v) if k in ("init", "mask") else v for k, v in fields.items()}
        body = self._post("/v1/samples", dict(fields, n=n, format="npy"))
        return np.load(io.BytesIO(body), allow_pickle=False)

    def sample_png(self, n: int = 1, **fields: Any) -> list[bytes]:
        """Samples as PNG files' bytes (``format: "png"``)."""
        payload = json.loads(self._post("/v1/samples", dict(fields, n=n, format="png")))
        return [base64.b64decode(img) for img in payload["images"]]

    def generate(self, prompt: str | list[str], **fields: Any) -> Generated:
        """``POST /v1/images/generations`` (a text-to-image server): images for ``prompt`` (one for all images, or
        one per image); ``fields`` are the request's other fields (n, negative_prompt, size, num_inference_steps,
        guidance_scale, seed, sampler, eta, output_format, timeout_s)."""
        payload = json.loads(
            self._post("/v1/images/generations", dict(fields, prompt=prompt, response_format="b64_json"))
        )
        data = payload["data"]
        return Generated(
            [base64.b64decode(d["b64_json"]) for d in data], [d["seed"] for d in data], payload["warnings"]
        )

    def generate_latents(self, prompt: str | list[str], **fields: Any) -> np.ndarray:
        """Like :meth:`generate`, the final latents instead of images: float32 [n, C, h, w]."""
        body = self._post("/v1/images/generations", dict(fields, prompt=prompt, response_format="latents"))
        return np.load(io.BytesIO(body), allow_pickle=False)

    def edit(self, image: bytes, prompt: str | list[str], mask: bytes | None = None, **fields: Any) -> Generated:
        """``POST /v1/images/edits`` (a text-to-image server): ``image`` (a PNG, JPEG or WebP file's bytes) edited for
        ``prompt``: image-to-image, or with ``mask`` (a file of the image's size; white regenerates, black keeps)
        inpainting; ``fields`` as :meth:`generate`'s, and ``strength``."""
        payload = json.loads(self._post_edit(image, prompt, mask, dict(fields, response_format="b64_json")))
        data = payload["data"]
        return Generated(
            [base64.b64decode(d["b64_json"]) for d in data], [d["seed"] for d in data], payload["warnings"]
        )

    def edit_latents(
        self, image: bytes, prompt: str | list[str], mask: bytes | None = None, **fields: Any
    ) -> np.ndarray:
        """Like :meth:`edit`, the final latents instead of images: float32 [n, C, h, w]."""
        body = self._post_edit(image, prompt, mask, dict(fields, response_format="latents"))
        return np.load(io.BytesIO(body), allow_pickle=False)

    def _post_edit(self, image: bytes, prompt: str | list[str], mask: bytes | None, fields: dict[str, Any]) -> bytes:
        parts = [("prompt", p) for p in ([prompt] if isinstance(prompt, str) else prompt)]
        parts += [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in fields.items() if v is not None]
        files = [("image", image)] + ([("mask", mask)] if mask is not None else [])
        data, content_type = multipart_form(parts, files)
        return self._post_data("/v1/images/edits", data, content_type)

    def info(self) -> dict[str, Any]:
        """``GET /v1/info``: sample shape, class count, prediction, samplers and limits of the server."""
        return json.loads(self._get("/v1/info"))

    def healthz(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return json.loads(self._get("/healthz"))

    def readyz(self) -> dict[str, Any]:
        """``GET /readyz`` (raises :class:`ServerError` 503 while the server shuts down)."""
        return json.loads(self._get("/readyz"))

    def metrics(self) -> dict[str, float]:
        """``GET /metrics`` parsed into ``{"name{labels}": value}``."""
        out: dict[str, float] = {}
        for line in self._get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    # ------------------------------------------------------------------ HTTP
    def _get(self, path: str) -> bytes:
        return self._send(urllib.request.Request(self.base_url + path, headers=self.headers))

    def _post(self, path: str, payload: dict[str, Any]) -> bytes:
        return self._post_data(path, json.dumps(payload).encode(), "application/json")

    def _post_data(self, path: str, data: bytes, content_type: str) -> bytes:
        for attempt in range(self.retries + 1):
            self.attempts = attempt + 1
            try:
                return self._send(
                    urllib.request.Request(
                        self.base_url + path,
                        data=data,
                        method="POST",
                        headers={**self.headers, "Content-Type": content_type},
                    )
                )
            except ServerError as exc:
                if attempt == self.retries or exc.status not in self.retry_statuses:
                    raise
                time.sleep(min(exc.retry_after if exc.retry_after is not None else self.backoff, self.max_wait))
            except (OSError, http.client.HTTPException):  # refused, reset, or a body cut off by a dying server
                if attempt == self.retries:
                    raise
                time.sleep(self.backoff)
        raise AssertionError("unreachable")

    def _send(self, req: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                self.last_headers = dict(resp.headers)
                return resp.read()
        except urllib.error.HTTPError as exc:
            self.last_headers = dict(exc.headers)
            raw = exc.read()
            try:
                detail = json.loads(raw).get("detail", raw.decode(errors="replace"))
            except ValueError:
                detail = raw.decode(errors="replace")
            retry = exc.headers.get("Retry-After")
            raise ServerError(exc.code, detail, float(retry) if retry else None) from None
