"""Serving: the step-level batching engine (:mod:`fastdiff.serving.engine`), the runner that drives it from a
thread (:mod:`fastdiff.serving.runner`), and the HTTP server around both (``fastdiff serve``:
:mod:`fastdiff.serving.server`, :mod:`fastdiff.serving.app`, :mod:`fastdiff.serving.api`; client:
:mod:`fastdiff.serving.client`). Rows of one running batch each run their own sampler program (per-row
coefficient rows, noise stages, history slots and guidance in one fused op per tick), so requests join and leave
at any tick and a request's samples do not depend on its batch. The HTTP modules need ``fastdiff[serve]``."""

from fastdiff.request import SampleRequest
from fastdiff.serving.engine import Engine, RequestCancelled, RequestFailed, TickReport
from fastdiff.serving.runner import DeadlineExceeded, QueueFull, Runner, ShuttingDown, Ticket

__all__ = [
    "DeadlineExceeded",
    "Engine",
    "QueueFull",
    "RequestCancelled",
    "RequestFailed",
    "Runner",
    "SampleRequest",
    "ShuttingDown",
    "TickReport",
    "Ticket",
]
