"""fastdiff.Schedule against closed forms computed here with numpy, and against diffusers.

Every expected value is computed in this file from the formulas (docs/architecture.md, "The math") or taken from
a peer library; nothing is read back from the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from peers import U32

from fastdiff import Schedule

# ----------------------------------------------------------------------------------------------------
# Independent closed forms. Each returns, for an array t, the quantities the schedule must reproduce.


def _vp_from_B(t, B, beta, sub=False):
    abar = np.exp(-B)
    one_minus = -np.expm1(-B)  # 1 - abar without cancellation
    alpha = np.sqrt(abar)
    sigma = one_minus if sub else np.sqrt(one_minus)
    return dict(
        alpha=alpha,
        sigma=sigma,
        log_snr=np.log(abar) - 2 * np.log(sigma),
        edm_sigma=sigma / alpha,
        drift_coef=-beta / 2,
        # VP: g^2 = beta; sub-VP: g^2 = beta (1 - exp(-2 int beta)) (score-SDE, eq. 29)
        g2=beta * -np.expm1(-2 * B) if sub else beta,
        model_time=t,
    )


def ref_vp_linear(t, beta_min=0.1, beta_max=20.0, sub=False):
    B = beta_min * t + (beta_max - beta_min) * t**2 / 2
    return _vp_from_B(t, B, beta_min + (beta_max - beta_min) * t, sub=sub)


def ref_vp_cosine(t, s=0.008):
    phi = lambda u: (u + s) / (1 + s) * math.pi / 2  # noqa: E731
    # abar = cos^2(phi(t)) / cos^2(phi(0)), so int beta = -log abar and beta = pi/(1+s) tan(phi(t)).
    B = -2 * (np.log(np.cos(phi(t))) - math.log(math.cos(phi(0.0))))
    return _vp_from_B(t, B, math.pi / (1 + s) * np.tan(phi(t)))


def ref_ve(t, sigma_min=0.01, sigma_max=50.0):
    sigma = sigma_min * (sigma_max / sigma_min) ** t
    return dict(
        alpha=np.ones_like(t),
        sigma=sigma,
        log_snr=-2 * np.log(sigma),
        edm_sigma=sigma,
        drift_coef=np.zeros_like(t),
        g2=2 * sigma**2 * math.log(sigma_max / sigma_min),
        model_time=t,
    )


def ref_edm(t):
    return dict(
        alpha=np.ones_like(t),
        sigma=t,
        log_snr=-2 * np.log(t),
        edm_sigma=t,
        drift_coef=np.zeros_like(t),
        g2=2 * t,
        model_time=t,
    )


def ref_flow(t, time_scale=1000.0):
    # alpha = 1 - t, sigma = t: f = d log alpha/dt = -1/(1-t); g^2 = 2t + 2t^2/(1-t) = 2t/(1-t).
    return dict(
        alpha=1 - t,
        sigma=t,
        log_snr=2 * (np.log1p(-t) - np.log(t)),
        edm_sigma=t / (1 - t),
        drift_coef=-1 / (1 - t),
        g2=2 * t / (1 - t),
        model_time=time_scale * t,
    )


# (id, constructor, reference, t_lo, t_hi): t_lo/t_hi are the expected range [t_min, t_max].
CASES = [
    ("vp_linear", lambda: Schedule.vp_linear(), ref_vp_linear, 1e-3, 1.0),
    (
        "vp_linear_custom",
        lambda: Schedule.vp_linear(0.05, 12.0, 1e-4),
        lambda t: ref_vp_linear(t, 0.05, 12.0),
        1e-4,
        1.0,
    ),
    ("vp_cosine", lambda: Schedule.vp_cosine(), ref_vp_cosine, 1e-3, 1.0),
    (
        "vp_cosine_custom",
        lambda: Schedule.vp_cosine(s=0.02, t_eps=1e-4, t_max=0.9946),
        lambda t: ref_vp_cosine(t, 0.02),
        1e-4,
        0.9946,
    ),
    ("sub_vp", lambda: Schedule.sub_vp(), lambda t: ref_vp_linear(t, sub=True), 1e-3, 1.0),
    (
        "sub_vp_custom",
        lambda: Schedule.sub_vp(0.2, 15.0, 1e-2),
        lambda t: ref_vp_linear(t, 0.2, 15.0, sub=True),
        1e-2,
        1.0,
    ),
    ("ve", lambda: Schedule.ve(), ref_ve, 0.0, 1.0),
    ("ve_custom", lambda: Schedule.ve(0.002, 80.0), lambda t: ref_ve(t, 0.002, 80.0), 0.0, 1.0),
    ("edm", lambda: Schedule.edm(), ref_edm, 0.002, 80.0),
    ("edm_custom", lambda: Schedule.edm(0.01, 20.0, 1.0), ref_edm, 0.01, 20.0),
    ("flow", lambda: Schedule.flow(), ref_flow, 1e-3, 1.0),
    ("flow_custom", lambda: Schedule.flow(1e-4, 0.98, 1.0), lambda t: ref_flow(t, 1.0), 1e-4, 0.98),
]
CASE_IDS = [c[0] for c in CASES]
QUANTITIES = ["alpha", "sigma", "log_snr", "edm_sigma", "drift_coef", "g2", "model_time"]


def _interior_t(lo, hi, n=41):
    """Points spanning [lo, hi], kept off singular ends (alpha -> 0 at t = 1 for cosine and flow)."""
    hi_eval = min(hi, 0.999) if hi <= 1.0 else hi
    return np.unique(np.concatenate([np.linspace(lo, hi_eval, n), np.geomspace(max(lo, 1e-4), hi_eval, n)]))


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_time_range(case):
    _, make, _, lo, hi = case
    sch = make()
    assert sch.t_min == pytest.approx(lo, rel=0, abs=0)
    assert sch.t_max == pytest.approx(hi, rel=0, abs=0)


@pytest.mark.parametrize("quantity", QUANTITIES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_closed_form(case, quantity):
    _, make, ref, lo, hi = case
    sch = make()
    t = _interior_t(lo, hi)
    got = getattr(sch, quantity)(t)
    want = ref(t)[quantity]
    assert got.dtype == np.float64 and got.shape == t.shape
    # log_snr crosses zero: an absolute floor there; everything else to float64 rounding of the formula.
    np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-11 if quantity == "log_snr" else 0)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_scalar_and_array_inputs_agree(case):
    _, make, ref, lo, hi = case
    sch = make()
    t = 0.5 * (lo + min(hi, 0.999 if hi <= 1 else hi))
    a = sch.alpha(t)
    assert np.ndim(a) == 0 and float(a) == pytest.approx(float(ref(np.array([t]))["alpha"][0]), rel=1e-12)
    t2 = np.full((2, 3), t)
    assert sch.sigma(t2).shape == (2, 3)


def _central_diff(f, t, h):
    return (f(t + h) - f(t - h)) / (2 * h)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sde_coefficients_by_finite_differences(case):
    """drift_coef = d log alpha/dt and g2 = d sigma^2/dt - 2 (d log alpha/dt) sigma^2, the SDE whose
    marginals are x_t = alpha x0 + sigma eps, checked by central differences of alpha(t), sigma(t)."""
    _, make, _, lo, hi = case
    sch = make()
    hi_eval = min(hi, 0.99) if hi <= 1.0 else hi
    t = np.linspace(lo + 0.02 * (hi_eval - lo), hi_eval - 0.02 * (hi_eval - lo), 25)
    h = 1e-5 * (hi_eval - lo)
    dlog_alpha = _central_diff(lambda u: np.log(sch.alpha(u)), t, h)
    dsigma2 = _central_diff(lambda u: sch.sigma(u) ** 2, t, h)
    sigma2 = sch.sigma(t) ** 2
    np.testing.assert_allclose(sch.drift_coef(t), dlog_alpha, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(sch.g2(t), dsigma2 - 2 * dlog_alpha * sigma2, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_inverse_maps_round_trip(case):
    """t_from_log_snr / t_from_edm_sigma invert the closed forms (computed here) over [t_min, t_max]."""
    _, make, ref, lo, hi = case
    sch = make()
    if hi == 1.0 and case[0].startswith(("vp_cosine", "flow")):
        hi = 0.999  # log-SNR is -inf at t = 1 for cosine and flow; t_max itself is tested separately
    t = np.linspace(lo, hi, 33)
    r = ref(t)
    np.testing.assert_allclose(sch.t_from_log_snr(r["log_snr"]), t, rtol=1e-9, atol=1e-12 * hi)
    np.testing.assert_allclose(sch.t_from_edm_sigma(r["edm_sigma"]), t, rtol=1e-9, atol=1e-12 * hi)


def test_vp_linear_inverse_matches_quadratic_formula():
    """For linear beta, lambda -> t has a closed form: B(t) = log(1 + e^-lambda) is quadratic in t."""
    bmin, bmax = 0.1, 20.0
    lam = np.linspace(-10.0, 9.0, 23)  # inside [log_snr(1), log_snr(1e-3)] = [-10.05, 9.1]
    B = np.log1p(np.exp(-lam))
    a, b = (bmax - bmin) / 2, bmin
    t_exact = (-b + np.sqrt(b * b + 4 * a * B)) / (2 * a)
    np.testing.assert_allclose(Schedule.vp_linear(bmin, bmax).t_from_log_snr(lam), t_exact, rtol=1e-10)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: Schedule.vp_linear(), "log_snr"),
        (lambda: Schedule.edm(), "sigma"),
        (lambda: Schedule.vp_discrete(), "sigma"),
    ],
)
def test_inverse_out_of_range_raises(make, name):
    """A log-SNR or sigma the schedule never reaches must raise, not be silently clamped to an end."""
    sch = make()
    fn = sch.t_from_log_snr if name == "log_snr" else sch.t_from_edm_sigma
    lo_t, hi_t = sch.t_min, sch.t_max
    ends = sch.log_snr(np.array([lo_t, hi_t])) if name == "log_snr" else sch.edm_sigma(np.array([lo_t, hi_t]))
    below = min(ends) * 0.5 if name == "sigma" else min(ends) - abs(min(ends)) * 0.5 - 1e-3
    for beyond in (max(ends) * 1.5 + 1, below):
        with pytest.raises(ValueError, match=name):
            fn(beyond)
    with pytest.raises(ValueError, match=name):
        fn(float("nan"))


def test_vp_cosine_reaches_zero_signal_at_t_max_one():
    """The cosine schedule's default t_max = 1 is allowed: abar(1) = 0 (up to cos(pi/2) in float64)."""
    sch = Schedule.vp_cosine()
    assert sch.t_max == 1.0
    assert sch.alpha(1.0) < 1e-15 and sch.sigma(1.0) == pytest.approx(1.0, abs=1e-15)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Schedule.vp_linear(),
        lambda: Schedule.ve(),
        lambda: Schedule.edm(),
        lambda: Schedule.flow(),
        lambda: Schedule.vp_discrete(),
    ],
)
def test_t_outside_range_raises(make):
    sch = make()
    below = (sch.clean_end if sch.clean_end is not None else min(0.0, sch.t_min)) - 0.5
    for bad in (below, sch.t_max + 0.5, float("nan")):
        with pytest.raises(ValueError, match="t must be in"):
            sch.alpha(bad)


