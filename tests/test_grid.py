"""Time grids (Schedule.grid) against diffusers' timesteps/sigmas, k-diffusion's Karras sigmas and the
spacing formulas computed here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from peers import U32

from fastdiff import Grid, Schedule

STEPS = [1, 7, 10, 50, 1000]
EXTRA_STEPS = [2, 3, 13, 333, 999]


@pytest.fixture(scope="module")
def vp_discrete():
    return Schedule.vp_discrete()


def _diffusers_timesteps(cls, steps, **cfg):
    sched = cls(**cfg)
    sched.set_timesteps(steps)
    return sched


# ----------------------------------------------------------------------------------------------------
# diffusers spacings


@pytest.mark.parametrize("steps", STEPS + EXTRA_STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_model_times_equal_ddim_timesteps(diffusers_schedulers, vp_discrete, spacing, steps):
    ddim = _diffusers_timesteps(diffusers_schedulers["ddim"], steps, timestep_spacing=spacing)
    g = vp_discrete.grid(steps, spacing)
    assert isinstance(g, Grid) and len(g) == steps + 1 and g.steps == steps
    np.testing.assert_array_equal(g.model_time[:-1], ddim.timesteps.numpy().astype(np.float64))
    np.testing.assert_array_equal(g.t[:-1], ddim.timesteps.numpy().astype(np.float64))


@pytest.mark.parametrize("steps", STEPS + EXTRA_STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_model_times_equal_euler_timesteps(diffusers_schedulers, vp_discrete, spacing, steps):
    euler = _diffusers_timesteps(diffusers_schedulers["euler"], steps, timestep_spacing=spacing)
    np.testing.assert_array_equal(
        vp_discrete.grid(steps, spacing).model_time[:-1], euler.timesteps.numpy().astype(np.float64)
    )


@pytest.mark.parametrize("steps", [1, 4, 7, 10, 50, 1000])
@pytest.mark.parametrize("which", ["ddim", "euler"])
def test_leading_steps_offset(diffusers_schedulers, which, steps):
    """steps_offset shifts 'leading' timesteps (Stable Diffusion's configs use steps_offset=1)."""
    sch = Schedule.vp_discrete()
    if steps == 1000:  # offset 1 would put the first timestep at 1000, past the table
        with pytest.raises(ValueError, match="steps_offset"):
            sch.grid(steps, "leading", steps_offset=1)
        return
    peer = _diffusers_timesteps(diffusers_schedulers[which], steps, timestep_spacing="leading", steps_offset=1)
    np.testing.assert_array_equal(
        sch.grid(steps, "leading", steps_offset=1).model_time[:-1], peer.timesteps.numpy().astype(np.float64)
    )


@pytest.mark.parametrize("n_train,steps", [(500, 7), (500, 500), (1200, 13), (64, 10), (2, 1), (2, 2)])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_other_train_lengths_match_ddim(diffusers_schedulers, spacing, n_train, steps):
    ddim = _diffusers_timesteps(
        diffusers_schedulers["ddim"], steps, timestep_spacing=spacing, num_train_timesteps=n_train
    )
    g = Schedule.vp_discrete(num_train_timesteps=n_train).grid(steps, spacing)
    np.testing.assert_array_equal(g.model_time[:-1], ddim.timesteps.numpy().astype(np.float64))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_grid_ends_clean(vp_discrete, spacing):
    """The terminal point is the clean end: t = -1, alpha = 1, sigma = 0 (diffusers' set_alpha_to_one,
    Euler's final sigma 0)."""
    for steps in (1, 10):
        g = vp_discrete.grid(steps, spacing)
        assert (g.t[-1], g.alpha[-1], g.sigma[-1], g.model_time[-1]) == (-1.0, 1.0, 0.0, -1.0)
        assert g.log_snr[-1] == np.inf


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_discrete_grid_alphas_match_ddim(diffusers_schedulers, vp_discrete, spacing, steps):
    """alpha^2 on the grid is DDIM's alphas_cumprod at its timesteps, then final_alpha_cumprod = 1."""
    ddim = _diffusers_timesteps(diffusers_schedulers["ddim"], steps, timestep_spacing=spacing)
    abar = ddim.alphas_cumprod.double().numpy()[ddim.timesteps.numpy()]
    abar = np.concatenate([abar, [float(ddim.final_alpha_cumprod)]])
    g = vp_discrete.grid(steps, spacing)
    np.testing.assert_allclose(g.alpha**2, abar, rtol=0, atol=2e-6)  # float32 peer, see test_schedule
    np.testing.assert_allclose(g.alpha**2 + g.sigma**2, 1.0, rtol=1e-14)


def _euler_sigma_rtol(abar, timesteps):
    """Relative error bound of diffusers' Euler sigmas = sqrt((1 - abar)/abar), formed in float32 from
    its float32 alphas_cumprod: an absolute error da <= 3 (i+1) u abar + u in abar (test_schedule's model)
    becomes a relative error da / (2 abar (1 - abar)) in sigma (large where abar ~ 1, as 1 - abar
    cancels), plus a few roundings of the float32 arithmetic."""
    da = 3 * (timesteps + 1) * U32 * abar + U32
    return da / (2 * abar * (1 - abar)) + 4 * U32


@pytest.mark.parametrize("steps", STEPS + EXTRA_STEPS)
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_discrete_grid_sigmas_match_euler(diffusers_schedulers, vp_discrete, spacing, steps):
    euler = _diffusers_timesteps(diffusers_schedulers["euler"], steps, timestep_spacing=spacing)
    theirs = euler.sigmas.double().numpy()
    g = vp_discrete.grid(steps, spacing)
    ours = g.sigma / g.alpha
    assert theirs[-1] == 0.0 and ours[-1] == 0.0
    ts = g.t[:-1].astype(int)
    rtol = _euler_sigma_rtol(vp_discrete.alphas_cumprod[ts], ts)
    assert np.all(np.abs(ours[:-1] - theirs[:-1]) <= rtol * theirs[:-1])


@pytest.mark.parametrize("steps", [7, 13, 50, 333])
def test_linspace_follows_ddim_not_euler(diffusers_schedulers, vp_discrete, steps):
    """For 'linspace' diffusers' DDIM rounds np.linspace(0, N-1, steps) to integers while Euler keeps
    the unrounded float32 values. fastdiff follows DDIM (integer timesteps, which diffusers' UNets
    expect); at Euler's own fractional timesteps the schedule's sigma/alpha, interpolated linearly in t
    like Euler's np.interp, equals Euler's sigmas."""
    euler = _diffusers_timesteps(diffusers_schedulers["euler"], steps, timestep_spacing="linspace")
    ts = euler.timesteps.numpy().astype(np.float64)
    g = vp_discrete.grid(steps, "linspace")
    assert not np.array_equal(g.model_time[:-1], ts)  # they do differ for these step counts ...
    np.testing.assert_allclose(g.model_time[:-1], ts, rtol=0, atol=0.5)  # ... by the rounding only
    theirs = euler.sigmas.double().numpy()[:-1]
    ours = vp_discrete.edm_sigma(ts)
    lo = np.floor(ts).astype(int)
    rtol = _euler_sigma_rtol(vp_discrete.alphas_cumprod[lo], lo + 1)
    assert np.all(np.abs(ours - theirs) <= rtol * theirs)


# ----------------------------------------------------------------------------------------------------
# Karras


def _karras_sigmas(s_min, s_max, n, rho):
    """Karras et al. (2022), eq. 5, in float64."""
    ramp = np.linspace(0, 1, n)
    return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


@pytest.mark.parametrize("rho", [1.0, 3.0, 7.0, 10.0])
@pytest.mark.parametrize("steps", [1, 2, 5, 10, 40])
@pytest.mark.parametrize("sigma_min,sigma_max", [(0.002, 80.0), (0.03, 14.6), (0.1, 1.0)])
def test_karras_matches_k_diffusion(kdiff_sampling, sigma_min, sigma_max, steps, rho):
    """grid(steps, 'karras').t on an EDM schedule is k-diffusion's get_sigmas_karras (with its final 0).

    k-diffusion forms the ramp b_i = b_max + r_i (b_min - b_max), b = sigma^(1/rho), in float32, so b_i
    carries an absolute error of a few u b_max (u = 2^-24), and sigma_i = b_i^rho a relative error of
    rho times that over b_i: we allow 4 u (rho b_max / b_i + 1). That is ~1e-6 except where b_i << b_max
    (rho = 1 near sigma_min). The float64 formula, evaluated here with numpy, must match to 1e-12."""
    theirs = kdiff_sampling.get_sigmas_karras(steps, sigma_min, sigma_max, rho=rho).double().numpy()
    g = Schedule.edm(sigma_min, sigma_max).grid(steps, "karras", rho=rho)
    assert len(g.t) == len(theirs) == steps + 1 and g.t[-1] == theirs[-1] == 0.0
    b = g.t[:-1] ** (1 / rho)
    rtol = 4 * U32 * (rho * sigma_max ** (1 / rho) / b + 1)
    assert np.all(np.abs(g.t[:-1] - theirs[:-1]) <= rtol * theirs[:-1])
    np.testing.assert_allclose(g.t[:-1], _karras_sigmas(sigma_min, sigma_max, steps, rho), rtol=1e-12)
    np.testing.assert_allclose(g.sigma, g.t, rtol=0, atol=0)  # EDM: t is sigma, alpha = 1
    assert np.all(g.alpha == 1.0) and np.all(g.model_time == g.t)


def test_karras_default_rho_is_7(kdiff_sampling):
    theirs = kdiff_sampling.get_sigmas_karras(18, 0.002, 80.0).double().numpy()
    np.testing.assert_allclose(Schedule.edm().grid(18).t, theirs, rtol=1e-5)
    np.testing.assert_allclose(Schedule.edm().grid(18).t[:-1], _karras_sigmas(0.002, 80.0, 18, 7.0), rtol=1e-12)


@pytest.mark.parametrize("rho", [3.0, 7.0])
@pytest.mark.parametrize("steps", [1, 4, 10, 25])
def test_karras_on_vp_linear(steps, rho):
    """On a VP schedule the Karras ramp is in sigma/alpha = sqrt(1/abar - 1), from t_max to t_min (no
    clean end: steps + 1 points), with abar from the closed form exp(-(bmin t + (bmax-bmin) t^2/2))."""
    bmin, bmax, t_eps = 0.1, 20.0, 1e-3
    k = lambda t: math.sqrt(math.expm1(bmin * t + (bmax - bmin) * t * t / 2))  # noqa: E731
    want = _karras_sigmas(k(t_eps), k(1.0), steps + 1, rho)
    g = Schedule.vp_linear(bmin, bmax, t_eps).grid(steps, "karras", rho=rho)
    np.testing.assert_allclose(g.sigma / g.alpha, want, rtol=1e-9)
    assert g.t[0] == 1.0 and g.t[-1] == t_eps


@pytest.mark.parametrize("steps", [5, 20])
def test_karras_on_vp_discrete_matches_k_diffusion(kdiff_sampling, steps):
    """k-diffusion's recipe for DDPM nets: Karras sigmas between the table's first and last sigma."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    s = np.sqrt((1 - abar) / abar)
    theirs = kdiff_sampling.get_sigmas_karras(steps, float(s[0]), float(s[-1])).double().numpy()
    g = Schedule.vp_discrete().grid(steps, "karras")
    np.testing.assert_allclose(g.sigma / g.alpha, theirs, rtol=32 * U32)
    assert g.t[0] == 999.0 and g.t[-1] == -1.0


# ----------------------------------------------------------------------------------------------------
# Continuous spacings on every family

SCHEDULES = {
    "vp_discrete": lambda: Schedule.vp_discrete(),
    "vp_discrete_scaled": lambda: Schedule.vp_discrete(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    ),
    "vp_linear": lambda: Schedule.vp_linear(),
    "vp_cosine": lambda: Schedule.vp_cosine(t_max=0.9946),
    "sub_vp": lambda: Schedule.sub_vp(),
    "ve": lambda: Schedule.ve(),
    "edm": lambda: Schedule.edm(),
    "flow": lambda: Schedule.flow(t_max=0.999),
    "tabulated": lambda: Schedule.from_beta_function(np.linspace(0, 1, 101), 0.1 + 19.9 * np.linspace(0, 1, 101)),
}
# Where grids end: t_min, then the clean end for the schedules that have one.
CLEAN_END = {"vp_discrete": -1.0, "vp_discrete_scaled": -1.0, "edm": 0.0, "flow": 0.0}
EXPECTED_RANGE = {  # (t_max, t_min) from each constructor's documented time axis
    "vp_discrete": (999.0, 0.0),
    "vp_discrete_scaled": (999.0, 0.0),
    "vp_linear": (1.0, 1e-3),
    "vp_cosine": (0.9946, 1e-3),
    "sub_vp": (1.0, 1e-3),
    "ve": (1.0, 0.0),
    "edm": (80.0, 0.002),
    "flow": (0.999, 1e-3),
    "tabulated": (1.0, 0.01),
}


@pytest.mark.parametrize("steps", [1, 2, 10, 37])
@pytest.mark.parametrize("spacing", ["uniform", "logsnr", "quadratic", "karras"])
@pytest.mark.parametrize("name", list(SCHEDULES))
def test_spacings_monotone_and_bounded(name, spacing, steps):
    sch = SCHEDULES[name]()
    g = sch.grid(steps, spacing)
    t_max, t_min = EXPECTED_RANGE[name]
    assert len(g.t) == steps + 1
    assert np.all(np.diff(g.t) < 0), g.t
    assert g.t[0] == t_max
    clean = CLEAN_END.get(name)
    if clean is None:
        assert g.t[-1] == t_min
    else:
        assert g.t[-1] == clean
        assert steps == 1 or g.t[-2] == pytest.approx(t_min, rel=1e-12, abs=1e-12)
    # sigma/alpha (the noise level) decreases along every grid
    assert np.all(np.diff(g.sigma / g.alpha) < 0)


@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("name", ["vp_linear", "sub_vp", "vp_cosine", "ve", "tabulated"])
def test_uniform_and_quadratic_formulas(name, steps):
    sch = SCHEDULES[name]()
    t_max, t_min = EXPECTED_RANGE[name]
    u = np.linspace(1.0, 0.0, steps + 1)
    np.testing.assert_allclose(sch.grid(steps, "uniform").t, t_min + (t_max - t_min) * u, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(sch.grid(steps, "quadratic").t, t_min + (t_max - t_min) * u**2, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("steps", [1, 5, 20])
@pytest.mark.parametrize("name", ["vp_linear", "sub_vp", "vp_cosine", "ve", "tabulated", "vp_discrete", "edm", "flow"])
def test_logsnr_is_uniform_in_log_snr(name, steps):
    """'logsnr' points are equally spaced in log-SNR between its values at t_max and t_min, computed
    here by the closed forms (for the tabulated schedule, whose log-SNR has no closed form, by the
    linear beta it was built from)."""
    sch = SCHEDULES[name]()
    t_max, t_min = EXPECTED_RANGE[name]
    g = sch.grid(steps, "logsnr")
    n = steps if name in CLEAN_END else steps + 1

    def lam(t):
        if name in ("vp_linear", "tabulated", "sub_vp"):
            B = 0.1 * t + 9.95 * t * t
            return -B - (2 if name == "sub_vp" else 1) * np.log(-np.expm1(-B))
        if name == "vp_cosine":
            f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
            a = f(t) / f(0.0)
            return np.log(a / (1 - a))
        if name == "ve":
            return -2 * np.log(0.01 * 5000.0**t)
        if name == "edm":
            return -2 * np.log(t)
        if name == "flow":
            return 2 * np.log((1 - t) / t)
        abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
        return np.log(abar[int(t)] / (1 - abar[int(t)]))

    want = np.linspace(lam(t_max), lam(t_min), n)
    np.testing.assert_allclose(g.log_snr[:n], want, rtol=1e-9, atol=1e-9)
    if n > 2:
        d = np.diff(g.log_snr[:n])
        np.testing.assert_allclose(d, d[0], rtol=1e-8)


def test_grid_arrays_follow_closed_form():
    """All five arrays of a grid, against vp_linear's closed form at the grid's t."""
    g = Schedule.vp_linear().grid(12, "uniform")
    B = 0.1 * g.t + 9.95 * g.t**2
    np.testing.assert_allclose(g.alpha, np.exp(-B / 2), rtol=1e-13)
    np.testing.assert_allclose(g.sigma, np.sqrt(-np.expm1(-B)), rtol=1e-13)
    np.testing.assert_allclose(g.log_snr, -B - np.log(-np.expm1(-B)), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(g.model_time, g.t)
    for arr in (g.t, g.alpha, g.sigma, g.log_snr, g.model_time):
        assert arr.dtype == np.float64 and arr.shape == (13,)


def test_flow_grid_model_time_is_scaled():
    g = Schedule.flow(time_scale=1000.0).grid(4, "uniform")
    np.testing.assert_allclose(g.model_time, 1000.0 * g.t, rtol=1e-15)
    assert g.t[-1] == 0.0 and g.alpha[-1] == 1.0 and g.sigma[-1] == 0.0


def test_default_spacings():
    np.testing.assert_array_equal(Schedule.vp_discrete().grid(10).t, Schedule.vp_discrete().grid(10, "leading").t)
    np.testing.assert_array_equal(Schedule.edm().grid(10).t, Schedule.edm().grid(10, "karras").t)
    np.testing.assert_array_equal(Schedule.vp_linear().grid(10).t, Schedule.vp_linear().grid(10, "uniform").t)


# ----------------------------------------------------------------------------------------------------
# Bad inputs


@pytest.mark.parametrize(
    "make,kw,exc,match",
    [
        (lambda: Schedule.vp_discrete(), dict(steps=0), ValueError, "steps"),
        (lambda: Schedule.vp_discrete(), dict(steps=-3), ValueError, "steps"),
        (lambda: Schedule.vp_linear(), dict(steps=0, spacing="uniform"), ValueError, "steps"),
        (lambda: Schedule.vp_discrete(), dict(steps=1001), ValueError, "steps must be <= num_train_timesteps"),
        (
            lambda: Schedule.vp_discrete(num_train_timesteps=50),
            dict(steps=51, spacing="trailing"),
            ValueError,
            "num_train_timesteps",
        ),
        (lambda: Schedule.vp_discrete(), dict(steps=10, spacing="cosine"), ValueError, "spacing"),
        (lambda: Schedule.vp_linear(), dict(steps=10, spacing="Leading"), ValueError, "spacing"),
        (lambda: Schedule.edm(), dict(steps=10, spacing="karras", rho=0.0), ValueError, "rho"),
        (lambda: Schedule.edm(), dict(steps=10, spacing="karras", rho=-7.0), ValueError, "rho"),
        (lambda: Schedule.edm(), dict(steps=10, spacing="karras", rho=float("nan")), ValueError, "rho"),
        (lambda: Schedule.vp_discrete(), dict(steps=10, rho=0.0), ValueError, "rho"),
        (lambda: Schedule.edm(), dict(steps=10, rho="7"), TypeError, "rho"),
        *[
            (mk, dict(steps=10, spacing=sp), ValueError, "spacing")
            for mk in (lambda: Schedule.vp_linear(), lambda: Schedule.edm(), lambda: Schedule.flow())
            for sp in ("leading", "trailing", "linspace")
        ],
        (lambda: Schedule.vp_discrete(), dict(steps=10.0), TypeError, "steps"),
        (lambda: Schedule.vp_discrete(), dict(steps="10"), TypeError, "steps"),
        (lambda: Schedule.vp_discrete(), dict(steps=True), TypeError, "steps"),
        (lambda: Schedule.vp_discrete(), dict(steps=None), TypeError, "steps"),
        (lambda: Schedule.vp_discrete(), dict(steps=10, steps_offset=-1), ValueError, "steps_offset"),
        (lambda: Schedule.vp_discrete(), dict(steps=10, steps_offset=1.0), TypeError, "steps_offset"),
        (lambda: Schedule.vp_discrete(), dict(steps=10, steps_offset=100), ValueError, "steps_offset"),
        # log-SNR or sigma/alpha infinite at an end: these spacings cannot be formed and say so
        (lambda: Schedule.flow(), dict(steps=10, spacing="logsnr"), ValueError, "logsnr"),
        (lambda: Schedule.flow(), dict(steps=10, spacing="karras"), ValueError, "karras"),
        (
            lambda: Schedule.vp_discrete(rescale_zero_terminal_snr=True),
            dict(steps=10, spacing="karras"),
            ValueError,
            "karras",
        ),
    ],
)
def test_grid_rejects_bad_arguments(make, kw, exc, match):
    with pytest.raises(exc, match=match):
        make().grid(**kw)


def test_steps_equal_num_train_timesteps_is_allowed(vp_discrete):
    g = vp_discrete.grid(1000, "trailing")
    np.testing.assert_array_equal(g.t, np.arange(999.0, -2.0, -1.0))
