"""Plain-torch reference of the fused sampler step: the CPU implementation and the Triton kernel's oracle.

One row of a coefficient program (see csrc/coefficients.h) applied elementwise, in float32:
    m      = m_u + w (m_c - m_u)                       (classifier-free guidance, when m_uncond is given)
    x_next = c_x x + c_m m + c_h0 h0 + c_h1 h1 + c_h2 h2 + c_z z
    h_new  = d_x x + d_m m,   x0_hat = e_x x + e_m m
z is Philox noise for (seed of sample b, stage, element) unless an explicit noise tensor is given.
nonfinite[b] is lowered to `stage` when sample b's x_next holds a NaN or Inf, so the caller can check
once after the loop, without a host sync per step.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

# Column order of a coefficient row (csrc/coefficients.h).
CX, CM, CH0, CH1, CH2, CZ, DX, DM, EX, EM = range(10)
NUM_COEF = 10
MAX_HISTORY = 3


def fused_step_reference(
    x: torch.Tensor,
    m: torch.Tensor,
    m_uncond: Optional[torch.Tensor],
    guidance_scale: float,
    hist: Sequence[torch.Tensor],
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
) -> None:
    """Applies row ``stage`` of ``coeffs`` ([stages, 10] float64) to ``x`` and ``m``, writing the outputs."""
    row = coeffs[stage].to(torch.float32)
    xf = x.to(torch.float32)
    mf = m.to(torch.float32)
    if m_uncond is not None:
        mu = m_uncond.to(torch.float32)
        mf = mu + guidance_scale * (mf - mu)
    acc = row[CX] * xf + row[CM] * mf
    for j, h in enumerate(hist):
        acc = acc + row[CH0 + j] * h.to(torch.float32)
    if use_noise:
        if noise is not None:
            z = noise.to(torch.float32)
        else:
            z = torch.ops.fastdiff.philox_normal(seeds, x[0].numel(), stage, stream).reshape(x.shape)
        acc = acc + row[CZ] * z
    x_out.copy_(acc)
    if h_out is not None:
        h_out.copy_(row[DX] * xf + row[DM] * mf)
    if x0_out is not None:
        x0_out.copy_(row[EX] * xf + row[EM] * mf)
    bad = ~torch.isfinite(x_out.reshape(x_out.shape[0], -1)).all(dim=1)
    nonfinite.copy_(torch.where(bad, nonfinite.clamp(max=stage), nonfinite))
