"""Drives step-level engines from one background thread: submissions from any thread, deadlines, cancellation,
backpressure and the three batching policies the load benchmark compares.

Requests of one sample shape share an :class:`~fastdiff.serving.engine.Engine` (one running batch per shape);
the thread ticks the engines that have work, round robin. Other threads only put submissions and cancellations
into an inbox the thread empties between ticks, so the engines stay single-threaded.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fastdiff.pipeline import Pipeline
from fastdiff.request import SampleRequest
from fastdiff.serving.engine import Engine, RequestCancelled, TickReport

if TYPE_CHECKING:  # the metrics need the serve extra (prometheus_client); the runner does not
    from fastdiff.serving.metrics import ServingMetrics

BATCHING_POLICIES = ("continuous", "request", "single")
LOG = logging.getLogger("fastdiff.serving")
THROUGHPUT_WINDOW_S = 30.0
MIN_RETRY_AFTER_S = 1.0


class QueueFull(RuntimeError):
    """The runner's queue of requests waiting to start is full (HTTP 429); ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceeded(TimeoutError):
    """A request did not finish before its deadline; its rows were dropped."""


class ShuttingDown(RuntimeError):
    """The runner is stopping and takes no new requests; ``retry_after`` estimates the seconds until it has
    finished the ones it holds."""

    def __init__(self, message: str, retry_after: float = MIN_RETRY_AFTER_S):
        super().__init__(message)
        self.retry_after = retry_after


class Throughput:
    """Requests finished per second, measured over the current busy period (since the runner last went from
    idle to busy) and at most the last ``window_s`` seconds. Times are passed in, so tests can drive it."""

    def __init__(self, window_s: float = THROUGHPUT_WINDOW_S):
        self.window_s = window_s
        self._finished: collections.deque[float] = collections.deque()
        self._lock = threading.Lock()

    def record(self, now: float) -> None:
        """A request finished at ``now``."""
        with self._lock:
            self._finished.append(now)

    def rate(self, now: float, busy_since: float) -> float:
        """Requests per second finished in ``[max(busy_since, now - window_s), now]`` (0: none finished)."""
        start = max(busy_since, now - self.window_s)
        with self._lock:
            while self._finished and self._finished[0] < now - self.window_s:
                self._finished.popleft()
            count = sum(1 for t in self._finished if t >= start)
        return count / (now - start) if count and now > start else 0.0


class Frontend(Protocol):
    """What a runner does before and after the engine for requests that come as jobs (a text-to-image server's
    prompts, :mod:`fastdiff.serving.prompts`), each for every job of one pass in one call: :meth:`prepare` turns
    the jobs that arrived since the last tick into requests (their prompts encoded together), :meth:`finish` turns
    the samples of the jobs that finished in one tick into results (decoded together). Either returns, per job,
    its value or the exception that fails that job alone."""

    def prepare(self, jobs: Sequence[Any]) -> list[SampleRequest | BaseException]:
        """The engine request of each job (its conditioning filled in)."""

    def finish(self, jobs: Sequence[Any], samples: Sequence[torch.Tensor]) -> list[Any]:
        """The result of each job from its samples."""


@dataclass
class Ticket:
    """A submitted request: ``future`` resolves to its samples (a CPU float32 tensor), or for a job its
    frontend's result, or its error. A job's ``request`` is complete only once the frontend prepared it."""

    id: int
    request: SampleRequest
    future: Future
    submitted: float
    deadline: float | None = None
    job: Any = None
    engine_id: int | None = None
    admitted: float | None = None
    cancel_reason: BaseException | None = field(default=None, repr=False)


