"""The Python CPU kernel of ``fastdiff::fused_step`` (``fastdiff::fused_step_any``, and fused_step's own where
fastdiff._ops is not built; fastdiff/kernels/op.py): the C++ fused step (csrc/fused_step.cpp) on tensor data pointers.

One pass over memory per step, OpenMP over (sample, block) items, float32 arithmetic from the float64 row,
Philox noise made in the loop (vectorised log/cos/sin, within ~1e-6 of the libm generator). Inputs the C++
kernel does not take (non-contiguous outputs, mixed state dtypes) go to the plain-torch reference instead,
so every call gives the reference's result up to float32 rounding.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fastdiff._ext import C
from fastdiff.kernels.launch_args import model_dtype
from fastdiff.kernels.reference import check_blend_args, check_per_row_args, fused_step_reference

_STATE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _as(t: torch.Tensor | None, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """t contiguous and (when given) in dtype; t itself when it already is (the common case: no call into torch)."""
    if t is None or ((dtype is None or t.dtype == dtype) and t.is_contiguous()):
        return t
    return (t if dtype is None else t.to(dtype)).contiguous()


def _c_compatible(x: torch.Tensor, outs: Sequence[torch.Tensor | None], states: Sequence[torch.Tensor]) -> bool:
    dtype, shape = x.dtype, x.shape
    if dtype not in _STATE_TYPES:
        return False
    for t in outs:
        if t is not None and (t.dtype != dtype or not t.is_contiguous() or t.shape != shape):
            return False
    for t in states:
        if t.dtype != dtype or t.shape != shape:
            return False
    return True


def fused_step_cpu(
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
    """Same arguments and results as :func:`fastdiff.kernels.reference.fused_step_reference`, in one C++ pass."""
    # The op's Python CPU kernel: every step where fastdiff._ops is not built (so it makes as few calls into torch
    # as the checks allow), else only the layouts the C++ kernel (csrc/torch/fused_step_op.cpp) passes on.
    check_per_row_args(x, hist, h_out, rows, pool, row_guidance, m_uncond)
    check_blend_args(x, coeffs, init, mask, blend, init_noise)
    if (
        not _c_compatible(x, (x_out, h_out, x0_out), hist)
        or (pool is not None and not pool.is_contiguous())
        or nonfinite.dtype != torch.int32
        or not nonfinite.is_contiguous()
    ):
        fused_step_reference(x, m, m_uncond, guidance_scale, hist, coeffs, stage, seeds, stream, use_noise, noise,
                             x_out, h_out, x0_out, nonfinite, clip, rows, pool, row_guidance, init, mask, blend,
                             init_noise)  # fmt: skip
        return
    state = x.dtype
    x = _as(x)
    nz = noise if use_noise else None
    # The kernel reads m, m_uncond and noise in one dtype: the state's where all of them are in it, else float32.
    md = model_dtype(state, m, m_uncond, nz, init_noise)
    m, mu, nz, kz = _as(m, md), _as(m_uncond, md), _as(nz, md), _as(init_noise, md)
    known, keep = _as(init, state), _as(mask, state)
    bl = None if blend is None else _as(blend, torch.float64)
    model_f32 = md == torch.float32
    # Every converted tensor is held in a local until the call returns (the kernel gets raw pointers).
    hs = [_as(h) for h in hist] if hist else ()
    n_hist = len(hs)
    h0 = hs[0].data_ptr() if n_hist > 0 else 0
    h1 = hs[1].data_ptr() if n_hist > 1 else 0
    h2 = hs[2].data_ptr() if n_hist > 2 else 0
    coef, sd = _as(coeffs, torch.float64), _as(seeds, torch.int64)
    cl = None if clip is None else _as(clip, torch.float32)
    rw = None if rows is None else _as(rows)
    gd = None if row_guidance is None else _as(row_guidance)
    batch = x.shape[0]
    C.fused_step_cpu(batch, x.numel() // batch if batch else 0, _STATE_TYPES[state], model_f32, x.data_ptr(),
                     m.data_ptr(), _ptr(mu), float(guidance_scale), _ptr(gd), h0, h1, h2, n_hist, coef.data_ptr(),
                     int(stage), sd.data_ptr(), int(stream), bool(use_noise), _ptr(nz), x_out.data_ptr(),
                     _ptr(h_out), _ptr(x0_out), nonfinite.data_ptr(), _ptr(cl), _ptr(rw), _ptr(pool),
                     torch.get_num_threads(), _ptr(known), _ptr(keep), _ptr(bl), _ptr(kz))  # fmt: skip
