"""The exact model (fastdiff.eval.exact.GaussianMixture) and the sample-quality metrics (fastdiff.eval.metrics)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff import Schedule
from fastdiff.eval.exact import PREDICTIONS, GaussianMixture
from fastdiff.eval.metrics import GMMCheck, gmm_statistical_check, moment_errors, sliced_wasserstein


def gmm2d() -> GaussianMixture:
    return GaussianMixture([[-2.0, 0.0], [2.0, 1.0], [0.0, -2.5]], [0.5, 0.8, 0.3], [0.5, 0.3, 0.2])


def gmm_diag4() -> GaussianMixture:
    """D = 4 with diagonal (anisotropic) components, for [B, 2, 2]-shaped inputs."""
    return GaussianMixture(
        [[1.0, -1.0, 0.5, 0.0], [-1.5, 0.5, 0.0, 2.0]], [[0.3, 0.6, 1.0, 0.4], [0.8, 0.2, 0.5, 0.7]], [2.0, 3.0]
    )


# ----------------------------------------------------------------------------- construction


def test_shapes_properties_and_normalised_weights():
    g = GaussianMixture([[0.0, 1.0]], [2.0], [5.0])
    assert g.dim == 2 and g.n_components == 1
    assert torch.allclose(g.weights, torch.tensor([1.0], dtype=torch.float64))
    assert torch.equal(g.stds, torch.full((1, 2), 2.0, dtype=torch.float64))
    g4 = gmm_diag4()
    assert g4.dim == 4 and g4.n_components == 2
    assert torch.allclose(g4.weights.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(means=[0.0, 1.0], stds=[1.0], weights=[1.0]), "means"),
        (dict(means=[[0.0], [1.0]], stds=[1.0, 1.0, 1.0], weights=[1.0, 1.0]), "stds"),
        (dict(means=[[0.0, 0.0]], stds=[[1.0, 1.0, 1.0]], weights=[1.0]), "stds"),
        (dict(means=[[0.0]], stds=[0.0], weights=[1.0]), "stds"),
        (dict(means=[[0.0]], stds=[-1.0], weights=[1.0]), "stds"),
        (dict(means=[[0.0], [1.0]], stds=[1.0, 1.0], weights=[1.0]), "weights"),
        (dict(means=[[0.0], [1.0]], stds=[1.0, 1.0], weights=[1.0, 0.0]), "weights"),
        (dict(means=[[float("nan")]], stds=[1.0], weights=[1.0]), "means"),
        (dict(means=[["a"]], stds=[1.0], weights=[1.0]), "means"),
    ],
)
def test_bad_construction_raises_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianMixture(**kwargs)


# ----------------------------------------------------------------------------- samples and moments


def test_sample_is_deterministic_and_typed():
    g = gmm2d()
    a, b = g.sample(100, seed=3), g.sample(100, seed=3)
    assert a.shape == (100, 2) and a.dtype == torch.float32 and torch.equal(a, b)
    assert not torch.equal(a, g.sample(100, seed=4))
    x64, comp = g.sample(100, seed=3, dtype=torch.float64, return_components=True)
    assert x64.dtype == torch.float64 and comp.shape == (100,) and torch.allclose(x64.float(), a)
    assert g.sample(0).shape == (0, 2)
    with pytest.raises(ValueError, match="n"):
        g.sample(-1)
    with pytest.raises(ValueError, match="seed"):
        g.sample(3, seed=1.5)


def test_exact_moments_match_direct_formula():
    g = gmm_diag4()
    w, mu, s = g.weights, g.means, g.stds
    m = (w[:, None] * mu).sum(0)
    cov = sum(w[k] * (torch.diag(s[k] ** 2) + torch.outer(mu[k] - m, mu[k] - m)) for k in range(2))
    assert torch.allclose(g.mean(), m) and torch.allclose(g.covariance(), cov)


def test_sample_moments_match_exact_moments():
    """n = 40000. Sample mean: per coordinate |m_hat - m| <= 5 sqrt(C_dd/n) (5 standard errors, a
    false-alarm rate of about 6e-7 per coordinate). Sample covariance: |C_hat - C|_F <= 5 sqrt(E|C_hat - C|_F^2),
    with E|C_hat - C|_F^2 = sum_ij Var((x_i - m_i)(x_j - m_j)) / n estimated from the samples' own 4th moments."""
    g = gmm_diag4()
    n = 40_000
    x = g.sample(n, seed=11, dtype=torch.float64)
    m, cov = g.mean(), g.covariance()
    se = (cov.diagonal() / n).sqrt()
    assert ((x.mean(0) - m).abs() <= 5 * se).all()
    y = x - x.mean(0)
    prod = y[:, :, None] * y[:, None, :]
    rms = math.sqrt(float(prod.var(0).sum()) / n)
    assert float((torch.cov(x.T) - cov).norm()) <= 5 * rms
    # component labels follow the weights: binomial standard error sqrt(w (1 - w) / n)
    _, comp = g.sample(n, seed=11, return_components=True)
    freq = torch.bincount(comp, minlength=2).double() / n
    assert ((freq - g.weights).abs() <= 5 * (g.weights * (1 - g.weights) / n).sqrt()).all()


