"""euler, euler_ancestral, heun (k-diffusion / EDM formulation) and flow_euler, flow_heun.

Parity: the exact Gaussian-mixture network, the same grid, the same x_T and the same explicit noise in
fastdiff and in the peer (diffusers' EulerDiscrete / EulerAncestralDiscrete / HeunDiscrete /
FlowMatchEulerDiscrete / FlowMatchHeunDiscrete, k-diffusion's sample_euler / sample_heun /
sample_euler_ancestral); the final samples must agree to 1e-4 relative. diffusers' Euler-type
schedulers keep y = x / alpha and feed the network ``scale_model_input(y) = x``; their timesteps for
spacing "linspace" are unrounded, so the fastdiff grid is built from the peer's own timesteps (for
"leading"/"trailing" fastdiff's own grid is used and checked equal to the peer's).

Convergence: on an EDM schedule the error against an RK45 solution of the probability-flow ODE
(float64, rtol 1e-10) must shrink at the method's order as the steps double. The programs are run in
float64 by a plain loop here, so the float32 kernel's rounding does not hide the discretisation error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from peers import U32
from sampler_helpers import CPU, convergence_slope, edm_reference_solution, grid_from_t, noises, x_T

from fastdiff._ext import C
from fastdiff.demos.mixture import default_mixture
from fastdiff.eval.exact import GaussianMixture
from fastdiff.eval.metrics import gmm_statistical_check
from fastdiff.pipeline import Pipeline
from fastdiff.program import build_program
from fastdiff.samplers import SAMPLERS, get_sampler
from fastdiff.schedule import Grid, Schedule

RTOL = 1e-4
# diffusers' Stable Diffusion betas: a realistic discrete schedule.
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return default_mixture()


def run_fastdiff(
    model,
    schedule: Schedule,
    prediction: str,
    grid: Grid,
    sampler: str,
    x: torch.Tensor,
    noise_per_step=None,
    **options,
) -> torch.Tensor:
    """Runs ``sampler`` on ``grid``; ``noise_per_step[i]`` is the noise of step i's noisy stage."""
    pipe = Pipeline(model, schedule, prediction, device="cpu")
    prog = build_program(schedule, grid, sampler, prediction, CPU, **options)
    if noise_per_step is None:
        return pipe.run_program(prog, x)
    noise = [noise_per_step[prog.step_of(k)] if prog.uses_noise(k) else torch.zeros_like(x) for k in range(prog.stages)]
    return pipe.run_program(prog, x, noise=noise)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    err = float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())
    assert err < RTOL, f"relative max error {err:.3g}"


# --------------------------------------------------------------------------------------- diffusers
def diffusers_timesteps(scheduler) -> np.ndarray:
    """The distinct timesteps a diffusers scheduler visits (Heun repeats each but the first)."""
    return torch.unique_consecutive(scheduler.timesteps).double().numpy()


def run_diffusers_edm(scheduler, model, x: torch.Tensor, schedule: Schedule) -> torch.Tensor:
    """diffusers' Euler-type loop: the sample is y = x / alpha, the network sees scale_model_input(y)."""
    t0 = float(scheduler.timesteps[0])
    y = x * math.sqrt(1.0 + float(schedule.edm_sigma(t0)) ** 2)
    for t in scheduler.timesteps:
        m = model(scheduler.scale_model_input(y, t), t)
        y = scheduler.step(m, t, y).prev_sample
    return y  # at sigma = 0, y = x


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_euler_heun_match_diffusers(gmm, sampler, spacing, steps):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    cls = EulerDiscreteScheduler if sampler == "euler" else HeunDiscreteScheduler
    peer = cls(timestep_spacing=spacing, **SD)
    peer.set_timesteps(steps)
    schedule = Schedule.vp_discrete(**SD)
    ts = diffusers_timesteps(peer)
    if spacing == "linspace":  # diffusers' Euler timesteps are unrounded: use them
        grid = grid_from_t(schedule, np.append(ts, -1.0))
    else:
        grid = schedule.grid(steps, spacing=spacing)
        np.testing.assert_array_equal(grid.t[:-1], ts)
    model = gmm.as_model(schedule, "eps")
    x = x_T()
    ours = run_fastdiff(model, schedule, "eps", grid, sampler, x)
    model.reset_nfe()
    theirs = run_diffusers_edm(peer, model, x, schedule)
    assert model.nfe == (steps if sampler == "euler" else 2 * steps - 1)
    assert_close(ours, theirs)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_v_prediction_matches_diffusers(gmm, sampler):
    from diffusers import EulerDiscreteScheduler, HeunDiscreteScheduler

    cls = EulerDiscreteScheduler if sampler == "euler" else HeunDiscreteScheduler
    peer = cls(prediction_type="v_prediction", **SD)
    peer.set_timesteps(10)
    schedule = Schedule.vp_discrete(**SD)
    grid = grid_from_t(schedule, np.append(diffusers_timesteps(peer), -1.0))
    model = gmm.as_model(schedule, "v")
    x = x_T()
    assert_close(run_fastdiff(model, schedule, "v", grid, sampler, x), run_diffusers_edm(peer, model, x, schedule))


