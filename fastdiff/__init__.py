"""fastdiff: fast sampling of diffusion models.

float64 noise schedules in C++, one fused Triton kernel per sampler step, counter-based noise that
depends on each sample's seed alone, exact likelihoods through the probability-flow ODE.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastdiff import samplers
from fastdiff._ext import C as _C  # noqa: F401  (fails with build instructions when missing)
from fastdiff.checkpoint import load, save
from fastdiff.pipeline import Pipeline
from fastdiff.request import SampleRequest
from fastdiff.runtime.checks import NonFiniteError
from fastdiff.samplers import list_samplers
from fastdiff.schedule import Grid, Schedule
from fastdiff.solvers.tune import tune
from fastdiff.solvers.tuned import TunedGrid

__all__ = [
    "Grid",
    "NonFiniteError",
    "Pipeline",
    "SampleRequest",
    "Schedule",
    "TunedGrid",
    "from_diffusers",
    "list_samplers",
    "load",
    "samplers",
    "save",
    "tune",
]


def from_diffusers(model: Any, scheduler: Any, **pipeline_kwargs: Any) -> Pipeline:
    """:func:`fastdiff.diffusers.pipeline.from_diffusers` (imported when called: the adapters need the ``diffusers``
    extra, the package does not)."""
    from fastdiff.diffusers.pipeline import from_diffusers as build

    return build(model, scheduler, **pipeline_kwargs)


try:
    __version__ = version("fastdiff")
except PackageNotFoundError:  # imported from a tree that was never installed
    __version__ = "0+unknown"
