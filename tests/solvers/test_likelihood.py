"""Exact likelihood, PF-ODE encoding (inversion) and latent interpolation, against closed forms.

The reference is an analytic Gaussian mixture: its noised density ``p_t`` and score are exact at every t,
so ``log p_{t_min}(x)`` -- what integrating the PF-ODE from ``t_min`` returns for a point x taken at
``t_min`` -- is known: ``gmm.log_prob_noised(x, alpha(t_min), sigma(t_min))``.
"""

from __future__ import annotations

import math

import pytest
import torch

import fastdiff
from fastdiff.eval.exact import GaussianMixture
from fastdiff.pipeline import Pipeline
from fastdiff.samplers import SAMPLERS
from fastdiff.solvers.interpolate import interpolate, slerp
from fastdiff.solvers.likelihood import (
    LikelihoodInfo,
    LikelihoodSolver,
    decode,
    encode,
    encode_samplers,
    pf_ode_drift,
    prior_log_prob,
)
from fastdiff.solvers.ode import Tolerances

# |z| <= 4 for the Hutchinson z-tests: under an unbiased estimator P(|z| > 4) = 6e-5, and the probes are
# seeded, so the test is deterministic; SLACK absorbs the solver error between the exact and the Hutchinson
# runs (different adaptive step sequences; measured <= 2e-4 nats at rtol = atol = 1e-5, see
# test_exact_likelihood_is_independent_of_chunking_and_autodiff), with a 5x margin.
Z_MAX = 4.0
SLACK = 1e-3


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return GaussianMixture(means=[[-2.0, 0.0], [2.0, 1.0], [0.0, -2.0]], stds=[0.5, 0.4, 0.6], weights=[0.5, 0.3, 0.2])


@pytest.fixture(scope="module")
def vp() -> fastdiff.Schedule:
    return fastdiff.Schedule.vp_linear()


def make_pipe(gmm: GaussianMixture, schedule: fastdiff.Schedule, prediction: str = "eps") -> Pipeline:
    return Pipeline(gmm.as_model(schedule, prediction), schedule, prediction, device="cpu")


def analytic(gmm: GaussianMixture, schedule: fastdiff.Schedule, x: torch.Tensor) -> torch.Tensor:
    """log p_{t_min}(x): the density of alpha(t_min) X0 + sigma(t_min) eps."""
    t = schedule.t_min
    return gmm.log_prob_noised(x.double(), float(schedule.alpha(t)), float(schedule.sigma(t)))


