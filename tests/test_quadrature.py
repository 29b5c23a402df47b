"""The quadrature behind Schedule.from_beta_function, on beta(t) with a known integral.

beta(t) = 0.1 + 19.9 t^2 + sin(3t) has int_0^t beta = 0.1 t + 19.9 t^3 / 3 + (1 - cos 3t) / 3,
beta'' = 39.8 - 9 sin(3t) (so max|beta''| = 39.8 on [0, 1], where sin(3t) >= 0) and
|beta'''| = |27 cos(3t)| <= 27.
"""

from __future__ import annotations

import numpy as np
import pytest

from fastdiff import Schedule
from fastdiff.schedule import trapezoid_error_bound

M2 = 39.8  # max |beta''| on [0, 1]
M3 = 27.0  # max |beta'''|


def beta(t):
    return 0.1 + 19.9 * t**2 + np.sin(3 * t)


def beta_integral(t):
    return 0.1 * t + 19.9 * t**3 / 3 + (1 - np.cos(3 * t)) / 3


def uniform(n):
    return np.linspace(0.0, 1.0, n)


def squared(n):  # fine near 0, coarse near 1: h_max = 2 h
    return np.linspace(0.0, 1.0, n) ** 2


def sqrt_(n):  # coarse near 0, fine near 1
    return np.sqrt(np.linspace(0.0, 1.0, n))


def jittered(n):
    u = np.linspace(0.0, 1.0, n)
    u[1:-1] += np.random.default_rng(n).uniform(-0.3, 0.3, n - 2) / (n - 1)
    return u


GRIDS = {"uniform": uniform, "squared": squared, "sqrt": sqrt_, "jittered": jittered}
SIZES = [11, 21, 41, 81, 161, 321]


def _log_abar_error(t):
    sch = Schedule.from_beta_function(t, beta(t))
    log_abar = 2 * np.log(sch.alpha(t))  # alpha = sqrt(abar)
    return np.abs(log_abar + beta_integral(t))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("kind", list(GRIDS))
def test_error_under_stated_bound(kind, n):
    t = GRIDS[kind](n)
    err = _log_abar_error(t)
    bound = trapezoid_error_bound(t, M2)
    h_max = np.max(np.diff(t))
    # the bound's formula, stated in quadrature.cpp and from_beta_function's docstring
    assert bound == pytest.approx((t[-1] - t[0]) * h_max**2 * M2 / 12, rel=1e-14)
    assert np.all(err <= bound)
    # and pointwise: the error accumulated up to t_k is at most t_k h_max^2 M2 / 12
    assert np.all(err <= t * h_max**2 * M2 / 12 + 1e-15)
    # The bound is not vacuous: beta'' > 0, so the rule overestimates on every interval, and the error
    # is the classical leading term sum h^3 beta''(midpoint) / 12 (to O(h^4)).
    h = np.diff(t)
    leading = np.cumsum(h**3 * (39.8 - 9 * np.sin(3 * (t[:-1] + h / 2))) / 12)
    np.testing.assert_allclose(err[1:], leading, rtol=0.02, atol=1e-15)
    if kind == "uniform":
        assert err[-1] > 0.7 * bound


# (Not "sqrt": there h_max = sqrt(1/(n-1)) sits in the first interval alone, so h_max does not halve.)
@pytest.mark.parametrize("kind", ["uniform", "squared"])
def test_error_shrinks_like_h_squared(kind):
    errs = np.array([_log_abar_error(GRIDS[kind](n))[-1] for n in SIZES])
    # sizes are 10 * 2^k + 1, so h halves from one to the next: the error falls by ~4
    ratios = errs[:-1] / errs[1:]
    assert np.all((ratios > 3.7) & (ratios < 4.3)), ratios
    # fit log err = p log h + c
    p = np.polyfit(np.log(1.0 / (np.array(SIZES) - 1)), np.log(errs), 1)[0]
    assert p == pytest.approx(2.0, abs=0.05)


@pytest.mark.parametrize("n", [11, 41, 161])
@pytest.mark.parametrize("kind", ["uniform", "jittered"])
def test_between_grid_points(kind, n):
    """Between grid points the integral is read by cubic Hermite interpolation with beta as slope: the
    error there is at most the larger node error plus the interpolation error h^4 max|beta''''of B| / 384
    = h^4 max|beta'''| / 384."""
    t = GRIDS[kind](n)
    sch = Schedule.from_beta_function(t, beta(t))
    mid = np.concatenate([0.5 * (t[1:-1] + t[2:]), t[1:-1] + 0.2 * np.diff(t)[1:]])
    err = np.abs(2 * np.log(sch.alpha(mid)) + beta_integral(mid))
    h_max = np.max(np.diff(t))
    assert np.all(err <= trapezoid_error_bound(t, M2) + h_max**4 * M3 / 384 + 1e-15)


@pytest.mark.parametrize("kind", list(GRIDS))
def test_drift_and_g2_use_the_given_beta(kind):
    """At grid points g^2 = beta and the drift coefficient is -beta/2 exactly as given."""
    t = GRIDS[kind](41)
    sch = Schedule.from_beta_function(t, beta(t))
    np.testing.assert_allclose(sch.g2(t[1:]), beta(t[1:]), rtol=1e-14)
    np.testing.assert_allclose(sch.drift_coef(t[1:]), -beta(t[1:]) / 2, rtol=1e-14)
    assert sch.t_min == t[1] and sch.t_max == 1.0 and sch.kind == "vp_tabulated"


@pytest.mark.parametrize("n", [2, 5, 101])
@pytest.mark.parametrize("kind", ["uniform", "jittered", "squared"])
def test_linear_beta_is_exact(kind, n):
    """For linear beta the trapezoid rule is exact and the Hermite cubic reproduces the quadratic
    integral: the tabulated schedule equals vp_linear (and its closed form) everywhere, to 1e-12."""
    t = GRIDS[kind](n)
    bmin, bmax = 0.1, 20.0
    tab = Schedule.from_beta_function(t, bmin + (bmax - bmin) * t)
    ref = Schedule.vp_linear(bmin, bmax, t_eps=1e-3)
    x = np.linspace(max(t[1], 1e-3), 1.0, 257)
    B = bmin * x + (bmax - bmin) * x**2 / 2
    np.testing.assert_allclose(tab.alpha(x), np.exp(-B / 2), rtol=1e-12)
    for q in ("alpha", "sigma", "log_snr", "drift_coef", "g2"):
        np.testing.assert_allclose(getattr(tab, q)(x), getattr(ref, q)(x), rtol=1e-12, atol=1e-12, err_msg=q)


def test_bound_argument_checks():
    with pytest.raises(ValueError, match="t"):
        trapezoid_error_bound([], 1.0)
    with pytest.raises(ValueError, match="t"):
        trapezoid_error_bound([0.0, float("nan")], 1.0)
