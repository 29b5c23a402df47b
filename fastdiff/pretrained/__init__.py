"""Networks shipped with fastdiff, as ready pipelines.

``fastdiff.pretrained.digits()`` is the class-conditional U-Net trained on scikit-learn's 8x8 digits by
``python -m fastdiff.pretrained.train digits`` (weights: ``digits.safetensors`` beside this file, about 2 MB).
"""

from __future__ import annotations

import os
from typing import Any

import torch

from fastdiff.checkpoint import load
from fastdiff.pipeline import Pipeline

DIGITS_PATH = os.path.join(os.path.dirname(__file__), "digits.safetensors")


def digits(
    device: str | torch.device | None = None, dtype: torch.dtype | None = None, **pipeline_kwargs: Any
) -> Pipeline:
    """The shipped digits network as a :class:`Pipeline` (eps prediction, diffusers' default DDPM schedule).

    Samples are [n, 1, 8, 8] (``pipe.sample_shape`` is ``(1, 8, 8)``), about in the data's [-1, 1] but not clipped
    (docs/pipeline.md gives the measured range); ``x0_clip=X0Clip(clip_range=1.0)`` limits the x0 estimate every step,
    as diffusers' ``clip_sample`` does, and keeps them in [-1, 1]. Condition on labels 0-9 with
    ``model_kwargs={"y": labels}``; label 10 (``pipe.num_classes``) is the null class, so classifier-free
    guidance is ``uncond_kwargs={"y": torch.full((n,), 10)}, guidance_scale=w``. With no ``y`` at all the
    network samples unconditionally.
    """
    return load(DIGITS_PATH, device=device, dtype=dtype, **pipeline_kwargs)


__all__ = ["DIGITS_PATH", "digits"]
