"""Plain-torch reference of the fused sampler step: the CPU implementation and the Triton kernel's oracle.

One row of a coefficient program (see csrc/coefficients.h) applied elementwise, in float32:
    m      = m_u + w (m_c - m_u)                       (classifier-free guidance, when m_uncond is given)
    x0     = e_x x + e_m m                             (the denoised estimate)
    x0c    = clamp(x0, -bound_b, bound_b) * scale_b     (when ``clip`` is given, else x0c = x0)
    x_next = c_x x + c_m m + c_x0 x0c + c_h0 h0 + c_h1 h1 + c_h2 h2 + c_z z
    h_new  = d_x x + d_m m + d_x0 x0c,   x0_out = x0c
z is Philox noise for (seed of sample b, stage, element) unless an explicit noise tensor is given.
nonfinite[b] is lowered to `stage` when sample b's x_next holds a NaN or Inf, so the caller can check
once after the loop, without a host sync per step.

A row with c_x0 = d_x0 = 0 is linear in (x, m); :func:`fastdiff.program.clip_form` rewrites a row to
route the network output through x0c instead, which is how diffusers' ``clip_sample`` and dynamic
``thresholding`` enter a step (the step is linear in x and the clipped x0).

Per-row mode (the serving engine: every sample runs its own program): ``rows`` [B, 6] int32 gives, per
sample, the row of ``coeffs`` to apply (coeffs is then the concatenation of many programs' tables), the
stage that keys its noise and its non-finite record, the three history slots it reads (-1 = none) and
the slot it writes (-1 = none). History lives in ``pool`` [slots, B, ...], read and written in place
(each element is read before it is written); ``row_guidance`` [B] float32 gives each sample's guidance
weight. In this mode ``stage`` is ignored and ``hist`` must be empty and ``h_out`` None.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

# Column order of a coefficient row (csrc/coefficients.h).
CX, CM, CH0, CH1, CH2, CZ, DX, DM, EX, EM, CX0, DX0 = range(12)
NUM_COEF = 12
MAX_HISTORY = 3
# Column order of a per-row descriptor (``rows``).
ROW_COEF, ROW_STAGE, ROW_READ0, ROW_READ1, ROW_READ2, ROW_WRITE = range(6)
ROW_FIELDS = 6


def check_per_row_args(x: torch.Tensor, hist: Sequence[torch.Tensor], h_out: Optional[torch.Tensor],
                       rows: Optional[torch.Tensor], pool: Optional[torch.Tensor],
                       row_guidance: Optional[torch.Tensor], m_uncond: Optional[torch.Tensor]) -> None:
    """Raises ValueError when the per-row arguments are inconsistent (shared by every implementation)."""
    if rows is None:
        if pool is not None or row_guidance is not None:
            raise ValueError("pool and row_guidance are per-row arguments: pass rows as well")
        return
    batch = x.shape[0]
    if rows.dtype != torch.int32 or tuple(rows.shape) != (batch, ROW_FIELDS):
        raise ValueError(f"rows must be int32 of shape ({batch}, {ROW_FIELDS}), got {rows.dtype} {tuple(rows.shape)}")
    if len(hist) or h_out is not None:
        raise ValueError("in per-row mode history is read from and written to pool: hist must be [] and h_out None")
    if pool is not None and (pool.dim() != x.dim() + 1 or pool.shape[1:] != x.shape or pool.dtype != x.dtype):
        raise ValueError(f"pool must be [slots, *x.shape] in x's dtype, got {pool.dtype} {tuple(pool.shape)}")
    if row_guidance is not None and (row_guidance.dtype != torch.float32 or tuple(row_guidance.shape) != (batch,)):
        raise ValueError(f"row_guidance must be float32 of shape ({batch},)")
    if row_guidance is not None and m_uncond is None:
        raise ValueError("row_guidance needs m_uncond")


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so it broadcasts over a sample."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


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
    clip: Optional[torch.Tensor] = None,
    rows: Optional[torch.Tensor] = None,
    pool: Optional[torch.Tensor] = None,
    row_guidance: Optional[torch.Tensor] = None,
) -> None:
    """Applies row ``stage`` of ``coeffs`` ([R, 12] float64) to ``x`` and ``m`` (or one row per sample,
    see the module docstring), writing the outputs."""
    check_per_row_args(x, hist, h_out, rows, pool, row_guidance, m_uncond)
    nd = x.dim()
    if rows is None:
        c = coeffs[stage].to(torch.float32)
        col = lambda i: c[i]  # noqa: E731
        stages = None
    else:
        c = coeffs[rows[:, ROW_COEF].long()].to(torch.float32)  # [B, 12]
        col = lambda i: _per_sample(c[:, i], nd)  # noqa: E731
        stages = rows[:, ROW_STAGE]
    xf = x.to(torch.float32)
    mf = m.to(torch.float32)
    if m_uncond is not None:
        mu = m_uncond.to(torch.float32)
        w = guidance_scale if row_guidance is None else _per_sample(row_guidance, nd)
        mf = mu + w * (mf - mu)
    x0 = col(EX) * xf + col(EM) * mf
    if clip is not None:
        bound = _per_sample(clip[:, 0].to(torch.float32), nd)
        x0 = torch.minimum(torch.maximum(x0, -bound), bound) * _per_sample(clip[:, 1].to(torch.float32), nd)
    acc = col(CX) * xf + col(CM) * mf + col(CX0) * x0
    if rows is None:
        for j, h in enumerate(hist):
            acc = acc + col(CH0 + j) * h.to(torch.float32)
    elif pool is not None:
        batch = torch.arange(x.shape[0], device=x.device)
        for j in range(MAX_HISTORY):
            slot = rows[:, ROW_READ0 + j].long()
            h = torch.where(_per_sample(slot >= 0, nd), pool[slot.clamp(min=0), batch].to(torch.float32), 0.0)
            acc = acc + col(CH0 + j) * h
    if use_noise:
        if noise is not None:
            z = noise.to(torch.float32)
        elif stages is None:
            z = torch.ops.fastdiff.philox_normal(seeds, x[0].numel(), stage, stream).reshape(x.shape)
        else:
            z = torch.ops.fastdiff.philox_normal_rows(seeds, x[0].numel(), stages, stream).reshape(x.shape)
        acc = acc + col(CZ) * z
    h_new = col(DX) * xf + col(DM) * mf + col(DX0) * x0
    x_out.copy_(acc)
    if h_out is not None:
        h_out.copy_(h_new)
    if rows is not None and pool is not None:
        # Without data-dependent control flow (the op's body is traced): samples that write nothing
        # write their slot 0's own value back.
        write = rows[:, ROW_WRITE].long()
        batch = torch.arange(x.shape[0], device=x.device)
        keep = pool[write.clamp(min=0), batch]
        pool[write.clamp(min=0), batch] = torch.where(_per_sample(write >= 0, nd), h_new.to(pool.dtype), keep)
    if x0_out is not None:
        x0_out.copy_(x0)
    bad = ~torch.isfinite(x_out.reshape(x_out.shape[0], -1)).all(dim=1)
    stage_now = torch.full_like(nonfinite, stage) if stages is None else stages.to(nonfinite.dtype)
    nonfinite.copy_(torch.where(bad, torch.minimum(nonfinite, stage_now), nonfinite))
