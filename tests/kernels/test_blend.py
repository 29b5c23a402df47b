"""Inpainting's blend inside the fused step: the Triton kernel (interpreted), the op's C++ CPU kernel and the
Python CPU kernel against the plain-torch reference, and the reference against the formula in float64.

The blend replaces the known region (mask 0) of x_next by ``a init + s zk`` with ``keep = w (1 - mask)``:
``x_out = (1 - keep) x_next + keep (a init + s zk)``; zk is Philox noise on ``STREAM_KNOWN`` (or ``init_noise``).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import fastdiff.kernels.op  # noqa: E402,F401  (registers torch.ops.fastdiff.fused_step)
from fastdiff import _C  # noqa: E402
from fastdiff.kernels.cpu import fused_step_cpu  # noqa: E402
from fastdiff.kernels.fused_step import launch_fused_step  # noqa: E402
from fastdiff.kernels.philox import STREAM_KNOWN  # noqa: E402
from fastdiff.kernels.reference import NUM_COEF, ROW_FIELDS, fused_step_reference  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():  # pragma: no cover
    pytest.skip("the Triton kernel needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

INT32_MAX = torch.iinfo(torch.int32).max
IMPLS = {
    "triton": launch_fused_step,
    "op": torch.ops.fastdiff.fused_step,
    "python_cpu": fused_step_cpu,
    "reference": fused_step_reference,
}
# One storage ulp (fp16, bf16) on top of float32 arithmetic and Philox's float32 log/cos (tests/kernels/test_kernel).
EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
F32_REL = 2e-6


def _case(dtype: torch.dtype, batch: int = 3, shape: tuple = (5, 11), seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    full = (batch, *shape)
    rnd = lambda: torch.randn(full, generator=gen).to(dtype)  # noqa: E731
    coeffs = torch.randn(4, NUM_COEF, generator=gen, dtype=torch.float64)
    blend = torch.rand(4, 3, generator=gen, dtype=torch.float64) + 0.2
    blend[1, 0] = 0.0  # a stage inside a multi-stage step: blends nothing
    mask = (torch.rand(full, generator=gen) > 0.5).to(dtype)
    mask[0, 0, :3] = torch.tensor([0.25, 0.5, 0.75])  # fractional masks blend linearly, as diffusers
    return dict(
        x=rnd(), m=rnd(), coeffs=coeffs, seeds=torch.tensor([5, 6, 7][:batch]), init=rnd(), mask=mask, blend=blend
    )


def _run(fn, c: dict, stage: int, init_noise=None, blend=True, rows=None) -> torch.Tensor:
    x = c["x"]
    out = torch.full_like(x, float("nan"))
    nonfinite = torch.full((x.shape[0],), INT32_MAX, dtype=torch.int32)
    extra = (c["init"], c["mask"], c["blend"], init_noise) if blend else (None, None, None, None)
    fn(x, c["m"], None, 1.0, [], c["coeffs"], stage, c["seeds"], 0, True, None, out, None, None, nonfinite,
       None, rows, None, None, *extra)  # fmt: skip
    assert (nonfinite == INT32_MAX).all()
    return out


def _known_noise(seeds: torch.Tensor, shape: tuple, stages: list[int]) -> torch.Tensor:
    numel = int(np.prod(shape[1:]))
    rows = [
        np.asarray(_C.philox_normal(seeds[b : b + 1].numpy(), numel, s, STREAM_KNOWN)) for b, s in enumerate(stages)
    ]
    return torch.from_numpy(np.concatenate(rows)).reshape(shape)


def _expected64(c: dict, unblended: torch.Tensor, rows: list[int], zk: torch.Tensor) -> tuple:
    """The blend in float64 from the unblended x_next (float32-rounded blend rows), and the terms' magnitude."""
    b = c["blend"].to(torch.float32).double()[rows]  # [batch, 3]
    w, a, s = (b[:, i].reshape(-1, *([1] * (unblended.dim() - 1))) for i in range(3))
    nxt, init, mask, zk = unblended.double(), c["init"].double(), c["mask"].double(), zk.double()
    keep = w * (1 - mask)
    known = a * init + s * zk
    scale = nxt.abs() + keep * ((a * init).abs() + (s * zk).abs() + nxt.abs())
    return (1 - keep) * nxt + keep * known, scale


