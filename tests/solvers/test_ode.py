"""fastdiff.solvers.ode.solve_ivp_rk45 against closed-form solutions and scipy's RK45."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fastdiff.solvers.ode import ODESolverError, StepControl, Tolerances, solve_ivp_rk45

RATES = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)[:, None]


def decay(t: float, y: torch.Tensor) -> torch.Tensor:
    return -RATES * y


@pytest.mark.parametrize("tol", [1e-3, 1e-6, 1e-9])
def test_linear_decay_forward_matches_closed_form(tol):
    y0 = torch.ones(3, 4, dtype=torch.float64)
    sol = solve_ivp_rk45(decay, 0.0, 2.0, y0, tolerances=Tolerances(rtol=tol, atol=tol))
    exact = torch.exp(-2.0 * RATES).expand(3, 4)
    assert sol.t == 2.0
    assert (sol.y - exact).abs().max() < 20 * tol
    assert sol.nfe == 6 * (sol.steps + sol.rejected) + 2  # FSAL: 6 per attempt + first f + initial-step probe


def test_error_falls_with_tolerance_and_nfe_grows():
    y0 = torch.ones(3, 1, dtype=torch.float64)
    exact = torch.exp(-2.0 * RATES)
    errs, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7, 1e-9):
        sol = solve_ivp_rk45(decay, 0.0, 2.0, y0, tolerances=Tolerances(rtol=tol, atol=tol))
        errs.append(float((sol.y - exact).abs().max()))
        nfes.append(sol.nfe)
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert all(b > a for a, b in zip(nfes, nfes[1:])), nfes


def test_backward_in_time():
    y1 = torch.exp(-2.0 * RATES).expand(3, 2).clone()
    sol = solve_ivp_rk45(decay, 2.0, 0.0, y1, tolerances=Tolerances(rtol=1e-8, atol=1e-12))
    assert sol.t == 0.0
    torch.testing.assert_close(sol.y, torch.ones(3, 2, dtype=torch.float64), rtol=1e-6, atol=0)


def test_same_nfe_as_scipy_rk45():
    """Same tableau, controller and initial step as scipy's RK45: the same number of evaluations."""
    from scipy.integrate import solve_ivp

    y0 = torch.ones(1, 1, dtype=torch.float64)
    ours = solve_ivp_rk45(lambda t, y: -3.0 * y, 0.0, 2.0, y0, tolerances=Tolerances(rtol=1e-5, atol=1e-5))
    ref = solve_ivp(lambda t, y: -3.0 * y, (0.0, 2.0), [1.0], method="RK45", rtol=1e-5, atol=1e-5)
    assert abs(ours.nfe - ref.nfev) <= 6
    assert abs(float(ours.y) - ref.y[0, -1]) < 1e-5


def test_tuple_state_time_dependent_and_accumulator():
    """y' = cos(t) and L' = sum(y): a state plus a per-sample accumulator, as the likelihood ODE uses."""
    y0 = (torch.zeros(4, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    sol = solve_ivp_rk45(
        lambda t, y: (math.cos(t) * torch.ones_like(y[0]), y[0].sum(1)),
        0.0,
        1.0,
        y0,
        tolerances=Tolerances(rtol=1e-9, atol=1e-12),
    )
    y, acc = sol.y
    assert isinstance(sol.y, tuple)
    torch.testing.assert_close(y, torch.full((4, 3), math.sin(1.0), dtype=torch.float64), rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(
        acc, torch.full((4,), 3 * (1 - math.cos(1.0)), dtype=torch.float64), rtol=1e-8, atol=1e-10
    )


def test_float64_on_request_and_dtype_kept():
    y0 = torch.ones(2, 3)
    assert solve_ivp_rk45(lambda t, y: -y, 0.0, 1.0, y0).y.dtype == torch.float32
    sol = solve_ivp_rk45(
        lambda t, y: -y, 0.0, 1.0, y0, dtype=torch.float64, tolerances=Tolerances(rtol=1e-10, atol=1e-12)
    )
    assert sol.y.dtype == torch.float64
    assert abs(float(sol.y[0, 0]) - math.exp(-1.0)) < 1e-9


def test_per_sample_norm_is_never_looser_than_global():
    """One stiff sample among many easy ones: 'sample' keeps its error within tolerance, so its error is
    no larger than under the 'global' (batch RMS) norm, and it takes at least as many steps."""
    k = torch.cat([torch.full((63, 1), 0.1), torch.full((1, 1), 8.0)]).to(torch.float64)
    y0 = torch.ones(64, 1, dtype=torch.float64)
    exact = torch.exp(-k)
    res = {}
    for norm in ("sample", "global"):
        sol = solve_ivp_rk45(lambda t, y: -k * y, 0.0, 1.0, y0, tolerances=Tolerances(rtol=1e-4, atol=1e-7), norm=norm)
        res[norm] = (float((sol.y - exact).abs()[-1]), sol.nfe)
    assert res["sample"][0] <= res["global"][0]
    assert res["sample"][1] >= res["global"][1]


def test_zero_span_returns_y0():
    y0 = torch.randn(2, 2)
    sol = solve_ivp_rk45(decay, 0.5, 0.5, y0)
    assert sol.nfe == 0 and torch.equal(sol.y, y0)


def test_max_steps_raises():
    with pytest.raises(ODESolverError, match="max_steps"):
        solve_ivp_rk45(
            lambda t, y: -1000.0 * y,
            0.0,
            10.0,
            torch.ones(1, 1, dtype=torch.float64),
            tolerances=Tolerances(rtol=1e-10, atol=1e-12, max_steps=5),
        )


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(tolerances=Tolerances(rtol=-1.0)), "rtol"),
        (dict(tolerances=Tolerances(atol=float("nan"))), "atol"),
        (dict(tolerances=Tolerances(max_steps=0)), "max_steps"),
        (dict(norm="l2"), "norm"),
        (dict(first_step=0.0), "first_step"),
        (dict(dtype=torch.int32), "dtype"),
        (dict(control=StepControl(safety=1.5)), "safety"),
        (dict(control=StepControl(min_factor=0.0)), "min_factor"),
    ],
)
def test_bad_arguments_name_themselves(kwargs, name):
    with pytest.raises(ValueError, match=name):
        solve_ivp_rk45(decay, 0.0, 1.0, torch.ones(3, 1, dtype=torch.float64), **kwargs)


