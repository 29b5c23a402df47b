"""``ServeSettings``: how a server (or each Ray Serve replica) runs its engine, in one place; ``fastdiff serve``'s
command line takes its defaults from here. Needs no serving extra (the CLI reads it before it imports the server).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastdiff.serving.runner import BATCHING_POLICIES


@dataclass(frozen=True)
class ServeSettings:
    """How a server (or each Ray Serve replica) runs its engine.

    Args:
        max_batch: the most rows (samples) one engine tick runs.
        max_queue: the most requests waiting to start; beyond it a request gets 429.
        batching: ``"continuous"`` (step-level: rows join and leave at every tick), ``"request"`` (whole
            requests batched, waiting up to ``batch_wait_s`` for a batch) or ``"single"`` (one at a time).
        batch_wait_s: (request batching) how long to wait for a batch to fill.
        max_n: the most samples one request may ask for (also capped by ``max_batch``).
        max_pixels: (text-to-image servers) the most pixels per image a request may ask for.
        request_timeout_s: the default per-request deadline (None: none).
        threads: torch CPU threads (None: torch's default).
        max_body_bytes: the largest request body read (413 beyond, without reading the rest).
        header_timeout_s: a connection's request headers must be complete this many seconds after it opened (or
            after its previous response); else the server closes it (after a 408 if part of a request came).
        body_timeout_s: a request's body must have arrived this many seconds after its headers (else 408).
        api_key: when set, every route but ``/healthz`` and ``/readyz`` needs ``Authorization: Bearer <key>``
            (401 otherwise); ``fastdiff serve`` reads it from ``--api-key`` or ``FASTDIFF_API_KEY``.
    """

    max_batch: int = 64
    max_queue: int = 256
    batching: str = "continuous"
    batch_wait_s: float = 0.02
    max_n: int = 64
    max_pixels: int = 1024 * 1024
    request_timeout_s: float | None = 300.0
    threads: int | None = None
    max_body_bytes: int = 16 * 2**20
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    api_key: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        ints = ("max_batch", "max_queue", "max_n", "max_pixels", "max_body_bytes")
        for name in ints + (("threads",) if self.threads is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if self.batching not in BATCHING_POLICIES:
            raise ValueError(f"batching must be one of {BATCHING_POLICIES}, got {self.batching!r}")
        if not self.batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {self.batch_wait_s!r}")
        if self.request_timeout_s is not None and not self.request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {self.request_timeout_s!r}")
        for name in ("header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        key = self.api_key
        if key is not None and not (key and key.isascii() and key.isprintable() and " " not in key):
            raise ValueError("api_key must be non-empty printable ASCII without spaces")


__all__ = ["ServeSettings"]