def z_test(estimates: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Mean difference and its standard error over independent estimates."""
    d = (estimates.double() - reference.double()).flatten()
    return float(d.mean()), float(d.std() / math.sqrt(d.numel()))


# ============================================================================ the drift
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "flow"])
def test_pf_ode_drift_matches_analytic(gmm, vp, prediction):
    x = gmm.sample(16, seed=3, dtype=torch.float64)
    drift = pf_ode_drift(gmm.as_model(vp, prediction), vp, prediction)
    for t in (vp.t_min, 0.3, vp.t_max):
        a, s = float(vp.alpha(t)), float(vp.sigma(t))
        want = float(vp.drift_coef(t)) * x - 0.5 * float(vp.g2(t)) * gmm.score_noised(x, a, s)
        torch.testing.assert_close(drift(x, t), want, rtol=1e-9, atol=1e-9)


def test_flow_drift_is_the_velocity_and_finite_at_t1(gmm):
    sch = fastdiff.Schedule.flow()
    model = gmm.as_model(sch, "flow")
    x = gmm.sample(8, seed=4, dtype=torch.float64)
    drift = pf_ode_drift(model, sch, "flow")
    for t in (0.5, 1.0):
        torch.testing.assert_close(drift(x, t), model(x, torch.full((8,), t * 1000.0, dtype=torch.float64)))


# ============================================================================ exact likelihood
@pytest.mark.parametrize("prediction", ["eps", "x0", "v", "score", "flow"])
def test_exact_likelihood_matches_noised_mixture_2d(gmm, vp, prediction):
    x0 = gmm.sample(64, seed=1, dtype=torch.float64)
    pipe = make_pipe(gmm, vp, prediction)
    ll, info = pipe.log_likelihood(x0, dtype=torch.float64, return_info=True)
    truth = analytic(gmm, vp, x0)
    assert isinstance(info, LikelihoodInfo) and ll.shape == (64,) and ll.dtype == torch.float64
    err = (ll - truth).abs()
    assert float(err.mean()) < 0.05, float(err.mean())  # the bar; measured 2.3e-3
    # What is left is the N(0, I) prior standing in for the exact marginal at t_max (alpha(1) = 0.0066):
    # with the exact marginal there the ODE part alone is within 1e-4 nats (measured 2.4e-6).
    exact_prior = gmm.log_prob_noised(info.x_T, float(vp.alpha(vp.t_max)), float(vp.sigma(vp.t_max)))
    assert float((exact_prior + info.delta_log_prob - truth).abs().mean()) < 1e-4
    assert float((info.prior_log_prob - exact_prior).abs().max()) < 0.02
    assert 50 < info.nfe < 400


def test_exact_likelihood_float32_default(gmm, vp):
    x0 = gmm.sample(32, seed=2)
    ll = make_pipe(gmm, vp).log_likelihood(x0)
    assert ll.dtype == torch.float32
    assert float((ll.double() - analytic(gmm, vp, x0)).abs().mean()) < 0.05


@pytest.mark.parametrize(
    "schedule, prediction",
    [
        (fastdiff.Schedule.vp_cosine(t_max=0.9946), "eps"),
        (fastdiff.Schedule.sub_vp(), "v"),
        (fastdiff.Schedule.ve(), "eps"),
        (fastdiff.Schedule.edm(), "x0"),
        (fastdiff.Schedule.flow(), "flow"),
    ],
    ids=["vp_cosine", "sub_vp", "ve", "edm", "flow"],
)
def test_exact_likelihood_other_schedules(gmm, schedule, prediction):
    x0 = gmm.sample(16, seed=5, dtype=torch.float64)
    ll = make_pipe(gmm, schedule, prediction).log_likelihood(x0, dtype=torch.float64)
    assert float((ll - analytic(gmm, schedule, x0)).abs().mean()) < 0.05


def test_exact_likelihood_is_independent_of_chunking_and_autodiff(gmm, vp):
    x0 = gmm.sample(6, seed=6, dtype=torch.float64)
    pipe = make_pipe(gmm, vp)
    ref = pipe.log_likelihood(x0, dtype=torch.float64)
    fwd = pipe.log_likelihood(x0, dtype=torch.float64, solver=LikelihoodSolver(autodiff="forward"))
    torch.testing.assert_close(fwd, ref, rtol=0, atol=1e-10)
    # batch_size=1 row per call: one sample per solve, its two trace rows in two calls
    chunked = pipe.log_likelihood(x0, dtype=torch.float64, batch_size=1)
    assert float((chunked - ref).abs().max()) < 2e-4  # only the adaptive steps differ


def test_bits_per_dim(gmm, vp):
    x0 = gmm.sample(8, seed=7, dtype=torch.float64)
    pipe = make_pipe(gmm, vp)
    nats = pipe.log_likelihood(x0, dtype=torch.float64)
    bpd = pipe.log_likelihood(x0, dtype=torch.float64, bits_per_dim=True)
    torch.testing.assert_close(bpd, -nats / (2 * math.log(2.0)))


def test_prior_log_prob_is_the_standard_normal(vp):
    x = torch.randn(5, 3, 2, dtype=torch.float64)
    want = torch.distributions.Normal(0.0, 1.0).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(prior_log_prob(vp, x), want)


# ============================================================================ Hutchinson
@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_2d(gmm, vp, probe):
    """Each of 16 points is replicated 64 times; sample i's probes depend on (seed, i), so the copies are
    1024 independent single-probe estimates. Their mean difference to the exact trace is a z-test."""
    pipe = make_pipe(gmm, vp)
    x0 = gmm.sample(16, seed=8, dtype=torch.float64)
    exact = pipe.log_likelihood(x0, dtype=torch.float64)
    reps = 64
    est = pipe.log_likelihood(x0.repeat(reps, 1), method="hutchinson", probe=probe, dtype=torch.float64, seed=11)
    bias, se = z_test(est, exact.repeat(reps))
    assert abs(bias) <= Z_MAX * se + SLACK, (bias, se)
    # the test can see a 0.1-nat bias (4 se + slack is measured 0.05 for Rademacher)
    if probe == "rademacher":
        assert Z_MAX * se + SLACK < 0.1, se
    # and the estimates do vary: the probes are not degenerate
    assert float(est.std()) > 0


def test_hutchinson_more_probes_lower_variance_and_seeded(gmm, vp):
    pipe = make_pipe(gmm, vp)
    x0 = gmm.sample(8, seed=9, dtype=torch.float64).repeat(16, 1)
    exact = pipe.log_likelihood(x0[:8], dtype=torch.float64).repeat(16)
    one = pipe.log_likelihood(x0, method="hutchinson", probe="gaussian", dtype=torch.float64, seed=1)
    many = pipe.log_likelihood(x0, method="hutchinson", probe="gaussian", n_probes=8, dtype=torch.float64, seed=1)
    assert float((many - exact).std()) < 0.6 * float((one - exact).std())
    again = pipe.log_likelihood(x0, method="hutchinson", probe="gaussian", dtype=torch.float64, seed=1)
    torch.testing.assert_close(again, one, rtol=0, atol=0)
    other = pipe.log_likelihood(x0, method="hutchinson", probe="gaussian", dtype=torch.float64, seed=2)
    assert not torch.equal(other, one)
    # a sample's probes do not depend on the chunk it is solved in (only the adaptive steps do)
    chunked = pipe.log_likelihood(x0, method="hutchinson", probe="gaussian", dtype=torch.float64, seed=1, batch_size=50)
    assert float((chunked - one).abs().max()) < 1e-3


def test_gaussian_16d_exact_and_hutchinson():
    """One anisotropic Gaussian in 16-D: exact trace (16 JVP rows per sample) and Hutchinson."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    std = 0.3 + 1.2 * torch.rand(1, 16, generator=gen, dtype=torch.float64)
    gauss = GaussianMixture(mean, std, [1.0])
    vp = fastdiff.Schedule.vp_linear()
    pipe = make_pipe(gauss, vp)
    x0 = gauss.sample(32, seed=3, dtype=torch.float64)
    exact, info = pipe.log_likelihood(x0, dtype=torch.float64, return_info=True)
    truth = analytic(gauss, vp, x0)
    assert float((exact - truth).abs().mean()) < 0.05  # measured 0.028, all of it the N(0, I) prior (|mean| = 4.7)
    exact_prior = gauss.log_prob_noised(info.x_T, float(vp.alpha(vp.t_max)), float(vp.sigma(vp.t_max)))
    assert float((exact_prior + info.delta_log_prob - truth).abs().mean()) < 1e-4  # measured 9e-6
    reps = 16
    est = pipe.log_likelihood(x0.repeat(reps, 1), method="hutchinson", probe="gaussian", dtype=torch.float64, seed=5)
    bias, se = z_test(est, exact.repeat(reps))
    assert abs(bias) <= Z_MAX * se + SLACK, (bias, se)
    # the Jacobian of a diagonal Gaussian's drift is diagonal: z^T J z with z = +-1 is its trace exactly
    rad = pipe.log_likelihood(x0, method="hutchinson", dtype=torch.float64, seed=5)
    assert float((rad - exact).abs().max()) < 1e-6


def test_mixture_16d_hutchinson_rademacher_unbiased():
    """Two components in 16-D: responsibilities couple the coordinates, so Rademacher probes vary too."""
    gen = torch.Generator().manual_seed(0)
    mean = torch.randn(1, 16, generator=gen, dtype=torch.float64)
    std = 0.3 + 1.2 * torch.rand(1, 16, generator=gen, dtype=torch.float64)
    mix = GaussianMixture(torch.cat([mean, -0.3 * mean]), torch.cat([std, std.flip(1)]), [0.6, 0.4])
    vp = fastdiff.Schedule.vp_linear()
    pipe = make_pipe(mix, vp)
    x0 = mix.sample(32, seed=3, dtype=torch.float64)
    exact = pipe.log_likelihood(x0, dtype=torch.float64)
    assert float((exact - analytic(mix, vp, x0)).abs().mean()) < 0.05  # measured 9e-3
    reps = 16
    est = pipe.log_likelihood(x0.repeat(reps, 1), method="hutchinson", dtype=torch.float64, seed=1)
    bias, se = z_test(est, exact.repeat(reps))
    assert se > 1e-3
    assert abs(bias) <= Z_MAX * se + SLACK, (bias, se)


# ============================================================================ encode / decode
def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_ddim_round_trip_error_falls_with_steps(gmm, vp):
    """Plain DDIM inversion (fixed_point_iters=0: one fused step per inversion step) is first order."""
    x0 = gmm.sample(256, seed=1)
    pipe = make_pipe(gmm, vp)
    errs = {}
    for steps in (25, 50, 100, 200):
        code = pipe.encode(x0, steps=steps, fixed_point_iters=0)
        assert code.shape == x0.shape and code.dtype == torch.float32
        errs[steps] = rel_err(pipe.sample(x0.shape, "ddim", steps=steps, x_T=code, progress=False), x0)
    # measured 1.2e-1, 6.7e-2, 4.5e-2, 1.2e-2: DDIM inversion is first order
    assert errs[25] > errs[50] > errs[100] > errs[200], errs
    assert errs[200] < 2e-2 and errs[25] / errs[200] > 4, errs


@pytest.mark.parametrize(
    "schedule", [fastdiff.Schedule.vp_linear(), fastdiff.Schedule.vp_discrete()], ids=["vp_linear", "vp_discrete"]
)
def test_ddim_round_trip_within_1e2_at_100_steps(gmm, schedule):
    """With one fixed-point refinement per inversion step, decode(encode(x0)) is within 1e-2 at 100 steps
    (measured 1.2e-3; plain DDIM inversion: 4.5e-2, see test_ddim_round_trip_error_falls_with_steps)."""
    x0 = gmm.sample(256, seed=1)
    pipe = make_pipe(gmm, schedule)
    code = encode(pipe, x0, steps=100)  # the default: one fixed-point refinement per step
    assert torch.equal(code, encode(pipe, x0, steps=100, fixed_point_iters=1))
    assert rel_err(pipe.sample(x0.shape, "ddim", steps=100, x_T=code, progress=False), x0) < 1e-2
    code2 = encode(pipe, x0, steps=100, fixed_point_iters=2)
    assert rel_err(pipe.sample(x0.shape, "ddim", steps=100, x_T=code2, progress=False), x0) < 1e-3


def test_rk45_round_trip_and_ddim_codes_converge_to_it(gmm, vp):
    x0 = gmm.sample(128, seed=2)
    model = gmm.as_model(vp, "eps")
    pipe = Pipeline(model, vp, "eps", device="cpu")
    model.reset_nfe()
    code = pipe.encode(x0, sampler="rk45", dtype=torch.float64)
    nfe_encode = model.nfe
    back = decode(pipe, code, sampler="rk45", dtype=torch.float64)
    assert rel_err(back, x0) < 1e-4  # measured 4e-6
    assert nfe_encode < 200  # measured 98 at rtol = atol = 1e-5
    # the codes are x_T of the exact PF-ODE: normal under the prior for data from the model
    assert abs(float(code.std()) - 1.0) < 0.1
    # DDIM inversion approximates the same map, better with more steps
    d50 = rel_err(pipe.encode(x0, steps=50, fixed_point_iters=0), code)
    d200 = rel_err(pipe.encode(x0, steps=200, fixed_point_iters=0), code)
    assert d200 < d50 / 2, (d50, d200)


def test_encode_samplers_and_dpmpp_2m():
    accepted = encode_samplers()
    assert "ddim" in accepted and "rk45" in accepted
    assert ("dpmpp_2m" in accepted) == ("dpmpp_2m" in SAMPLERS)


@pytest.mark.skipif("dpmpp_2m" not in SAMPLERS, reason="dpmpp_2m is not registered yet")
def test_dpmpp_2m_round_trip(gmm, vp):
    x0 = gmm.sample(128, seed=3)
    pipe = make_pipe(gmm, vp)
    code = pipe.encode(x0, steps=100, sampler="dpmpp_2m")
    assert rel_err(pipe.sample(x0.shape, "dpmpp_2m", steps=100, x_T=code, progress=False), x0) < 5e-2


# ============================================================================ bad input
def test_bad_x0_shapes_name_x0(gmm, vp):
    pipe = make_pipe(gmm, vp)
    with pytest.raises(ValueError, match="x0"):
        pipe.log_likelihood(torch.zeros(2))  # no batch dimension
    with pytest.raises(ValueError, match="x0"):
        pipe.log_likelihood(torch.zeros(4, 3))  # the model is 2-D
    with pytest.raises(ValueError, match="x0"):
        pipe.encode(torch.zeros(4, 3), sampler="rk45")
    with pytest.raises(ValueError, match="x0"):
        pipe.encode(torch.zeros(3))
    with pytest.raises(ValueError, match="x0"):
        pipe.log_likelihood(torch.full((2, 2), float("nan")))
    with pytest.raises(TypeError, match="x0"):
        pipe.log_likelihood([[0.0, 0.0]])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(method="trace"), "method"),
        (dict(probe="uniform"), "probe"),
        (dict(n_probes=0), "n_probes"),
        (dict(n_probes=1.5), "n_probes"),
        (dict(batch_size=0), "batch_size"),
        (dict(solver=LikelihoodSolver(rtol=0.0)), "rtol"),
        (dict(solver=LikelihoodSolver(atol=-1.0)), "atol"),
        (dict(dtype=torch.float16), "dtype"),
        (dict(solver=LikelihoodSolver(autodiff="numeric")), "autodiff"),
        (dict(solver=LikelihoodSolver(max_steps=0)), "max_steps"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_bad_likelihood_arguments_name_themselves(gmm, vp, kwargs, name):
    with pytest.raises(ValueError, match=name):
        make_pipe(gmm, vp).log_likelihood(torch.zeros(2, 2), **kwargs)


def test_settings_objects_of_the_wrong_type_are_type_errors(gmm, vp):
    pipe = make_pipe(gmm, vp)
    x = torch.zeros(2, 2)
    with pytest.raises(TypeError, match="solver"):
        pipe.log_likelihood(x, solver=Tolerances())
    with pytest.raises(TypeError, match="tolerances"):
        pipe.encode(x, sampler="rk45", tolerances=1e-5)
    with pytest.raises(TypeError, match="tolerances"):
        decode(pipe, x, sampler="rk45", tolerances={"rtol": 1e-5})
    with pytest.raises(ValueError, match="atol"):
        pipe.encode(x, sampler="rk45", tolerances=Tolerances(atol=0.0))


def test_schedule_or_prediction_without_a_score(gmm, vp):
    discrete = fastdiff.Schedule.vp_discrete()
    with pytest.raises(ValueError, match="schedule"):
        make_pipe(gmm, discrete).log_likelihood(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="schedule"):
        make_pipe(gmm, discrete).encode(torch.zeros(2, 2), sampler="rk45")
    pipe = make_pipe(gmm, vp)
    pipe.prediction = "sample"  # a prediction type fastdiff cannot turn into a score
    with pytest.raises(ValueError, match="prediction"):
        pipe.log_likelihood(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="prediction"):
        pf_ode_drift(gmm.as_model(vp), vp, "sample")
    # rectified flow at t = 1 (alpha = 0) has no eps -> x0 conversion, so no finite drift there
    with pytest.raises(ValueError, match="prediction 'eps'"):
        make_pipe(gmm, fastdiff.Schedule.flow(), "eps").log_likelihood(torch.zeros(2, 2))


def test_bad_encode_arguments(gmm, vp):
    pipe = make_pipe(gmm, vp)
    x = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="sampler must be one of") as info:
        pipe.encode(x, sampler="ddpm")
    assert "ddim" in str(info.value) and "rk45" in str(info.value)
    with pytest.raises(ValueError, match="sampler"):
        pipe.encode(x, sampler="heun")
    if "dpmpp_2m" not in SAMPLERS:
        with pytest.raises(ValueError, match="sampler"):
            pipe.encode(x, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="fixed_point_iters"):
        pipe.encode(x, fixed_point_iters=-1)
    with pytest.raises(ValueError, match="fixed_point_iters"):
        pipe.encode(x, sampler="rk45", fixed_point_iters=1)