# ----------------------------------------------------------------------------- densities


def test_log_prob_integrates_to_one_1d():
    g = GaussianMixture([[-1.0], [1.5]], [0.4, 0.7], [0.3, 0.7])
    h = 0.01
    u = torch.arange(-12.0, 12.0 + h / 2, h, dtype=torch.float64)[:, None]
    # rectangle rule: its error for a Gaussian of std s is ~exp(-2 pi^2 s^2 / h^2), far below 1e-12 here
    assert abs(float(g.log_prob(u).exp().sum()) * h - 1) < 1e-12


def test_log_prob_integrates_to_one_2d_and_matches_scipy():
    from scipy import stats

    g = GaussianMixture([[-1.0, 0.5], [1.0, -0.5]], [[0.5, 0.9], [0.7, 0.4]], [0.4, 0.6])
    h = 0.04
    u = torch.arange(-8.0, 8.0 + h / 2, h, dtype=torch.float64)
    xx, yy = torch.meshgrid(u, u, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1)
    total = float(g.log_prob(pts).exp().sum()) * h * h  # rectangle rule: spectrally accurate for Gaussians
    assert abs(total - 1) < 1e-8
    x = g.sample(50, seed=1, dtype=torch.float64)
    ref = sum(
        w * stats.multivariate_normal(mu, np.diag(s**2)).pdf(x.numpy())
        for w, mu, s in zip(g.weights.numpy(), g.means.numpy(), g.stds.numpy())
    )
    assert np.allclose(g.log_prob(x).numpy(), np.log(ref), rtol=0, atol=1e-10)


def test_log_prob_noised_is_the_noised_mixture_and_keeps_dtype():
    g = gmm2d()
    x = g.sample(20, seed=2)
    a, s = 0.6, 0.8
    noised = GaussianMixture(a * g.means, (a**2 * g.stds**2 + s**2).sqrt(), g.weights)
    lp = g.log_prob_noised(x, a, s)
    assert lp.dtype == torch.float32 and lp.shape == (20,)
    assert torch.allclose(g.log_prob_noised(x.double(), a, s), noised.log_prob(x.double()), atol=1e-12)
    # per-sample alpha, sigma
    at = torch.linspace(0.1, 1.0, 20, dtype=torch.float64)
    st = (1 - at**2).sqrt()
    per = g.log_prob_noised(x.double(), at, st)
    for i in (0, 7, 19):
        assert torch.allclose(per[i], g.log_prob_noised(x[i : i + 1].double(), float(at[i]), float(st[i]))[0])


@pytest.mark.parametrize("alpha, sigma", [(1.0, 0.1), (0.7, 0.7), (0.05, 1.0), (1.0, 30.0)])
def test_score_is_gradient_of_log_prob_noised(alpha, sigma):
    g = gmm_diag4()
    x = (
        alpha * g.sample(32, seed=5, dtype=torch.float64)
        + sigma * torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ).requires_grad_(True)
    (grad,) = torch.autograd.grad(g.log_prob_noised(x, alpha, sigma).sum(), x)
    assert torch.allclose(g.score_noised(x.detach(), alpha, sigma), grad, rtol=1e-10, atol=1e-10)


