"""fastdiff: fast sampling of diffusion models.

float64 noise schedules in C++, one fused Triton kernel per sampler step, counter-based noise that
depends on each sample's seed alone, and whole-loop CUDA graphs.
"""
from fastdiff._ext import C as _C  # noqa: F401  (fails with build instructions when missing)
from fastdiff.schedule import Grid, Schedule

__all__ = ["Grid", "Schedule"]
__version__ = "0.1.0"