class Runner:
    """Serves :class:`SampleRequest` s on ``pipe`` from a background thread.

    Args:
        pipe: the pipeline every request samples.
        max_batch: the most rows one engine tick runs.
        max_queue: the most requests waiting to start; :meth:`submit` raises :class:`QueueFull` beyond it.
        batching: ``"continuous"`` (step-level: requests join the running batch at any tick), ``"request"``
            (request-level: wait up to ``batch_wait_s`` for a batch, run it to its end, then take the next) or
            ``"single"`` (one request at a time).
        batch_wait_s: how long ``"request"`` batching waits for more requests before it starts a batch.
        metrics: where to record metrics (default: none).
        frontend: what turns submitted jobs into requests and finished samples into results
            (:class:`Frontend`; a text-to-image server's prompt encoder and VAE).
    """

    def __init__(
        self,
        pipe: Pipeline,
        max_batch: int = 64,
        max_queue: int = 256,
        batching: str = "continuous",
        batch_wait_s: float = 0.02,
        metrics: ServingMetrics | None = None,
        frontend: Frontend | None = None,
    ):
        if batching not in BATCHING_POLICIES:
            raise ValueError(f"batching must be one of {BATCHING_POLICIES}, got {batching!r}")
        if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an int >= 1, got {max_queue!r}")
        if not batch_wait_s >= 0:
            raise ValueError(f"batch_wait_s must be >= 0, got {batch_wait_s!r}")
        Engine(pipe, max_batch)  # validates max_batch now rather than in the thread
        self.pipe = pipe
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.batching = batching
        self.batch_wait_s = float(batch_wait_s)
        self.metrics = metrics
        self.frontend = frontend
        if metrics is not None:
            metrics.max_batch.set(max_batch)
        self._inbox: queue.SimpleQueue[tuple[str, Ticket]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # guards _waiting and _accepting
        self._waiting = 0  # submitted, not yet admitted (or finished)
        self._accepting = True
        self._stop = False
        self._abort = False  # stop without draining: cancel what is left
        self._ids = itertools.count()
        self._engines: dict[tuple[int, ...], Engine] = {}
        self._tickets: dict[int, Ticket] = {}  # by ticket id, until finished
        self._by_engine_id: dict[tuple[tuple[int, ...], int], Ticket] = {}
        self._thread: threading.Thread | None = None
        self._tick_seconds = 0.0  # an estimate of one tick, for Retry-After
        self.throughput = Throughput()
        self._in_flight = 0  # submitted, not yet finished
        self._in_flight_steps = 0  # their steps, summed
        self._busy_since = time.monotonic()

    # ------------------------------------------------------------------ any thread
    def start(self) -> Runner:
        """Starts the background thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="fastdiff-runner", daemon=True)
            self._thread.start()
        return self

    def submit(self, request: SampleRequest, timeout_s: float | None = None, job: Any = None) -> Ticket:
        """Validates and queues ``request``; returns its ticket at once. With ``job`` (needs a frontend),
        ``request`` is the job's request without its conditioning, which the frontend fills in on the serving
        thread (with the other jobs that arrive by the next tick), and the ticket resolves to the frontend's
        result.

        Raises ValueError/TypeError for a request the pipeline refuses, :class:`QueueFull` when ``max_queue``
        requests already wait, :class:`ShuttingDown` after :meth:`stop`.
        """
        if job is not None and self.frontend is None:
            raise ValueError("a job needs a runner with a frontend")
        request.validate(self.pipe, serving=True)
        if request.n > self.max_batch:
            raise ValueError(f"n = {request.n} is more than max_batch = {self.max_batch} rows")
        now = time.monotonic()
        with self._lock:
            if not self._accepting:
                raise ShuttingDown("the server is shutting down", retry_after=self._wait_estimate(self._in_flight))
            if self._waiting >= self.max_queue:
                if self.metrics:
                    self.metrics.rejected.inc()
                raise QueueFull(
                    f"{self._waiting} requests are waiting (max_queue = {self.max_queue})",
                    retry_after=self._wait_estimate(self._waiting),
                )
            self._waiting += 1
            if not self._in_flight:
                self._busy_since = now
            self._in_flight += 1
            self._in_flight_steps += request.steps
        deadline = None if timeout_s is None else now + timeout_s
        ticket = Ticket(next(self._ids), request, Future(), now, deadline, job=job)
        ticket.future.set_running_or_notify_cancel()
        self._inbox.put(("submit", ticket))
        self._wake.set()
        return ticket

    def cancel(self, ticket: Ticket, reason: BaseException | None = None) -> None:
        """Cancels a ticket (its rows leave at the next tick; its future gets ``reason``, default
        :class:`RequestCancelled`)."""
        ticket.cancel_reason = reason or RequestCancelled(f"request {ticket.id} was cancelled")
        self._inbox.put(("cancel", ticket))
        self._wake.set()

    def close(self) -> None:
        """Stops taking requests (:meth:`submit` raises :class:`ShuttingDown`); what was accepted still runs."""
        with self._lock:
            self._accepting = False

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stops taking requests; with ``drain`` finishes what was accepted, else cancels it; joins the thread."""
        self.close()
        self._abort = not drain
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def accepting(self) -> bool:
        """Whether :meth:`submit` takes requests (False once :meth:`stop` was called or the thread failed)."""
        return self._accepting and (self._thread is None or self._thread.is_alive())

    @property
    def queue_depth(self) -> int:
        """Requests submitted that have not started running."""
        return self._waiting

    @property
    def running_rows(self) -> int:
        """Rows in the running batches."""
        return sum(e.running_rows for e in list(self._engines.values()))

    @property
    def in_flight(self) -> int:
        """Requests submitted that have not finished (queued or running)."""
        return self._in_flight

    def retry_after(self) -> float:
        """Seconds a client refused now should wait: until the queue has cleared (queue full), or until every
        accepted request has finished (shutting down); see :meth:`_wait_estimate`."""
        with self._lock:
            return self._wait_estimate(self._waiting if self._accepting else self._in_flight)

    def _wait_estimate(self, ahead: int) -> float:
        """Seconds until ``ahead`` more requests have finished, at least :data:`MIN_RETRY_AFTER_S`: at the
        throughput measured since the runner became busy; before any of those requests finished, as batches
        of the requests running now, each taking the mean steps of the requests held times the mean tick."""
        now = time.monotonic()
        rate = self.throughput.rate(now, self._busy_since)
        if rate > 0:
            return max(MIN_RETRY_AFTER_S, ahead / rate)
        running = max(1, self._in_flight - self._waiting)
        mean_steps = self._in_flight_steps / max(1, self._in_flight)
        return max(MIN_RETRY_AFTER_S, math.ceil(ahead / running) * mean_steps * self._tick_seconds)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        try:
            with torch.inference_mode():  # no autograd records in serving, whatever the network's parameters say
                self._serve()
        except BaseException as exc:  # a bug here must not leave requests waiting forever
            self.close()
            self._drain_inbox_into_failures(exc)
            for ticket in list(self._tickets.values()):
                self._tickets.pop(ticket.id, None)
                if not ticket.future.done():
                    self._finish(ticket, error=RuntimeError(f"the serving thread failed: {exc!r}"))
            LOG.exception("the serving thread failed; every request it held was failed")

    def _drain_inbox_into_failures(self, exc: BaseException) -> None:
        while True:
            try:
                kind, ticket = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit" and not ticket.future.done():
                self._finish(ticket, error=RuntimeError(f"the serving thread failed: {exc!r}"))

    def _serve(self) -> None:
        while True:
            self._drain_inbox()
            if self._abort:
                for ticket in list(self._tickets.values()):
                    ticket.cancel_reason = ShuttingDown("the server shut down before the request finished")
                    self._cancel_now(ticket)
            self._expire()
            busy = [(shape, e) for shape, e in self._engines.items() if not e.idle]
            if not busy:
                if self._stop and self._inbox.empty():
                    return
                self._wake.wait(self._next_deadline_wait())
                self._wake.clear()
                continue
            ran = False
            for shape, engine in busy:
                if self._held_back(engine):
                    continue
                self._tick(shape, engine)
                ran = True
            if not ran:
                self._wake.wait(self.batch_wait_s / 4 or 0.001)
                self._wake.clear()

    def _drain_inbox(self) -> None:
        fresh: list[Ticket] = []
        while True:
            try:
                kind, ticket = self._inbox.get_nowait()
            except queue.Empty:
                break
            if kind == "submit":
                fresh.append(ticket)
                continue
            self._enqueue_all(fresh)  # in order: a cancel may be for one of them
            fresh = []
            self._cancel_now(ticket)
        self._enqueue_all(fresh)

    def _enqueue_all(self, tickets: list[Ticket]) -> None:
        """Queues the tickets, their jobs prepared by the frontend in one call first (a job it fails, fails)."""
        jobs = [t for t in tickets if t.job is not None]
        failed: dict[int, BaseException] = {}
        if jobs:
            for ticket, prepared in zip(jobs, _per_job(self.frontend.prepare, [t.job for t in jobs]), strict=True):
                if isinstance(prepared, BaseException):
                    failed[ticket.id] = prepared
                else:
                    ticket.request = prepared
        for ticket in tickets:
            if ticket.id in failed:
                self._finish(ticket, error=failed[ticket.id])
            else:
                self._enqueue(ticket)

    def _enqueue(self, ticket: Ticket) -> None:
        shape = tuple(int(s) for s in ticket.request.sample_shape)
        engine = self._engines.get(shape)
        if engine is None:
            admission = "continuous" if self.batching == "continuous" else "drain"
            engine = Engine(
                self.pipe, self.max_batch, admission=admission, max_requests=1 if self.batching == "single" else None
            )
            self._engines[shape] = engine
        try:
            ticket.engine_id = engine.submit(ticket.request)
        except Exception as exc:  # noqa: BLE001  (a request the engine refuses fails alone)
            self._finish(ticket, error=exc)
            return
        self._tickets[ticket.id] = ticket
        self._by_engine_id[(shape, ticket.engine_id)] = ticket

    def _cancel_now(self, ticket: Ticket) -> None:
        if ticket.id not in self._tickets:
            return  # finished already
        shape = tuple(int(s) for s in ticket.request.sample_shape)
        engine = self._engines[shape]
        engine.cancel(ticket.engine_id)
        try:
            engine.result(ticket.engine_id)  # forgets it; its rows leave at the next tick
        except RequestCancelled:
            pass
        self._forget(shape, ticket)
        self._finish(ticket, error=ticket.cancel_reason)

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in list(self._tickets.values()):
            if ticket.deadline is not None and now >= ticket.deadline:
                ticket.cancel_reason = DeadlineExceeded(
                    f"request {ticket.id} did not finish within {ticket.deadline - ticket.submitted:.3g} s"
                )
                self._cancel_now(ticket)

    def _next_deadline_wait(self) -> float | None:
        deadlines = [t.deadline for t in self._tickets.values() if t.deadline is not None]
        if self._stop:
            return 0.05
        return None if not deadlines else max(0.0, min(deadlines) - time.monotonic())

    def _held_back(self, engine: Engine) -> bool:
        """Request-level batching: an empty engine waits up to batch_wait_s after its oldest queued request
        (or until a full batch waits) before it starts a batch."""
        if self.batching != "request" or engine.running_rows or self._stop:
            return False
        queued = [
            t
            for t in self._tickets.values()
            if t.admitted is None
            and t.engine_id is not None
            and self._engines.get(tuple(int(s) for s in t.request.sample_shape)) is engine
        ]
        if not queued:
            return False
        if sum(t.request.n for t in queued) >= self.max_batch:
            return False
        return time.monotonic() - min(t.submitted for t in queued) < self.batch_wait_s

    def _tick(self, shape: tuple[int, ...], engine: Engine) -> None:
        self._record(shape, engine, TickReport(admitted=engine.admit()), 0.0)  # before the (long) network call
        t0 = time.perf_counter()
        try:
            report = engine.tick()
        except Exception as exc:  # noqa: BLE001  (not a network error, which the engine pins on its request)
            self._fail_engine(shape, engine, exc)
            return
        elapsed = time.perf_counter() - t0
        if report.rows:
            self._tick_seconds = 0.9 * self._tick_seconds + 0.1 * elapsed if self._tick_seconds else elapsed
        self._record(shape, engine, report, elapsed)

    def _record(self, shape: tuple[int, ...], engine: Engine, report: TickReport, elapsed: float) -> None:
        now = time.monotonic()
        for rid in report.admitted:
            ticket = self._by_engine_id[(shape, rid)]
            ticket.admitted = now
            with self._lock:
                self._waiting -= 1
            if self.metrics:
                self.metrics.time_to_first_step.observe(now - ticket.submitted)
        if self.metrics and report.rows:
            self.metrics.observe_tick(report.rows, self.max_batch, elapsed)
        report.finished += [rid for rid in report.admitted if engine.done(rid) and rid not in report.finished]
        done: list[tuple[Ticket, torch.Tensor]] = []
        for rid in report.finished:
            ticket = self._by_engine_id[(shape, rid)]
            self._forget(shape, ticket)
            try:
                done.append((ticket, engine.result(rid)))
            except Exception as exc:  # noqa: BLE001  (NaN rows, the network raised on its rows, refused at admission)
                self._finish(ticket, error=exc)
        self._deliver(done)

    def _deliver(self, done: list[tuple[Ticket, torch.Tensor]]) -> None:
        """Finishes the tickets that finished in one tick: samples as CPU float32, jobs through the frontend's
        :meth:`~Frontend.finish` in one call."""
        jobs = [(t, s) for t, s in done if t.job is not None]
        if jobs:
            results = _per_job(self.frontend.finish, [t.job for t, _ in jobs], [s for _, s in jobs])
            for (ticket, _), result in zip(jobs, results, strict=True):
                if isinstance(result, BaseException):
                    self._finish(ticket, error=result)
                else:
                    self._finish(ticket, samples=result)
        for ticket, samples in done:
            if ticket.job is None:
                self._finish(ticket, samples=samples.float().cpu())

    def _fail_engine(self, shape: tuple[int, ...], engine: Engine, exc: Exception) -> None:
        """A tick raised outside the network calls (the engine fails a request the network raised on by itself,
        so this is a bug): its running requests fail with that error; the queued ones move to a fresh engine."""
        del self._engines[shape]
        for ticket in [t for (s, _), t in list(self._by_engine_id.items()) if s == shape]:
            self._forget(shape, ticket)
            if ticket.admitted is not None:
                self._finish(ticket, error=RuntimeError(f"the engine's tick raised: {exc!r}"))
            else:
                self._enqueue(ticket)

    def _forget(self, shape: tuple[int, ...], ticket: Ticket) -> None:
        self._tickets.pop(ticket.id, None)
        self._by_engine_id.pop((shape, ticket.engine_id), None)

    def _finish(self, ticket: Ticket, samples: Any = None, error: BaseException | None = None) -> None:
        with self._lock:
            if ticket.admitted is None:
                self._waiting -= 1
            self._in_flight -= 1
            self._in_flight_steps -= ticket.request.steps
        if ticket.admitted is None:
            ticket.admitted = float("nan")  # never started
        self.throughput.record(time.monotonic())
        if self.metrics:
            self.metrics.observe_finish(ticket, error)
        if error is not None:
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(samples)


def _per_job(call: Any, jobs: list[Any], *per_job: list[Any]) -> list[Any]:
    """``call(jobs, *per_job)``; if it raises, each job alone (so one job's failure fails only that job)."""
    try:
        return list(call(jobs, *per_job))
    except Exception as exc:  # noqa: BLE001  (found out below: whose job it was)
        if len(jobs) == 1:
            return [exc]
    out: list[Any] = []
    for i, job in enumerate(jobs):
        try:
            out += call([job], *[[items[i]] for items in per_job])
        except Exception as exc:  # noqa: BLE001  (this job's own failure)
            out.append(exc)
    return out