@pytest.mark.parametrize("steps", [10, 25])
def test_euler_ancestral_matches_diffusers(gmm, steps, monkeypatch):
    import diffusers.schedulers.scheduling_euler_ancestral_discrete as mod

    peer = mod.EulerAncestralDiscreteScheduler(**SD)
    peer.set_timesteps(steps)
    schedule = Schedule.vp_discrete(**SD)
    grid = grid_from_t(schedule, np.append(diffusers_timesteps(peer), -1.0))
    model = gmm.as_model(schedule, "eps")
    x, z = x_T(), noises(steps)
    drawn = iter(z)
    monkeypatch.setattr(mod, "randn_tensor", lambda shape, **kw: next(drawn).clone())
    theirs = run_diffusers_edm(peer, model, x, schedule)
    ours = run_fastdiff(model, schedule, "eps", grid, "euler_ancestral", x, z)
    assert_close(ours, theirs)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("sampler", ["flow_euler", "flow_heun"])
def test_flow_samplers_match_diffusers(gmm, sampler, steps):
    from diffusers import FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler

    peer = (FlowMatchEulerDiscreteScheduler if sampler == "flow_euler" else FlowMatchHeunDiscreteScheduler)(shift=1.0)
    peer.set_timesteps(steps)
    schedule = Schedule.flow(t_min=1e-3)
    grid = schedule.grid(steps, spacing="uniform")  # linspace(1, 1/1000, steps), then 0: the peer's sigmas
    np.testing.assert_allclose(grid.t[:-1], diffusers_timesteps(peer) / 1000, rtol=1e-6)
    model = gmm.as_model(schedule, "flow")
    x = x_T()
    ours = run_fastdiff(model, schedule, "flow", grid, sampler, x)
    y = x.clone()
    for t in peer.timesteps:
        y = peer.step(model(y, t), t, y).prev_sample
    assert_close(ours, y)


# --------------------------------------------------------------------------------------- k-diffusion
def kdiff_denoiser(gmm: GaussianMixture, schedule: Schedule):
    model = gmm.as_model(schedule, "x0")  # EDM: model time = sigma, and D = the x0 prediction
    return lambda x, sigma: model(x, sigma)


def kdiff_grid(kdiff_sampling, steps: int, schedule: Schedule):
    sigmas = kdiff_sampling.get_sigmas_karras(steps, 0.002, 80.0).double()
    return sigmas, grid_from_t(schedule, sigmas.numpy())


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("s_churn", [0.0, 40.0])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_euler_heun_match_k_diffusion(gmm, kdiff_sampling, sampler, s_churn, steps, monkeypatch):
    schedule = Schedule.edm()
    sigmas, grid = kdiff_grid(kdiff_sampling, steps, schedule)
    # fastdiff's own karras grid is k-diffusion's up to its float32 ramp (raised to the power rho = 7)
    np.testing.assert_allclose(schedule.grid(steps).t, sigmas.numpy(), rtol=64 * U32)
    churn = dict(s_churn=s_churn, s_tmin=0.05, s_tmax=50.0, s_noise=1.003)  # EDM's ImageNet settings
    x = x_T() * 80.0
    z = noises(steps)
    drawn = iter(z)
    # k-diffusion draws torch.randn_like(x) once per step (used only when the step churns).
    monkeypatch.setattr(torch, "randn_like", lambda t, **kw: next(drawn).clone())
    peer = kdiff_sampling.sample_euler if sampler == "euler" else kdiff_sampling.sample_heun
    theirs = peer(kdiff_denoiser(gmm, schedule), x.clone(), sigmas.float(), disable=True, **churn)
    monkeypatch.undo()
    model = gmm.as_model(schedule, "eps")
    ours = run_fastdiff(model, schedule, "eps", grid, sampler, x, z, **churn)
    if s_churn > 0:
        prog = build_program(schedule, grid, sampler, "eps", CPU, **churn)
        assert sum(not prog.calls_model(k) for k in range(prog.stages)) > 0  # some steps did churn
    assert_close(ours, theirs)


