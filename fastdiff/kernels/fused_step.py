"""The fused sampler step as one Triton kernel (see fastdiff/kernels/reference.py for the math it implements).

Grid: one program per (sample, block of BLOCK elements), the batch folded into axis x
(fastdiff/kernels/grid.py: CUDA caps axis y at 65,535 samples). Each program loads its sample's seed (and, in
per-row mode, its coefficient row, noise stage and history slots), reads x, m (and the guidance and history inputs),
makes the noise in registers with Philox at counter (element, stage, stream), and writes x_next (and
h_new, x0_hat). Arithmetic is float32 whatever the storage dtype; coefficients are read from a float64
table on the device.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from fastdiff.kernels.grid import sample_block, sample_grid
from fastdiff.kernels.launch_args import LaunchArgs, check_launch_args, numel_per_sample
from fastdiff.kernels.philox import STREAM_KNOWN, normal_at
from fastdiff.kernels.reference import (
    BLEND_COLS,
    MAX_HISTORY,
    ROW_FIELDS,
    check_blend_args,
    check_per_row_args,
)

BLOCK_SIZE = 1024
_STREAM_KNOWN = tl.constexpr(STREAM_KNOWN)  # a jit function reads module globals only as constexprs


@triton.jit
def _history_term(
    acc,
    row,
    which: tl.constexpr,
    h_ptr,
    pool_ptr,
    rows_ptr,
    b,
    batch,
    numel,
    off,
    mask,
    NUM_HIST: tl.constexpr,
    PER_ROW: tl.constexpr,
):
    """acc + c_hj * h_j: h_j from its own tensor, or from the pool slot the sample's descriptor names."""
    if PER_ROW:
        slot = tl.load(rows_ptr + b * 6 + 2 + which)
        ok = mask & ((off * 0 + slot) >= 0)  # broadcast the scalar test over the block
        base = tl.maximum(slot, 0).to(tl.int64) * batch * numel
        h = tl.load(pool_ptr + base + off, mask=ok, other=0.0).to(tl.float32)
        acc += tl.load(row + 2 + which).to(tl.float32) * h
    elif NUM_HIST > which:
        acc += tl.load(row + 2 + which).to(tl.float32) * tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
    return acc