# ============================================================================ interpolation
def test_interpolate_endpoints_shape_and_norm():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(3, 4, 5, generator=gen)
    b = torch.randn(3, 4, 5, generator=gen)
    b = b * (a.flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1))[:, None, None]  # equal norms per sample
    alphas = torch.linspace(0, 1, 7)
    path = interpolate(a, b, alphas)
    assert path.shape == (7, 3, 4, 5)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    norms = path.flatten(2).norm(dim=2)
    torch.testing.assert_close(norms, a.flatten(1).norm(dim=1).expand(7, 3), rtol=1e-6, atol=0)
    # it is not the straight line: the chord's midpoint is shorter
    assert float((0.5 * (a + b)).flatten(1).norm(dim=1).max()) < float(norms[3].min())
    # along the great circle: the angle to a grows linearly
    cos = (path.flatten(2) * a.flatten(1)).sum(-1) / (norms * a.flatten(1).norm(dim=1))
    theta = torch.acos(cos.double().clamp(-1, 1))
    torch.testing.assert_close(theta, alphas.double()[:, None] * theta[-1], rtol=0, atol=1e-3)


def test_interpolate_parallel_and_zero_vectors():
    a = torch.randn(2, 6)
    torch.testing.assert_close(interpolate(a, 3 * a, [0.5])[0], 2 * a)  # parallel: linear
    assert torch.isfinite(interpolate(a, torch.zeros_like(a), [0.25, 0.5])).all()
    assert torch.isfinite(slerp(a, -a, 0.5)).all()
    assert torch.isfinite(interpolate(a, a, [0.3])).all()


