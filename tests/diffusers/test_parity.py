"""Parity with diffusers' DDIMScheduler and DDPMScheduler on the same exact network, grid and noise.

The network is the exact eps (or v) predictor of a 2-D Gaussian mixture under the scheduler's own
betas (``Schedule.from_diffusers``), called by both loops as ``model(x, t)``. Both start from the same
x_T; for stochastic runs both add the same noise: DDIM takes ``variance_noise=`` per step, DDPM draws
``randn_tensor(shape, generator)`` only on steps with t > 0, so fastdiff's per-stage ``noise`` list is
drawn from an identically seeded generator in the same order (zeros on the last stage, which adds
none). Final samples must agree to 1e-4 relative (max |a - b| / max |b|).

What remains is float rounding: diffusers computes alphas_cumprod (3.6e-7 relative from the float64
values; 2.6e-6 with zero-SNR rescaling) and every step's scalars in float32, fastdiff's rows are float64
rounded once to float32; x0 = (x - sqrt(1 - abar) eps) / sqrt(abar) amplifies float32 rounding of the
state by up to 1/sqrt(abar) ~ 160, and samples near the boundary between two components amplify
it further, so the max over 512 samples grows with the step count. Measured max relative differences
(printed with ``-s``): DDIM eps 2.3e-6..1.2e-5, DDPM 3.6e-6..2.8e-5 (fixed_small, 50 steps), DDIM v
1.2e-6..2.0e-6, zero-SNR v 1.4e-6..4.5e-5 (eta = 1, 50 steps). Promoting diffusers' alphas_cumprod
to float64 leaves these at the same level (2.5e-5 and 5.9e-5 for the two largest), so they are
float32 state rounding, not a formula difference.
"""

from __future__ import annotations

import pytest
import torch

from fastdiff import Pipeline, Schedule
from fastdiff.demos.mixture import default_mixture

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

GMM = default_mixture()
B = 512
REL_TOL = 1e-4