@pytest.mark.parametrize("eta", [1.0, 0.5])
@pytest.mark.parametrize("steps", [10, 25])
def test_euler_ancestral_matches_k_diffusion(gmm, kdiff_sampling, steps, eta):
    schedule = Schedule.edm()
    sigmas, grid = kdiff_grid(kdiff_sampling, steps, schedule)
    x, z = x_T() * 80.0, noises(steps)
    drawn = iter(z)
    theirs = kdiff_sampling.sample_euler_ancestral(
        kdiff_denoiser(gmm, schedule),
        x.clone(),
        sigmas.float(),
        disable=True,
        eta=eta,
        s_noise=0.9,
        noise_sampler=lambda s, s_next: next(drawn).clone(),
    )
    ours = run_fastdiff(
        gmm.as_model(schedule, "x0"), schedule, "x0", grid, "euler_ancestral", x, z, eta=eta, s_noise=0.9
    )
    assert_close(ours, theirs)


# --------------------------------------------------------------------------------------- convergence
@pytest.fixture(scope="module")
def edm_reference(gmm):
    """x at sigma_max and the PF-ODE solution at sigma_min (tests/sampler_helpers.py)."""
    return edm_reference_solution(gmm)


@pytest.mark.parametrize("sampler,steps", [("euler", [128, 256, 512]), ("heun", [32, 64, 128])])
def test_convergence_order(gmm, edm_reference, sampler, steps):
    # measured: euler 1.02 (RMS errors 3.0e-2 .. 7.3e-3), heun 1.94 (1.6e-2 .. 1.1e-3)
    slope, errors = convergence_slope(gmm, edm_reference, sampler, steps)
    order = get_sampler(sampler).order
    assert abs(slope - order) < 0.3, (slope, errors)


# --------------------------------------------------------------------------------------- statistics
# First-order samplers need ~150 steps before their bias drops below the check's sampling error at
# n = 4000 (euler_ancestral at 60 steps: covariance |z| up to 5.7 against a threshold of 4.15).
@pytest.mark.parametrize(
    "sampler,steps,options",
    [
        ("euler_ancestral", 150, {}),
        ("euler", 150, dict(s_churn=5.0, s_tmin=0.05, s_tmax=10.0)),
        ("heun", 60, dict(s_churn=10.0, s_tmax=50.0)),
    ],
)
def test_stochastic_samples_match_the_mixture(gmm, sampler, steps, options):
    schedule = Schedule.edm()
    pipe = Pipeline(gmm.as_model(schedule, "x0"), schedule, "x0", device="cpu")
    x = pipe.sample((4000, 2), sampler=sampler, steps=steps, seed=7, progress=False, **options)
    check = gmm_statistical_check(x, gmm)
    assert check, check


def test_flow_heun_samples_match_the_mixture(gmm):
    schedule = Schedule.flow(t_min=1e-3)
    pipe = Pipeline(gmm.as_model(schedule, "flow"), schedule, "flow", device="cpu")
    check = gmm_statistical_check(pipe.sample((4000, 2), sampler="flow_heun", steps=30, seed=3, progress=False), gmm)
    assert check, check


