"""Limiting the x0 estimate before a step uses it: diffusers' ``clip_sample`` and dynamic ``thresholding``.

Both make a step nonlinear in the network output, but leave it linear in x and the limited estimate
``x0c``, which the fused kernel forms itself from per-sample bounds (``clip`` [B, 2]: ``x0c = clamp(x0,
-b, b) * scale``; fastdiff/kernels/reference.py). :meth:`X0Clip.program` rewrites a program's rows so the network
output reaches the step through ``x0c`` the way diffusers does:

- ``ddim``: ``x' = alpha' x0c + c_eps eps + sigma_eta z`` with eps from the raw output (diffusers' DDIM
  without ``use_clipped_model_output``): the row's x0 part moves to the ``c_x0`` column;
- every other sampler: eps recomputed from ``x0c`` (:func:`fastdiff.program.clip_form`), which is what
  diffusers' DDPM, DPM-Solver++, UniPC and DEIS do (and DDIM with ``use_clipped_model_output=True``).

Static clipping is ``clip = [clip_sample_range, 1]``. Dynamic thresholding (Saharia et al. 2022) takes,
per sample, ``s = quantile(|x0|, ratio)`` clamped to ``[1, sample_max_value]`` and ``clip = [s, 1/s]``:
one small torch op before the fused step, on the guided output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fastdiff.kernels.reference import CM, CX, CX0, EM, EX
from fastdiff.program import Program, clip_form
from fastdiff.runtime.guidance import per_sample

Bounds = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, float, np.ndarray], torch.Tensor]


@dataclass(frozen=True)
class X0Clip:
    """How the x0 estimate is limited: ``clip_range`` (static clamp to [-r, r]) or ``threshold_ratio``
    (dynamic thresholding at that quantile, bounds clamped to ``[1, sample_max_value]``; ``sample_max_value``
    below 1 is the bound itself, as in diffusers); exactly one.

    ``recompute_eps`` forces eps to be recomputed from the limited x0 for ddim too (diffusers'
    ``use_clipped_model_output=True``).
    """

    clip_range: float | None = None
    threshold_ratio: float | None = None
    sample_max_value: float = 1.0
    recompute_eps: bool = False

    def __post_init__(self) -> None:
        if (self.clip_range is None) == (self.threshold_ratio is None):
            raise ValueError("X0Clip needs exactly one of clip_range and threshold_ratio")
        if self.clip_range is not None and not self.clip_range > 0:
            raise ValueError(f"clip_sample_range must be > 0, got {self.clip_range}")
        if self.threshold_ratio is not None and not 0.0 <= self.threshold_ratio <= 1.0:
            raise ValueError(f"dynamic_thresholding_ratio must be in [0, 1], got {self.threshold_ratio}")
        # Below 1 the bound is sample_max_value itself (torch.clamp(s, 1, max) gives max when max < 1, as in diffusers).
        if not self.sample_max_value > 0.0:
            raise ValueError(f"sample_max_value must be > 0, got {self.sample_max_value}")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> X0Clip | None:
        """The limit a diffusers scheduler config asks for (``thresholding`` wins over ``clip_sample``,
        as in diffusers), or None."""
        if config.get("thresholding", False):
            return cls(
                threshold_ratio=float(config.get("dynamic_thresholding_ratio", 0.995)),
                sample_max_value=float(config.get("sample_max_value", 1.0)),
            )
        if config.get("clip_sample", False):
            return cls(clip_range=float(config.get("clip_sample_range", 1.0)))
        return None

    def with_recompute_eps(self, recompute: bool) -> X0Clip:
        """This limit with ``recompute_eps`` set."""
        return self if recompute == self.recompute_eps else dataclasses.replace(self, recompute_eps=recompute)

    def program(self, prog: Program) -> Program:
        """``prog`` with its rows rewritten to read the limited x0 (see the module docstring)."""
        if prog.sampler == "ddim" and not self.recompute_eps:
            coef = _x0_split(prog)
        else:
            coef = clip_form(prog.coef)
        return dataclasses.replace(
            prog, coef=coef, coef_device=torch.as_tensor(coef, dtype=torch.float64).to(prog.coef_device.device)
        )

    def bounds(self, batch: int, device: torch.device) -> Bounds:
        """A function ``(x, m, m_uncond, w, row) -> clip [batch, 2]`` for the fused step's ``clip`` argument.

        Call it once per run, before the loop: a static limit's bounds are one device tensor made here (with fills,
        no copy from host data) and returned at every stage; a dynamic limit's are computed on the device from the
        stage's tensors. Nothing the returned function does copies host data to the device, so a CUDA graph can
        capture it.
        """
        if self.clip_range is not None:
            static = torch.empty((batch, 2), dtype=torch.float32, device=device)
            static[:, 0].fill_(self.clip_range)
            static[:, 1].fill_(1.0)
            return lambda x, m, m_uncond, w, row: static
        ratio, top = self.threshold_ratio, self.sample_max_value

        def dynamic(
            x: torch.Tensor, m: torch.Tensor, m_uncond: torch.Tensor | None, w: float | torch.Tensor, row: np.ndarray
        ) -> torch.Tensor:
            mf = m.float()
            if m_uncond is not None:  # w: one number, or one per sample in a captured graph
                mf = m_uncond.float() + per_sample(w, mf.ndim) * (mf - m_uncond.float())
            x0 = float(np.float32(row[EX])) * x.float() + float(np.float32(row[EM])) * mf
            s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), ratio, dim=1).clamp(1.0, top)
            return torch.stack([s, 1.0 / s], dim=1).contiguous()

        return dynamic


def _x0_split(prog: Program) -> np.ndarray:
    """DDIM rows with their x0 part on the limited x0: ``x' = alpha' x0c + (the eps and noise terms)``.

    Stage k steps from its grid point to the next, so its x0 weight is the next grid point's alpha.
    """
    out = np.array(prog.coef, dtype=np.float64, copy=True)
    for k in range(prog.stages):
        if out[k, EM] == 0.0:
            continue
        w = float(prog.grid.alpha[prog.step_of(k) + 1])
        out[k, CX] -= w * out[k, EX]
        out[k, CM] -= w * out[k, EM]
        out[k, CX0] += w
    return out