def test_clean_ends():
    """Schedules with a clean end are defined there: alpha = 1 / sigma = 0 (VP discrete at t = -1,
    EDM at sigma = 0) and x = x0 for flow at t = 0."""
    d = Schedule.vp_discrete()
    assert (d.clean_end, d.alpha(-1.0), d.sigma(-1.0)) == (-1.0, 1.0, 0.0)
    e = Schedule.edm()
    assert (e.clean_end, e.alpha(0.0), e.sigma(0.0)) == (0.0, 1.0, 0.0)
    f = Schedule.flow()
    assert (f.clean_end, f.alpha(0.0), f.sigma(0.0), f.model_time(0.0)) == (0.0, 1.0, 0.0, 0.0)
    assert Schedule.vp_linear().clean_end is None and Schedule.ve().clean_end is None


@pytest.mark.parametrize(
    "make,prior",
    [
        (lambda: Schedule.vp_discrete(), 1.0),
        (lambda: Schedule.vp_linear(), 1.0),
        (lambda: Schedule.flow(), 1.0),
        (lambda: Schedule.ve(0.01, 50.0), 50.0),
        (lambda: Schedule.edm(0.002, 80.0), 80.0),
    ],
)
def test_prior_std(make, prior):
    assert make().prior_std == pytest.approx(prior, rel=1e-14)


