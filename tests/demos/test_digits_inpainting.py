"""The demo's inpainting of digits: the kept upper halves come back exactly, the regenerated lower halves are new."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from fastdiff.demos.digits import inpaint_digits, lower_half_mask  # noqa: E402
from fastdiff.pretrained import digits  # noqa: E402


def test_inpaint_digits_keeps_the_upper_half_and_regenerates_the_lower() -> None:
    pipe = digits(device="cpu")
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    out, targets = inpaint_digits(pipe, images, torch.tensor([0, 3, 7, 9]), guidance_scale=3.0, steps=8)
    assert targets.tolist() == [1, 4, 8, 0]
    keep = (lower_half_mask(images.shape) == 0).expand_as(images)
    assert torch.equal(out[keep], images[keep])
    assert torch.isfinite(out).all() and not torch.allclose(out[~keep], images[~keep], atol=0.1)
