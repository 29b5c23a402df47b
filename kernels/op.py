"""``torch.ops.fastdiff.fused_step``: the fused sampler step as one registered op.

The op is defined with ``torch.library.Library`` (schema below) and has a kernel per device: on CPU the
C++ fused step (kernels/cpu.py), on CUDA the Triton kernel (kernels/fused_step.py), plus a fake kernel
for tracing. torch.compile, CUDA graphs and a TorchDispatchMode see exactly one op per step on any device.

Why not ``torch.library.triton_op`` (which this op was first): its Python-level dispatch costs grow with
the number of arguments, ~0.3 ms per call for this 19-argument op on the CPU, more than the whole C++ step
at 64k elements; a ``Library`` kernel is reached in ~12 us. torch.compile sees the op as opaque either way
for our purposes (one op per step); what triton_op added, tracing into the Triton kernel, is not needed.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from fastdiff.kernels import philox as _philox  # noqa: F401  (registers fastdiff::philox_normal)
from fastdiff.kernels.cpu import fused_step_cpu
from fastdiff.kernels.fused_step import launch_fused_step
from fastdiff.kernels.reference import fused_step_reference

SCHEMA = (
    "fused_step(Tensor x, Tensor m, Tensor? m_uncond, float guidance_scale, Tensor[] hist, Tensor coeffs, "
    "int stage, Tensor seeds, int stream, bool use_noise, Tensor? noise, Tensor(a!) x_out, Tensor(b!)? h_out, "
    "Tensor(c!)? x0_out, Tensor(d!) nonfinite, Tensor? clip=None, Tensor? rows=None, Tensor(e!)? pool=None, "
    "Tensor? row_guidance=None) -> ()"
)

_lib = torch.library.Library("fastdiff", "FRAGMENT")
_lib.define(SCHEMA)


def _fused_step_cuda(x: torch.Tensor, m: torch.Tensor, m_uncond: Optional[torch.Tensor], guidance_scale: float,
                     hist: List[torch.Tensor], coeffs: torch.Tensor, stage: int, seeds: torch.Tensor, stream: int,
                     use_noise: bool, noise: Optional[torch.Tensor], x_out: torch.Tensor,
                     h_out: Optional[torch.Tensor], x0_out: Optional[torch.Tensor], nonfinite: torch.Tensor,
                     clip: Optional[torch.Tensor] = None, rows: Optional[torch.Tensor] = None,
                     pool: Optional[torch.Tensor] = None, row_guidance: Optional[torch.Tensor] = None) -> None:
    with torch.cuda.device(x.device):
        launch_fused_step(x, m, m_uncond, guidance_scale, hist, coeffs, stage, seeds, stream, use_noise, noise,
                          x_out, h_out, x0_out, nonfinite, clip, rows, pool, row_guidance)


def _fused_step_fake(*args, **kwargs) -> None:
    return None


cpu_kernel = fused_step_cpu
"""What the CPU kernel runs (looked up per call, so a test can swap in the Triton launch or the reference)."""


def _fused_step_on_cpu(*args, **kwargs) -> None:
    cpu_kernel(*args, **kwargs)


_lib.impl("fused_step", _fused_step_on_cpu, "CPU")
_lib.impl("fused_step", _fused_step_cuda, "CUDA")
torch.library.register_fake("fastdiff::fused_step", _fused_step_fake, lib=_lib)

fused_step = torch.ops.fastdiff.fused_step
"""The registered op (CPU: C++, CUDA: Triton); :func:`fused_step_reference` is its plain-torch oracle."""

__all__ = ["SCHEMA", "cpu_kernel", "fused_step", "fused_step_reference"]