def test_score_with_per_sample_coefficients_matches_autograd():
    g = gmm2d()
    n = 16
    a = torch.linspace(0.05, 0.99, n, dtype=torch.float64)
    s = (1 - a**2).sqrt()
    x = torch.randn(n, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    (grad,) = torch.autograd.grad(g.log_prob_noised(x, a, s).sum(), x)
    assert torch.allclose(g.score_noised(x.detach(), a, s), grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("alpha, sigma", [(1.0, 0.05), (0.8, 0.6), (0.01, 1.0), (1.0, 20.0)])
def test_posterior_mean_is_tweedie(alpha, sigma):
    g = gmm_diag4()
    x = torch.randn(64, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    tweedie = (x + sigma**2 * g.score_noised(x, alpha, sigma)) / alpha
    assert torch.allclose(g.posterior_mean(x, alpha, sigma), tweedie, rtol=1e-9, atol=1e-9)


def test_posterior_mean_at_zero_snr_is_the_mixture_mean():
    g = gmm2d()
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 5
    pm = g.posterior_mean(x, 0.0, 1.0)
    assert torch.isfinite(pm).all()
    assert torch.allclose(pm, g.mean().expand(8, 2), atol=1e-14)


def test_bad_density_inputs_raise():
    g = gmm2d()
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="x must have shape"):
        g.log_prob(torch.zeros(4, 3))
    with pytest.raises(ValueError, match="x must have shape"):
        g.log_prob(torch.zeros(2))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        g.log_prob([[0.0, 0.0]])
    with pytest.raises(ValueError, match="alpha"):
        g.score_noised(x, torch.ones(3), 0.5)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        g.score_noised(x, 1.0, -0.5)
    with pytest.raises(ValueError, match="both be 0"):
        g.log_prob_noised(x, 0.0, 0.0)
    with pytest.raises(ValueError, match="finite"):
        g.posterior_mean(x, float("nan"), 0.5)
    with pytest.raises(ValueError, match="prediction must be one of"):
        g.predict(x, 1.0, 0.5, "noise")


# ----------------------------------------------------------------------------- the ideal network

SCHEDULES = {
    "vp_discrete": lambda: Schedule.vp_discrete(),
    "vp_discrete_zsnr": lambda: Schedule.vp_discrete(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_zero_terminal_snr=True
    ),
    "vp_linear": lambda: Schedule.vp_linear(),
    "vp_cosine": lambda: Schedule.vp_cosine(),
    "sub_vp": lambda: Schedule.sub_vp(),
    "ve": lambda: Schedule.ve(),
    "edm": lambda: Schedule.edm(),
    "flow": lambda: Schedule.flow(),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_as_model_predictions_are_mutually_consistent(name):
    schedule = SCHEDULES[name]()
    g = gmm_diag4()
    grid = schedule.grid(6)
    mt = torch.tensor(grid.model_time, dtype=torch.float64)  # includes the clean end where there is one
    b = len(mt)
    alpha = torch.tensor(grid.alpha, dtype=torch.float64)
    sigma = torch.tensor(grid.sigma, dtype=torch.float64)
    x0 = g.sample(b, seed=4, dtype=torch.float64)
    z = torch.randn(b, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x = (alpha[:, None] * x0 + sigma[:, None] * z).reshape(b, 2, 2)  # [B, *shape] input
    models = {p: g.as_model(schedule, p) for p in PREDICTIONS}
    out = {p: m(x, mt) for p, m in models.items()}
    for p, o in out.items():
        assert o.shape == x.shape and o.dtype == x.dtype and torch.isfinite(o).all(), p
        assert models[p].nfe == 1
    a, s = alpha[:, None, None], sigma[:, None, None]
    eps, xh, v, score, flow = (out[p] for p in ("eps", "x0", "v", "score", "flow"))
    assert torch.allclose(a * xh + s * eps, x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(v, a * eps - s * xh, rtol=1e-12, atol=1e-12)
    assert torch.allclose(eps, -s * score, rtol=1e-12, atol=1e-12)
    assert torch.allclose(flow, eps - xh, rtol=1e-12, atol=1e-12)
    # against the density methods, at the schedule's own alpha and sigma
    flat = x.reshape(b, 4)
    assert torch.allclose(score.reshape(b, 4), g.score_noised(flat, alpha, sigma), rtol=1e-12, atol=1e-12)
    assert torch.allclose(xh.reshape(b, 4), g.posterior_mean(flat, alpha, sigma), rtol=1e-12, atol=1e-12)


def test_as_model_float32_io_counts_calls_and_accepts_kwargs():
    schedule = Schedule.vp_linear()
    g = gmm2d()
    model = g.as_model(schedule, "v")
    x = torch.randn(5, 2)
    t = torch.full((5,), 0.5)
    y = model(x, t, class_labels=torch.zeros(5))
    assert y.dtype == torch.float32 and y.shape == (5, 2)
    a, s = float(schedule.alpha(0.5)), float(schedule.sigma(0.5))
    ref = g.predict(x.double(), a, s, "v").float()
    assert torch.allclose(y, ref)
    assert torch.allclose(model(x, torch.tensor(0.5)), y)  # a scalar t broadcasts
    assert model.nfe == 2
    model.reset_nfe()
    assert model.nfe == 0


def test_zero_terminal_snr_v_prediction_is_finite_at_the_last_timestep():
    schedule = Schedule.vp_discrete(rescale_zero_terminal_snr=True)
    last = schedule.num_train_timesteps - 1
    assert float(schedule.alpha(float(last))) == 0.0
    g = gmm2d()
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((6,), float(last))
    v = g.as_model(schedule, "v")(x, t)
    eps = g.as_model(schedule, "eps")(x, t)
    x0 = g.as_model(schedule, "x0")(x, t)
    assert torch.isfinite(v).all() and torch.isfinite(eps).all() and torch.isfinite(x0).all()
    # alpha = 0, sigma = 1: x0_hat is the mixture mean, eps = x, v = -x0_hat
    assert torch.allclose(x0, g.mean().float().expand(6, 2), atol=1e-6)
    assert torch.allclose(eps, x, atol=1e-6)
    assert torch.allclose(v, -x0, atol=1e-6)


def test_clean_end_sigma_zero_is_finite():
    g = gmm2d()
    x = torch.randn(4, 2, dtype=torch.float64)
    for schedule, mt in ((Schedule.vp_discrete(), -1.0), (Schedule.edm(), 0.0), (Schedule.flow(), 0.0)):
        t = torch.full((4,), mt)
        assert torch.allclose(g.as_model(schedule, "x0")(x, t), x, atol=1e-12)  # x0_hat = x at sigma = 0
        assert torch.equal(g.as_model(schedule, "eps")(x, t), torch.zeros_like(x))


def test_flow_model_time_is_scaled():
    schedule = Schedule.flow()  # the network is fed t * 1000
    g = gmm2d()
    x = torch.randn(3, 2, dtype=torch.float64)
    out = g.as_model(schedule, "flow")(x, torch.full((3,), 250.0))
    assert torch.allclose(out, g.predict(x, 0.75, 0.25, "flow"), atol=1e-13)


def test_as_model_bad_inputs_raise():
    g = gmm2d()
    schedule = Schedule.vp_linear()
    with pytest.raises(ValueError, match=r"prediction must be one of \('eps', 'x0', 'v', 'score', 'flow'\)"):
        g.as_model(schedule, "velocity")
    with pytest.raises(TypeError, match="schedule"):
        g.as_model(object(), "eps")
    model = g.as_model(schedule)
    with pytest.raises(ValueError, match=r"t must be a scalar or have shape \[B\]"):
        model(torch.zeros(4, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="finite"):
        model(torch.zeros(4, 2), torch.full((4,), float("nan")))


# ----------------------------------------------------------------------------- metrics


def test_sliced_wasserstein_same_vs_shifted():
    g = gmm2d()
    a, b = g.sample(3000, seed=0), g.sample(3000, seed=1)
    same = sliced_wasserstein(a, b, n_projections=128)
    assert same < 0.15
    shift = torch.tensor([1.0, 0.5])
    shifted = sliced_wasserstein(a, b + shift, n_projections=128)
    # a shift c moves every projection by theta.c: SW2 -> sqrt(E (theta.c)^2) = |c| / sqrt(D)
    assert abs(shifted - float(shift.norm()) / math.sqrt(2)) < 0.1
    assert shifted > 4 * same
    # 1-D: exactly the shift (directions are +-1)
    g1 = GaussianMixture([[0.0], [3.0]], [1.0, 0.5], [0.5, 0.5])
    x = g1.sample(1000, seed=0)
    assert abs(sliced_wasserstein(x, x + 2.0, n_projections=4) - 2.0) < 1e-5
    assert sliced_wasserstein(a, a, n_projections=8) == 0.0
    assert sliced_wasserstein(a, b, 8, seed=3) == sliced_wasserstein(a, b, 8, seed=3)


def test_sliced_wasserstein_unequal_sizes_is_exact():
    g = gmm2d()
    a, b = g.sample(30, seed=0, dtype=torch.float64), g.sample(45, seed=1, dtype=torch.float64)
    # the empirical measure of a set repeated k times is the same measure
    assert sliced_wasserstein(a, torch.cat([a, a, a]), n_projections=16) < 1e-12
    # replicate each set to the common size 90: equal sizes then reduce to sorting
    ref = sliced_wasserstein(a.repeat(3, 1), b.repeat(2, 1), n_projections=16)
    assert abs(sliced_wasserstein(a, b, n_projections=16) - ref) < 1e-12
    # [n] and [n, *shape] inputs
    assert sliced_wasserstein(a[:, 0], b[:, 0], n_projections=2) >= 0
    with pytest.raises(ValueError, match="same dimension"):
        sliced_wasserstein(a, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="n_projections"):
        sliced_wasserstein(a, b, n_projections=0)
    with pytest.raises(ValueError, match="NaN"):
        sliced_wasserstein(a, torch.full((3, 2), float("nan")))


def test_moment_errors():
    g = gmm2d()
    x = g.sample(20_000, seed=0)
    e = moment_errors(x, g)
    # sampling error: |m_hat - m| ~ sqrt(trace(C) / n) = 0.015 relative; weights ~ sqrt(w(1-w)/n) = 0.0035
    assert e["mean_error_rel"] < 5 / math.sqrt(20_000)
    assert e["cov_error"] < 0.05
    assert e["weight_error_soft"] < 0.02 and e["weight_error"] < 0.02  # well separated: hard ~ soft
    shifted = moment_errors(x + torch.tensor([0.3, 0.4]), g)
    assert abs(shifted["mean_error"] - 0.5) < 0.05
    with pytest.raises(ValueError, match="dimension"):
        moment_errors(torch.zeros(10, 3), g)


def test_gmm_statistical_check_passes_exact_samples_and_catches_errors():
    g = gmm2d()
    n = 2000
    x = g.sample(n, seed=21, dtype=torch.float64)
    check = gmm_statistical_check(x, g)
    assert isinstance(check, GMMCheck) and check, check
    assert set(check.as_dict()) == {"mean", "covariance", "weights", "sliced_ks", "sliced_w2"}
    sd = g.covariance().diagonal().sqrt()
    # a shift of 0.15 marginal standard deviations is ~6.7 standard errors at n = 2000
    shifted = gmm_statistical_check(x + 0.15 * sd, g)
    assert not shifted.mean and not shifted and "FAIL" in repr(shifted)
    assert gmm_statistical_check(x + 0.15 * sd, g, bias_tol=0.2).mean
    # 10% too wide about the mean
    m = g.mean()
    assert not gmm_statistical_check(m + 1.1 * (x - m), g).covariance
    # wrong component weights: drop half of component 0
    _, comp = g.sample(n, seed=21, return_components=True)
    keep = (comp != 0) | (torch.arange(n) % 2 == 0)
    assert not gmm_statistical_check(x[keep], g).weights
    # a mode collapse at the component means is caught by the KS and W2 checks
    collapsed = g.means[comp]
    c = gmm_statistical_check(collapsed, g)
    assert not c.sliced_ks and not c.sliced_w2
    with pytest.raises(ValueError, match="false_alarm"):
        gmm_statistical_check(x, g, false_alarm=0.0)
    with pytest.raises(ValueError, match="bias_tol"):
        gmm_statistical_check(x, g, bias_tol=-1.0)
    with pytest.raises(ValueError, match="dimension"):
        gmm_statistical_check(torch.zeros(10, 3), g)
