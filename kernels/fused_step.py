"""The fused sampler step as one Triton kernel (see kernels/reference.py for the math it implements).

Grid: (cdiv(numel per sample, BLOCK), batch). Each program loads its sample's seed, reads x, m (and
the guidance and history inputs), makes the noise in registers with Philox at counter
(element, stage, stream), and writes x_next (and h_new, x0_hat). Arithmetic is float32 whatever the
storage dtype; coefficients are read from a float64 table on the device.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from fastdiff.kernels.philox import normal_at

BLOCK_SIZE = 1024


@triton.jit
def _fused_step_kernel(
    x_ptr, m_ptr, mu_ptr, h0_ptr, h1_ptr, h2_ptr, coef_ptr, seeds_ptr, noise_ptr,
    x_out_ptr, h_out_ptr, x0_out_ptr, nonfinite_ptr,
    numel, stage, stream, guidance_scale,
    NUM_HIST: tl.constexpr, HAS_UNCOND: tl.constexpr, USE_NOISE: tl.constexpr,
    EXPLICIT_NOISE: tl.constexpr, WRITE_H: tl.constexpr, WRITE_X0: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = j < numel
    off = b * numel + j
    row = coef_ptr + stage * 10
    c_x = tl.load(row + 0).to(tl.float32)
    c_m = tl.load(row + 1).to(tl.float32)

    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(tl.float32)
        m = mu + guidance_scale * (m - mu)
    acc = c_x * x + c_m * m
    if NUM_HIST >= 1:
        acc += tl.load(row + 2).to(tl.float32) * tl.load(h0_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if NUM_HIST >= 2:
        acc += tl.load(row + 3).to(tl.float32) * tl.load(h1_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if NUM_HIST >= 3:
        acc += tl.load(row + 4).to(tl.float32) * tl.load(h2_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if USE_NOISE:
        if EXPLICIT_NOISE:
            z = tl.load(noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
        else:
            seed = tl.load(seeds_ptr + b)
            z = normal_at(seed, j, stage, stream)
        acc += tl.load(row + 5).to(tl.float32) * z
    y = acc.to(x_out_ptr.dtype.element_ty)
    tl.store(x_out_ptr + off, y, mask=mask)
    if WRITE_H:
        h = tl.load(row + 6).to(tl.float32) * x + tl.load(row + 7).to(tl.float32) * m
        tl.store(h_out_ptr + off, h.to(h_out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        x0 = tl.load(row + 8).to(tl.float32) * x + tl.load(row + 9).to(tl.float32) * m
        tl.store(x0_out_ptr + off, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)
    # Record the first non-finite stage of this sample: one atomic per block that saw a NaN/Inf.
    yf = y.to(tl.float32)
    bad = mask & ((yf != yf) | (tl.abs(yf) == float("inf")))
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.atomic_min(nonfinite_ptr + b, stage)


def launch_fused_step(
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
    launcher=None,
) -> None:
    """Launches the Triton kernel (same arguments as ``fused_step_reference``).

    ``launcher`` wraps the kernel for ``torch.library`` (``wrap_triton``); left None the kernel is launched
    directly, which is how tests run it under TRITON_INTERPRET=1 on CPU tensors.
    """
    batch = x.shape[0]
    numel = x[0].numel()
    h = list(hist) + [x] * (3 - len(hist))
    kernel = _fused_step_kernel if launcher is None else launcher(_fused_step_kernel)
    grid = (triton.cdiv(numel, BLOCK_SIZE), batch)
    kernel[grid](
        x, m, m_uncond if m_uncond is not None else m, h[0], h[1], h[2], coeffs, seeds,
        noise if noise is not None else x,
        x_out, h_out if h_out is not None else x_out, x0_out if x0_out is not None else x_out, nonfinite,
        numel, stage, stream, float(guidance_scale),
        NUM_HIST=len(hist), HAS_UNCOND=m_uncond is not None, USE_NOISE=bool(use_noise),
        EXPLICIT_NOISE=noise is not None, WRITE_H=h_out is not None, WRITE_X0=x0_out is not None,
        BLOCK=BLOCK_SIZE,
    )
