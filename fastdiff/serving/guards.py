"""ASGI middleware that guards the HTTP app before a request reaches it: an API key, a body size limit and a body
read deadline, and a hook that sees every answer (for the metrics).

Pure ASGI (no framework imports), so the same guards run under ``fastdiff serve`` and inside each Ray Serve
replica. The header read deadline is not here: an ASGI app is only called once the headers are complete, so
that one is the server's (:func:`fastdiff.serving.server.with_header_timeout`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = ("/healthz", "/readyz")


@dataclass(frozen=True)
class HttpGuards:
    """What the HTTP layer refuses before the app sees a request.

    Args:
        max_body_bytes: the largest request body read; a larger one gets 413 (a declared ``Content-Length``
            beyond it at once, without reading the body).
        body_timeout_s: the body must have arrived this many seconds after its headers, else 408.
        api_key: when set, every path but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <key>``
            (401 otherwise).
    """

    max_body_bytes: int = 16 * 2**20
    body_timeout_s: float = 30.0
    api_key: str | None = field(default=None, repr=False)


async def send_json(
    send: Send, status: int, detail: Any, headers: Iterable[tuple[str, str]] = (), close: bool = False
) -> None:
    """Answers ``{"detail": detail}`` with ``status``; ``close`` ends the connection after it. (A body left
    unread is not parsed as a next request: the server discards it, within its header deadline.)"""
    body = json.dumps({"detail": detail}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers]
    if close:
        raw.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


class ApiKeyGuard:
    """401 (``WWW-Authenticate: Bearer``) for a request without ``Authorization: Bearer <api_key>``, except on
    ``open_paths``; the key is compared in constant time."""

    def __init__(self, app: ASGIApp, api_key: str, open_paths: tuple[str, ...] = OPEN_PATHS):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Passes an authorized request (or a non-HTTP scope) on; answers 401 otherwise."""
        if scope["type"] != "http" or scope.get("path") in self.open_paths:
            return await self.app(scope, receive, send)
        given = _header(scope, b"authorization") or b""
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        await send_json(send, 401, "a valid API key is required", [("WWW-Authenticate", "Bearer")])


class BodyTooLarge(Exception):
    """The request body is longer than the limit."""


class BodyGuard:
    """Reads each request's body before the app runs, at most ``max_body_bytes`` (413 beyond, without reading
    the rest) within ``body_timeout_s`` of its headers (408 past it, e.g. a ``Content-Length`` larger than what
    is sent); the app then gets the body in one message."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout_s: float):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answers 413/408 itself, or runs the app on the whole body."""
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return await self._too_large(send, int(declared))
        try:
            async with asyncio.timeout(self.body_timeout_s):
                first = await self._read_body(receive)
        except BodyTooLarge:
            return await self._too_large(send, None)
        except TimeoutError:
            return await send_json(
                send, 408, f"the request body did not arrive within {self.body_timeout_s:g} s", close=True
            )
        if first is not None:  # None: the client went away
            await self.app(scope, _replay(first, receive), send)

    async def _read_body(self, receive: Receive) -> Message | None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _too_large(self, send: Send, declared: int | None) -> None:
        size = "" if declared is None else f" ({declared} bytes)"
        await send_json(send, 413, f"the request body is too large{size}: at most {self.max_body_bytes} bytes")


def _replay(first: Message, receive: Receive) -> Receive:
    """A ``receive`` that gives ``first`` once, then the server's own messages (a disconnect)."""
    pending = [first]

    async def replayed() -> Message:
        return pending.pop() if pending else await receive()

    return replayed


class AnswerHook:
    """Calls ``on_answer(scope, status, seconds)`` once per HTTP response on ``paths`` (500 when the app raised;
    the exception still propagates), whoever answered: the app, a guard inside this one, or an error handler."""

    def __init__(self, app: ASGIApp, on_answer: Callable[[Scope, int, float], None], paths: tuple[str, ...]):
        self.app = app
        self.on_answer = on_answer
        self.paths = paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Runs the app, noting the status it answers with."""
        if scope["type"] != "http" or scope.get("path") not in self.paths:
            return await self.app(scope, receive, send)
        start = time.monotonic()
        status: list[int] = []

        async def noting(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, noting)
        except Exception:
            self.on_answer(scope, 500, time.monotonic() - start)
            raise
        self.on_answer(scope, status[0] if status else 500, time.monotonic() - start)
