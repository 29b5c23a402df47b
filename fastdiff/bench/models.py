"""Networks for ``python -m fastdiff.bench --model fastdiff.bench.models:FACTORY`` (see
:func:`fastdiff.bench.throughput.make_model`): each factory takes ``(shape, device, dtype)`` and returns an
eps-predicting ``model(x, t)``.

``sd15_unet``: diffusers' ``UNet2DConditionModel`` with Stable Diffusion 1.5's block layout and channels (4 latent
channels, blocks of 320/640/1280/1280 channels, cross-attention on 768-wide text states) and seeded random weights,
conditioned on a seeded random ``encoder_hidden_states`` of shape [B, 77, 768]: the cost of SD 1.5's network
without its checkpoint. ``sd15_unet_tiny``: the same layout with 32 channels everywhere, to check the plan on a CPU.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from fastdiff.extras import require

SD15_UNET = dict(
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
"""SD 1.5's UNet configuration (``runwayml/stable-diffusion-v1-5``'s ``unet/config.json``, its layout fields)."""
TINY = dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4)
TEXT_TOKENS = 77


class ConditionedUNet(torch.nn.Module):
    """``model(x, t)`` = ``unet(x, t, encoder_hidden_states=context).sample``, with a fixed ``context``."""

    def __init__(self, unet: torch.nn.Module, context: torch.Tensor):
        super().__init__()
        self.unet = unet
        self.register_buffer("context", context)

    def forward(self, x: torch.Tensor, t: torch.Tensor, **_: Any) -> torch.Tensor:
        t = t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t
        return self.unet(x, t, encoder_hidden_states=self.context, return_dict=False)[0]


@functools.lru_cache(maxsize=2)
def _unet(tiny: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The seeded random-weight UNet, built on ``device`` once per process (a bench run of several batches and step
    counts reuses it)."""
    diffusers = require("diffusers", "bench")
    config = {**SD15_UNET, **(TINY if tiny else {})}
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []), torch.device(dev):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(**config)
    # torch.nn.Module.to: diffusers' own warns about casting a model not loaded with from_pretrained
    return torch.nn.Module.to(unet, dtype=dtype).eval().requires_grad_(False)


def build(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype, tiny: bool = False) -> ConditionedUNet:
    """The SD-1.5-shaped UNet (``tiny``: 32 channels) for samples of ``shape`` (B, 4, H, W), with its context."""
    if len(shape) != 4 or shape[1] != 4:
        raise ValueError(f"the SD UNet draws (B, 4, H, W) latents; got {tuple(shape)}")
    unet = _unet(tiny, str(torch.device(device)), dtype)
    width = (TINY if tiny else SD15_UNET)["cross_attention_dim"]
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(shape[0], TEXT_TOKENS, width, generator=gen).to(device=device, dtype=dtype)
    return ConditionedUNet(unet, context)


def sd15_unet(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> ConditionedUNet:
    """Factory: SD 1.5's UNet layout, random weights (for ``--shape 4,64,64 --dtype float16``)."""
    return build(shape, device, dtype)


def sd15_unet_tiny(shape: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> ConditionedUNet:
    """Factory: the same layout with 32 channels everywhere (a CPU-sized check of the same code)."""
    return build(shape, device, dtype, tiny=True)
