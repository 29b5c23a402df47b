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

Editing (image-to-image needs nothing here; inpainting does): with ``blend`` [R, 3] float64 (one row per
coefficient row: on/off w, alpha a, sigma s of the state after the step), ``init`` and ``mask`` (x's shape; mask 1 =
regenerate, 0 = known, as diffusers), the known region of x_next is replaced by ``init`` forward-noised to the
step's end:
    keep   = w (1 - mask)
    x_out  = (1 - keep) x_next + keep (a init + s zk)      (diffusers' blend: exact at keep 0 and 1)
zk is Philox noise on its own stream (:data:`STREAM_KNOWN`, keyed by seed, stage and element like z) unless an
explicit ``init_noise`` tensor is given. h_new and x0_out are not blended (a multistep history holds what the
network said, as diffusers' schedulers do).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff.kernels.philox import STREAM_KNOWN

# Column order of a coefficient row (csrc/coefficients.h).
CX, CM, CH0, CH1, CH2, CZ, DX, DM, EX, EM, CX0, DX0 = range(12)
NUM_COEF = 12
MAX_HISTORY = 3
# Column order of a per-row descriptor (``rows``).
ROW_COEF, ROW_STAGE, ROW_READ0, ROW_READ1, ROW_READ2, ROW_WRITE = range(6)
ROW_FIELDS = 6
# Column order of a blend row (inpainting): on/off, alpha and sigma of the known region after the step.
BLEND_W, BLEND_A, BLEND_S = range(3)
BLEND_COLS = 3


def check_blend_args(
    x: torch.Tensor,
    coeffs: torch.Tensor,
    init: torch.Tensor | None,
    mask: torch.Tensor | None,
    blend: torch.Tensor | None,
    init_noise: torch.Tensor | None,
) -> None:
    """Raises ValueError when the inpainting arguments are inconsistent (shared by every implementation): ``init``,
    ``mask`` and ``blend`` come together, ``init_noise`` only with them; init, mask and init_noise have x's shape and
    blend is [rows, 3], one row per row of ``coeffs``."""
    given = (init is not None, mask is not None, blend is not None)
    if any(given) and not all(given):
        raise ValueError("init, mask and blend are the inpainting arguments: pass all three or none")
    if init_noise is not None and blend is None:
        raise ValueError("init_noise needs init, mask and blend")
    for name, t in (("init", init), ("mask", mask), ("init_noise", init_noise)):
        if t is not None and tuple(t.shape) != tuple(x.shape):
            raise ValueError(f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
    if blend is not None and (blend.dim() != 2 or tuple(blend.shape) != (coeffs.shape[0], BLEND_COLS)):
        raise ValueError(
            f"blend must be [{coeffs.shape[0]}, {BLEND_COLS}] (a row per coefficient row), got {tuple(blend.shape)}"
        )


def check_per_row_args(
    x: torch.Tensor,
    hist: Sequence[torch.Tensor],
    h_out: torch.Tensor | None,
    rows: torch.Tensor | None,
    pool: torch.Tensor | None,
    row_guidance: torch.Tensor | None,
    m_uncond: torch.Tensor | None,
) -> None:
    """Raises ValueError when the per-row arguments are inconsistent (shared by every implementation).

    ``row_guidance`` (one guidance weight per sample) works with or without ``rows``: a captured graph reads the
    scale from a buffer so that one graph serves every scale."""
    batch = x.shape[0]
    if row_guidance is not None and (row_guidance.dtype != torch.float32 or tuple(row_guidance.shape) != (batch,)):
        raise ValueError(f"row_guidance must be float32 of shape ({batch},)")
    if row_guidance is not None and m_uncond is None:
        raise ValueError("row_guidance needs m_uncond")
    if rows is None:
        if pool is not None:
            raise ValueError("pool is a per-row argument: pass rows as well")
        return
    if rows.dtype != torch.int32 or tuple(rows.shape) != (batch, ROW_FIELDS):
        raise ValueError(f"rows must be int32 of shape ({batch}, {ROW_FIELDS}), got {rows.dtype} {tuple(rows.shape)}")
    if len(hist) or h_out is not None:
        raise ValueError("in per-row mode history is read from and written to pool: hist must be [] and h_out None")
    if pool is not None and (pool.dim() != x.dim() + 1 or pool.shape[1:] != x.shape or pool.dtype != x.dtype):
        raise ValueError(f"pool must be [slots, *x.shape] in x's dtype, got {pool.dtype} {tuple(pool.shape)}")


def _per_sample(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] so it broadcasts over a sample."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def _blend_known(
    acc: torch.Tensor,
    x: torch.Tensor,
    init: torch.Tensor,
    mask: torch.Tensor,
    blend: torch.Tensor,
    row: int | torch.Tensor,
    stages: torch.Tensor | None,
    seeds: torch.Tensor,
    init_noise: torch.Tensor | None,
    stage: int,
) -> torch.Tensor:
    """x_next with its known region replaced by init forward-noised to the step's end (module docstring)."""
    nd = x.dim()
    if stages is None:
        r = blend[row].to(torch.float32)
        w, a, s = r[BLEND_W], r[BLEND_A], r[BLEND_S]
    else:
        r = blend[row.long()].to(torch.float32)
        w, a, s = (_per_sample(r[:, i], nd) for i in (BLEND_W, BLEND_A, BLEND_S))
    if init_noise is not None:
        zk = init_noise.to(torch.float32)
    elif stages is None:
        zk = torch.ops.fastdiff.philox_normal(seeds, x[0].numel(), stage, STREAM_KNOWN).reshape(x.shape)
    else:
        zk = torch.ops.fastdiff.philox_normal_rows(seeds, x[0].numel(), stages, STREAM_KNOWN).reshape(x.shape)
    keep = w * (1.0 - mask.to(torch.float32))
    return (1.0 - keep) * acc + keep * (a * init.to(torch.float32) + s * zk)


def fused_step_reference(
    x: torch.Tensor,
    m: torch.Tensor,
    m_uncond: torch.Tensor | None,
    guidance_scale: float,
    hist: Sequence[torch.Tensor],
    coeffs: torch.Tensor,
    stage: int,
    seeds: torch.Tensor,
    stream: int,
    use_noise: bool,
    noise: torch.Tensor | None,
    x_out: torch.Tensor,
    h_out: torch.Tensor | None,
    x0_out: torch.Tensor | None,
    nonfinite: torch.Tensor,
    clip: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    row_guidance: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    blend: torch.Tensor | None = None,
    init_noise: torch.Tensor | None = None,
) -> None:
    """Applies row ``stage`` of ``coeffs`` ([R, 12] float64) to ``x`` and ``m`` (or one row per sample,
    see the module docstring), writing the outputs."""
    check_per_row_args(x, hist, h_out, rows, pool, row_guidance, m_uncond)
    check_blend_args(x, coeffs, init, mask, blend, init_noise)
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
    if blend is not None:
        acc = _blend_known(acc, x, init, mask, blend, stage if stages is None else rows[:, ROW_COEF], stages, seeds,
                           init_noise, stage)  # fmt: skip
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
