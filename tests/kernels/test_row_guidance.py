"""One guidance weight per sample without per-row programs (``row_guidance`` with ``rows=None``): what a captured
CUDA graph passes so that one graph serves every guidance scale. Each implementation (the C++ CPU kernel, the
interpreted Triton kernel, the plain-torch reference) gives each sample exactly what a run of that sample alone with
its weight as the scalar ``guidance_scale`` gives."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import fastdiff.kernels.op  # noqa: E402,F401  (registers the op the C++ kernel serves)
from fastdiff.kernels.cpu import fused_step_cpu  # noqa: E402
from fastdiff.kernels.fused_step import launch_fused_step  # noqa: E402
from fastdiff.kernels.reference import fused_step_reference  # noqa: E402
from fastdiff.program import build_program  # noqa: E402
from fastdiff.schedule import Schedule  # noqa: E402

IMPLS = {
    "op": torch.ops.fastdiff.fused_step,  # the registered op: its C++ fast path on the CPU
    "cpp": fused_step_cpu,
    "triton": launch_fused_step,
    "reference": fused_step_reference,
}
WEIGHTS = (1.0, 7.5, 0.0)


def _step(fn, x, m, mu, w, row_guidance, coeffs, seeds):
    out = torch.full_like(x, float("nan"))
    x0 = torch.full_like(x, float("nan"))
    nonfinite = torch.full((x.shape[0],), torch.iinfo(torch.int32).max, dtype=torch.int32)
    fn(x, m, mu, w, [], coeffs, 0, seeds, 0, True, None, out, None, x0, nonfinite, None, None, None, row_guidance)
    return out, x0


@pytest.mark.parametrize("impl", IMPLS)
def test_row_guidance_without_rows_equals_each_sample_alone(impl):
    sch = Schedule.vp_discrete()
    coeffs = build_program(sch, sch.grid(6), "ddim", "eps", torch.device("cpu"), eta=0.5).coef_device
    g = torch.Generator().manual_seed(4)
    x, m, mu = (torch.randn(len(WEIGHTS), 3, 37, generator=g) for _ in range(3))
    seeds = torch.tensor([3, -8, 2**35])
    fn = IMPLS[impl]
    weights = torch.tensor(WEIGHTS, dtype=torch.float32)
    batched = _step(fn, x, m, mu, 1.0, weights, coeffs, seeds)
    for i, w in enumerate(WEIGHTS):
        alone = _step(fn, x[i : i + 1], m[i : i + 1], mu[i : i + 1], w, None, coeffs, seeds[i : i + 1])
        for got, want in zip(batched, alone):
            torch.testing.assert_close(got[i : i + 1], want, rtol=0, atol=0)
    # the weights matter: the middle sample differs from a run at scale 1
    plain = _step(fn, x, m, mu, 1.0, None, coeffs, seeds)
    assert torch.equal(plain[0][0], batched[0][0]) and not torch.equal(plain[0][1], batched[0][1])


@pytest.mark.parametrize("impl", IMPLS)
def test_row_guidance_without_rows_is_checked(impl):
    sch = Schedule.vp_discrete()
    coeffs = build_program(sch, sch.grid(4), "ddim", "eps", torch.device("cpu")).coef_device
    x = torch.zeros(2, 5)
    seeds = torch.tensor([0, 1])
    with pytest.raises(ValueError, match="row_guidance must be float32"):
        _step(IMPLS[impl], x, x, x, 1.0, torch.ones(3), coeffs, seeds)
    with pytest.raises(ValueError, match="row_guidance needs m_uncond"):
        _step(IMPLS[impl], x, x, None, 1.0, torch.ones(2), coeffs, seeds)
