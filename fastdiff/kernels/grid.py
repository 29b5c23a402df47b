"""The launch grid of the per-sample Triton kernels (the fused step, the Philox noise kernels).

One program per (sample, block of ``BLOCK`` elements), all on grid axis x: program ``pid`` works on sample
``pid // cdiv(numel, BLOCK)``, block ``pid % cdiv(numel, BLOCK)``. CUDA caps grid axes y and z at 65,535 and axis
x at 2**31 - 1, so the batch is folded into x rather than put on y (a batch above 65,535 failed to launch).
"""

from __future__ import annotations

import triton
import triton.language as tl

MAX_GRID_X = 2**31 - 1
"""CUDA's limit on gridDim.x (compute capability >= 3.0)."""
MAX_GRID_YZ = 65_535
"""CUDA's limit on gridDim.y and gridDim.z."""


def sample_grid(batch: int, numel: int, block: int) -> tuple[int, int, int]:
    """The grid of a per-sample kernel over ``batch`` samples of ``numel`` elements, ``block`` per program.

    Raises:
        ValueError: more programs than CUDA's grid axis x takes (over 2**31 - 1 blocks, ~2**41 elements).
    """
    programs = batch * triton.cdiv(numel, block)
    if programs > MAX_GRID_X:
        raise ValueError(f"{batch} samples x {numel} elements need {programs} blocks, over CUDA's {MAX_GRID_X}")
    return (programs, 1, 1)


@triton.jit
def sample_block(numel, BLOCK: tl.constexpr):
    """This program's sample ``b`` (int64 scalar) and element indices ``j`` within it (int64 block)."""
    pid = tl.program_id(0)
    blocks = tl.cdiv(numel, BLOCK)
    b = (pid // blocks).to(tl.int64)
    j = (pid % blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return b, j
