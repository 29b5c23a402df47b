"""Serving: the step-level batching engine (:mod:`fastdiff.serving.engine`). Rows of one running batch each run
their own sampler program (per-row coefficient rows, noise stages, history slots and guidance in one fused
op per tick), so requests join and leave at any tick and a request's samples do not depend on its batch."""
from fastdiff.serving.engine import Engine, RequestFailed, SampleRequest

__all__ = ["Engine", "RequestFailed", "SampleRequest"]
