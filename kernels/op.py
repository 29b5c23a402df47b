"""``torch.ops.fastdiff.fused_step``: the fused sampler step as one registered op.

CUDA tensors launch the Triton kernel through ``wrap_triton``; every other device runs the plain-torch
reference (registered as the CPU kernel, and taken by the op's body when traced on CPU), so
torch.compile, CUDA graphs and a TorchDispatchMode see exactly one op per step on any device.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch.library import triton_op, wrap_triton

from fastdiff.kernels import philox as _philox  # noqa: F401  (registers fastdiff::philox_normal)
from fastdiff.kernels.fused_step import launch_fused_step
from fastdiff.kernels.reference import fused_step_reference


@triton_op("fastdiff::fused_step", mutates_args={"x_out", "h_out", "x0_out", "nonfinite", "pool"})
def fused_step(
    x: torch.Tensor,
    m: torch.Tensor,
    m_uncond: Optional[torch.Tensor],
    guidance_scale: float,
    hist: List[torch.Tensor],
    coeffs: torch.Tensor,
    stage: int,
    seeds: torch.Tensor,
    stream: int,
    use_noise: bool,
    noise: Optional[torch.Tensor],
    x_out: torch.Tensor,
    h_out: Optional[torch.Tensor],
    x0_out: Optional[torch.Tensor],
    nonfinite: torch.Tensor,
    clip: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
    pool: Optional[torch.Tensor] = None,
    row_guidance: Optional[torch.Tensor] = None,
) -> None:
    """One sampler step: ``x_out = c_x x + c_m m + c_x0 x0c + sum_j c_hj h_j + c_z z`` with row ``stage`` of
    ``coeffs`` (or one row per sample: ``rows``, ``pool``, ``row_guidance``).

    See kernels/reference.py for every argument. Mutates ``x_out``, ``h_out``, ``x0_out``, ``nonfinite`` and
    ``pool``.
    """
    args = (x, m, m_uncond, guidance_scale, hist, coeffs, stage, seeds, stream, use_noise, noise,
            x_out, h_out, x0_out, nonfinite, clip, rows, pool, row_guidance)
    if x.device.type != "cuda":
        fused_step_reference(*args)
        return
    launch_fused_step(*args, launcher=wrap_triton)


@fused_step.register_kernel("cpu")
def _fused_step_cpu(*args) -> None:
    fused_step_reference(*args)


@fused_step.register_fake
def _fused_step_fake(*args) -> None:
    return None