# ----------------------------------------------------------------------------------------------------
# Discrete VP: an independent float64 numpy version of diffusers' beta schedules.


def ref_betas(n, beta_schedule, beta_start=1e-4, beta_end=0.02, rescale=False):
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n) ** 2
    elif beta_schedule == "squaredcos_cap_v2":  # diffusers' betas_for_alpha_bar, Nichol & Dhariwal
        f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = np.array([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)])
    else:
        raise AssertionError(beta_schedule)
    if rescale:  # Lin et al. 2023, "Common diffusion noise schedules and sample steps are flawed", Alg. 1
        q = np.sqrt(np.cumprod(1 - betas))
        q0, qT = q[0], q[-1]
        q = (q - qT) * q0 / (q0 - qT)
        abar = q**2
        betas = 1 - np.concatenate([abar[:1], abar[1:] / abar[:-1]])
    return betas


DISCRETE = [
    dict(beta_schedule="linear"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]
DISCRETE_IDS = [d["beta_schedule"] for d in DISCRETE]


@pytest.mark.parametrize("n", [1000, 500, 2])
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("kw", DISCRETE, ids=DISCRETE_IDS)
def test_vp_discrete_float64_betas(kw, rescale, n):
    """betas and alphas_cumprod are computed in float64: equal to a numpy float64 reference."""
    sch = Schedule.vp_discrete(num_train_timesteps=n, rescale_zero_terminal_snr=rescale, **kw)
    betas = ref_betas(n, rescale=rescale, **kw)
    # The rescale's q_i - q_T cancels near the end, so float64 rounding there is ~1e-15 absolute
    # (float32 would be ~1e-8).
    atol = 1e-13 if rescale else 1e-18
    np.testing.assert_allclose(sch.betas, betas, rtol=1e-12, atol=atol)
    np.testing.assert_allclose(sch.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12, atol=atol)
    assert sch.alphas_cumprod.dtype == np.float64 and sch.num_train_timesteps == n
    assert (sch.t_min, sch.t_max) == (0.0, n - 1.0)
    if rescale:
        assert sch.alphas_cumprod[-1] == 0.0


def _f32_abar_tolerance(abar_ref, abar_plain, rescale):
    """Bound on |diffusers' float32 alphas_cumprod - exact| (per entry), from a rounding-error model.

    Up to index i diffusers rounds three times per factor in float32 (the beta from linspace, 1 - beta,
    the running product), so the relative error is at most 3 (i + 1) u, u = 2^-24, plus u absolute for
    the final rounding. The zero-SNR rescale then forms v = (q_i - q_T) k with q = sqrt(abar),
    k = q_0 / (q_0 - q_T): the subtraction turns the relative error of q_i and q_T into an absolute
    error of order k q_i 3 (i + 1) u on v, and 2 v times that on abar = v^2; the following float32
    cumprod of the new betas adds another 3 (i + 1) u abar.
    """
    i1 = np.arange(1, len(abar_ref) + 1)
    if not rescale:
        return 3 * i1 * U32 * abar_ref + U32
    q = np.sqrt(abar_plain)
    k = q[0] / (q[0] - q[-1])
    return 3 * i1 * U32 * (abar_ref + 4 * k * q * np.sqrt(abar_ref)) + U32


@pytest.mark.parametrize("which", ["ddim", "ddpm", "euler"])
@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
@pytest.mark.parametrize("kw", DISCRETE, ids=DISCRETE_IDS)
def test_alphas_cumprod_match_diffusers(diffusers_schedulers, which, kw, rescale):
    """Agreement with diffusers to float32 precision (diffusers builds betas and their cumprod in float32;
    see _f32_abar_tolerance for the per-entry bound; observed errors are 5-40x below it)."""
    theirs = diffusers_schedulers[which](rescale_betas_zero_snr=rescale, **kw).alphas_cumprod.double().numpy()
    ours = Schedule.vp_discrete(rescale_zero_terminal_snr=rescale, **kw).alphas_cumprod
    tol = _f32_abar_tolerance(
        np.cumprod(1 - ref_betas(1000, rescale=rescale, **kw)), np.cumprod(1 - ref_betas(1000, **kw)), rescale
    )
    if which == "euler" and rescale:
        # diffusers' Euler overwrites the terminal abar = 0 with 2^-24 so that its first sigma is finite;
        # fastdiff keeps the exact zero (its grids never evaluate sigma/alpha at the zero-SNR end).
        assert theirs[-1] == 2.0**-24 and ours[-1] == 0.0
        ours, theirs, tol = ours[:-1], theirs[:-1], tol[:-1]
    err = np.abs(ours - theirs)
    assert np.all(err <= tol), f"max err/tol = {np.max(err / tol):.3g} at index {np.argmax(err / tol)}"
    # and plainly: within a few float32 ulps at 1 everywhere
    assert np.max(err) < 2e-6


@pytest.mark.parametrize("kw", DISCRETE, ids=DISCRETE_IDS)
def test_vp_discrete_functions_of_t(kw):
    """alpha, sigma, log_snr, drift, g2 and model_time at integer and fractional timesteps.

    At integer t: alpha = sqrt(abar_t), sigma = sqrt(1 - abar_t). Between table entries sigma/alpha is
    interpolated linearly in t (as diffusers' Euler schedulers do, np.interp of their sigmas), down to 0
    at the clean end t = -1; drift and g2 come from beta(t) interpolated linearly (the VP SDE whose
    unit-step discretisation is the DDPM chain)."""
    betas = ref_betas(1000, **kw)
    abar = np.cumprod(1 - betas)
    sch = Schedule.vp_discrete(**kw)
    ti = np.arange(1000.0)
    np.testing.assert_allclose(sch.alpha(ti), np.sqrt(abar), rtol=1e-12)
    np.testing.assert_allclose(sch.sigma(ti), np.sqrt(1 - abar), rtol=1e-12)
    np.testing.assert_allclose(sch.log_snr(ti), np.log(abar / (1 - abar)), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(sch.model_time(ti), ti, rtol=0, atol=0)
    np.testing.assert_allclose(sch.drift_coef(ti), -betas / 2, rtol=1e-12)
    np.testing.assert_allclose(sch.g2(ti), betas, rtol=1e-12)

    tf = np.concatenate([np.linspace(-1, 0, 9), np.random.default_rng(0).uniform(0, 999, 200)])
    ksig = np.interp(tf, np.arange(-1.0, 1000.0), np.concatenate([[0.0], np.sqrt((1 - abar) / abar)]))
    np.testing.assert_allclose(sch.edm_sigma(tf), ksig, rtol=1e-12)
    np.testing.assert_allclose(sch.alpha(tf), 1 / np.sqrt(1 + ksig**2), rtol=1e-12)
    np.testing.assert_allclose(sch.sigma(tf), ksig / np.sqrt(1 + ksig**2), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(sch.model_time(tf), tf, rtol=0, atol=0)
    tp = tf[tf >= 0]
    np.testing.assert_allclose(sch.g2(tp), np.interp(tp, ti, betas), rtol=1e-12)
    # inverse maps, against the independently computed sigma/alpha
    np.testing.assert_allclose(sch.t_from_edm_sigma(ksig[tf >= 0]), tp, rtol=1e-9, atol=1e-9)
    lam = np.log(abar / (1 - abar))
    np.testing.assert_allclose(sch.t_from_log_snr(lam[::37]), ti[::37], rtol=1e-9, atol=1e-9)


def test_vp_discrete_zero_snr_end():
    sch = Schedule.vp_discrete(rescale_zero_terminal_snr=True)
    assert sch.alpha(999.0) == 0.0 and sch.sigma(999.0) == 1.0
    assert sch.log_snr(999.0) == -np.inf
    assert sch.alpha(998.0) > 0


# ----------------------------------------------------------------------------------------------------
# from_diffusers / from_betas


DIFFUSERS_CONFIGS = [
    dict(),
    dict(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True),
    dict(num_train_timesteps=300, beta_start=2e-4, beta_end=0.03, rescale_betas_zero_snr=True),
]


def _expected_from_config(cfg):
    n = cfg.get("num_train_timesteps", 1000)
    kw = {k: cfg[k] for k in ("beta_schedule", "beta_start", "beta_end") if k in cfg}
    kw.setdefault("beta_schedule", "linear")
    return ref_betas(n, rescale=cfg.get("rescale_betas_zero_snr", False), **kw)


def _check_against_peer(sch, betas_ref, peer_abar, rescale):
    np.testing.assert_allclose(sch.betas, betas_ref, rtol=1e-12)
    n = len(betas_ref)
    ours, theirs = sch.alphas_cumprod, peer_abar
    assert len(ours) == n
    if rescale and theirs[-1] == 2.0**-24:  # Euler's terminal-abar patch, see above
        ours, theirs = ours[:-1], theirs[:-1]
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6)


@pytest.mark.parametrize("which", ["ddim", "ddpm", "euler"])
@pytest.mark.parametrize("cfg", DIFFUSERS_CONFIGS, ids=["default", "sd_scaled_500", "cos_zero_snr", "linear_300_zsnr"])
def test_from_diffusers_scheduler_and_config(diffusers_schedulers, which, cfg):
    sched = diffusers_schedulers[which](**cfg)
    betas_ref = _expected_from_config(cfg)
    peer = sched.alphas_cumprod.double().numpy()
    rescale = cfg.get("rescale_betas_zero_snr", False)
    for source in (sched, sched.config, dict(sched.config), dict(cfg)):
        sch = Schedule.from_diffusers(source)
        assert sch.is_discrete
        _check_against_peer(sch, betas_ref, peer, rescale)


@pytest.mark.parametrize("rescale", [False, True], ids=["plain", "zero_snr"])
def test_from_diffusers_trained_betas(diffusers_schedulers, rescale):
    """trained_betas replace the named schedule; diffusers still applies rescale_betas_zero_snr to them."""
    n = 64
    trained = np.linspace(0.0003, 0.04, n) ** 1.3
    sched = diffusers_schedulers["ddim"](num_train_timesteps=n, trained_betas=trained, rescale_betas_zero_snr=rescale)
    expected = trained
    if rescale:
        q = np.sqrt(np.cumprod(1 - trained))
        q = (q - q[-1]) * q[0] / (q[0] - q[-1])
        expected = 1 - np.concatenate([q[:1] ** 2, q[1:] ** 2 / q[:-1] ** 2])
    sch = Schedule.from_diffusers(sched)
    _check_against_peer(sch, expected, sched.alphas_cumprod.double().numpy(), rescale)
    sch2 = Schedule.from_diffusers(dict(trained_betas=list(trained), rescale_betas_zero_snr=rescale))
    np.testing.assert_allclose(sch2.betas, expected, rtol=1e-12)


def test_from_diffusers_rejects_other_types():
    with pytest.raises(TypeError, match="scheduler_or_config"):
        Schedule.from_diffusers(42)


@pytest.mark.parametrize(
    "betas",
    [
        np.linspace(1e-4, 0.02, 1000),
        [0.5, 0.25, 1.0],
        np.geomspace(1e-5, 0.9, 17).astype(np.float32),
    ],
)
def test_from_betas(betas):
    b = np.asarray(betas, dtype=np.float64)
    sch = Schedule.from_betas(betas)
    np.testing.assert_array_equal(sch.betas, b)
    np.testing.assert_allclose(sch.alphas_cumprod, np.cumprod(1 - b), rtol=1e-13, atol=0)
    np.testing.assert_allclose(sch.alpha(np.arange(len(b), dtype=float)), np.sqrt(np.cumprod(1 - b)), rtol=1e-13)
    assert sch.num_train_timesteps == len(b) and sch.t_max == len(b) - 1


# ----------------------------------------------------------------------------------------------------
# Bad inputs: ValueError (TypeError for wrong types) naming the argument.

NAN = float("nan")
BAD_CONSTRUCTOR_ARGS = [
    # vp_discrete
    (Schedule.vp_discrete, dict(beta_schedule="cosine"), ValueError, "beta_schedule"),
    (Schedule.vp_discrete, dict(beta_schedule=None), ValueError, "beta_schedule"),
    (Schedule.vp_discrete, dict(beta_start=NAN), ValueError, "beta_start"),
    (Schedule.vp_discrete, dict(beta_start=-1e-4), ValueError, "beta_start"),
    (Schedule.vp_discrete, dict(beta_start=0.0), ValueError, "beta_start"),
    (Schedule.vp_discrete, dict(beta_schedule="scaled_linear", beta_start=-1e-4), ValueError, "beta_start"),
    (Schedule.vp_discrete, dict(beta_end=NAN), ValueError, "beta_end"),
    (Schedule.vp_discrete, dict(beta_start=0.02, beta_end=1e-4), ValueError, "beta_end"),
    (Schedule.vp_discrete, dict(beta_end=1.0), ValueError, "beta_end"),
    (Schedule.vp_discrete, dict(beta_end=float("inf")), ValueError, "beta_end"),
    (Schedule.vp_discrete, dict(num_train_timesteps=1), ValueError, "num_train_timesteps"),
    (Schedule.vp_discrete, dict(num_train_timesteps=0), ValueError, "num_train_timesteps"),
    (Schedule.vp_discrete, dict(num_train_timesteps=-5), ValueError, "num_train_timesteps"),
    (Schedule.vp_discrete, dict(num_train_timesteps=1000.0), TypeError, "num_train_timesteps"),
    (Schedule.vp_discrete, dict(num_train_timesteps="1000"), TypeError, "num_train_timesteps"),
    (Schedule.vp_discrete, dict(num_train_timesteps=True), TypeError, "num_train_timesteps"),
    (Schedule.vp_discrete, dict(beta_start="1e-4"), TypeError, "beta_start"),
    (Schedule.vp_discrete, dict(rescale_zero_terminal_snr="yes"), TypeError, "rescale_zero_terminal_snr"),
    # vp_linear and sub_vp
    *[
        (ctor, kw, ValueError, name)
        for ctor in (Schedule.vp_linear, Schedule.sub_vp)
        for kw, name in [
            (dict(beta_min=NAN), "beta_min"),
            (dict(beta_min=-0.1), "beta_min"),
            (dict(beta_min=float("inf")), "beta_min"),
            (dict(beta_max=NAN), "beta_max"),
            (dict(beta_max=0.1), "beta_max"),
            (dict(beta_min=5.0, beta_max=1.0), "beta_max"),
            (dict(beta_max=float("inf")), "beta_max"),
            (dict(t_eps=0.0), "t_eps"),
            (dict(t_eps=1.0), "t_eps"),
            (dict(t_eps=-1e-3), "t_eps"),
            (dict(t_eps=NAN), "t_eps"),
            (dict(t_eps=1.5), "t_eps"),
        ]
    ],
    (Schedule.vp_linear, dict(beta_min=None), TypeError, "beta_min"),
    (Schedule.sub_vp, dict(beta_max="20"), TypeError, "beta_max"),
    # vp_cosine
    (Schedule.vp_cosine, dict(s=0.0), ValueError, "^s must"),
    (Schedule.vp_cosine, dict(s=-0.008), ValueError, "^s must"),
    (Schedule.vp_cosine, dict(s=NAN), ValueError, "^s must"),
    (Schedule.vp_cosine, dict(t_eps=0.0), ValueError, "t_eps"),
    (Schedule.vp_cosine, dict(t_eps=NAN), ValueError, "t_eps"),
    (Schedule.vp_cosine, dict(t_eps=0.5, t_max=0.4), ValueError, "t_eps"),
    (Schedule.vp_cosine, dict(t_max=0.0), ValueError, "t_max"),
    (Schedule.vp_cosine, dict(t_max=1.5), ValueError, "t_max"),
    (Schedule.vp_cosine, dict(t_max=NAN), ValueError, "t_max"),
    (Schedule.vp_cosine, dict(s=[0.008]), TypeError, "^s must"),
    # ve and edm
    *[
        (ctor, kw, ValueError, name)
        for ctor in (Schedule.ve, Schedule.edm)
        for kw, name in [
            (dict(sigma_min=0.0), "sigma_min"),
            (dict(sigma_min=-1.0), "sigma_min"),
            (dict(sigma_min=NAN), "sigma_min"),
            (dict(sigma_max=NAN), "sigma_max"),
            (dict(sigma_min=1.0, sigma_max=1.0), "sigma_max"),
            (dict(sigma_min=2.0, sigma_max=1.0), "sigma_max"),
            (dict(sigma_max=float("inf")), "sigma_max"),
        ]
    ],
    (Schedule.edm, dict(sigma_data=0.0), ValueError, "sigma_data"),
    (Schedule.edm, dict(sigma_data=-0.5), ValueError, "sigma_data"),
    (Schedule.edm, dict(sigma_data=NAN), ValueError, "sigma_data"),
    (Schedule.ve, dict(sigma_min="0.01"), TypeError, "sigma_min"),
    # flow
    (Schedule.flow, dict(t_min=0.0), ValueError, "t_min"),
    (Schedule.flow, dict(t_min=-0.1), ValueError, "t_min"),
    (Schedule.flow, dict(t_min=NAN), ValueError, "t_min"),
    (Schedule.flow, dict(t_min=0.5, t_max=0.5), ValueError, "t_min"),
    (Schedule.flow, dict(t_max=0.0), ValueError, "t_max"),
    (Schedule.flow, dict(t_max=1.01), ValueError, "t_max"),
    (Schedule.flow, dict(t_max=NAN), ValueError, "t_max"),
    (Schedule.flow, dict(time_scale=0.0), ValueError, "time_scale"),
    (Schedule.flow, dict(time_scale=-1000.0), ValueError, "time_scale"),
    (Schedule.flow, dict(time_scale=NAN), ValueError, "time_scale"),
    (Schedule.flow, dict(time_scale=None), TypeError, "time_scale"),
]


@pytest.mark.parametrize(
    "ctor,kw,exc,name",
    BAD_CONSTRUCTOR_ARGS,
    ids=[f"{c.__name__}-{'-'.join(f'{k}={v!r}' for k, v in kw.items())}" for c, kw, _, _ in BAD_CONSTRUCTOR_ARGS],
)
def test_constructor_rejects_bad_argument(ctor, kw, exc, name):
    with pytest.raises(exc, match=name):
        ctor(**kw)


@pytest.mark.parametrize(
    "betas,exc,name",
    [
        ([0.1, 0.0, 0.2], ValueError, r"betas\[1\]"),
        ([0.1, -0.2], ValueError, r"betas\[1\]"),
        ([0.1, 1.5], ValueError, r"betas\[1\]"),
        ([], ValueError, "betas"),
        (np.zeros((0,)), ValueError, "betas"),
        ([0.1, NAN], ValueError, "betas"),
        ([0.1, float("inf")], ValueError, "betas"),
        ([[0.1, 0.2]], ValueError, "betas"),
        (["a", "b"], TypeError, "betas"),
    ],
)
def test_from_betas_rejects(betas, exc, name):
    with pytest.raises(exc, match=name):
        Schedule.from_betas(betas)


@pytest.mark.parametrize(
    "t,beta,name",
    [
        ([0.0, 0.5, 0.5, 1.0], [1.0, 2.0, 3.0, 4.0], "t must be strictly increasing"),
        ([0.0, 0.6, 0.5, 1.0], [1.0, 2.0, 3.0, 4.0], "t must be strictly increasing"),
        ([0.0, 0.5, 1.0], [1.0, 2.0], "t and beta"),
        ([0.0, 0.5, 1.0], [1.0, 2.0, 3.0, 4.0], "t and beta"),
        ([0.0], [1.0], "^t must"),
        ([-0.1, 0.5, 1.0], [1.0, 2.0, 3.0], "^t must"),
        ([0.1, 0.5, 1.0], [1.0, 2.0, 3.0], "^t must start at 0"),
        ([0.0, NAN, 1.0], [1.0, 2.0, 3.0], "^t must"),
        ([0.0, 0.5, 1.0], [1.0, -2.0, 3.0], "^beta must"),
        ([0.0, 0.5, 1.0], [1.0, NAN, 3.0], "^beta must"),
        ([], [], "^t must"),
    ],
)
def test_from_beta_function_rejects(t, beta, name):
    with pytest.raises(ValueError, match=name):
        Schedule.from_beta_function(t, beta)
