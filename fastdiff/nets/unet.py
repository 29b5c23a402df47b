"""A small class-conditional U-Net for images, written for inference speed and CUDA-graph capture.

``UNet(x, t, y=None)`` predicts (by default) the noise of ``x`` [B, C, H, W] at model time ``t`` [B] (for a
discrete VP schedule: the timestep index as a float). ``y`` [B] are class labels in ``0 .. num_classes - 1``;
the label ``num_classes`` (:attr:`UNet.null_class`) is the unconditional "null" class that classifier-free
guidance evaluates, and ``y=None`` means null for every sample. The forward pass has no data-dependent
Python control flow and never reads device values on the host, so the whole sampling loop around it can
be captured in one CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [B, dim] of (possibly fractional) times ``t`` [B], as in DDPM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (time + class) embedding added in between, and a skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, c_in), c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = nn.GroupNorm(min(groups, c_out), c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, c_in, H, W], emb [B, emb_dim] -> [B, c_out, H, W]."""
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class UNet(nn.Module):
    """A two-level U-Net: ``channels[i]`` features at resolution ``image_size / 2**i``.

    Args:
        in_channels: image channels.
        image_size: height = width of the images (divisible by ``2**(len(channels) - 1)``).
        channels: features per resolution level, finest first.
        blocks_per_level: residual blocks per level on the way down (the way up has one more, for the skip).
        emb_dim: width of the time (and class) embedding.
        num_classes: number of class labels; 0 builds an unconditional network.
        groups: GroupNorm groups.
    """

    def __init__(
        self,
        in_channels: int = 1,
        image_size: int = 8,
        channels: Sequence[int] = (64, 128),
        blocks_per_level: int = 1,
        emb_dim: int = 128,
        num_classes: int = 10,
        groups: int = 8,
    ):
        super().__init__()
        channels = [int(c) for c in channels]
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if image_size % (2 ** (len(channels) - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{len(channels) - 1}")
        if num_classes < 0 or blocks_per_level < 1:
            raise ValueError("num_classes must be >= 0 and blocks_per_level >= 1")
        self.config = dict(
            in_channels=in_channels,
            image_size=image_size,
            channels=channels,
            blocks_per_level=blocks_per_level,
            emb_dim=emb_dim,
            num_classes=num_classes,
            groups=groups,
        )
        self.num_classes = num_classes
        self.emb_dim = emb_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [channels[0]]
        c = channels[0]
        for i, width in enumerate(channels):
            for _ in range(blocks_per_level):
                self.down.append(ResBlock(c, width, emb_dim, groups))
                c = width
                skips.append(c)
            if i < len(channels) - 1:
                self.downsample.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid = ResBlock(c, c, emb_dim, groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, width in reversed(list(enumerate(channels))):
            for _ in range(blocks_per_level + 1):
                self.up.append(ResBlock(c + skips.pop(), width, emb_dim, groups))
                c = width
            if i > 0:
                self.upsample.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = nn.GroupNorm(min(groups, c), c)
        self.conv_out = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        self._levels = len(channels)
        self._blocks = blocks_per_level

    @property
    def null_class(self) -> int:
        """The label of the unconditional (null) class used for classifier-free guidance."""
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Predicts the network target (noise for the shipped digits model) for ``x`` at times ``t``."""
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        emb = self.time_mlp(timestep_embedding(t, self.emb_dim).to(x.dtype))
        if self.class_emb is not None:
            if y is None:
                y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            emb = emb + self.class_emb(y.to(torch.long))
        h = self.conv_in(x)
        hs = [h]
        blocks = iter(self.down)
        for level in range(self._levels):
            for _ in range(self._blocks):
                h = next(blocks)(h, emb)
                hs.append(h)
            if level < self._levels - 1:
                h = self.downsample[level](h)
                hs.append(h)
        h = self.mid(h, emb)
        blocks = iter(self.up)
        for level in range(self._levels):
            for _ in range(self._blocks + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), emb)
            if level < self._levels - 1:
                h = self.upsample[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return self.conv_out(F.silu(self.norm_out(h)))
