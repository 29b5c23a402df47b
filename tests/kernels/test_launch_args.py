"""The Triton fused step's launch grid and argument checks, on the CPU (no kernel runs)."""

from __future__ import annotations

import pytest
import torch

from fastdiff.kernels.fused_step import BLOCK_SIZE
from fastdiff.kernels.grid import MAX_GRID_X, MAX_GRID_YZ, sample_grid
from fastdiff.kernels.launch_args import check_launch_args, model_dtype


@pytest.mark.parametrize("batch,numel", [(100_000, 3 * 64 * 64), (100_000, 1), (70_000, 4096 * 1024), (1, 10**6)])
def test_grid_within_cuda_limits(batch: int, numel: int) -> None:
    grid = sample_grid(batch, numel, BLOCK_SIZE)
    assert 0 < grid[0] <= MAX_GRID_X and grid[1] <= MAX_GRID_YZ and grid[2] <= MAX_GRID_YZ
    assert grid[0] * grid[1] * grid[2] == batch * -(-numel // BLOCK_SIZE)  # one program per (sample, block)


def test_grid_too_large_and_empty() -> None:
    with pytest.raises(ValueError, match="blocks"):
        sample_grid(2**21, 2**30, BLOCK_SIZE)
    assert sample_grid(0, 100, BLOCK_SIZE)[0] == 0 and sample_grid(5, 0, BLOCK_SIZE)[0] == 0


def _args(dtype: torch.dtype = torch.float16, batch: int = 3, **over) -> dict:
    x = torch.randn(batch, 4, 8).to(dtype)
    args = dict(x=x, m=torch.randn_like(x), m_uncond=None, hist=[torch.randn_like(x)],
                coeffs=torch.zeros(4, 12, dtype=torch.float64), seeds=torch.arange(batch), noise=None,
                x_out=torch.empty_like(x), h_out=None, x0_out=None,
                nonfinite=torch.zeros(batch, dtype=torch.int32))  # fmt: skip
    return {**args, **over}


def test_inputs_come_back_contiguous_in_the_dtype_read() -> None:
    a = _args()
    x = a["x"]
    expanded = torch.randn(1, 4, 8).expand(3, 4, 8)
    out = check_launch_args(**{**a, "noise": expanded, "m": x.transpose(1, 2).contiguous().transpose(1, 2)})
    assert out.noise.is_contiguous() and out.m.is_contiguous() and out.m.dtype == torch.float32
    torch.testing.assert_close(out.noise, expanded.float(), rtol=0, atol=0)
    x4 = torch.randn(2, 3, 4, 5)
    channels_last = torch.randn_like(x4).to(memory_format=torch.channels_last)
    four_d = _args(torch.float32, 2, x=x4, m=channels_last, hist=[], x_out=torch.empty_like(x4))
    assert torch.equal(check_launch_args(**four_d).m, channels_last) and not channels_last.is_contiguous()
    same = check_launch_args(**a)
    assert same.m is a["m"] and same.hist[0] is a["hist"][0]  # nothing copied when nothing needs it


@pytest.mark.parametrize(
    "over,exc,match",
    [
        (dict(x_out=torch.empty(3, 8, 4, dtype=torch.float16).transpose(1, 2)), ValueError, "x_out must be contiguous"),
        (dict(h_out=torch.empty(3, 4, 8)), TypeError, "h_out must have dtype"),
        (dict(x0_out=torch.empty(3, 4, 9, dtype=torch.float16)), ValueError, "x0_out must have shape"),
        (dict(nonfinite=torch.zeros(3, dtype=torch.int64)), TypeError, "nonfinite must have dtype"),
        (dict(nonfinite=torch.zeros(6, dtype=torch.int32)[::2]), ValueError, "nonfinite must be contiguous"),
        (dict(m=torch.randn(3, 4, 7)), ValueError, "m must have shape"),
        (dict(m=None), TypeError, "m must be a torch.Tensor"),
        (dict(noise=torch.randn(1, 4, 8)), ValueError, "noise must have shape"),
        (dict(hist=[torch.randn(3, 4, 8)]), TypeError, r"hist\[0\] must have x's dtype"),
        (dict(seeds=torch.arange(2)), ValueError, "seeds must have shape"),
        (dict(coeffs=torch.zeros(4, 11)), ValueError, "coeffs must be"),
        (dict(clip=torch.zeros(3, 3)), ValueError, "clip must have shape"),
        (dict(x=torch.zeros(3, 4, 8, dtype=torch.float64)), TypeError, "x must have dtype"),
        (dict(x=torch.zeros(3, 8, 4, dtype=torch.float16).transpose(1, 2)), ValueError, "x must be a contiguous"),
        (dict(hist=[torch.randn(3, 4, 8).half()] * 4), ValueError, "hist holds at most"),
    ],
)
def test_bad_arguments_are_named(over: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        check_launch_args(**_args(**over))


def test_another_device_is_named() -> None:
    meta = torch.empty(3, 4, 8, dtype=torch.float16, device="meta")
    with pytest.raises(ValueError, match="x_out must be on x's device"):
        check_launch_args(**_args(x_out=meta))
    with pytest.raises(ValueError, match="seeds must be on x's device"):
        check_launch_args(**_args(seeds=torch.arange(3, device="meta")))


def test_model_dtype() -> None:
    h, f = torch.zeros(1, dtype=torch.float16), torch.zeros(1)
    assert model_dtype(torch.float16, h, None, h) == torch.float16
    assert model_dtype(torch.float16, h, f, None) == torch.float32
    assert model_dtype(torch.float16, h.double()) == torch.float32
    assert model_dtype(torch.float32, f, None, None) == torch.float32