def _assert_within(got, want, scale, dtype, what):
    err = (got.double() - want).abs()
    bound = EPS[dtype] * want.abs() + F32_REL * scale + 1e-30
    ratio = float((err / bound).max())
    assert ratio <= 1.0, f"{what}: max |diff| / bound = {ratio:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("explicit", [False, True], ids=["philox", "init_noise"])
@pytest.mark.parametrize("stage", [0, 1, 3])
@pytest.mark.parametrize("impl", list(IMPLS))
def test_blend_matches_the_formula(impl: str, stage: int, explicit: bool, dtype: torch.dtype) -> None:
    c = _case(dtype, seed=stage)
    zk_given = torch.randn(c["x"].shape, generator=torch.Generator().manual_seed(9)).to(dtype) if explicit else None
    got = _run(IMPLS[impl], c, stage, zk_given)
    # The same implementation's unblended step in float32 (checked against the reference by test_kernel.py), so
    # what is compared is the blend, without storage rounding before it.
    c32 = {k: (v.float() if v.is_floating_point() and v.dtype != torch.float64 else v) for k, v in c.items()}
    unblended = _run(IMPLS[impl], c32, stage, blend=False)
    zk = zk_given if explicit else _known_noise(c["seeds"], tuple(c["x"].shape), [stage] * c["x"].shape[0])
    want, scale = _expected64(c, unblended, [stage] * c["x"].shape[0], zk)
    _assert_within(got, want, scale, dtype, f"{impl} stage {stage}")


@pytest.mark.parametrize("impl", list(IMPLS))
def test_blend_edges(impl: str) -> None:
    """w = 0 and mask 1 leave the step as it is (bitwise); mask 0 with (1, 1, 0) gives init exactly."""
    fn = IMPLS[impl]
    c = _case(torch.float32)
    plain = _run(fn, c, 1, blend=False)
    assert torch.equal(_run(fn, c, 1), plain)  # row 1 has w = 0
    assert torch.equal(_run(fn, dict(c, mask=torch.ones_like(c["mask"])), 2), _run(fn, c, 2, blend=False))
    last = c["blend"].clone()
    last[3] = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
    assert torch.equal(_run(fn, dict(c, mask=torch.zeros_like(c["mask"]), blend=last), 3), c["init"])


@pytest.mark.parametrize("impl", ["triton", "op", "reference"])
def test_per_row_blend_reads_each_rows_coefficient_row_and_stage(impl: str) -> None:
    """In per-row mode a sample's blend row is its coefficient row's and its known noise is keyed by its stage."""
    c = _case(torch.float32)
    rows = torch.tensor([[0, 4, -1, -1, -1, -1], [1, 9, -1, -1, -1, -1], [3, 2, -1, -1, -1, -1]], dtype=torch.int32)
    assert rows.shape[1] == ROW_FIELDS
    got = _run(IMPLS[impl], c, 0, rows=rows)
    unblended_all = _run(IMPLS[impl], c, 0, rows=rows, blend=False)
    for b, (row, stage) in enumerate(rows[:, :2].tolist()):
        one = {k: (v[b : b + 1] if k in ("x", "m", "init", "mask", "seeds") else v) for k, v in c.items()}
        zk = _known_noise(c["seeds"][b : b + 1], tuple(one["x"].shape), [stage])
        want, scale = _expected64(one, unblended_all[b : b + 1], [row], zk)
        _assert_within(got[b : b + 1], want, scale, torch.float32, f"{impl} row {b}")


@pytest.mark.parametrize("impl", ["triton", "python_cpu", "reference", "op"])
def test_bad_blend_arguments_are_named(impl: str) -> None:
    fn = IMPLS[impl]
    c = _case(torch.float32)
    with pytest.raises(ValueError, match="init, mask and blend"):
        _run(fn, dict(c, blend=None), 0)
    with pytest.raises(ValueError, match="blend must be"):
        _run(fn, dict(c, blend=c["blend"][:2]), 0)
    with pytest.raises(ValueError, match="mask must have"):
        _run(fn, dict(c, mask=c["mask"][:, :1]), 0)


def test_opcheck_with_blend() -> None:
    c = _case(torch.float32)
    x = c["x"]
    args = (x, c["m"], None, 1.0, [], c["coeffs"], 2, c["seeds"], 0, True, None, torch.empty_like(x), None,
            torch.empty_like(x), torch.full((3,), INT32_MAX, dtype=torch.int32), None, None, None, None, c["init"],
            c["mask"], c["blend"], torch.randn_like(x))  # fmt: skip
    torch.library.opcheck(torch.ops.fastdiff.fused_step.default, args)
