"""The serving metrics, in Prometheus' text format (``GET /metrics``), all named ``fastdiff_*``.

Each :class:`ServingMetrics` has its own registry, so several servers (or tests) in one process do not collide.
"""

from __future__ import annotations

import collections
import threading
import time
from typing import Any

from fastdiff.extras import missing_extra

try:
    from prometheus_client import (
        CONTENT_TYPE_LATEST,  # noqa: F401  (re-exported for the app)
        CollectorRegistry,
        Counter,
        Gauge,
        Histogram,
        generate_latest,
    )
    from prometheus_client.process_collector import ProcessCollector
except ModuleNotFoundError as exc:
    raise missing_extra("serve", exc) from exc

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
OCCUPANCY_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
RATE_WINDOW_S = 10.0


class ServingMetrics:
    """Counters, gauges and histograms of one server; the runner records into it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        ProcessCollector(namespace="fastdiff", registry=reg)  # fastdiff_process_cpu_seconds_total, memory
        self.max_batch = Gauge("fastdiff_max_batch", "The most rows one tick runs", registry=reg)
        self.queue_depth = Gauge("fastdiff_queue_depth", "Requests waiting to start", registry=reg)
        self.running_rows = Gauge("fastdiff_running_rows", "Rows (samples) in the running batches", registry=reg)
        self.batch_occupancy = Histogram(
            "fastdiff_batch_occupancy", "Rows per tick / max_batch", buckets=OCCUPANCY_BUCKETS, registry=reg
        )
        self.ticks = Counter("fastdiff_ticks", "Engine ticks (one network call and one fused step each)", registry=reg)
        self.busy_seconds = Counter(
            "fastdiff_engine_busy_seconds", "Seconds the engine thread spent in ticks", registry=reg
        )
        self.latency = Histogram(
            "fastdiff_request_latency_seconds",
            "Submission to samples (or error)",
            ["outcome"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.time_to_first_step = Histogram(
            "fastdiff_time_to_first_step_seconds",
            "Submission to the request's first tick",
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.requests = Counter("fastdiff_requests", "Requests finished, by outcome", ["outcome"], registry=reg)
        self.rejected = Counter(
            "fastdiff_requests_rejected", "Requests refused because the queue was full", registry=reg
        )
        self.samples = Counter("fastdiff_samples", "Samples returned", registry=reg)
        self.samples_per_second = Gauge(
            "fastdiff_samples_per_second",
            f"Samples returned per second over the last {RATE_WINDOW_S:g} s",
            registry=reg,
        )
        self.samples_per_second.set_function(self._rate)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def observe_tick(self, rows: int, max_batch: int, seconds: float) -> None:
        """One engine tick over ``rows`` rows that took ``seconds``."""
        self.ticks.inc()
        self.busy_seconds.inc(seconds)
        self.batch_occupancy.observe(rows / max_batch)

    def observe_finish(self, ticket: Any, error: BaseException | None) -> None:
        """A request finished (``error`` None: its samples were returned)."""
        self.observe_answer("ok" if error is None else _outcome(error), time.monotonic() - ticket.submitted)
        if error is None:
            self.samples.inc(ticket.request.n)
            with self._lock:
                self._recent.append((time.monotonic(), ticket.request.n))

    def observe_answer(self, outcome: str, seconds: float) -> None:
        """A sampling request answered with ``outcome`` after ``seconds`` (the runner's outcomes, and the HTTP
        layer's for requests the runner never saw: ``invalid_request``, ``body_too_large``, ...)."""
        self.requests.labels(outcome).inc()
        self.latency.labels(outcome).observe(seconds)

    def render(self, queue_depth: int, running_rows: int) -> bytes:
        """The text exposition, with the gauges read now."""
        self.queue_depth.set(queue_depth)
        self.running_rows.set(running_rows)
        return generate_latest(self.registry)

    def _rate(self) -> float:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - RATE_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / RATE_WINDOW_S


def _outcome(error: BaseException) -> str:
    """A short label for a failed request: the error's class name in snake case."""
    name = type(error).__name__
    return "".join("_" + c.lower() if c.isupper() and i else c.lower() for i, c in enumerate(name))
