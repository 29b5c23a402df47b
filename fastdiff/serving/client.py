"""A small Python client for ``fastdiff serve`` (standard library only)::

    from fastdiff.serving.client import Client
    client = Client("http://127.0.0.1:8000")
    x = client.sample(n=4, seed=0, sampler="dpmpp_2m", steps=20, class_label=7)   # numpy [4, 1, 8, 8]
"""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional

import numpy as np


class ServerError(RuntimeError):
    """The server answered with an error: ``status`` (422, 429, 500, 503, 504, ...), ``detail`` and, for 429/503,
    ``retry_after`` seconds."""

    def __init__(self, status: int, detail: Any, retry_after: Optional[float] = None):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class Client:
    """Talks to one server at ``base_url``; ``timeout`` (seconds) bounds each HTTP call."""

    def __init__(self, base_url: str = "http://127.0.0.1:8000", timeout: float = 600.0):
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.last_headers: Dict[str, str] = {}

    def sample(self, n: int = 1, **fields: Any) -> np.ndarray:
        """Samples as a float32 array [n, *sample_shape] (``format: "npy"``); ``fields`` are the request's
        other fields (seed, sampler, steps, eta, guidance_scale, class_label, conditioning, shape, timeout_s)."""
        body = self._post("/v1/samples", dict(fields, n=n, format="npy"))
        return np.load(io.BytesIO(body), allow_pickle=False)

    def sample_png(self, n: int = 1, **fields: Any) -> List[bytes]:
        """Samples as PNG files' bytes (``format: "png"``)."""
        payload = json.loads(self._post("/v1/samples", dict(fields, n=n, format="png")))
        return [base64.b64decode(img) for img in payload["images"]]

    def info(self) -> Dict[str, Any]:
        """``GET /v1/info``: sample shape, class count, prediction, samplers and limits of the server."""
        return json.loads(self._get("/v1/info"))

    def healthz(self) -> Dict[str, Any]:
        """``GET /healthz``."""
        return json.loads(self._get("/healthz"))

    def readyz(self) -> Dict[str, Any]:
        """``GET /readyz`` (raises :class:`ServerError` 503 while the server shuts down)."""
        return json.loads(self._get("/readyz"))

    def metrics(self) -> Dict[str, float]:
        """``GET /metrics`` parsed into ``{"name{labels}": value}``."""
        out: Dict[str, float] = {}
        for line in self._get("/metrics").decode().splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    # ------------------------------------------------------------------ HTTP
    def _get(self, path: str) -> bytes:
        return self._send(urllib.request.Request(self.base_url + path))

    def _post(self, path: str, payload: Dict[str, Any]) -> bytes:
        data = json.dumps(payload).encode()
        return self._send(urllib.request.Request(self.base_url + path, data=data, method="POST",
                                                 headers={"Content-Type": "application/json"}))

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