def test_interpolate_bad_input():
    a = torch.randn(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        interpolate(a, torch.randn(2, 4), [0.5])
    with pytest.raises(ValueError, match="alphas"):
        interpolate(a, a, [])
    with pytest.raises(ValueError, match="xT_a"):
        interpolate(torch.randn(3), torch.randn(3), [0.5])
    with pytest.raises(TypeError, match="xT_b"):
        interpolate(a, [[0.0]], [0.5])


def test_interpolation_recipe_between_two_data_points(gmm, vp):
    """The docs/likelihood.md recipe: encode two points, slerp their codes, decode; the end frames are the points."""
    pipe = make_pipe(gmm, vp)
    pts = torch.tensor([[-2.0, 0.2], [2.1, 0.9]])
    codes = pipe.encode(pts, steps=100, fixed_point_iters=1)
    path = interpolate(codes[0:1], codes[1:2], torch.linspace(0, 1, 9))
    frames = pipe.sample((9, 2), sampler="ddim", steps=100, x_T=path[:, 0], progress=False)
    torch.testing.assert_close(frames[0], pts[0], rtol=0, atol=2e-2)
    torch.testing.assert_close(frames[-1], pts[1], rtol=0, atol=2e-2)
    assert torch.isfinite(frames).all()
    # the inner frames are new points, each decoded from a code on the great circle between the two
    assert float((frames[1:-1] - pts[0]).norm(dim=1).min()) > 1e-3