# --------------------------------------------------------------------------------------- programs and errors
def test_heun_program_shape():
    schedule = Schedule.edm()
    prog = build_program(schedule, schedule.grid(10), "heun", "eps", CPU)
    assert prog.stages == 19 and prog.slots == 1
    # each Heun step: stage 1 at t_i keeps x_i, stage 2 at t_{i+1} reads it; the last step is Euler only
    for i in range(9):
        assert prog.writes(2 * i) == 0 and prog.reads(2 * i + 1) == [0]
        assert prog.t[2 * i + 1] == prog.grid.t[i + 1]
    assert prog.reads(18) == [] and prog.writes(18) == -1


def test_churn_stage_moves_model_time_to_sigma_hat():
    schedule = Schedule.vp_discrete()
    grid = schedule.grid(10, spacing="trailing")
    prog = build_program(schedule, grid, "heun", "eps", CPU, s_churn=2.0, s_tmax=100.0)
    gamma = min(2.0 / 10, math.sqrt(2) - 1)
    s_hat = float(schedule.edm_sigma(grid.t[1])) * (1 + gamma)  # step 0 starts at sigma 157 > s_tmax
    churned = [k for k in range(prog.stages) if not prog.calls_model(k)]
    k = churned[0]
    assert prog.step_of(k) == 1 and prog.uses_noise(k)
    np.testing.assert_allclose(schedule.edm_sigma(prog.t[k + 1]), s_hat, rtol=1e-9)
    np.testing.assert_allclose(prog.model_time[k + 1], schedule.model_time(prog.t[k + 1]))


def test_churn_beyond_the_schedule_is_an_error():
    schedule = Schedule.edm()
    with pytest.raises(ValueError, match="s_churn raises sigma at step 0"):
        build_program(schedule, schedule.grid(10), "heun", "eps", CPU, s_churn=10.0)


@pytest.mark.parametrize(
    "sampler,options,match",
    [
        ("euler_ancestral", dict(eta=1.5), "eta"),
        ("heun", dict(s_churn=-1.0), "s_churn"),
        ("euler", dict(s_noise="loud"), "s_noise must be a number"),
        ("heun", dict(s_tmin=2.0, s_tmax=1.0), "s_tmax"),
    ],
)
def test_bad_options(sampler, options, match):
    schedule = Schedule.edm()
    with pytest.raises(ValueError, match=match):
        build_program(schedule, schedule.grid(10), sampler, "eps", CPU, **options)


@pytest.mark.parametrize("sampler", ["flow_euler", "flow_heun"])
def test_flow_samplers_need_the_flow_schedule(sampler):
    schedule = Schedule.vp_discrete()
    with pytest.raises(ValueError, match="Schedule.flow"):
        build_program(schedule, schedule.grid(10), sampler, "eps", CPU)


def test_unknown_option_is_named(gmm):
    schedule = Schedule.edm()
    pipe = Pipeline(gmm.as_model(schedule, "x0"), schedule, "x0", device="cpu")
    with pytest.raises(ValueError, match="does not take lower_order_final"):
        pipe.sample((4, 2), sampler="heun", steps=5, lower_order_final=True, progress=False)


@pytest.mark.parametrize("name", ["euler", "euler_ancestral", "heun", "flow_euler", "flow_heun"])
def test_registry_entries(name):
    info = SAMPLERS[name]
    assert name in C.sampler_names()
    expected = {
        "euler": (1, False, 1),
        "euler_ancestral": (1, True, 1),
        "heun": (2, False, 2),
        "flow_euler": (1, False, 1),
        "flow_heun": (2, False, 2),
    }[name]
    assert (info.order, info.stochastic, info.nfe_per_step) == expected
    assert "flow" in info.predictions


def test_explicit_eta_zero_reaches_the_sampler(gmm):
    """eta=0 makes euler_ancestral plain Euler; it must not fall back to the sampler's default eta = 1."""
    schedule = Schedule.edm()
    pipe = Pipeline(gmm.as_model(schedule, "x0"), schedule, "x0", device="cpu")
    x = x_T() * 80.0
    euler = pipe.sample(x.shape, sampler="euler", steps=10, x_T=x, progress=False)
    zero = pipe.sample(x.shape, sampler="euler_ancestral", steps=10, x_T=x, eta=0.0, seed=1, progress=False)
    one = pipe.sample(x.shape, sampler="euler_ancestral", steps=10, x_T=x, seed=1, progress=False)
    assert_close(zero, euler)
    assert float((one - euler).abs().max()) > 0.1
