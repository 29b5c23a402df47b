"""Counter-based Gaussian noise (docs/architecture.md, principle 4), identical on the CPU (C++) and in Triton.

The contract
------------
For a sample's int64 seed ``s`` (its bits read as uint64), a stage index ``k >= 0`` (the sampler step,
or the stage within a step), a stream id ``r`` (:data:`STREAM_STEP` = 0 for per-step noise,
:data:`STREAM_INIT` = 1 for the initial noise x_T,
:data:`STREAM_KNOWN` = 2**16 for inpainting's known region, the others reserved) and an element index ``j``
within the sample (``0 <= j < numel_per_sample``), one Philox call makes the four normals of elements ``4c .. 4c + 3``::

    c       = j >> 2
    key     = (k0 = s & 0xffffffff, k1 = s >> 32)
    counter = (c0 = c & 0xffffffff, c1 = c >> 32, c2 = k, c3 = r)
    i1, i2, i3, i4 = Philox4x32-10(counter, key)           # triton.language.random.philox_impl
    u1, u2, u3, u4 = uint_to_uniform_float(i1), ..., uint_to_uniform_float(i4)
    n0, n1 = pair_uniform_to_normal(u1, u2)                # Box-Muller: r cos(th), r sin(th), float32
    n2, n3 = pair_uniform_to_normal(u3, u4)
    z = (n0, n1, n2, n3)[j & 3]

which is what ``tl.randn4x`` computes, with the stage and stream in the two counter words it leaves at zero.
Using all four Philox words (rather than ``tl.randn``'s first two, for one normal per call) makes CPU noise
about 2.5x cheaper (csrc/fast_normal.cpp). :func:`normal_at` is the Triton helper for fused kernels; the C++
twin is ``fastdiff._C.philox_normal``. A sample's noise therefore depends on its seed alone: not on its batch,
its position in the batch, the device, or eager versus CUDA-graph execution.

The custom op ``fastdiff::philox_normal`` (CPU: C++, CUDA: the Triton kernel, plus a fake kernel for
tracing) fills a ``[B, numel]`` float32 tensor; :func:`philox_normal` is its Python entry point and
:func:`derive_seeds` turns a user's seed argument into the per-sample int64 seeds.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from fastdiff.kernels.grid import sample_block, sample_grid

__all__ = [
    "STREAM_STEP",
    "STREAM_INIT",
    "STREAM_KNOWN",
    "normal_at",
    "philox_normal_kernel",
    "launch_philox_normal_triton",
    "philox_normal",
    "philox_normal_rows",
    "derive_seeds",
    "splitmix64",
]

STREAM_STEP = 0
"""Stream id of the per-step noise ``z`` of stochastic samplers."""
STREAM_INIT = 1
"""Stream id of the initial noise ``x_T`` (image-to-image noises its ``init`` with the same draw)."""
STREAM_KNOWN = 1 << 16
"""Stream id of the noise inpainting adds to the known region (clear of the corrector's streams 2, 3, ...)."""

_U32_MAX = 0xFFFFFFFF
_U64_MASK = (1 << 64) - 1
_BLOCK = 1024


# ------------------------------------------------------------------------------------------------
# Triton
# ------------------------------------------------------------------------------------------------


@triton.jit
def normal_at(seed, j, stage, stream):
    """Standard normals (float32) at element indices ``j`` for one sample.

    Args:
        seed: the sample's int64 seed (a scalar, e.g. ``tl.load(seeds_ptr + b)``).
        j: a block of element indices within the sample (int32 or int64, all >= 0).
        stage: the stage index (scalar, 0 <= stage < 2**32).
        stream: the stream id (scalar or constexpr, 0 <= stream < 2**32).

    Returns:
        A float32 block shaped like ``j``; bit-for-bit the ``tl.randn4x`` pipeline (tl.philox,
        uint_to_uniform_float, pair_uniform_to_normal) at counter (c lo, c hi, stage, stream), c = j >> 2,
        output j & 3. Each element runs its own Philox call (the four lanes of a counter each pick their
        word pair and branch), which keeps the helper elementwise, shaped like any other load.
    """
    j64 = j.to(tl.int64)
    c = j64 >> 2
    lane = (j64 & 3).to(tl.int32)
    c0 = c.to(tl.uint32)  # truncation: the low 32 bits
    c1 = (c >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + tl.to_tensor(stage).to(tl.uint32)
    c3 = zero + tl.to_tensor(stream).to(tl.uint32)
    i1, i2, i3, i4 = tl.philox(seed, c0, c1, c2, c3)
    first_pair = lane < 2
    u1 = tl.random.uint_to_uniform_float(tl.where(first_pair, i1, i3))
    u2 = tl.random.uint_to_uniform_float(tl.where(first_pair, i2, i4))
    n_cos, n_sin = tl.random.pair_uniform_to_normal(u1, u2)
    return tl.where((lane & 1) == 0, n_cos, n_sin)


@triton.jit
def _store_normals_of_sample(seed, stage, b, j, out_ptr, numel, stream):
    """Writes the normals at elements ``j`` of sample ``b`` into its row of ``out``."""
    tl.store(out_ptr + b * numel + j, normal_at(seed, j, stage, stream), mask=j < numel)


@triton.jit
def philox_normal_kernel(seeds_ptr, out_ptr, numel, stage, stream, BLOCK: tl.constexpr):
    """Fills ``out[b, j] = normal_at(seeds[b], j, stage, stream)``; grid ``sample_grid(B, numel, BLOCK)``."""
    b, j = sample_block(numel, BLOCK)
    _store_normals_of_sample(tl.load(seeds_ptr + b), stage, b, j, out_ptr, numel, stream)


@triton.jit
def philox_normal_rows_kernel(seeds_ptr, stages_ptr, out_ptr, numel, stream, BLOCK: tl.constexpr):
    """Fills ``out[b, j] = normal_at(seeds[b], j, stages[b], stream)``: each sample at its own stage."""
    b, j = sample_block(numel, BLOCK)
    _store_normals_of_sample(tl.load(seeds_ptr + b), tl.load(stages_ptr + b), b, j, out_ptr, numel, stream)


def _check_args(seeds: torch.Tensor, numel: int, stage: int, stream: int) -> None:
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"seeds must be a torch.Tensor of int64, got {type(seeds).__name__}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must have dtype torch.int64, got {seeds.dtype}")
    if seeds.dim() != 1:
        raise ValueError(f"seeds must be 1-D (batch,), got shape {tuple(seeds.shape)}")
    for name, value, hi in (("numel", numel, (1 << 63) - 1), ("stage", stage, _U32_MAX), ("stream", stream, _U32_MAX)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if not 0 <= int(value) <= hi:
            raise ValueError(f"{name} must be in [0, {hi}], got {value}")


def launch_philox_normal_triton(seeds: torch.Tensor, numel: int, stage: int, stream: int = STREAM_STEP) -> torch.Tensor:
    """Runs :func:`philox_normal_kernel` directly on ``seeds.device`` (CUDA, or CPU under TRITON_INTERPRET=1).

    Args:
        seeds: int64 tensor of shape ``(B,)``, one seed per sample.
        numel: elements per sample.
        stage: stage index, in [0, 2**32).
        stream: stream id, in [0, 2**32).

    Returns:
        float32 tensor of shape ``(B, numel)`` on ``seeds.device``.
    """
    _check_args(seeds, numel, stage, stream)
    seeds = seeds.contiguous()
    batch = seeds.shape[0]
    out = torch.empty((batch, numel), dtype=torch.float32, device=seeds.device)
    if batch == 0 or numel == 0:
        return out
    grid = sample_grid(batch, numel, _BLOCK)
    philox_normal_kernel[grid](seeds, out, numel, stage, stream, BLOCK=_BLOCK)
    return out


# ------------------------------------------------------------------------------------------------
# The custom op
# ------------------------------------------------------------------------------------------------
# A plain torch.library.custom_op (not triton_op): the CPU kernel is C++, and triton_op would route
# every device, CPU included, through the Triton kernel under functionalization (torch.compile, AOT
# dispatch). Opaque is fine here: the op is one launch, and CUDA graphs capture it like any other.


@torch.library.custom_op("fastdiff::philox_normal", mutates_args=())
def _philox_normal_op(seeds: torch.Tensor, numel: int, stage: int, stream: int) -> torch.Tensor:
    raise NotImplementedError(f"fastdiff::philox_normal has kernels for cpu and cuda only, got seeds on {seeds.device}")


@_philox_normal_op.register_kernel("cpu")
def _philox_normal_cpu(seeds: torch.Tensor, numel: int, stage: int, stream: int) -> torch.Tensor:
    from fastdiff._ext import C

    arr = seeds.detach().contiguous().numpy()
    return torch.from_numpy(C.philox_normal(arr, numel, stage, stream))


@_philox_normal_op.register_kernel("cuda")
def _philox_normal_cuda(seeds: torch.Tensor, numel: int, stage: int, stream: int) -> torch.Tensor:
    with torch.cuda.device(seeds.device):
        return launch_philox_normal_triton(seeds, numel, stage, stream)


@_philox_normal_op.register_fake
def _philox_normal_fake(seeds: torch.Tensor, numel: int, stage: int, stream: int) -> torch.Tensor:
    torch._check(seeds.dim() == 1, lambda: "seeds must be 1-D (batch,)")
    torch._check(seeds.dtype == torch.int64, lambda: "seeds must have dtype torch.int64")
    return seeds.new_empty((seeds.shape[0], numel), dtype=torch.float32)


@torch.library.custom_op("fastdiff::philox_normal_rows", mutates_args=())
def _philox_normal_rows_op(seeds: torch.Tensor, numel: int, stages: torch.Tensor, stream: int) -> torch.Tensor:
    raise NotImplementedError(
        f"fastdiff::philox_normal_rows has kernels for cpu and cuda only, got seeds on {seeds.device}"
    )


@_philox_normal_rows_op.register_kernel("cpu")
def _philox_normal_rows_cpu(seeds: torch.Tensor, numel: int, stages: torch.Tensor, stream: int) -> torch.Tensor:
    from fastdiff._ext import C

    arr = seeds.detach().contiguous().numpy()
    rows = [C.philox_normal(arr[b : b + 1], numel, int(k), stream) for b, k in enumerate(stages.tolist())]
    return torch.from_numpy(np.concatenate(rows)) if rows else torch.empty((0, numel), dtype=torch.float32)


@_philox_normal_rows_op.register_kernel("cuda")
def _philox_normal_rows_cuda(seeds: torch.Tensor, numel: int, stages: torch.Tensor, stream: int) -> torch.Tensor:
    out = torch.empty((seeds.shape[0], numel), dtype=torch.float32, device=seeds.device)
    if seeds.shape[0] and numel:
        with torch.cuda.device(seeds.device):
            philox_normal_rows_kernel[sample_grid(seeds.shape[0], numel, _BLOCK)](
                seeds.contiguous(), stages.to(torch.int32).contiguous(), out, numel, stream, BLOCK=_BLOCK
            )
    return out


@_philox_normal_rows_op.register_fake
def _philox_normal_rows_fake(seeds: torch.Tensor, numel: int, stages: torch.Tensor, stream: int) -> torch.Tensor:
    torch._check(seeds.dim() == 1 and stages.shape == seeds.shape, lambda: "seeds and stages must be 1-D (batch,)")
    return seeds.new_empty((seeds.shape[0], numel), dtype=torch.float32)


def philox_normal_rows(
    seeds: torch.Tensor, numel: int, stages: torch.Tensor, stream: int = STREAM_STEP
) -> torch.Tensor:
    """:func:`philox_normal` with one stage per sample: row ``b`` is keyed by ``seeds[b]`` at stage ``stages[b]``.

    Row ``b`` equals ``philox_normal(seeds[b:b+1], numel, stages[b], stream)`` (the serving engine's rows each
    run their own program).
    """
    _check_args(seeds, numel, 0, stream)
    if (
        not isinstance(stages, torch.Tensor)
        or stages.shape != seeds.shape
        or stages.dtype not in (torch.int32, torch.int64)
    ):
        raise ValueError(f"stages must be an int tensor shaped like seeds {tuple(seeds.shape)}")
    return torch.ops.fastdiff.philox_normal_rows(seeds, int(numel), stages, int(stream))


def philox_normal(seeds: torch.Tensor, numel: int, stage: int, stream: int = STREAM_STEP) -> torch.Tensor:
    """Counter-based standard normals, ``[B, numel]`` float32 on ``seeds.device``.

    Row ``b`` is keyed by ``seeds[b]``; element ``j`` uses the counter ``(j lo, j hi, stage, stream)``
    (see the module docstring). CPU and CUDA give the same numbers up to float32 rounding of
    log/cos (about 1e-6).

    Args:
        seeds: int64 tensor of shape ``(B,)`` (see :func:`derive_seeds`).
        numel: elements per sample, >= 0.
        stage: stage index, in [0, 2**32).
        stream: stream id (:data:`STREAM_STEP` = 0, :data:`STREAM_INIT` = 1), in [0, 2**32).

    Raises:
        TypeError: seeds is not an int64 tensor, or numel/stage/stream is not an int.
        ValueError: seeds is not 1-D, or numel/stage/stream is out of range.
    """
    _check_args(seeds, numel, stage, stream)
    return torch.ops.fastdiff.philox_normal(seeds, int(numel), int(stage), int(stream))


# ------------------------------------------------------------------------------------------------
# Seeds
# ------------------------------------------------------------------------------------------------

_GOLDEN_GAMMA = 0x9E3779B97F4A7C15


def splitmix64(seed: int, index: np.ndarray | int) -> np.ndarray:
    """The ``index``-th output (0-based) of SplitMix64 (Steele, Lea & Flood 2014) seeded with ``seed``.

    ``z = seed + (index + 1) * 0x9E3779B97F4A7C15 (mod 2**64)``, then the finaliser
    ``z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31``.
    This is exactly the sequence ``java.util.SplittableRandom``/the reference ``splitmix64.c`` produce.

    Args:
        seed: any int in [-2**63, 2**64) (negative values are taken mod 2**64).
        index: one index or an array of indices (>= 0).

    Returns:
        uint64 numpy array shaped like ``index``.
    """
    idx = np.asarray(index, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed & _U64_MASK) + (idx + np.uint64(1)) * np.uint64(_GOLDEN_GAMMA)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return np.asarray(z, dtype=np.uint64)


def _as_int_seed(value: object, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    v = operator.index(value)
    if not -(1 << 63) <= v < (1 << 64):
        raise ValueError(f"{name} must be in [-2**63, 2**64), got {v}")
    return v


def derive_seeds(seed: int | Sequence[int] | torch.Tensor, batch: int) -> torch.Tensor:
    """Per-sample int64 seeds for a batch.

    * An int ``seed``: sample ``b`` gets ``splitmix64(seed, b)`` (the b-th SplitMix64 output for
      ``seed``, bits reinterpreted as int64; see :func:`splitmix64`). It depends only on ``(seed, b)``,
      so sample b's noise is the same whatever the batch size. Returned on the CPU.
    * A sequence of ints or an integer tensor: used as given, one seed per sample (ints in
      [2**63, 2**64) are reinterpreted as int64). A tensor keeps its device.

    Args:
        seed: an int, a sequence of ``batch`` ints, or an integer tensor of shape ``(batch,)``.
        batch: the batch size, >= 0.

    Returns:
        int64 tensor of shape ``(batch,)``.

    Raises:
        TypeError: a non-integer seed, sequence element or tensor dtype, or a non-int batch.
        ValueError: a negative batch, a seed outside [-2**63, 2**64), or a length other than batch.
    """
    if isinstance(batch, (bool, np.bool_)) or not isinstance(batch, (int, np.integer)):
        raise TypeError(f"batch must be an int, got {type(batch).__name__}")
    batch = int(batch)
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")

    if isinstance(seed, torch.Tensor):
        if seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"seed tensor must have an integer dtype, got {seed.dtype}")
        if seed.dim() != 1 or seed.shape[0] != batch:
            raise ValueError(f"seed tensor must have shape ({batch},) (one seed per sample), got {tuple(seed.shape)}")
        return seed.to(torch.int64).contiguous()

    if isinstance(seed, (int, np.integer)) and not isinstance(seed, (bool, np.bool_)):
        s = _as_int_seed(seed, "seed")
        return torch.from_numpy(splitmix64(s, np.arange(batch, dtype=np.uint64)).view(np.int64).copy())

    if isinstance(seed, np.ndarray):
        if seed.dtype.kind not in "iu":
            raise TypeError(f"seed array must have an integer dtype, got {seed.dtype}")
        seed = seed.tolist()
        if not isinstance(seed, list):
            raise ValueError(f"seed array must have shape ({batch},) (one seed per sample), got a 0-d array")

    if isinstance(seed, (str, bytes)) or not isinstance(seed, Sequence):
        raise TypeError(f"seed must be an int, a sequence of ints or an integer tensor, got {type(seed).__name__}")
    if len(seed) != batch:
        raise ValueError(f"seed must hold one seed per sample: expected {batch} seeds, got {len(seed)}")
    vals = [_as_int_seed(v, f"seed[{i}]") & _U64_MASK for i, v in enumerate(seed)]
    return torch.from_numpy(np.array(vals, dtype=np.uint64).view(np.int64).copy())
