"""A minimal greyscale/RGB PNG writer (zlib + struct), so the demo writes images without an imaging library."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of an 8-bit image: greyscale [H, W] or RGB [H, W, 3] (uint8)."""
    img = np.ascontiguousarray(image)
    rgb = img.ndim == 3 and img.shape[2] == 3
    if not (img.ndim == 2 or rgb) or img.dtype != np.uint8:
        raise ValueError(f"image must be a uint8 array [H, W] or [H, W, 3], got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))  # filter type 0 on every row
    header = struct.pack(">IIBBBBB", w, h, 8, 2 if rgb else 0, 0, 0, 0)  # 8-bit greyscale or truecolour
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 9)) + _chunk(b"IEND", b"")
    )


def image_grid(images: torch.Tensor, rows: int, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tiles images [N, 1, H, W] in [-1, 1] into a uint8 grid of ``rows`` rows, each pixel ``scale`` x ``scale``."""
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [N, 1, H, W], got {tuple(images.shape)}")
    n, _, h, w = images.shape
    cols = -(-n // rows)
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()[:, 0]
    x = x.repeat(scale, axis=1).repeat(scale, axis=2)
    hs, ws = h * scale + pad, w * scale + pad
    grid = np.full((rows * hs + pad, cols * ws + pad), 64, dtype=np.uint8)  # grey gaps between images
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * hs : pad + r * hs + h * scale, pad + c * ws : pad + c * ws + w * scale] = x[i]
    return grid


def write_png(path: str, image: np.ndarray) -> None:
    """Writes a uint8 greyscale image [H, W] to ``path``."""
    with open(path, "wb") as f:
        f.write(encode_png(image))
