"""pndm (PLMS) and lms against diffusers' PNDMScheduler / LMSDiscreteScheduler and k-diffusion's sample_lms on the
exact eps (or v) network of a 2-D Gaussian mixture, on the peers' own grids, same x_T: relative difference
<= 1e-4 (measured 4e-8 .. 6e-6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sampler_helpers import pf_ode_reference

from fastdiff import Pipeline, Schedule
from fastdiff.demos.mixture import default_mixture
from fastdiff.eval.exact import GaussianMixture
from fastdiff.program import build_program
from fastdiff.samplers import SAMPLERS
from fastdiff.schedule import Grid

diffusers = pytest.importorskip("diffusers")
GMM = default_mixture()
B = 256


def _rel(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("steps", [1, 2, 5, 12])
@pytest.mark.parametrize("prediction,ptype", [("eps", "epsilon"), ("v", "v_prediction")])
def test_pndm_equals_diffusers_plms(steps, prediction, ptype):
    sched = diffusers.PNDMScheduler(skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1, prediction_type=ptype)
    schedule = Schedule.from_diffusers(sched)
    model = GMM.as_model(schedule, prediction)
    sched.set_timesteps(steps)
    x_T = torch.randn(B, 2, generator=torch.Generator().manual_seed(steps))
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((B,), float(t))), t, x).prev_sample
    chain = sched._timesteps[::-1].astype(np.float64)
    t = np.concatenate([chain, [0.0]])  # set_alpha_to_one=False: the last step lands on alphas_cumprod[0]
    grid = Grid(
        t=t,
        alpha=schedule.alpha(t),
        sigma=schedule.sigma(t),
        log_snr=schedule.log_snr(t),
        model_time=schedule.model_time(t),
    )
    prog = build_program(schedule, grid, "pndm", prediction, torch.device("cpu"))
    assert prog.stages == len(sched.timesteps) and prog.slots <= 3  # one stage per network call, as diffusers
    ours = Pipeline(model, schedule, prediction=prediction, device="cpu").run_program(prog, x_T)
    assert _rel(ours, x) <= 1e-4


@pytest.mark.parametrize("steps", [4, 5, 12])
@pytest.mark.parametrize("prediction,ptype", [("eps", "epsilon"), ("v", "v_prediction")])
def test_pndm_runge_kutta_start_equals_diffusers(steps, prediction, ptype):
    """PNDMScheduler's default (skip_prk_steps=False): three pseudo Runge-Kutta steps of four network calls each
    (at the step's start, twice at its half point, at its end), then PLMS on their first outputs."""
    sched = diffusers.PNDMScheduler(set_alpha_to_one=False, steps_offset=1, prediction_type=ptype)
    schedule = Schedule.from_diffusers(sched)
    model = GMM.as_model(schedule, prediction)
    sched.set_timesteps(steps)
    x_T = torch.randn(B, 2, generator=torch.Generator().manual_seed(steps))
    x = x_T.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, torch.full((B,), float(t))), t, x).prev_sample
    t = np.concatenate([sched._timesteps[::-1].astype(np.float64), [0.0]])
    grid = Grid(t=t, alpha=schedule.alpha(t), sigma=schedule.sigma(t), log_snr=schedule.log_snr(t), model_time=t)
    prog = build_program(schedule, grid, "pndm_prk", prediction, torch.device("cpu"))
    assert prog.stages == len(sched.timesteps) and prog.slots == 4
    assert np.array_equal(prog.model_time, sched.timesteps.numpy())  # the half points diffusers feeds
    ours = Pipeline(model, schedule, prediction=prediction, device="cpu").run_program(prog, x_T)
    assert _rel(ours, x) <= 1e-4


def test_pndm_runge_kutta_start_converges_to_the_exact_flow():
    """On a smooth mixture with its exact score, the Runge-Kutta start keeps PLMS's second order against an accurate
    PF-ODE solution (continuous schedule: the half point is the midpoint); it needs more steps than its warm-up."""
    gmm = GaussianMixture(torch.tensor([[-1.5, 0.5], [1.5, -0.5]]), torch.tensor([0.8, 1.0]), torch.tensor([0.6, 0.4]))
    sch = Schedule.vp_linear()
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = pf_ode_reference(gmm, sch, x.numpy(), sch.t_max, sch.t_min)
    pipe = Pipeline(gmm.as_model(sch, "eps"), sch, "eps", device="cpu")
    steps, errors = [10, 20, 40, 80], []
    for n in steps:
        prog = build_program(sch, sch.grid(n, spacing="logsnr"), "pndm_prk", "eps", torch.device("cpu"))
        out = pipe.run_program(prog, x.float()).double().numpy()
        errors.append(float(np.sqrt(np.mean((out - ref) ** 2))))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - 2.0) < 0.3 and errors[-1] < 2e-3, (errors, slope)
    with pytest.raises(ValueError, match="needs more than 3 steps"):
        build_program(sch, sch.grid(3), "pndm_prk", "eps", torch.device("cpu"))


@pytest.mark.parametrize("steps", [1, 5, 10, 25])
def test_lms_equals_diffusers_and_k_diffusion(steps, kdiff_sampling):
    sched = diffusers.LMSDiscreteScheduler()
    schedule = Schedule.from_diffusers(sched)
    model = GMM.as_model(schedule, "eps")
    pipe = Pipeline(model, schedule, prediction="eps", device="cpu")
    sched.set_timesteps(steps)
    x_T = torch.randn(B, 2, generator=torch.Generator().manual_seed(steps))
    y = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        y = sched.step(model(sched.scale_model_input(y, t), torch.full((B,), float(t))), t, y).prev_sample
    a0 = float(schedule.alpha(schedule.grid_from_sigmas(sched.sigmas.tolist()).t[0]))
    ours = pipe.sample(
        (B, 2), sampler="lms", sigmas=sched.sigmas.tolist(), x_T=x_T * sched.init_noise_sigma * a0, progress=False
    )
    assert _rel(ours, y) <= 1e-4
    sig = torch.tensor(sched.sigmas.tolist(), dtype=torch.float64)

    def denoiser(yy, s):
        t = float(schedule.t_from_edm_sigma(float(s.reshape(-1)[0])))
        return (
            yy - float(s.reshape(-1)[0]) * model((yy * float(schedule.alpha(t))).float(), torch.full((B,), t)).double()
        )

    theirs = kdiff_sampling.sample_lms(denoiser, x_T.double() * float(sig[0]), sig, disable=True)
    assert (
        _rel(
            pipe.sample(
                (B, 2), sampler="lms", sigmas=sig.tolist(), x_T=(x_T * float(sig[0]) * a0).float(), progress=False
            ),
            theirs,
        )
        <= 1e-4
    )


def test_registry_and_options():
    assert (SAMPLERS["pndm"].nfe_per_step, SAMPLERS["lms"].options) == (1, ("order",))
    schedule = Schedule.vp_discrete()
    pipe = Pipeline(GMM.as_model(schedule, "eps"), schedule, device="cpu")
    with pytest.raises(ValueError, match="order must be 1, 2, 3 or 4"):
        pipe.sample((4, 2), sampler="lms", steps=5, order=5, progress=False)
    low = pipe.sample((4, 2), sampler="lms", steps=5, order=1, progress=False)
    euler = pipe.sample((4, 2), sampler="euler", steps=5, progress=False)
    assert _rel(low, euler) < 1e-5  # first-order LMS is Euler
