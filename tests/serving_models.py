"""Networks for the serving tests, importable by a server subprocess as ``serving_models:<factory>``."""

from __future__ import annotations

import os
import threading
import time

import torch

from fastdiff import Pipeline, Schedule
from fastdiff.demos.mixture import default_mixture
from fastdiff.request import SampleRequest


class ConditionedMixture:
    """The exact mixture network plus 0.05 * y (elementwise, so batch-invariant); y = 99 poisons a row. ``c``
    [B, k] (any width k) adds 0.01 * the sum of each row's k values (per row, so batch-invariant too).

    ``delay_s`` sleeps in every call (a slow network); ``gate``, when set, is a :class:`threading.Event` every
    call waits on (a network the test holds still); ``calls`` counts the calls; y = 77 makes the call raise."""

    def __init__(self, schedule: Schedule, delay_s: float = 0.0):
        self.base = default_mixture().as_model(schedule, "eps")
        self.delay_s = delay_s
        self.gate = None
        self.calls = 0

    def __call__(self, x, t, y=None, c=None):
        self.calls += 1
        if self.gate is not None:
            assert self.gate.wait(30), "the test never released the network"
        if self.delay_s:
            time.sleep(self.delay_s)
        out = self.base(x, t)
        if c is not None:
            out = out + 0.01 * c.to(out.dtype).sum(dim=1).reshape(-1, *([1] * (out.dim() - 1)))
        if y is None:
            return out
        if bool((y == 77).any()):
            raise RuntimeError("the network refuses label 77")
        y = y.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))
        return torch.where(y == 99, torch.full_like(out, float("nan")), out + 0.05 * y)


def mixture_pipeline(delay_s: float = 0.0) -> Pipeline:
    """The conditioned mixture as a pipeline with a fixed sample shape (2,)."""
    schedule = Schedule.vp_discrete()
    return Pipeline(ConditionedMixture(schedule, delay_s), schedule, device="cpu", sample_shape=(2,))


def slow_mixture() -> Pipeline:
    """The mixture sleeping 20 ms per network call (the SIGTERM drain test's server)."""
    return mixture_pipeline(delay_s=0.02)


def gated_mixture_pipeline() -> Pipeline:
    """The mixture with a gate the test opens and closes (``pipe.model.gate``), open at first."""
    pipe = mixture_pipeline()
    pipe.model.gate = threading.Event()
    pipe.model.gate.set()
    return pipe


class FileGate:
    """A gate a server subprocess's network waits on while the file ``path`` exists (the test removes it)."""

    def __init__(self, path: str):
        self.path = path

    def wait(self, timeout: float) -> bool:
        """True once the file is gone; False after ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while os.path.exists(self.path):
            if time.monotonic() > end:
                return False
            time.sleep(0.005)
        return True


def file_gated_mixture() -> Pipeline:
    """The mixture whose network calls wait while the file named by ``$FASTDIFF_TEST_GATE`` exists."""
    pipe = mixture_pipeline()
    pipe.model.gate = FileGate(os.environ["FASTDIFF_TEST_GATE"])
    return pipe


def offline(pipe: Pipeline, req: SampleRequest) -> torch.Tensor:
    """``req`` sampled offline through :meth:`Pipeline.sample`'s keyword arguments: what the engine's contract says a
    served request equals."""
    return pipe.sample(
        (req.n, *req.sample_shape),
        sampler=req.sampler,
        steps=req.steps,
        seed=req.seed,
        spacing=req.spacing,
        guidance_scale=req.guidance_scale,
        model_kwargs=dict(req.model_kwargs),
        uncond_kwargs=req.uncond_kwargs,
        init=req.init,
        mask=req.mask,
        strength=req.strength,
        progress=False,
        **dict(req.options),
    )
