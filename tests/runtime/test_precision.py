"""Reduced-precision state over a 1000-step discrete schedule on the exact Gaussian-mixture network.

The state is stored in fp16/bf16 (the kernel computes in fp32 from float64 coefficients); the fp32 run
with the same seeds is the reference. Tolerance, and why:

* fp16's unit roundoff is u = 2^-11 ~ 4.9e-4. With |x| <~ 4 one rounding of the state is <~ 1e-3, and
  1000 roundings that act like a random walk give ~ sqrt(1000) * 1e-3 / 2 ~ 0.015 typically. We require
  the median per-sample error <= 0.05 (3x that) and the 90th percentile <= 0.25: the probability-flow
  ODE magnifies a perturbation for the few samples that start near the boundary between two modes,
  where fp16 can send a sample to the neighbouring mode (seen in our runs), so a max-error bound would
  be meaningless. At the level of the distribution we require the fp16 samples to pass the exact
  statistical check against the mixture and to be closer (sliced W2) to the fp32 samples than two
  independent exact 1024-sample sets of the mixture are to each other (the sampling-noise floor, ~0.1):
  precision loss must not be visible above sampling error.
* bf16 has u = 2^-9 ~ 2e-3: per step a DDIM state change (~|x|/1000) is below half an ulp, so the
  deterministic 1000-step DDIM run stalls and is *not* within tolerance (xfail below, documenting the
  limitation: use fp16 or fp32 state, or fewer steps, with bf16). The stochastic DDPM run, whose noise
  increments are large compared with the bf16 ulp, is held to the same distribution-level tolerance.
"""

from __future__ import annotations

import math

import pytest
import torch

from fastdiff import Pipeline, Schedule
from fastdiff.eval.exact import GaussianMixture
from fastdiff.eval.metrics import gmm_statistical_check, sliced_wasserstein

MEANS = torch.tensor([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], dtype=torch.float64)
STDS = torch.tensor([0.5, 0.35, 0.6], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
N = 1024


class TorchMixtureEps:
    """The exact eps network of the mixture in float64 torch ops (fast: no host round trip per call).

    For x_t = alpha x0 + sigma eps with x0 ~ sum_k w_k N(mu_k, s_k^2 I): component k of x_t is
    N(alpha mu_k, (alpha^2 s_k^2 + sigma^2) I); eps = -sigma * score.
    """

    def __init__(self, schedule: Schedule):
        t = torch.arange(
            schedule.num_train_timesteps if hasattr(schedule, "num_train_timesteps") else 1000, dtype=torch.float64
        )
        self.alpha = torch.as_tensor(schedule.alpha(t), dtype=torch.float64)
        self.sigma = torch.as_tensor(schedule.sigma(t), dtype=torch.float64)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        i = t.round().long()
        a, s = self.alpha[i][:, None, None], self.sigma[i][:, None, None]  # [B, 1, 1]
        xd = x.double()[:, None, :]  # [B, 1, D]
        var = a**2 * STDS[None, :, None] ** 2 + s**2  # [B, K, 1]
        diff = xd - a * MEANS[None]  # [B, K, D]
        logp = (
            torch.log(WEIGHTS)[None, :, None]
            - 0.5 * (diff**2 / var).sum(-1, keepdim=True)
            - diff.shape[-1] / 2 * torch.log(var)
        )
        post = torch.softmax(logp, dim=1)
        score = -(post * diff / var).sum(1)
        return (-s[:, 0] * score).to(x.dtype)


@pytest.fixture(scope="module")
def setup():
    # One intra-op thread: these are thousands of tiny ops, and thread wake-ups would dominate them.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield _setup()
    finally:
        torch.set_num_threads(threads)


def _setup():
    sched = Schedule.vp_discrete()
    model = TorchMixtureEps(sched)
    ref = {
        s: Pipeline(model, sched, device="cpu").sample((N, 2), sampler=s, steps=1000, seed=0, progress=False)
        for s in ("ddim", "ddpm")
    }
    gmm = GaussianMixture(MEANS.float(), STDS.float(), WEIGHTS.float())
    floor = sliced_wasserstein(gmm.sample(N, seed=1), gmm.sample(N, seed=2))
    return sched, model, ref, gmm, floor


def test_torch_mixture_model_is_the_exact_network(setup):
    sched, model, _, gmm, _ = setup
    exact = gmm.as_model(sched, "eps")
    x = torch.randn(64, 2)
    for t in (0.0, 250.0, 999.0):
        tt = torch.full((64,), t)
        torch.testing.assert_close(model(x, tt), exact(x, tt), rtol=1e-4, atol=1e-5)


def _errors(x: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    err = (x.float() - ref).norm(dim=1)
    return float(err.median()), float(err.quantile(0.9))


@pytest.mark.parametrize(
    "dtype,sampler",
    [
        (torch.float16, "ddim"),
        (torch.float16, "ddpm"),
        (torch.bfloat16, "ddpm"),
        pytest.param(
            torch.bfloat16,
            "ddim",
            marks=pytest.mark.xfail(
                strict=True, reason="bf16 state: 1000 DDIM increments fall below half an ulp and the run stalls"
            ),
        ),
    ],
)
def test_low_precision_state_within_tolerance_of_fp32(setup, dtype, sampler):
    sched, model, ref, gmm, floor = setup
    x = Pipeline(model, sched, device="cpu", dtype=dtype).sample(
        (N, 2), sampler=sampler, steps=1000, seed=0, progress=False
    )
    assert x.dtype == dtype and torch.isfinite(x.float()).all()
    median, q90 = _errors(x, ref[sampler])
    assert median <= 0.05 and q90 <= 0.25, (median, q90)
    assert sliced_wasserstein(x.float(), ref[sampler]) < floor
    check = gmm_statistical_check(x.float(), gmm)
    assert check, check


def test_fp32_reference_is_itself_right(setup):
    _, _, ref, gmm, _ = setup
    for x in ref.values():
        check = gmm_statistical_check(x, gmm)
        assert check, check
    assert not math.isnan(float(ref["ddim"].sum()))