def test_settings_objects_of_the_wrong_type_are_type_errors():
    with pytest.raises(TypeError, match="tolerances"):
        solve_ivp_rk45(decay, 0.0, 1.0, torch.ones(3, 1, dtype=torch.float64), tolerances=1e-5)
    with pytest.raises(TypeError, match="control"):
        solve_ivp_rk45(decay, 0.0, 1.0, torch.ones(3, 1, dtype=torch.float64), control=(0.9, 0.2, 10.0))


def test_step_control_changes_the_steps_not_the_answer():
    y0 = torch.ones(3, 1, dtype=torch.float64)
    tol = Tolerances(rtol=1e-8, atol=1e-10)
    default = solve_ivp_rk45(decay, 0.0, 2.0, y0, tolerances=tol)
    cautious = solve_ivp_rk45(decay, 0.0, 2.0, y0, tolerances=tol, control=StepControl(safety=0.5, max_factor=2.0))
    assert cautious.steps > default.steps
    torch.testing.assert_close(cautious.y, default.y, rtol=1e-7, atol=0)


def test_bad_state_and_rhs():
    with pytest.raises(ValueError, match="y0"):
        solve_ivp_rk45(decay, 0.0, 1.0, torch.tensor(1.0))
    with pytest.raises(ValueError, match="batch size"):
        solve_ivp_rk45(lambda t, y: y, 0.0, 1.0, (torch.ones(2, 1), torch.ones(3)))
    with pytest.raises(ValueError, match="structure and shapes"):
        solve_ivp_rk45(lambda t, y: y[:, :1], 0.0, 1.0, torch.ones(2, 2))


def test_nonfinite_rhs_raises():
    with pytest.raises(ODESolverError):
        solve_ivp_rk45(lambda t, y: torch.full_like(y, float("nan")), 0.0, 1.0, torch.ones(2, 2))


def test_matches_scipy_on_a_nonlinear_problem():
    """Van der Pol (mu = 1), batched over initial conditions, against scipy at tight tolerance."""
    from scipy.integrate import solve_ivp

    y0 = torch.tensor([[2.0, 0.0], [0.5, -1.0], [-1.0, 1.0]], dtype=torch.float64)

    def vdp(t, y):
        return torch.stack([y[:, 1], (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], dim=1)

    sol = solve_ivp_rk45(vdp, 0.0, 5.0, y0, tolerances=Tolerances(rtol=1e-10, atol=1e-10))
    for i in range(3):
        ref = solve_ivp(
            lambda t, y: [y[1], (1 - y[0] ** 2) * y[1] - y[0]],
            (0, 5),
            y0[i].numpy(),
            rtol=1e-12,
            atol=1e-12,
            method="DOP853",
        )
        np.testing.assert_allclose(sol.y[i].numpy(), ref.y[:, -1], rtol=0, atol=1e-7)


def test_nonfinite_midway_shrinks_then_raises():
    """A right-hand side that blows up at t > 0.5: steps are rejected down to underflow, then it raises."""

    def f(t, y):
        return y * (float("inf") if t > 0.5 else 1.0)

    with pytest.raises(ODESolverError):
        solve_ivp_rk45(f, 0.0, 1.0, torch.ones(2, 2, dtype=torch.float64))
