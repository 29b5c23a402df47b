"""fastdiff: fast sampling of diffusion models.

float64 noise schedules in C++, one fused Triton kernel per sampler step, counter-based noise that
depends on each sample's seed alone, exact likelihoods through the probability-flow ODE.
"""
from fastdiff._ext import C as _C  # noqa: F401  (fails with build instructions when missing)
from fastdiff import models, samplers
from fastdiff.checkpoint import load, save
from fastdiff.interpolate import interpolate
from fastdiff.checks import NonFiniteError
from fastdiff.pipeline import Pipeline
from fastdiff.samplers import list_samplers
from fastdiff.schedule import Grid, Schedule

__all__ = ["Grid", "NonFiniteError", "Pipeline", "Schedule", "interpolate", "list_samplers", "load", "models",
           "samplers", "save"]
__version__ = "0.2.0"
