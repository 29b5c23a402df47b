"""The checks the Triton fused step runs before it hands raw pointers to the kernel (any device, CPU included).

The kernel reads every tensor as a dense row-major array of its dtype through a bare pointer, so a
non-contiguous, misplaced or mistyped tensor would be read (or written) wrongly without an error. Inputs the
kernel only reads are made contiguous and converted (like the CPU kernel does, fastdiff/kernels/cpu.py);
tensors it writes must already be contiguous, on x's device and in x's dtype, since a copy would lose the write.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdiff.kernels.reference import MAX_HISTORY, NUM_COEF

STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
"""The storage dtypes of x (and of hist, the outputs and pool)."""


def model_dtype(state: torch.dtype, *operands: torch.Tensor | None) -> torch.dtype:
    """The one dtype the kernels read m, m_uncond and noise in: the state's if all of them are in it, else float32."""
    return state if all(t is None or t.dtype == state for t in operands) else torch.float32


def launchable_dtypes() -> list[tuple[torch.dtype, torch.dtype]]:
    """Every (state dtype, model-operand dtype) pair the checks below pass on to the kernel."""
    return [(s, s) for s in STATE_DTYPES] + [(s, torch.float32) for s in STATE_DTYPES if s != torch.float32]


def _placed(name: str, t: object, device: torch.device, shape: Sequence[int] | None = None) -> torch.Tensor:
    """``t`` after checking it is a tensor on ``device`` (and of ``shape`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {t.device}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    return t


def _read(name: str, t: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype, shape=None) -> torch.Tensor | None:
    """An input as the kernel reads it: placed-checked, then contiguous in ``dtype`` (``t`` itself if it is)."""
    if t is None:
        return None
    return _placed(name, t, x.device, shape).to(dtype).contiguous()


def _written(name: str, t: torch.Tensor | None, x: torch.Tensor, dtype: torch.dtype, shape=None) -> None:
    """Raises unless an output the kernel writes is on x's device, in ``dtype``, of ``shape`` and contiguous."""
    if t is None:
        return
    _placed(name, t, x.device, shape)
    if t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (the kernel writes it in place through a raw pointer)")


@dataclass
class LaunchArgs:
    """The tensors the kernel reads, each contiguous and in the dtype it is read in."""

    m: torch.Tensor
    m_uncond: torch.Tensor | None
    noise: torch.Tensor | None
    hist: list[torch.Tensor]
    coeffs: torch.Tensor
    seeds: torch.Tensor
    clip: torch.Tensor | None
    rows: torch.Tensor | None
    row_guidance: torch.Tensor | None
    init: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    blend: torch.Tensor | None = None
    init_noise: torch.Tensor | None = None


def _check_x(x: object) -> torch.Tensor:
    """x itself, after checking its type, dtype and layout (every other argument is checked against it)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in STATE_DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1 or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [batch, ...] tensor, got shape {tuple(x.shape)}")
    return x


def check_states(x, hist, x_out, h_out, x0_out, nonfinite, pool) -> None:
    """Raises TypeError/ValueError, naming the argument, for an output the kernel cannot write in place or a
    history tensor not in x's dtype (read in its own dtype, it would be another kernel specialisation)."""
    for i, h in enumerate(hist):
        if isinstance(h, torch.Tensor) and h.dtype != x.dtype:
            raise TypeError(f"hist[{i}] must have x's dtype {x.dtype}, got {h.dtype}")
    for name, t in (("x_out", x_out), ("h_out", h_out), ("x0_out", x0_out)):
        _written(name, t, x, x.dtype, x.shape)
    if x_out is None:
        raise TypeError("x_out must be a torch.Tensor, got NoneType")
    _written("nonfinite", nonfinite, x, torch.int32, (x.shape[0],))
    _written("pool", pool, x, x.dtype)  # its shape: check_per_row_args


def check_launch_args(x, m, m_uncond, hist, coeffs, seeds, noise, x_out, h_out, x0_out, nonfinite,
                      clip=None, rows=None, pool=None, row_guidance=None, init=None, mask=None, blend=None,
                      init_noise=None) -> LaunchArgs:  # fmt: skip
    """Checks the fused step's arguments for the Triton kernel; returns its inputs as it reads them.

    Raises:
        TypeError: a tensor argument is not a tensor, or x or an output has the wrong dtype.
        ValueError: a tensor is on another device than x, has the wrong shape, or an output is not contiguous.
    """
    x = _check_x(x)
    check_states(x, hist, x_out, h_out, x0_out, nonfinite, pool)
    if len(hist) > MAX_HISTORY:
        raise ValueError(f"hist holds at most {MAX_HISTORY} tensors, got {len(hist)}")
    shape, batch = x.shape, x.shape[0]
    operands = (m, m_uncond, noise, init_noise)
    model = model_dtype(x.dtype, *(t if isinstance(t, torch.Tensor) else None for t in operands))
    coeffs = _read("coeffs", coeffs, x, torch.float64)
    if coeffs.dim() != 2 or coeffs.shape[1] != NUM_COEF:
        raise ValueError(f"coeffs must be [rows, {NUM_COEF}], got shape {tuple(coeffs.shape)}")
    return LaunchArgs(
        m=_read("m", _placed("m", m, x.device), x, model, shape),
        m_uncond=_read("m_uncond", m_uncond, x, model, shape),
        noise=_read("noise", noise, x, model, shape),
        hist=[_read(f"hist[{i}]", h, x, x.dtype, shape) for i, h in enumerate(hist)],
        coeffs=coeffs,
        seeds=_read("seeds", seeds, x, torch.int64, (batch,)),
        clip=_read("clip", clip, x, torch.float32, (batch, 2)),
        rows=_read("rows", rows, x, torch.int32),
        row_guidance=_read("row_guidance", row_guidance, x, torch.float32),
        init=_read("init", init, x, x.dtype, shape),
        mask=_read("mask", mask, x, x.dtype, shape),
        blend=_read("blend", blend, x, torch.float64),
        init_noise=_read("init_noise", init_noise, x, model, shape),
    )


def numel_per_sample(x: torch.Tensor) -> int:
    """Elements of one sample of x (0 for an empty batch's samples too, without indexing x[0])."""
    return math.prod(x.shape[1:])
