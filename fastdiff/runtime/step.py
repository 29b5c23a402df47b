"""The one Python entry to the fused step op: ``torch.ops.fastdiff.fused_step`` with its arguments named.

Every caller (the sampling loop, the serving engine's tick, the corrector, the drop-in scheduler, the benchmarks)
goes through :func:`fused_step`, so the op's 19 positional arguments are spelled out in one place. The op itself
(schema, kernels per device) is :mod:`fastdiff.kernels.op`; the math of one call is
:func:`fastdiff.kernels.reference.fused_step_reference`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

import fastdiff.kernels.op  # noqa: F401  (registers torch.ops.fastdiff.fused_step)
from fastdiff.kernels.philox import STREAM_KNOWN

STEP_NOISE_STREAM = 0
"""The Philox stream of the sampler steps' noise (a sample's noise is keyed by its seed, this stream, the stage)."""
INITIAL_NOISE_STREAM = 1
"""The Philox stream of the initial state x_T (and of the noise image-to-image adds to its ``init``)."""
KNOWN_NOISE_STREAM = STREAM_KNOWN
"""The Philox stream of the noise inpainting adds to the known region (inside the op)."""


def fused_step(
    *,
    x: torch.Tensor,
    m: torch.Tensor,
    coeffs: torch.Tensor,
    stage: int,
    seeds: torch.Tensor,
    x_out: torch.Tensor,
    nonfinite: torch.Tensor,
    m_uncond: torch.Tensor | None = None,
    guidance_scale: float = 1.0,
    history: Sequence[torch.Tensor] = (),
    stream: int = STEP_NOISE_STREAM,
    use_noise: bool = True,
    noise: torch.Tensor | None = None,
    h_out: torch.Tensor | None = None,
    x0_out: torch.Tensor | None = None,
    clip: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    pool: torch.Tensor | None = None,
    row_guidance: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    blend: torch.Tensor | None = None,
    init_noise: torch.Tensor | None = None,
) -> None:
    """One sampler stage: ``x_out = c_x x + c_m m + sum_j c_hj history[j] + c_z z`` with the coefficient row
    ``coeffs[stage]`` (or each row's own, with ``rows``), writing ``h_out`` and ``x0_out`` where given and the first
    stage a sample went NaN/Inf into ``nonfinite``.

    Args:
        x, m: the state and the network output; ``m_uncond`` with ``guidance_scale`` w makes the output
            ``m_uncond + w (m - m_uncond)`` (``row_guidance``: one w per row).
        coeffs: the program's coefficient table on the device (``Program.coef_device``); ``stage`` its row.
        seeds: one Philox seed per sample; the noise z of element j is keyed by (seed, ``stream``, stage, j).
        use_noise: whether the stage draws z; ``noise`` replaces the Philox noise with an explicit tensor.
        history: the history slots the stage reads; ``h_out`` the slot it writes.
        x_out, x0_out, nonfinite: outputs (``x_out`` must not alias ``x``).
        clip: per-sample x0 bounds (:class:`fastdiff.runtime.x0_clip.X0Clip`).
        rows, pool: the serving engine's per-row stage descriptors and history pool.
        init, mask, blend, init_noise: inpainting: the known region (``mask`` 0) of ``x_out`` replaced by ``init``
            noised to the step's end, per the blend row (on, alpha, sigma) of the coefficient row
            (:mod:`fastdiff.kernels.reference`).
    """
    history = history if isinstance(history, list) else list(history)  # the loop passes lists: no copy per stage
    torch.ops.fastdiff.fused_step(x, m, m_uncond, guidance_scale, history, coeffs, stage, seeds, stream, use_noise,
                                  noise, x_out, h_out, x0_out, nonfinite, clip=clip, rows=rows, pool=pool,
                                  row_guidance=row_guidance, init=init, mask=mask, blend=blend,
                                  init_noise=init_noise)  # fmt: skip


__all__ = ["INITIAL_NOISE_STREAM", "KNOWN_NOISE_STREAM", "STEP_NOISE_STREAM", "fused_step"]