@triton.jit
def _fused_step_kernel(
    x_ptr,
    m_ptr,
    mu_ptr,
    h0_ptr,
    h1_ptr,
    h2_ptr,
    coef_ptr,
    seeds_ptr,
    noise_ptr,
    x_out_ptr,
    h_out_ptr,
    x0_out_ptr,
    nonfinite_ptr,
    clip_ptr,
    rows_ptr,
    pool_ptr,
    guid_ptr,
    init_ptr,
    mask_ptr,
    blend_ptr,
    init_noise_ptr,
    batch,
    numel,
    stage,
    stream,
    guidance_scale,
    NUM_HIST: tl.constexpr,
    HAS_UNCOND: tl.constexpr,
    USE_NOISE: tl.constexpr,
    EXPLICIT_NOISE: tl.constexpr,
    WRITE_H: tl.constexpr,
    WRITE_X0: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    PER_ROW: tl.constexpr,
    HAS_POOL: tl.constexpr,
    ROW_GUIDANCE: tl.constexpr,
    HAS_BLEND: tl.constexpr,
    EXPLICIT_INIT_NOISE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b, j = sample_block(numel, BLOCK)
    mask = j < numel
    off = b * numel + j
    if PER_ROW:
        row_index = tl.load(rows_ptr + b * 6).to(tl.int64)
        stage = tl.load(rows_ptr + b * 6 + 1)
    else:
        row_index = stage.to(tl.int64)
    row = coef_ptr + row_index * 12

    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(m_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if HAS_UNCOND:
        mu = tl.load(mu_ptr + off, mask=mask, other=0.0).to(tl.float32)
        if ROW_GUIDANCE:
            m = mu + tl.load(guid_ptr + b) * (m - mu)
        else:
            m = mu + guidance_scale * (m - mu)
    x0 = tl.load(row + 8).to(tl.float32) * x + tl.load(row + 9).to(tl.float32) * m
    if HAS_CLIP:
        bound = tl.load(clip_ptr + b * 2)
        x0 = tl.minimum(tl.maximum(x0, -bound), bound) * tl.load(clip_ptr + b * 2 + 1)
    acc = tl.load(row + 0).to(tl.float32) * x + tl.load(row + 1).to(tl.float32) * m
    acc += tl.load(row + 10).to(tl.float32) * x0
    if HAS_POOL or not PER_ROW:
        acc = _history_term(acc, row, 0, h0_ptr, pool_ptr, rows_ptr, b, batch, numel, off, mask, NUM_HIST, PER_ROW)
        acc = _history_term(acc, row, 1, h1_ptr, pool_ptr, rows_ptr, b, batch, numel, off, mask, NUM_HIST, PER_ROW)
        acc = _history_term(acc, row, 2, h2_ptr, pool_ptr, rows_ptr, b, batch, numel, off, mask, NUM_HIST, PER_ROW)
    if USE_NOISE:
        if EXPLICIT_NOISE:
            z = tl.load(noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
        else:
            seed = tl.load(seeds_ptr + b)
            z = normal_at(seed, j, stage, stream)
        acc += tl.load(row + 5).to(tl.float32) * z
    # h_new and x0 first: x, m and x0 are then dead while the blend makes its noise (fewer live registers).
    h = tl.load(row + 6).to(tl.float32) * x + tl.load(row + 7).to(tl.float32) * m
    h += tl.load(row + 11).to(tl.float32) * x0
    if WRITE_H:
        tl.store(h_out_ptr + off, h.to(h_out_ptr.dtype.element_ty), mask=mask)
    if PER_ROW and HAS_POOL:
        slot = tl.load(rows_ptr + b * 6 + 5)
        base = tl.maximum(slot, 0).to(tl.int64) * batch * numel
        tl.store(pool_ptr + base + off, h.to(pool_ptr.dtype.element_ty), mask=mask & ((j * 0 + slot) >= 0))
    if WRITE_X0:
        tl.store(x0_out_ptr + off, x0.to(x0_out_ptr.dtype.element_ty), mask=mask)
    if HAS_BLEND:  # inpainting: the known region (mask 0) is init forward-noised to the step's end
        brow = blend_ptr + row_index * 3
        if EXPLICIT_INIT_NOISE:
            zk = tl.load(init_noise_ptr + off, mask=mask, other=0.0).to(tl.float32)
        else:
            zk = normal_at(tl.load(seeds_ptr + b), j, stage, _STREAM_KNOWN)
        known = tl.load(brow + 1).to(tl.float32) * tl.load(init_ptr + off, mask=mask, other=0.0).to(tl.float32)
        known += tl.load(brow + 2).to(tl.float32) * zk
        keep = tl.load(brow).to(tl.float32) * (1.0 - tl.load(mask_ptr + off, mask=mask, other=1.0).to(tl.float32))
        acc = (1.0 - keep) * acc + keep * known
    y = acc.to(x_out_ptr.dtype.element_ty)
    tl.store(x_out_ptr + off, y, mask=mask)
    # Record the first non-finite stage of this sample: one atomic per block that saw a NaN/Inf.
    yf = y.to(tl.float32)
    bad = mask & ((yf != yf) | (tl.abs(yf) == float("inf")))
    if tl.max(bad.to(tl.int32), axis=0) > 0:
        tl.atomic_min(nonfinite_ptr + b, stage)


OPTIONAL_TENSORS = (
    "m_uncond", "noise", "h_out", "x0_out", "clip", "rows", "pool", "row_guidance",
    "init", "mask", "blend", "init_noise",
)  # fmt: skip
"""The launcher's optional tensor arguments: each is present or None, and the kernel specialises on which."""


def kernel_constexprs(
    n_hist: int,
    use_noise: bool,
    m_uncond: torch.Tensor | None,
    noise: torch.Tensor | None,
    h_out: torch.Tensor | None,
    x0_out: torch.Tensor | None,
    clip: torch.Tensor | None,
    rows: torch.Tensor | None,
    pool: torch.Tensor | None,
    row_guidance: torch.Tensor | None,
    init: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    blend: torch.Tensor | None = None,
    init_noise: torch.Tensor | None = None,
) -> dict[str, int | bool]:
    """The constexpr arguments ``launch_fused_step`` passes for these arguments (all but the optional tensors'
    contents: only whether each is given counts). Explicit noise counts only where noise is used."""
    return dict(
        NUM_HIST=n_hist,
        HAS_UNCOND=m_uncond is not None,
        USE_NOISE=bool(use_noise),
        EXPLICIT_NOISE=bool(use_noise) and noise is not None,
        WRITE_H=h_out is not None,
        WRITE_X0=x0_out is not None,
        HAS_CLIP=clip is not None,
        PER_ROW=rows is not None,
        HAS_POOL=pool is not None,
        ROW_GUIDANCE=row_guidance is not None,
        HAS_BLEND=blend is not None,
        EXPLICIT_INIT_NOISE=init_noise is not None,
        BLOCK=BLOCK_SIZE,
    )


def launch_warps(flags: dict[str, int | bool], state: torch.dtype) -> int:
    """Warps per program for a launch with these constexprs and state dtype: 4 (8 elements per thread, one 128-bit
    access per stream in fp16/bf16, two in fp32), but 8 for float32 steps that make two Philox streams (the step's
    noise and inpainting's known-region noise): at 8 elements per thread those need up to 140 registers on sm_80,
    over the 128 that keep 4 blocks per SM; at 4 they need ~95, and 4 float32 elements are still one 128-bit access."""
    two_philox = flags["USE_NOISE"] and not flags["EXPLICIT_NOISE"] and flags["HAS_BLEND"]
    return 8 if state == torch.float32 and two_philox and not flags["EXPLICIT_INIT_NOISE"] else 4


def _stand_in(name: str, x: torch.Tensor) -> torch.Tensor:
    """A small CPU tensor that passes the per-row checks in the place of optional argument ``name``."""
    if name == "rows":
        return torch.zeros(x.shape[0], ROW_FIELDS, dtype=torch.int32)
    if name == "pool":
        return x.new_zeros(1, *x.shape)
    if name == "blend":
        return torch.zeros(1, BLEND_COLS, dtype=torch.float64)
    return torch.zeros(x.shape[0]) if name == "row_guidance" else x


def launchable_constexprs() -> list[dict[str, int | bool]]:
    """Every constexpr set ``launch_fused_step`` can pass: ``kernel_constexprs`` of each combination of history
    length, use_noise and present/absent optional tensors that the launcher's argument checks accept."""
    x, found = torch.zeros(1, 4), {}
    for n_hist, use_noise, given in itertools.product(
        range(MAX_HISTORY + 1), (False, True), itertools.product((False, True), repeat=len(OPTIONAL_TENSORS))
    ):
        opt = {name: _stand_in(name, x) if on else None for name, on in zip(OPTIONAL_TENSORS, given)}
        try:
            check_per_row_args(
                x, [x] * n_hist, opt["h_out"], opt["rows"], opt["pool"], opt["row_guidance"], opt["m_uncond"]
            )
            check_blend_args(x, torch.zeros(1, 12), opt["init"], opt["mask"], opt["blend"], opt["init_noise"])
        except ValueError:
            continue
        flags = kernel_constexprs(n_hist, use_noise, **opt)
        found[tuple(flags.items())] = flags
    return list(found.values())


def _kernel_args(x: torch.Tensor, a: LaunchArgs, x_out, h_out, x0_out, nonfinite, pool) -> tuple:
    """The kernel's pointer arguments in order; an absent tensor's pointer is a stand-in of the dtype it would have
    (never read or written: its constexpr flag is off), so the kernel's specialisation depends on the flags only."""
    h = a.hist + [x] * (MAX_HISTORY - len(a.hist))
    f32 = nonfinite.view(torch.float32)  # the float32 stand-in: no allocation (int32 and float32 are 4 bytes)
    return (x, a.m, a.m_uncond if a.m_uncond is not None else a.m, h[0], h[1], h[2], a.coeffs, a.seeds,
            a.noise if a.noise is not None else a.m, x_out, h_out if h_out is not None else x_out,
            x0_out if x0_out is not None else x_out, nonfinite, a.clip if a.clip is not None else f32,
            a.rows if a.rows is not None else nonfinite, pool if pool is not None else x,
            a.row_guidance if a.row_guidance is not None else f32, a.init if a.init is not None else x,
            a.mask if a.mask is not None else x, a.blend if a.blend is not None else a.coeffs,
            a.init_noise if a.init_noise is not None else a.m)  # fmt: skip


def launch_fused_step(
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
    launcher=None,
) -> None:
    """Launches the Triton kernel (same arguments as ``fused_step_reference``).

    ``launcher`` wraps the kernel for ``torch.library`` (``wrap_triton``); left None the kernel is launched
    directly, which is how tests run it under TRITON_INTERPRET=1 on CPU tensors. Read-only inputs are made
    contiguous (and converted to the dtype the kernel reads) first; see ``check_launch_args``.

    Raises:
        TypeError, ValueError: an argument the kernel cannot take (``check_launch_args``, ``check_per_row_args``),
            naming it; ValueError also for a launch over CUDA's grid limit (``sample_grid``).
    """
    check_per_row_args(x, hist, h_out, rows, pool, row_guidance, m_uncond)
    check_blend_args(x, coeffs, init, mask, blend, init_noise)
    args = check_launch_args(x, m, m_uncond, hist, coeffs, seeds, noise, x_out, h_out, x0_out, nonfinite,
                             clip, rows, pool, row_guidance, init, mask, blend, init_noise)  # fmt: skip
    batch, numel = x.shape[0], numel_per_sample(x)
    grid = sample_grid(batch, numel, BLOCK_SIZE)
    if grid[0] == 0:
        return
    kernel = _fused_step_kernel if launcher is None else launcher(_fused_step_kernel)
    flags = kernel_constexprs(len(hist), use_noise, m_uncond, noise, h_out, x0_out, clip, rows, pool, row_guidance,
                              init, mask, blend, init_noise)  # fmt: skip
    kernel[grid](
        *_kernel_args(x, args, x_out, h_out, x0_out, nonfinite, pool),
        batch,
        numel,
        stage,
        stream,
        float(guidance_scale),
        num_warps=launch_warps(flags, x.dtype),
        **flags,
    )