def _diffusers_loop(
    scheduler,
    model,
    x_T: torch.Tensor,
    steps: int,
    *,
    eta: float | None = None,
    variance_noise: list | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """diffusers' own sampling loop (as its pipelines run it), with the exact network."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for i, t in enumerate(scheduler.timesteps):
        m = model(x, torch.full((x.shape[0],), float(t)))
        if isinstance(scheduler, DDIMScheduler):
            noise = variance_noise[i] if (variance_noise is not None and eta > 0) else None
            x = scheduler.step(m, t, x, eta=eta, variance_noise=noise).prev_sample
        else:
            x = scheduler.step(m, t, x, generator=generator).prev_sample
    return x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def _check(name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.shape == theirs.shape and torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    rel = _rel(ours, theirs)
    print(f"{name}: max relative difference {rel:.2e}")
    assert rel <= REL_TOL, f"{name}: max |fastdiff - diffusers| / max |diffusers| = {rel:.3g}"


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim(eta: float, spacing: str, steps: int) -> None:
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, timestep_spacing=spacing)
    schedule = Schedule.from_diffusers(sched)
    model = GMM.as_model(schedule, "eps")
    gen = torch.Generator().manual_seed(steps + 7)
    x_T = torch.randn(B, 2, generator=gen)
    noise = [torch.randn(B, 2, generator=gen) for _ in range(steps)]
    theirs = _diffusers_loop(sched, model, x_T, steps, eta=eta, variance_noise=noise)
    pipe = Pipeline(model, schedule, prediction="eps", device="cpu")
    ours = pipe.sample(
        (B, 2),
        sampler="ddim",
        steps=steps,
        eta=eta,
        spacing=spacing,
        x_T=x_T,
        noise=noise if eta > 0 else None,
        progress=False,
    )
    _check(f"ddim eta={eta} {spacing} {steps} steps", ours, theirs)
    if eta > 0:  # the explicit noise really is used: Philox noise gives other samples
        other = pipe.sample((B, 2), sampler="ddim", steps=steps, eta=eta, spacing=spacing, x_T=x_T, progress=False)
        assert _rel(other, theirs) > 1e-2


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm(variance_type: str, steps: int) -> None:
    sched = DDPMScheduler(variance_type=variance_type, clip_sample=False)
    schedule = Schedule.from_diffusers(sched)
    model = GMM.as_model(schedule, "eps")
    x_T = torch.randn(B, 2, generator=torch.Generator().manual_seed(steps))
    theirs = _diffusers_loop(sched, model, x_T, steps, generator=torch.Generator().manual_seed(1234))
    # The same generator, drawn in diffusers' order: one randn(shape) per step with t > 0.
    gen = torch.Generator().manual_seed(1234)
    noise = [torch.randn(B, 2, generator=gen) if int(t) > 0 else torch.zeros(B, 2) for t in sched.timesteps]
    assert int(sched.timesteps[-1]) == 0  # so the last stage adds no noise, in both
    ours = Pipeline(model, schedule, prediction="eps", device="cpu").sample(
        (B, 2), sampler="ddpm", steps=steps, variance_type=variance_type, x_T=x_T, noise=noise, progress=False
    )
    _check(f"ddpm {variance_type} {steps} steps", ours, theirs)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_v_prediction(eta: float) -> None:
    steps = 10
    sched = DDIMScheduler(clip_sample=False, set_alpha_to_one=True, prediction_type="v_prediction")
    schedule = Schedule.from_diffusers(sched)
    model = GMM.as_model(schedule, "v")
    gen = torch.Generator().manual_seed(3)
    x_T = torch.randn(B, 2, generator=gen)
    noise = [torch.randn(B, 2, generator=gen) for _ in range(steps)]
    theirs = _diffusers_loop(sched, model, x_T, steps, eta=eta, variance_noise=noise)
    ours = Pipeline(model, schedule, prediction="v", device="cpu").sample(
        (B, 2), sampler="ddim", steps=steps, eta=eta, x_T=x_T, noise=noise if eta > 0 else None, progress=False
    )
    _check(f"ddim v-prediction eta={eta} {steps} steps", ours, theirs)


@pytest.mark.parametrize("steps", [10, 50])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_zero_terminal_snr_v_prediction(eta: float, steps: int) -> None:
    # Rescaled betas: alphas_cumprod[999] == 0 in both, the trailing grid starts there, and only
    # v-prediction has a finite first step (x0 = alpha x - sigma v = -v at alpha = 0).
    sched = DDIMScheduler(
        clip_sample=False,
        set_alpha_to_one=True,
        rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    assert float(sched.alphas_cumprod[-1]) == 0.0
    schedule = Schedule.from_diffusers(sched)
    if eta == 1.0 and steps == 10:
        # diffusers' first step (t = 999 -> 899) computes (1 - a_prev - std_dev_t**2) ** 0.5 with
        # std_dev_t**2 = 1 - a_prev exactly in theory but 1 - a_prev + 6e-8 in float32: sqrt of -6e-8, so
        # every sample is NaN. Its scalar arithmetic in float64 (alphas_cumprod promoted; the samples
        # stay float32) rounds to +1e-16 there and runs the very same formulas; fastdiff clamps at 0.
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.final_alpha_cumprod.double()
    assert float(schedule.alpha(999.0)) == 0.0
    model = GMM.as_model(schedule, "v")
    gen = torch.Generator().manual_seed(11)
    x_T = torch.randn(B, 2, generator=gen)
    noise = [torch.randn(B, 2, generator=gen) for _ in range(steps)]
    theirs = _diffusers_loop(sched, model, x_T, steps, eta=eta, variance_noise=noise)
    ours = Pipeline(model, schedule, prediction="v", device="cpu").sample(
        (B, 2),
        sampler="ddim",
        steps=steps,
        eta=eta,
        spacing="trailing",
        x_T=x_T,
        noise=noise if eta > 0 else None,
        progress=False,
    )
    _check(f"ddim zero-SNR v-prediction eta={eta} trailing {steps} steps", ours, theirs)
